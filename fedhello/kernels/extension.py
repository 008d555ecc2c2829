"""Loading and building the csrc extensions behind the compiled backends ("cpu", "cuda").

``setup.py`` builds ``fedhello._C_cpu`` (C++/OpenMP) wherever a C++ compiler is present and
``fedhello._C_cuda`` where torch has CUDA and nvcc is found. When ``fedhello._C_cpu`` was not
built at install time (a plain ``pip install -e .`` with build isolation), the first use builds
it from ``csrc/`` with ``torch.utils.cpp_extension.load`` into the fedhello cache folder
(``$FEDHELLO_CACHE`` or ``~/.cache/fedhello``; about a minute once, then loaded from there), if a
C++ compiler is found and ``FEDHELLO_BUILD_EXT`` is not ``0``. The CUDA extension takes minutes
to compile, so a first use never starts that build: ``python -m fedhello.kernels.extension build
cuda`` (or ``build("cuda")``) builds it once into the same cache folder, from where later uses load
it (how ``benchmarks/gpu_check.sh`` gets it on a machine where nothing is installed).
``backend(device_type)`` returns the ``CompiledBackend`` (``backends/compiled.py``) over that
extension, or ``None`` when it is not available; ``load_error(device_type)`` says why.
"""

from __future__ import annotations

import importlib
import os
import shutil
import sys
from pathlib import Path
from types import ModuleType

import torch

from .backends.compiled import CompiledBackend

__all__ = ["DEVICE_TYPES", "backend", "build", "load_error"]

DEVICE_TYPES = ("cpu", "cuda")
_NATIVE_MODULES = {"cpu": "fedhello._C_cpu", "cuda": "fedhello._C_cuda"}
_cache: dict[str, "CompiledBackend | None"] = {}
_errors: dict[str, str] = {}


def _check_device_type(device_type: object) -> str:
    if not isinstance(device_type, str):
        raise TypeError(f"device_type: expected one of {DEVICE_TYPES}, got {type(device_type).__name__}")
    if device_type not in DEVICE_TYPES:
        raise ValueError(f"device_type: expected one of {DEVICE_TYPES}, got {device_type!r}")
    return device_type


_CSRC = Path(__file__).resolve().parents[2] / "csrc"  # present in a source checkout (editable install)
_JIT_SOURCES = {
    "cpu": ["cpu/multi_lora_cpu.cpp", "cpu/shrink_expand.cpp", "cpu/weight_grad.cpp"],
    "cuda": ["cuda/multi_lora_cuda.cpp", "cuda/multi_lora_kernels.cu", "cuda/shrink_expand.cu", "cuda/weight_grad.cu"],
}


def _build_dir(device_type: str) -> Path:
    """Cache folder of the ``device_type`` build for this torch and Python."""
    from fedhello.cache import cache_dir

    tag = f"torch{torch.__version__}-py{sys.version_info.major}{sys.version_info.minor}".replace("+", "_")
    return cache_dir() / "extensions" / tag / device_type


def _library(device_type: str) -> Path:
    """The shared library ``cpp_extension.load`` leaves in the build folder."""
    return _build_dir(device_type) / f"fedhello_C_{device_type}.so"


