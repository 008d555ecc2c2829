"""PEFT LoRA checkpoints to and from a client slot.

A checkpoint is a folder with ``adapter_config.json`` and ``adapter_model.safetensors`` as
``peft`` writes them: for every wrapped module ``base_model.model.<module>.lora_A.weight``
``[r, d_in]`` and ``...lora_B.weight`` ``[d_out, r]``, and for every head (``modules_to_save``)
``base_model.model.<head>.weight`` / ``.bias``. ``peft.PeftModel.from_pretrained(base, folder)``
on the original (un-injected) model reproduces the client's outputs.

A client of rank ``r_c < r_max`` is exported at rank ``r_c`` (its first ``r_c`` rank slices,
``lora_alpha`` unchanged, so PEFT's scale ``alpha / r_c`` matches). Importing sets the slot's rank
to the checkpoint's ``r`` (which must be ``<= r_max``) and zero-pads the rest; when the
checkpoint's scale (``lora_alpha / r``, or ``/ sqrt(r)`` with rsLoRA) differs from the model's,
``lora_B`` is rescaled so that the adapter's contribution is unchanged.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .model import MultiLoRAModel

__all__ = ["export_peft", "import_peft", "CONFIG_NAME", "WEIGHTS_NAME"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_PREFIX = "base_model.model."


def export_peft(
    model: MultiLoRAModel,
    client: int | None,
    path: str | Path,
    *,
    state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write one client's adapters and heads as a PEFT LoRA checkpoint.

    Args:
        model: the multi-client model.
        client: the slot to export; or None together with ``state``.
        path: output folder (created).
        state: export this client state instead of the slot's (e.g. the server's global state,
            keys as in ``model.client_state``); at the slot's rank, or at r_max when ``client`` is None.

    Raises:
        ValueError: the slot has rank 0 (no adapter: PEFT's LoRA has no r = 0), or its scale differs
            across layers.

    Returns:
        the folder.
    """
    from peft import LoraConfig

    if not isinstance(model, MultiLoRAModel):
        raise TypeError(f"model: expected a MultiLoRAModel (inject_multi_lora), got {type(model).__name__}")
    if client is None and state is None:
        raise ValueError("client: expected a slot index, or None together with state=")
    if state is None:
        state = model.client_state(client)
    else:
        model.check_state(state, strict=True)
    rank = model.ranks[model.check_client(client)] if client is not None else model.max_rank
    if rank == 0:
        raise ValueError(f"client: slot {client} has rank 0 (no adapter); a PEFT LoRA checkpoint needs r >= 1 "
                         "(set_ranks the slot to its rank, or export another slot)")

    tensors: dict[str, torch.Tensor] = {}
    for name, _ in model.lora_modules:
        tensors[f"{_PREFIX}{name}.lora_A.weight"] = state[f"{name}.lora_a"][:rank].contiguous().cpu()
        tensors[f"{_PREFIX}{name}.lora_B.weight"] = state[f"{name}.lora_b"][:, :rank].contiguous().cpu()
    for key, _ in model.head_banks():
        tensors[_PREFIX + key] = state[key].contiguous().cpu()

    layers = [layer for _, layer in model.lora_modules]
    scale = model.scale_of(rank)
    if client is not None:
        # The scale the slot's forward really uses (its buffers, e.g. loaded by load_state_dict),
        # which must be one number across layers for PEFT's single lora_alpha.
        scales = {float(layer.scaling[model.check_client(client)]) for layer in layers}
        if len(scales) != 1:
            raise ValueError(f"client: slot {client} has different LoRA scales across layers {sorted(scales)}; "
                             "a PEFT config holds one lora_alpha")
        (scale,) = scales
    config = LoraConfig(
        task_type=_task_type(model.backbone),
        r=rank,
        lora_alpha=scale * rank,  # PEFT scales by lora_alpha / r
        lora_dropout=model.dropout,
        target_modules=[name for name, _ in model.lora_modules],
        modules_to_save=[name for name, _ in model.head_modules] or None,
        fan_in_fan_out=all(layer.conv1d for layer in layers),
        base_model_name_or_path=getattr(getattr(model.backbone, "config", None), "_name_or_path", None) or None,
        bias="none",
    )
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(folder))
    save_file(tensors, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
    return folder


# PEFT task types by the backbone's transformers class suffix (AutoPeftModel needs one to pick its
# class). Classifiers get none: PEFT's classification task types add their own modules_to_save
# ("classifier", "score"), which collide with the head modules this export names (an MPNet/RoBERTa
# classifier.dense + classifier.out_proj fails to load); PeftModel loads them all the same.
_TASK_TYPES = (("ForCausalLM", "CAUSAL_LM"), ("ForConditionalGeneration", "SEQ_2_SEQ_LM"),
               ("ForSeq2SeqLM", "SEQ_2_SEQ_LM"))


def _task_type(backbone: torch.nn.Module) -> str | None:
    name = type(backbone).__name__
    for suffix, task in _TASK_TYPES:
        if name.endswith(suffix):
            return task
    return "FEATURE_EXTRACTION" if name.endswith("Model") and "For" not in name else None


def _read_config(folder: Path, max_rank: int) -> tuple[int, float]:
    """(rank, scale) of a PEFT LoRA config, with every unsupported option rejected."""
    config_file = folder / CONFIG_NAME
    if not config_file.is_file() or not (folder / WEIGHTS_NAME).is_file():
        raise ValueError(f"path: expected a PEFT checkpoint folder with {CONFIG_NAME} and {WEIGHTS_NAME}, got {folder}")
    config = json.loads(config_file.read_text())
    if config.get("peft_type") != "LORA":
        raise ValueError(
            f"path: expected a LoRA checkpoint (peft_type 'LORA'), got peft_type {config.get('peft_type')!r}"
        )
    for option in ("use_dora", "lora_bias"):
        if config.get(option):
            raise ValueError(f"path: {option}=True checkpoints are not supported (plain LoRA only)")
    for option in ("rank_pattern", "alpha_pattern"):
        if config.get(option):
            raise ValueError(f"path: per-module {option} is not supported (one rank and alpha per client)")
    rank = config.get("r")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"path: expected an integer rank r >= 1 in {CONFIG_NAME}, got {rank!r}")
    if rank > max_rank:
        raise ValueError(f"path: checkpoint rank r={rank} exceeds the bank's r_max={max_rank} "
                         f"(inject with rank >= {rank})")
    alpha = float(config.get("lora_alpha", 8))
    scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    return rank, scale


