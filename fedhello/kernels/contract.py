"""The contract every backend of ``multi_lora_linear`` and ``lora_delta`` implements.

A backend computes only the LoRA part; the autograd functions in ``multi_lora.py`` and
``delta.py`` add the frozen base GEMMs into the buffers it writes. The backends, named as users
pass them to ``backend=``:

* ``"torch"``: ``backends/torch.py``, a per-client loop of torch ops: the readable statement of
  the math, the only backend for float64 and for higher-order gradients;
* ``"triton"``: ``backends/triton.py`` (launchers) over ``backends/triton_kernels.py`` (kernels);
* ``"cpu"`` / ``"cuda"``: ``backends/compiled.py``, one ``CompiledBackend`` per csrc extension
  (loaded or built by ``extension.py``).

The torch and Triton backends are modules and the compiled ones objects; ``Backend`` is a
structural protocol, so both satisfy it, and ``tests/kernels/test_backend_contract.py`` checks
that every backend has each member with exactly the signature below.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from .checks import ClientParams
from .plan import LoRAPlan

__all__ = ["Backend", "Grads"]

# ``(dx_lora, dA, dB)``: each ``None`` when it was not asked for.
Grads = tuple[Tensor | None, Tensor | None, Tensor | None]


@runtime_checkable
class Backend(Protocol):
    """What ``resolve_backend`` returns.

    Attributes:
        NAME: the name that selects it (``resolve_backend(NAME, ...)``): "torch", "triton", "cpu"
            or "cuda".
        DTYPES: the input dtypes its kernels take.
        FUSED_DROPOUT: whether its kernels apply LoRA dropout themselves. When ``False`` the
            caller masks ``x`` and scales ``s_c`` by ``1 / (1 - p)`` instead
            (``multi_lora.prepare_dropout``), which gives the same values.
    """

    NAME: str
    DTYPES: tuple[torch.dtype, ...]
    FUSED_DROPOUT: bool

    def saved_shape(self, rows: int, r_max: int) -> tuple[int, ...]:
        """Shape of the float32 ``saved`` that ``lora_forward`` returns for ``rows`` rows (what the
        registered ops' fake implementations allocate)."""
        ...

    def lora_forward(self, x2d: Tensor, lora_a: Tensor, lora_b: Tensor, bias: Tensor | None, plan: LoRAPlan,
                     params: ClientParams) -> tuple[Tensor, Tensor | None]:
        """``(out, saved)``: ``out[t] = b + s_c (x_t A_c[:r_c]^T) B_c[:, :r_c]^T`` for every row ``t``
        of client ``c`` (only ``b``, or zeros, on rows without adapter; ``x_t`` under dropout's mask
        where ``FUSED_DROPOUT``), and what the backward needs.

        Shapes: ``x2d [T, d_in]``, ``lora_a [N, r_max, d_in]``, ``lora_b [N, d_out, r_max]``,
        ``bias [d_out]`` or ``None``, contiguous; ``out [T, d_out]`` in ``x2d``'s dtype (the caller
        adds ``x W^T`` into it); ``saved`` is float32 of ``saved_shape(T, r_max)``, or ``None``.
        LoRA arithmetic accumulates in float32 (float64 for float64 inputs).
        """
        ...

    def lora_backward(self, dy2d: Tensor, x2d: Tensor, lora_a: Tensor, lora_b: Tensor, plan: LoRAPlan,
                      params: ClientParams, saved: Tensor | None, need_dx: bool, weight_grads: bool,
                      grad_sqnorm: Tensor | None) -> Grads:
        """``(dx_lora, dA, dB)`` of the LoRA term, given ``dy2d [T, d_out]`` and ``saved`` from the forward.

        ``dx_lora [T, d_in]`` in ``x2d``'s dtype holds ``G_c A_c[:r_c]`` (``G_c = s_c dY_c
        B_c[:, :r_c]``, masked by dropout) on routed rows and zeros elsewhere (``None`` unless
        ``need_dx``; the caller adds ``dy W``). ``dA [N, r_max, d_in]`` and ``dB [N, d_out, r_max]``
        in the adapters' dtype are zero for frozen clients, clients without rows and entries beyond
        each rank (``None`` unless ``weight_grads``). ``grad_sqnorm`` (float32 ``[N]`` or ``None``)
        gets ``+= ||dA_c||^2 + ||dB_c||^2`` of every trainable client.
        """
        ...