def build(device_type: str) -> ModuleType:
    """Compile the ``device_type`` extension from ``csrc/`` into the cache folder and import it.

    ``cpp_extension.load`` keys its build by the sources and flags, so a later call with nothing
    changed loads the cached library in about a second. The CPU build takes about a minute; the
    CUDA one minutes (nvcc, for the visible GPUs' architectures or ``TORCH_CUDA_ARCH_LIST``;
    ``MAX_JOBS`` caps the parallel compiles). Raises ``ImportError`` (with the reason) when the
    sources, a compiler, a CUDA build of torch or the permission to build are missing, or the
    build fails.
    """
    device_type = _check_device_type(device_type)
    if os.environ.get("FEDHELLO_BUILD_EXT", "1").strip().lower() in ("0", "false", "no", "off"):
        raise ImportError("FEDHELLO_BUILD_EXT=0: not building it")
    sources = [_CSRC / name for name in _JIT_SOURCES[device_type]]
    if not all(path.is_file() for path in sources):
        raise ImportError(f"its sources are not in {_CSRC} (install from a source checkout to build it)")
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        raise ImportError("no C++ compiler found to build it (set CXX or install g++)")
    from torch.utils import cpp_extension

    if device_type == "cuda":
        if torch.version.cuda is None:
            raise ImportError(f"torch {torch.__version__} is a CPU build: the cuda extension needs a CUDA build")
        if cpp_extension.CUDA_HOME is None:
            raise ImportError("nvcc not found (set CUDA_HOME)")
        flags = {"extra_cflags": ["-O3"], "extra_cuda_cflags": ["-O3", "-std=c++17"]}
    else:
        openmp = [] if sys.platform == "darwin" else ["-fopenmp"]  # as setup.py: Apple clang has no OpenMP
        flags = {"extra_cflags": ["-O3", "-ffp-contract=fast", "-Wno-psabi", *openmp], "extra_ldflags": openmp}
    build_dir = _build_dir(device_type)
    build_dir.mkdir(parents=True, exist_ok=True)
    if not _library(device_type).exists():
        took = "minutes" if device_type == "cuda" else "about a minute"
        print(f"fedhello: building the csrc {device_type} extension once into {build_dir} ({took})",
              file=sys.stderr, flush=True)
    try:
        return cpp_extension.load(name=f"fedhello_C_{device_type}", sources=[str(p) for p in sources],
                                  build_directory=str(build_dir), verbose=False, **flags)
    except Exception as err:  # a toolchain failure leaves the pure-Python backends working
        raise ImportError(f"building it failed: {type(err).__name__}: {err}") from err


def _build_on_first_use(device_type: str) -> ModuleType:
    """``build(device_type)`` when a first kernel call may build it: always for the CPU extension
    (about a minute), for the CUDA one only once it has been built explicitly (it takes minutes)."""
    if device_type == "cuda" and not _library("cuda").exists():
        raise ImportError("the cuda extension takes minutes to build, so it is built only on request: at "
                          "install time (pip install --no-build-isolation -e .) or once with "
                          "`python -m fedhello.kernels.extension build cuda`")
    return build(device_type)


def backend(device_type: str) -> CompiledBackend | None:
    """The compiled backend for ``"cpu"`` or ``"cuda"`` tensors (built on first use where it can be),
    or ``None`` when it is not available.

    Raises:
        TypeError / ValueError: ``device_type`` is not one of ``DEVICE_TYPES``.
    """
    device_type = _check_device_type(device_type)
    if device_type not in _cache:
        try:
            native = importlib.import_module(_NATIVE_MODULES[device_type])
        except (ImportError, OSError) as err:  # not built at install time, or built against another torch
            try:
                native = _build_on_first_use(device_type)
            except ImportError as build_err:
                _errors[device_type] = f"{type(err).__name__}: {err}; {build_err}"
                _cache[device_type] = None
                return None
        _cache[device_type] = CompiledBackend(device_type, native)
    return _cache[device_type]


def load_error(device_type: str) -> str | None:
    """Why ``backend(device_type)`` is ``None`` (the import error), or ``None`` when it loads."""
    device_type = _check_device_type(device_type)
    backend(device_type)
    return _errors.get(device_type)


def main(argv: list[str] | None = None) -> int:
    """``python -m fedhello.kernels.extension build {cpu,cuda}``: build (or load the cached build of)
    one extension into the cache folder; exit status 1 with the reason when it cannot."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m fedhello.kernels.extension",
                                     description="Build a csrc extension into the fedhello cache folder.")
    parser.add_argument("command", choices=["build"])
    parser.add_argument("device_type", choices=DEVICE_TYPES)
    args = parser.parse_args(argv)
    try:
        native = build(args.device_type)
    except ImportError as err:
        print(f"fedhello: the {args.device_type} extension was not built: {err}", file=sys.stderr)
        return 1
    print(f"fedhello: {args.device_type} extension ready: {getattr(native, '__file__', native.__name__)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
