"""Loading backbones and tokenizers by hub name, local path or offline alias.

``load_backbone("all-MiniLM-L6-v2", num_labels=5)`` reads the offline asset package;
``load_backbone("bert-base-uncased", num_labels=2)`` goes to the Hugging Face hub (online users);
``load_backbone("/path/to/model")`` reads a local folder. Aliases of the offline assets
(case-insensitive):

* ``minilm``, ``all-MiniLM-L6-v2``, ``sentence-transformers/all-MiniLM-L6-v2``;
* ``smollm2``, ``SmolLM2-135M-Instruct``, ``HuggingFaceTB/SmolLM2-135M-Instruct``;
* ``mpnet``, ``all-mpnet-base-v2``, ``sentence-transformers/all-mpnet-base-v2``.

The full hub names fall back to the hub when the asset package is not installed; the short
ones raise ``MissingAssetError`` naming the pip command. ``check_backbone_name`` checks a name
in a fraction of a second (no torch import) and fails in one line when it cannot load offline.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from fedhello.errors import UserError
from fedhello.hub import hub_problem, looks_like_hub_id

from .assets import MissingAssetError, minilm_path, mpnet_path, smollm2_path

# torch and transformers are imported where used: checking a config's model name must not wait
# for them (seconds).

__all__ = ["TASKS", "check_backbone_name", "offline_aliases", "resolve_backbone", "load_backbone", "load_tokenizer"]

logger = logging.getLogger(__name__)

TASKS = ("sequence-classification", "causal-lm", "feature-extraction", "image-classification")

_ALIASES: dict[str, tuple[Callable[[], Path], bool]] = {
    # alias -> (offline path, whether the hub may serve it when the package is missing)
    "minilm": (minilm_path, False),
    "all-minilm-l6-v2": (minilm_path, False),
    "sentence-transformers/all-minilm-l6-v2": (minilm_path, True),
    "smollm2": (smollm2_path, False),
    "smollm2-135m-instruct": (smollm2_path, False),
    "huggingfacetb/smollm2-135m-instruct": (smollm2_path, True),
    "mpnet": (mpnet_path, False),
    "all-mpnet-base-v2": (mpnet_path, False),
    "sentence-transformers/all-mpnet-base-v2": (mpnet_path, True),
}


def resolve_backbone(name_or_path: str | Path) -> str:
    """The local folder of an offline alias, else ``name_or_path`` unchanged (a hub name or a path)."""
    if not isinstance(name_or_path, (str, Path)):
        raise TypeError(f"name_or_path: expected a hub name or a path, got {type(name_or_path).__name__}")
    text = str(name_or_path)
    local = os.path.expanduser(text)  # "~/models/x" as check_backbone_name accepts it
    if Path(local).exists():
        return local
    alias = _ALIASES.get(text.lower())
    if alias is None:
        return text
    locate, hub_fallback = alias
    try:
        return str(locate())
    except MissingAssetError:
        if hub_fallback:
            return text
        raise


def offline_aliases() -> list[str]:
    """The names (case-insensitive) that load an offline asset package instead of going to the hub."""
    return sorted(_ALIASES)


def check_backbone_name(name: str, field: str = "model.name") -> None:
    """Check that ``name`` can load now, without loading it (no torch import, at most one quick probe).

    Accepted: an existing local folder with a ``config.json``, an offline alias
    (``offline_aliases()``; a missing asset package is reported by ``MissingAssetError`` when it
    loads), or a hub id while the hub is reachable or holds it in the local cache.

    Raises:
        UserError: starting with ``field``, saying what is wrong and how to use a local folder.
    """
    if not isinstance(name, (str, Path)):
        raise TypeError(f"name: expected a hub name or a path, got {type(name).__name__}")
    text = str(name)
    local = Path(os.path.expanduser(text))
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise UserError(f"{field}: the folder {text!r} has no config.json; expected a transformers model "
                            f"folder (config.json, weights, tokenizer files)")
        return
    if text.lower() in _ALIASES:
        return
    aliases = ", ".join(offline_aliases())
    folder = f"or set {field} to a local folder holding config.json and the weights"
    if local.exists() or not looks_like_hub_id(text):
        raise UserError(f"{field}: {text!r} is not a model folder, an offline alias ({aliases}) or a hub id; "
                        f"use an offline alias {folder}")
    problem = hub_problem(text, "model")
    if problem is not None:
        raise UserError(f"{field}: {text!r} is not a local folder or an offline alias ({aliases}), and {problem}; "
                        f"use an offline alias {folder}")


def _auto_class(task: str):
    import transformers

    classes = {
        "sequence-classification": transformers.AutoModelForSequenceClassification,
        "causal-lm": transformers.AutoModelForCausalLM,
        "feature-extraction": transformers.AutoModel,
        "image-classification": transformers.AutoModelForImageClassification,
    }
    if task not in classes:
        raise ValueError(f"task: expected one of {TASKS}, got {task!r}")
    return classes[task]


def load_tokenizer(name_or_path: str | Path, **kwargs):
    """The tokenizer of a backbone, with a padding token (the EOS token when the model has none).

    Args:
        name_or_path: hub name, local folder or offline alias (see module doc).
        kwargs: passed to ``AutoTokenizer.from_pretrained``.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_backbone(name_or_path), **kwargs)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@contextmanager
