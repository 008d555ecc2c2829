"""Launch settings of the Triton kernels: a small static table, no autotuning.

Autotuning would time kernels at the first call (slow, and impossible in the interpreter or
under CUDA-graph capture), so settings come from this table, keyed by the input dtype and the
padded rank. The GPU entries are first estimates sized for Hopper (H100/H200) from the byte
model in ``benchmarks/README.md``; ``benchmarks/sweep_kernel_configs.py`` times candidates on a
GPU and prints a replacement table to commit here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["KernelConfig", "INTERPRETER", "lookup"]


@dataclass(frozen=True)
class KernelConfig:
    """Block sizes and launch settings shared by one call's kernels.

    Attributes:
        block_m: rows per tile of the shrink, the expands and the split reductions.
        block_k: step along ``d_in`` of the forward shrink.
        block_n: column tile of the expands and of the ``dA`` pass over ``X``.
        dy_block_n: column tile of the pass over ``dY`` (``G`` and ``dB``). Each tile leaves one
            fp32 partial of ``G`` ``[T, R_PAD]`` to be summed, so wider tiles move fewer bytes.
        chunk: rows of one client that one weight-gradient program sums before its result is
            either final (the client has one chunk) or an fp32 partial (more chunks).
        num_warps, num_stages: Triton launch settings.
    """

    block_m: int
    block_k: int
    block_n: int
    dy_block_n: int
    chunk: int
    num_warps: int
    num_stages: int


# The interpreter runs one program at a time: few, large blocks are fastest there. The chunk is
# small so that the tests' clients (tens to hundreds of rows) exercise the multi-chunk path.
INTERPRETER = KernelConfig(block_m=32, block_k=64, block_n=64, dy_block_n=32, chunk=64, num_warps=4, num_stages=1)

# (dtype, padded rank) -> settings. Half-precision tiles: 16-byte vector loads need 8 contiguous
# elements, every block here is a multiple of 64 along contiguous dimensions.
_GPU = {
    ("half", 16): KernelConfig(64, 128, 128, 256, 512, 8, 3),
    ("half", 32): KernelConfig(64, 128, 128, 256, 512, 8, 3),
    ("half", 64): KernelConfig(64, 64, 64, 128, 512, 8, 3),
    ("half", 128): KernelConfig(32, 64, 32, 64, 512, 4, 2),
    ("float", 16): KernelConfig(64, 64, 64, 128, 512, 8, 3),
    ("float", 32): KernelConfig(64, 64, 64, 128, 512, 8, 3),
    ("float", 64): KernelConfig(32, 64, 64, 64, 512, 4, 2),
    ("float", 128): KernelConfig(32, 32, 32, 32, 512, 4, 2),
}


def lookup(dtype: torch.dtype, r_pad: int, interpreting: bool) -> KernelConfig:
    """Settings for inputs of ``dtype`` and a padded rank ``r_pad`` (a power of two >= 16)."""
    if interpreting:
        return INTERPRETER
    family = "float" if dtype == torch.float32 else "half"
    return _GPU[(family, min(max(r_pad, 16), 128))]
