"""Compiled backends (``backend="cpu"`` and ``backend="cuda"``): the csrc extensions behind ``contract.Backend``.

One class serves both names: the two extensions export the same two entry points
(``lora_forward``, ``lora_backward``), built from ``csrc/cpu`` and ``csrc/cuda``; ``extension.py``
loads (or builds) them and makes one ``CompiledBackend`` per device type.

Both keep the rank intermediate ``H`` and all accumulation in float32. The forward returns
``H`` (fp32 ``[T, r_max]``, rows in ``plan.sorted_rows`` order) for the backward to reuse.
Like the Triton backend, the compiled kernels *write* every row of ``out`` (``bias + LoRA``,
the bias added in fp32) and of ``dx`` (the LoRA share, zeros on rows without adapter) once,
without reading them, so both start as ``torch.empty`` and ``multi_lora.py`` adds the base
GEMMs into them with ``addmm_``.
"""

from __future__ import annotations

from types import ModuleType

import torch

from ..checks import ClientParams
from ..contract import Grads
from ..plan import LoRAPlan

__all__ = ["CompiledBackend"]


class CompiledBackend:
    """One compiled extension as a ``contract.Backend``.

    Attributes:
        NAME: ``"cpu"`` or ``"cuda"``, the device type of its tensors.
        DTYPES: the input dtypes the kernels take (float32, float16, bfloat16).
        FUSED_DROPOUT: ``False``: the caller masks ``x``.
        native: the pybind11 module with the kernels.
    """

    DTYPES = (torch.float32, torch.float16, torch.bfloat16)
    FUSED_DROPOUT = False

    def __init__(self, device_type: str, native: ModuleType) -> None:
        self.NAME = device_type
        self.native = native

    def __repr__(self) -> str:
        return f"CompiledBackend({self.NAME!r}, {self.native.__name__})"

    def _tiles(self, plan: LoRAPlan) -> tuple[torch.Tensor, ...]:
        # The CUDA kernels walk the plan's fixed-size (client, row-tile) list, with items for the
        # rows without adapter too (the expand writes them; the other kernels skip them); the
        # CPU ones build their own from the offsets.
        if self.NAME != "cuda":
            return ()
        tiles = plan.tiles(self.native.BLOCK_M, include_unrouted=True)
        return tiles.tile_client, tiles.tile_start

    def saved_shape(self, rows: int, r_max: int) -> tuple[int, ...]:
        """Shape of ``H``, the float32 intermediate ``lora_forward`` returns."""
        return (rows, r_max)

    def lora_forward(self, x2d: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, bias: torch.Tensor | None,
                     plan: LoRAPlan, params: ClientParams) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``contract.Backend.lora_forward``; ``saved`` is ``H``, float32 ``[T, r_max]`` by position in
        ``plan.sorted_rows``. The kernels write every row of ``out`` once (LoRA term plus bias summed in
        fp32, rounded once), so it starts empty."""
        lora_a, lora_b = _in_dtype(x2d.dtype, lora_a, lora_b)
        out = torch.empty(x2d.shape[0], lora_b.shape[1], dtype=x2d.dtype, device=x2d.device)
        h = self.native.lora_forward(
            x2d, lora_a, lora_b, plan.sorted_rows, plan.offsets, params.scaling, params.ranks,
            *self._tiles(plan), None if bias is None else bias.contiguous(), out,
        )
        return out, h

    def lora_backward(self, dy2d: torch.Tensor, x2d: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                      plan: LoRAPlan, params: ClientParams, saved: torch.Tensor | None, need_dx: bool,
                      weight_grads: bool, grad_sqnorm: torch.Tensor | None) -> Grads:
        """``contract.Backend.lora_backward`` from the forward's ``H``; ``dx`` is written once by the kernels
        (so it starts empty), the norms come from the complete fp32 gradients."""
        adapter_dtype = lora_a.dtype
        lora_a, lora_b = _in_dtype(x2d.dtype, lora_a, lora_b)
        dx = torch.empty_like(x2d) if need_dx else None
        d_a, d_b = self.native.lora_backward(
            dy2d, x2d, lora_a, lora_b, plan.sorted_rows, plan.offsets, params.scaling, params.ranks,
            params.trainable, *self._tiles(plan), saved, dx, weight_grads, grad_sqnorm,
        )
        if not weight_grads:
            return dx, None, None
        return dx, d_a.to(adapter_dtype), d_b.to(adapter_dtype)


def _in_dtype(dtype: torch.dtype, lora_a: torch.Tensor, lora_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The adapters in the activations' dtype: the compiled kernels take one dtype for all inputs, so
    float32 master adapters under half-precision activations cost a cast copy per call here."""
    if lora_a.dtype == dtype:
        return lora_a, lora_b
    return lora_a.to(dtype), lora_b.to(dtype)