def _seeded(seed: int | None) -> Iterator[None]:
    """Seed torch's global RNG for the block (weights ``from_pretrained`` creates draw from it)
    and restore the caller's RNG state afterwards."""
    import torch

    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _report_loading(model, path: str, info: dict) -> None:
    """One log line for a new head, a warning for anything else that did not load cleanly."""
    prefix = f"{model.base_model_prefix}."
    missing = info.get("missing_keys", [])
    new_head = [k for k in missing if not k.startswith(prefix)]
    if new_head:
        logger.info("%s: new, randomly initialised head weights %s", path, sorted(new_head))
    # A checkpoint tensor of a component the task model leaves out (MPNet's classifier is built
    # without the pooler: its attribute is None) is expected, not a loading problem.
    unexpected = info.get("unexpected_keys", [])
    unused = [k for k in unexpected if getattr(model.base_model, k.removeprefix(prefix).split(".", 1)[0], 0) is None]
    if unused:
        logger.info("%s: checkpoint tensors of components this task does not use: %s", path, sorted(unused))
    problems = {name: sorted(keys) for name, keys in (
        ("missing", [k for k in missing if k.startswith(prefix)]),
        ("unexpected", [k for k in unexpected if k not in unused]),
        ("mismatched", [k[0] if isinstance(k, tuple) else k for k in info.get("mismatched_keys", [])]),
    ) if keys}
    if problems:
        logger.warning("%s: weights that did not load cleanly: %s", path, problems)


def load_backbone(
    name_or_path: str | Path,
    task: str = "sequence-classification",
    num_labels: int | None = None,
    seed: int | None = None,
    *,
    quantize: str = "none",
    compute_dtype=None,
    device=None,
    **kwargs,
):
    """A ``transformers`` model for ``task``, in eval mode, optionally with a quantized base.

    Args:
        name_or_path: hub name, local folder or offline alias (see module doc).
        task: "sequence-classification" (``AutoModelForSequenceClassification``; the head is new
            and randomly initialised when the checkpoint has none), "causal-lm",
            "feature-extraction" (``AutoModel``) or "image-classification".
        num_labels: number of classes of a classification head.
        seed: seeds the initialisation of weights the checkpoint lacks (a new head), so that
            two loads give the same model; ``None`` draws from torch's global RNG.
        quantize: ``"none"``, or ``"nf4"`` / ``"fp4"`` / ``"int8"``: the linear layers of the
            blocks become frozen bitsandbytes layers (``fedhello.models.quantize``; embeddings,
            norms and heads stay), the way QLoRA loads a base.
        compute_dtype: what 4-bit layers multiply in (default float32).
        device: where the model goes before it is quantized (bitsandbytes quantizes on the
            weight's device); default: where ``from_pretrained`` puts it.
        kwargs: passed to ``from_pretrained`` (``dtype``, ``revision``, ``local_files_only``, ...).

    A new head is logged at INFO level (``fedhello.models``) instead of transformers' load
    report; other missing, unexpected or mismatched weights are logged as a warning.

    For sequence classification, a model without ``pad_token_id`` (LLaMA, GPT-2: their heads
    read the last non-padding token) gets the tokenizer's padding token id.
    """
    from transformers.utils import logging as transformers_logging

    auto = _auto_class(task)
    if num_labels is not None:
        if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 1:
            raise ValueError(f"num_labels: expected an int >= 1, got {num_labels!r}")
        if task not in ("sequence-classification", "image-classification"):
            raise ValueError(f"num_labels: only for classification tasks, got task {task!r}")
        kwargs["num_labels"] = num_labels
        # A checkpoint with a head of another size (an ImageNet ViT, a fine-tuned classifier) gets a
        # new head of num_labels classes, reported by _report_loading, instead of a load error.
        kwargs.setdefault("ignore_mismatched_sizes", True)
    path = resolve_backbone(name_or_path)
    verbosity, bar_was_on = transformers_logging.get_verbosity(), transformers_logging.is_progress_bar_enabled()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    try:
        with _seeded(seed):
            model, info = auto.from_pretrained(path, output_loading_info=True, **kwargs)
    finally:
        transformers_logging.set_verbosity(verbosity)
        if bar_was_on:
            transformers_logging.enable_progress_bar()
    _report_loading(model, path, info)
    if task == "sequence-classification" and getattr(model.config, "pad_token_id", None) is None:
        tokenizer = load_tokenizer(path)
        model.config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    if device is not None:
        model.to(device)
    if quantize != "none":
        import torch

        from .quantize import quantize_backbone

        quantize_backbone(model, quantize, compute_dtype or torch.float32, field="quantize")
    return model
