"""``multi_lora_linear``: a frozen linear layer shared by N clients, each with its own LoRA adapter.

The autograd function below is a thin shell: the frozen base GEMMs (``x W^T + b`` and
``dy W``) go to the vendor BLAS through ``torch``, and the LoRA part (shrink, expand, the
LoRA share of ``dx``, ``dA``/``dB`` and their fused squared norms) goes to a backend:

* ``"triton"``: fused Triton kernels (``triton_lora.py``); CUDA tensors, or CPU tensors
  under ``TRITON_INTERPRET=1``;
* ``"torch"``: a per-client loop (``reference.py``), the readable contract and CPU default;
* ``"cpu"`` / ``"cuda"``: the compiled extension from ``csrc/`` when it is built;
* ``"auto"``: the fastest one available for the tensors' device.
"""

from __future__ import annotations

import os
from types import ModuleType
from typing import Sequence

import torch
import torch.nn.functional as F

from . import reference
from .checks import ClientParams, check_inputs
from .plan import LoRAPlan

BACKENDS = ("auto", "triton", "torch", "cpu", "cuda")


def triton_available() -> bool:
    """True when the Triton package imports."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _extension(device_type: str) -> ModuleType | None:
    """The compiled csrc backend for ``device_type`` ("cpu" or "cuda"), if it is built."""
    try:
        from . import extension
    except ImportError:
        return None
    return extension.backend(device_type)


def resolve_backend(name: str, device: torch.device) -> ModuleType:
    """Map a backend name to the module that implements the LoRA part on ``device``."""
    if not isinstance(name, str):
        raise TypeError(f"backend: expected one of {BACKENDS}, got {type(name).__name__}")
    if name not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {name!r}")
    if name == "torch":
        return reference
    if name == "triton":
        if not triton_available():
            raise ValueError("backend: 'triton' requested but the triton package is not installed")
        if device.type != "cuda" and not triton_interpreting():
            raise ValueError(
                f"backend: 'triton' needs CUDA tensors (got {device}) or TRITON_INTERPRET=1 "
                "set before triton is imported"
            )
        from . import triton_lora

        return triton_lora
    if name in ("cpu", "cuda"):
        if device.type != name:
            raise ValueError(f"backend: {name!r} needs {name} tensors, got tensors on {device}")
        ext = _extension(name)
        if ext is None:
            raise ValueError(
                f"backend: {name!r} requested but the csrc extension for {name} is not built "
                "(pip install -e . with a C++ compiler; CUDA also needs nvcc)"
            )
        return ext
    # auto
    if device.type == "cuda":
        if triton_available():
            from . import triton_lora

            return triton_lora
        return _extension("cuda") or reference
    return _extension(device.type) or reference


class _MultiLoRALinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, plan, params, grad_sqnorm, backend):
        d_in = weight.shape[1]
        x2d = x.reshape(-1, d_in).contiguous()
        lora_a = lora_a.contiguous()
        lora_b = lora_b.contiguous()
        out = F.linear(x2d, weight, bias)
        saved = backend.lora_forward(x2d, lora_a, lora_b, plan, params, out)
        ctx.save_for_backward(x2d, weight, lora_a, lora_b, saved)
        ctx.plan, ctx.params, ctx.grad_sqnorm, ctx.backend = plan, params, grad_sqnorm, backend
        ctx.x_shape, ctx.has_bias = x.shape, bias is not None
        return out.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x2d, weight, lora_a, lora_b, saved = ctx.saved_tensors
        need_x, need_w, need_b, need_a, need_lb = ctx.needs_input_grad[:5]
        dy2d = dy.reshape(-1, weight.shape[0]).contiguous()
        dx = dy2d @ weight if need_x else None
        d_a, d_b = ctx.backend.lora_backward(
            dy2d, x2d, lora_a, lora_b, ctx.plan, ctx.params, saved, dx,
            need_a or need_lb, ctx.grad_sqnorm,
        )
        d_w = dy2d.t() @ x2d if need_w else None
        d_bias = dy2d.sum(0) if (need_b and ctx.has_bias) else None
        if dx is not None:
            dx = dx.reshape(ctx.x_shape)
        return (dx, d_w, d_bias, d_a if need_a else None, d_b if need_lb else None,
                None, None, None, None)


def multi_lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    plan: LoRAPlan,
    scaling: float | torch.Tensor | Sequence[float],
    ranks: torch.Tensor | Sequence[int] | None = None,
    trainable: torch.Tensor | Sequence[bool] | None = None,
    grad_sqnorm: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Frozen linear plus a per-row choice among N LoRA adapters.

    ``y_t = x_t W^T + b + s_c (x_t A_c[:r_c]^T) B_c[:, :r_c]^T`` with ``c = client(t)``
    from ``plan``; rows routed to ``-1`` get the base output only.

    Args:
        x: ``[..., d_in]``; the number of rows (product of leading dims) must equal
            ``plan.num_rows``. float32, float16 or bfloat16 (float64 on the torch backend).
        weight: ``[d_out, d_in]`` frozen base weight, same dtype and device as ``x``.
        bias: ``[d_out]`` or ``None``.
        lora_a: ``[N, r_max, d_in]`` down-projections.
        lora_b: ``[N, d_out, r_max]`` up-projections.
        plan: the batch's ``LoRAPlan`` (``LoRAPlan.build(client_ids, N)``).
        scaling: one float for all clients or ``[N]`` per-client scales ``s_c``.
        ranks: ``None`` (every client uses ``r_max``) or int ``[N]`` ranks in ``[0, r_max]``;
            adapter entries beyond a client's rank are ignored and get zero gradient.
        trainable: ``None`` (all) or bool ``[N]``. A frozen client's adapter still acts in the
            forward pass and on ``dx``, but gets no ``dA``/``dB`` work (zero gradient).
        grad_sqnorm: ``None`` or float32 ``[N]`` on ``x``'s device; the backward adds
            ``||dA_c||_F^2 + ||dB_c||_F^2`` of every trainable client into it.
        backend: ``"auto"``, ``"triton"``, ``"torch"``, ``"cpu"`` or ``"cuda"``.

    Returns:
        ``[..., d_out]`` in the dtype of ``x``. LoRA arithmetic accumulates in float32.
    """
    params: ClientParams = check_inputs(
        x, weight, bias, lora_a, lora_b, plan, scaling, ranks, trainable, grad_sqnorm
    )
    impl = resolve_backend(backend, x.device)
    if x.dtype not in impl.DTYPES:
        names = ", ".join(str(d).removeprefix("torch.") for d in impl.DTYPES)
        raise TypeError(f"x: backend {backend!r} supports dtypes {names}, got {x.dtype}")
    return _MultiLoRALinearFn.apply(x, weight, bias, lora_a, lora_b, plan, params, grad_sqnorm, impl)
