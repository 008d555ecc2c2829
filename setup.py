"""Packaging entry point. Metadata lives in pyproject.toml; this file only adds the
optional compiled backends from csrc/ (see fedhello/kernels/extension.py):

* ``fedhello._C_cpu``: C++/OpenMP kernels, built wherever torch and a C++ compiler are present;
* ``fedhello._C_cuda``: CUDA kernels, built when torch is a CUDA build and nvcc is found.

Both need torch at build time, so install without build isolation (see README):
``pip install torch==2.13.0 && pip install --no-build-isolation -e ".[test]"``.
A missing or failing toolchain never fails the install: the extension is skipped with a
message and the pure-Python backends ("torch", "triton") keep working.

Environment: ``FEDHELLO_BUILD_EXT=0`` skips both extensions, ``FEDHELLO_BUILD_CUDA=0`` only
the CUDA one; ``TORCH_CUDA_ARCH_LIST`` picks GPU architectures (default: the visible GPUs,
or "8.0;9.0+PTX" when none is visible).
"""

from __future__ import annotations

import os
import shutil
import sys

from setuptools import setup

CPU_SOURCES = ["csrc/cpu/multi_lora_cpu.cpp", "csrc/cpu/shrink_expand.cpp", "csrc/cpu/weight_grad.cpp"]
CUDA_SOURCES = [
    "csrc/cuda/multi_lora_cuda.cpp",
    "csrc/cuda/multi_lora_kernels.cu",
    "csrc/cuda/shrink_expand.cu",
    "csrc/cuda/weight_grad.cu",
]
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"


def _say(message: str) -> None:
    print(f"fedhello setup: {message}", file=sys.stderr, flush=True)


def _enabled(name: str) -> bool:
    return os.environ.get(name, "1").strip().lower() not in ("0", "false", "no", "off")


def _cxx_compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "c++"))


def _cpu_flags() -> dict[str, list[str]]:
    # -ffp-contract=fast: ISO C++ modes turn FMA contraction off, and the micro-kernels rely on it.
    # -Wno-psabi: wide vector types in the AVX-512/AVX2 variants (all inlined; no ABI crosses).
    cxx = ["-O3", "-ffp-contract=fast", "-Wno-psabi"]
    link: list[str] = []
    if sys.platform != "darwin":  # Apple clang has no -fopenmp; the kernels then run on one thread
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    return {"extra_compile_args": {"cxx": cxx}, "extra_link_args": link}


def _extensions() -> tuple[list, dict]:
    """The extensions this machine can build, and the build_ext command that builds them."""
    if not _enabled("FEDHELLO_BUILD_EXT"):
        _say("FEDHELLO_BUILD_EXT=0: skipping the csrc extensions (pure-Python backends only)")
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        _say(
            "torch is not importable at build time, so the csrc extensions are skipped "
            "(pure-Python backends only). Install torch first and build with "
            "pip install --no-build-isolation -e ."
        )
        return [], {}
    if _cxx_compiler() is None:
        _say("no C++ compiler found (set CXX or install g++): skipping the csrc extensions")
        return [], {}

    exts = [cpp_extension.CppExtension("fedhello._C_cpu", CPU_SOURCES, **_cpu_flags())]
    nvcc = os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc") if cpp_extension.CUDA_HOME else None
    if not _enabled("FEDHELLO_BUILD_CUDA"):
        _say("FEDHELLO_BUILD_CUDA=0: skipping the CUDA extension")
    elif torch.version.cuda is None:
        _say(f"torch {torch.__version__} is a CPU build: skipping the CUDA extension")
    elif nvcc is None or not os.path.exists(nvcc):
        _say("nvcc not found (set CUDA_HOME): skipping the CUDA extension")
    else:
        if "TORCH_CUDA_ARCH_LIST" not in os.environ and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS
        exts.append(
            cpp_extension.CUDAExtension(
                "fedhello._C_cuda",
                CUDA_SOURCES,
                extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-std=c++17"]},
            )
        )

    class OptionalBuildExt(cpp_extension.BuildExtension):
        """Builds each extension on its own; one that fails is reported and left out."""

        def build_extensions(self) -> None:
            wanted, built = list(self.extensions), []
            for ext in wanted:
                # torch's build_extensions patches the compiler object; undo it between runs.
                saved = (self.compiler.compile, self.compiler._compile, list(self.compiler.src_extensions))
                self.extensions = [ext]
                try:
                    super().build_extensions()
                except Exception as err:  # noqa: BLE001 - any toolchain failure must not fail the install
                    _say(f"building {ext.name} failed, continuing without it: {type(err).__name__}: {err}")
                else:
                    built.append(ext)
                    _say(f"built {ext.name}")
                finally:
                    self.compiler.compile, self.compiler._compile, self.compiler.src_extensions = saved
            self.extensions = built

    return exts, {"build_ext": OptionalBuildExt}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