@torch.no_grad()
def import_peft(model: MultiLoRAModel, client: int, path: str | Path) -> None:
    """Load a PEFT LoRA checkpoint into slot ``client`` (adapters, and heads it contains).

    The checkpoint must hold an adapter for exactly the modules this model wraps, with matching
    feature sizes; heads absent from it keep their current values.

    Raises:
        ValueError: not a LoRA checkpoint, rank above r_max, or tensors for another
            architecture or other target modules (missing, unexpected or wrongly shaped).
    """
    if not isinstance(model, MultiLoRAModel):
        raise TypeError(f"model: expected a MultiLoRAModel (inject_multi_lora), got {type(model).__name__}")
    client = model.check_client(client)
    folder = Path(path)
    rank, scale = _read_config(folder, model.max_rank)
    tensors = load_file(str(folder / WEIGHTS_NAME))
    arch = type(model.backbone).__name__

    lora = {name: layer for name, layer in model.lora_modules}
    heads = dict(model.head_banks())
    factors: dict[str, dict[str, torch.Tensor]] = {}
    others: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        short = key.removeprefix(_PREFIX)
        for part, factor in ((".lora_A.weight", "A"), (".lora_B.weight", "B")):
            if short.endswith(part):
                factors.setdefault(short[: -len(part)], {})[factor] = value
                break
        else:
            others[short] = value
    # Adapters first: a checkpoint of another architecture is reported by its adapter names.
    foreign = [module for module in factors if module not in lora]
    if foreign:
        raise ValueError(f"path: adapter for module {foreign[0]!r} does not exist in this {arch} "
                         "(a checkpoint of another architecture or other target modules)")
    state: dict[str, torch.Tensor] = {}
    for short, value in others.items():
        if short not in heads:
            raise ValueError(f"path: unexpected tensor {_PREFIX + short!r}: neither a LoRA factor of a wrapped "
                             f"module nor a head of this {arch}")
        expected = tuple(heads[short].shape[1:])
        if tuple(value.shape) != expected:
            raise ValueError(f"path: head tensor {_PREFIX + short!r} expected shape {expected}, "
                             f"got {tuple(value.shape)}")
        state[short] = value.to(torch.float32)

    missing = [name for name in lora if set(factors.get(name, {})) != {"A", "B"}]
    if missing:
        raise ValueError(f"path: checkpoint has no lora_A/lora_B for {missing[0]!r} ({len(missing)} wrapped modules "
                         f"missing; a checkpoint of another architecture or other target modules)")
    for name, layer in lora.items():
        a, b = factors[name]["A"], factors[name]["B"]
        if tuple(a.shape) != (rank, layer.in_features):
            raise ValueError(f"path: {name}.lora_A.weight expected shape (r, d_in) = {(rank, layer.in_features)}, "
                             f"got {tuple(a.shape)}")
        if tuple(b.shape) != (layer.out_features, rank):
            raise ValueError(f"path: {name}.lora_B.weight expected shape (d_out, r) = {(layer.out_features, rank)}, "
                             f"got {tuple(b.shape)}")
        padded_a = torch.zeros(model.max_rank, layer.in_features)
        padded_b = torch.zeros(layer.out_features, model.max_rank)
        padded_a[:rank] = a.to(torch.float32)
        padded_b[:, :rank] = b.to(torch.float32)
        ratio = scale / model.scale_of(rank)
        if ratio != 1.0:
            padded_b *= ratio
        state[f"{name}.lora_a"] = padded_a
        state[f"{name}.lora_b"] = padded_b
    model.set_ranks({client: rank})
    model.load_client_state(client, state, strict=False)
