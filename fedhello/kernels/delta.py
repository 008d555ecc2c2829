"""``lora_delta``: the multi-client LoRA term alone, for base layers this library does not own.

``multi_lora_linear`` fuses the frozen base GEMM with the adapters. A base layer it cannot run
(quantized, FP8, a fused QKV projection, any user module) computes its own ``y``; ``lora_delta``
then gives ``s_c (x_t A_c^T) B_c^T`` per row, either as a new tensor or added into that ``y``
(``out=y``, Punica's ``add_inputs``), with the same backends, dropout masks, ranks, frozen clients,
fused gradient norms and host-sync-free contract as ``multi_lora_linear``.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .checks import ClientParams, check_lora_inputs
from .multi_lora import Call, backend_for, lora_backward, lora_forward, op_arguments, prepare_dropout, rows2d
from .plan import LoRAPlan

__all__ = ["lora_delta"]


def delta_forward(x, lora_a, lora_b, plan, params, keep, impl) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(delta [..., d_out], saved)``: the backend writes the LoRA term once (zeros on unrouted rows)."""
    out, saved = lora_forward(impl, rows2d(x, plan.num_rows), lora_a, lora_b, None, plan, params, keep)
    return out.reshape(*x.shape[:-1], lora_b.shape[1]), saved


class _LoRADeltaFn(torch.autograd.Function):
    """``delta = LoRA term``, and its backward on the saved inputs (see ``multi_lora.lora_backward``)."""

    @staticmethod
    def forward(x, lora_a, lora_b, plan, params, keep, grad_sqnorm, impl):
        return delta_forward(x, lora_a, lora_b, plan, params, keep, impl)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, lora_a, lora_b, plan, params, keep, grad_sqnorm, impl = inputs
        ctx.save_for_backward(x, lora_a, lora_b, output[1], keep)
        ctx.call = Call(impl, plan, params, grad_sqnorm, "lora_delta")
        if output[1] is not None:
            ctx.mark_non_differentiable(output[1])

    @staticmethod
    def backward(ctx, d_delta, _d_saved):
        x, lora_a, lora_b, saved, keep = ctx.saved_tensors
        need_x, need_a, need_b = ctx.needs_input_grad[:3]
        rows = ctx.call.plan.num_rows
        dx, d_a, d_b = lora_backward(ctx.call, rows2d(d_delta, rows), rows2d(x, rows), lora_a, lora_b, saved,
                                     keep, need_x, need_a or need_b)
        return (dx.reshape(x.shape) if dx is not None else None, d_a if need_a else None,
                d_b if need_b else None) + (None,) * 5


def lora_delta(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    plan: LoRAPlan,
    scaling: float | torch.Tensor | Sequence[float],
    ranks: torch.Tensor | Sequence[int] | None = None,
    trainable: torch.Tensor | Sequence[bool] | None = None,
    grad_sqnorm: torch.Tensor | None = None,
    backend: str = "auto",
    dropout_p: float = 0.0,
    dropout_seeds: torch.Tensor | Sequence[int] | None = None,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The LoRA term of ``multi_lora_linear`` without the base layer, optionally added into ``out``.

    ``delta_t = s_c (x_t A_c[:r_c]^T) B_c[:, :r_c]^T`` with ``c = client(t)`` from ``plan``; rows
    routed to ``-1`` get 0. Every LoRA argument (``ranks``, ``trainable``, ``grad_sqnorm``,
    ``backend``, ``dropout_p``, ``dropout_seeds``) means what it means for ``multi_lora_linear``,
    and dropout draws the same masks, so ``base(x) + lora_delta(x, ...)`` equals
    ``multi_lora_linear`` with that base layer.

    Args:
        x: ``[..., d_in]``, ``plan.num_rows`` rows; float32, float16 or bfloat16 (float64 on the
            torch backend).
        lora_a: ``[N, r_max, d_in]``, in x's dtype or float32 under float16/bfloat16 ``x``.
        lora_b: ``[N, d_out, r_max]``, in ``lora_a``'s dtype.
        plan, scaling, ranks, trainable, grad_sqnorm, backend, dropout_p, dropout_seeds: as for
            ``multi_lora_linear``.
        out: ``None``, or the base layer's output ``y [..., d_out]`` (x's leading shape, x's dtype
            and device), made by any layer. The delta is then added into ``y`` in place and ``y``
            is returned; autograd sees ``y + delta``: the gradient of ``y`` flows on, unchanged,
            to whatever produced it. ``y`` may be a view, e.g. one slice of a fused QKV output
            (``out=qkv[..., :d]``, the q adapters' share). The backends write the delta into a
            buffer of its own that the add then reads (freed on return): one more pass over ``[T,
            d_out]`` than a fused kernel would need (``y`` read and written, the delta read), the
            same as ``y += lora_delta(x, ...)``. ``y`` must not be a leaf that requires grad
            (autograd refuses in-place updates of those).

    Returns:
        ``[..., d_out]`` in x's dtype: the delta, or ``out`` holding ``y + delta``.
    """
    params: ClientParams = check_lora_inputs(x, lora_a, lora_b, plan, scaling, ranks, trainable, grad_sqnorm,
                                             dropout_p, dropout_seeds)
    impl = backend_for(backend, x)
    keep, params = prepare_dropout(x, plan, params, impl)
    if out is not None:
        _check_out(out, x, lora_b.shape[1])
    if torch.compiler.is_compiling():  # one opaque graph node (see ops.py); the compiler fuses the add
        delta = torch.ops.fedhello.lora_delta(x, lora_a, lora_b, *op_arguments(plan, params, keep), grad_sqnorm,
                                              impl.NAME)[0]
    else:
        delta = _LoRADeltaFn.apply(x, lora_a, lora_b, plan, params, keep, grad_sqnorm, impl)[0]
    # A plain in-place add: autograd passes y's gradient through it unchanged, also when ``out`` is
    # a view (a column slice of a fused QKV output), and the delta is freed on return.
    return delta if out is None else out.add_(delta)


def _check_out(out: object, x: torch.Tensor, d_out: int) -> None:
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out: expected None or a torch.Tensor, got {type(out).__name__}")
    expected = (*x.shape[:-1], d_out)
    if tuple(out.shape) != expected:
        raise ValueError(f"out: expected shape [..., d_out] = {expected} (x's leading shape, lora_b.shape[1]), "
                         f"got {tuple(out.shape)}")
    if out.dtype != x.dtype:
        raise TypeError(f"out: expected dtype {x.dtype} (the dtype of x), got {out.dtype}")
    if out.device != x.device:
        raise ValueError(f"out: expected a tensor on {x.device} (the device of x), got {out.device}")
