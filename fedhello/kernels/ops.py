"""The kernels as registered PyTorch custom ops (``torch.library``, namespace ``fedhello``).

``torch.compile`` cannot trace into the backends (a Triton launch, a pybind11 call, the torch
backend's per-client loop reading the plan's offsets to the host), so inside a compiled region
``multi_lora_linear`` and ``lora_delta`` call these ops instead: each is one opaque node of the
graph with a fake (meta) implementation for shapes and a registered autograd formula, so a model
built on them compiles with no graph break (``fullgraph=True``), and the plan enters the graph as
tensors plus a bool. Eager calls keep the autograd functions of ``multi_lora.py`` and ``delta.py``
(they cache the plan's work lists across layers, and the torch backend's backward supports
``create_graph=True``); both paths run the same backend code and give the same bits.

Ops (``torch.ops.fedhello.*``); ``PLAN`` stands for ``client_ids, sorted_rows, offsets, counts,
contiguous`` (the fields of ``LoRAPlan``), ``SETTINGS`` for ``scaling, ranks, trainable, dropout_p,
dropout_seeds, keep`` (``ClientParams`` plus the unfused-dropout mask of ``prepare_dropout``):

* ``multi_lora_linear(x, weight, bias, lora_a, lora_b, PLAN, SETTINGS, grad_sqnorm, backend)
  -> (y, saved)``;
* ``lora_delta(x, lora_a, lora_b, PLAN, SETTINGS, grad_sqnorm, backend) -> (delta, saved)``;
* ``lora_backward(dy, x, lora_a, lora_b, saved, PLAN, SETTINGS, grad_sqnorm!, backend, need_dx,
  weight_grads) -> (dx_lora, dA, dB)``: the LoRA part of both backwards; it accumulates the fused
  norms into ``grad_sqnorm`` (a mutated argument) and returns empty tensors for what was not asked.

``backend`` is a resolved name (``"torch"``, ``"triton"``, ``"cpu"``, ``"cuda"``). ``saved`` is the
backend's intermediate kept for the backward (an empty tensor on the torch backend). The ops'
backward is not itself differentiable: under ``create_graph=True`` it raises.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .backends import torch as torch_backend
from .checks import ClientParams
from .delta import delta_forward
from .multi_lora import Call, base_grads, linear_forward, lora_backward as _lora_backward, records_graph
from .multi_lora import refuse_create_graph
from .multi_lora import op_arguments, resolve_backend, rows2d
from .plan import LoRAPlan

def _unpack(client_ids, sorted_rows, offsets, counts, contiguous, scaling, ranks, trainable, dropout_p,
            dropout_seeds) -> tuple[LoRAPlan, ClientParams]:
    plan = LoRAPlan(client_ids, counts.numel(), sorted_rows, counts, offsets, contiguous)
    return plan, ClientParams(scaling, ranks, trainable, dropout_p, dropout_seeds)


def _saved_or_empty(saved: Tensor | None, like: Tensor) -> Tensor:
    return saved if saved is not None else like.new_empty(0, dtype=torch.float32)


def _fake_saved(x: Tensor, lora_a: Tensor, backend: str) -> Tensor:
    rows = math.prod(x.shape[:-1])
    return x.new_empty(resolve_backend(backend, x.device).saved_shape(rows, lora_a.shape[1]), dtype=torch.float32)


# ------------------------------------------------------------------------------ multi_lora_linear
@torch.library.custom_op("fedhello::multi_lora_linear", mutates_args=())
def multi_lora_linear_op(
    x: Tensor, weight: Tensor, bias: Tensor | None, lora_a: Tensor, lora_b: Tensor,
    client_ids: Tensor, sorted_rows: Tensor, offsets: Tensor, counts: Tensor, contiguous: bool,
    scaling: Tensor, ranks: Tensor, trainable: Tensor, dropout_p: float, dropout_seeds: Tensor | None,
    keep: Tensor | None, grad_sqnorm: Tensor | None, backend: str,
) -> tuple[Tensor, Tensor]:
    plan, params = _unpack(client_ids, sorted_rows, offsets, counts, contiguous, scaling, ranks, trainable,
                           dropout_p, dropout_seeds)
    y, saved = linear_forward(x, weight, bias, lora_a, lora_b, plan, params, keep, resolve_backend(backend, x.device))
    return y, _saved_or_empty(saved, x)


@multi_lora_linear_op.register_fake
def _(x, weight, bias, lora_a, lora_b, *args):
    return x.new_empty(*x.shape[:-1], weight.shape[0]), _fake_saved(x, lora_a, args[-1])


def _setup_linear(ctx, inputs, output):
    x, weight, bias, lora_a, lora_b, *rest = inputs
    _save(ctx, (x, lora_a, lora_b, output[1], *rest[:-1]), rest[-1], weight)
    ctx.has_bias = bias is not None


def _backward_linear(ctx, dy, _d_saved):
    x, weight, lora_a, lora_b, (dx, d_a, d_b), dy2d, x2d = _lora_part(ctx, dy, ctx.needs_input_grad[0],
                                                                        any(ctx.needs_input_grad[3:5]))
    need_w, need_b = ctx.needs_input_grad[1:3]
    dx, d_w, d_bias = base_grads(dx, dy2d, x2d, weight, x.shape, need_w, need_b and ctx.has_bias)
    need_a, need_lb = ctx.needs_input_grad[3:5]
    return (dx, d_w, d_bias, d_a if need_a else None, d_b if need_lb else None) + (None,) * 13


multi_lora_linear_op.register_autograd(_backward_linear, setup_context=_setup_linear)


# ------------------------------------------------------------------------------------- lora_delta
@torch.library.custom_op("fedhello::lora_delta", mutates_args=())
def lora_delta_op(
    x: Tensor, lora_a: Tensor, lora_b: Tensor,
    client_ids: Tensor, sorted_rows: Tensor, offsets: Tensor, counts: Tensor, contiguous: bool,
    scaling: Tensor, ranks: Tensor, trainable: Tensor, dropout_p: float, dropout_seeds: Tensor | None,
    keep: Tensor | None, grad_sqnorm: Tensor | None, backend: str,
) -> tuple[Tensor, Tensor]:
    plan, params = _unpack(client_ids, sorted_rows, offsets, counts, contiguous, scaling, ranks, trainable,
                           dropout_p, dropout_seeds)
    delta, saved = delta_forward(x, lora_a, lora_b, plan, params, keep, resolve_backend(backend, x.device))
    return delta, _saved_or_empty(saved, x)


@lora_delta_op.register_fake
def _(x, lora_a, lora_b, *args):
    return x.new_empty(*x.shape[:-1], lora_b.shape[1]), _fake_saved(x, lora_a, args[-1])


def _setup_delta(ctx, inputs, output):
    x, lora_a, lora_b, *rest = inputs
    _save(ctx, (x, lora_a, lora_b, output[1], *rest[:-1]), rest[-1], None)


def _backward_delta(ctx, d_delta, _d_saved):
    need_x, need_a, need_b = ctx.needs_input_grad[:3]
    x, _, _, _, (dx, d_a, d_b), _, _ = _lora_part(ctx, d_delta, need_x, need_a or need_b)
    return (dx.reshape(x.shape) if dx is not None else None, d_a if need_a else None,
            d_b if need_b else None) + (None,) * 13


lora_delta_op.register_autograd(_backward_delta, setup_context=_setup_delta)


# ---------------------------------------------------------------------------------- lora_backward
@torch.library.custom_op("fedhello::lora_backward", mutates_args=("grad_sqnorm",))
def lora_backward_op(
    dy: Tensor, x: Tensor, lora_a: Tensor, lora_b: Tensor, saved: Tensor,
    client_ids: Tensor, sorted_rows: Tensor, offsets: Tensor, counts: Tensor, contiguous: bool,
    scaling: Tensor, ranks: Tensor, trainable: Tensor, dropout_p: float, dropout_seeds: Tensor | None,
    keep: Tensor | None, grad_sqnorm: Tensor | None, backend: str, need_dx: bool, weight_grads: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    plan, params = _unpack(client_ids, sorted_rows, offsets, counts, contiguous, scaling, ranks, trainable,
                           dropout_p, dropout_seeds)
    impl = resolve_backend(backend, x.device)
    call = Call(impl, plan, params, grad_sqnorm, "lora_backward")
    with torch.no_grad():  # the op is opaque to autograd; its caller refuses create_graph=True
        dx, d_a, d_b = _lora_backward(call, dy, x, lora_a, lora_b, None if impl is torch_backend else saved, keep,
                                      need_dx, weight_grads)
    empty = x.new_empty(0)
    return (dx if dx is not None else empty, d_a if d_a is not None else lora_a.new_empty(0),
            d_b if d_b is not None else lora_b.new_empty(0))


@lora_backward_op.register_fake
def _(dy, x, lora_a, lora_b, saved, *args):
    need_dx, weight_grads = args[-2:]
    return (torch.empty_like(x) if need_dx else x.new_empty(0),
            torch.empty_like(lora_a) if weight_grads else lora_a.new_empty(0),
            torch.empty_like(lora_b) if weight_grads else lora_b.new_empty(0))


# ------------------------------------------------------------------------------- shared autograd
def _save(ctx, tensors_and_settings: tuple, backend: str, weight: Tensor | None) -> None:
    """Keep the inputs of the backward: tensors through ``save_for_backward``, the rest on ctx."""
    (x, lora_a, lora_b, saved, client_ids, sorted_rows, offsets, counts, contiguous, scaling, ranks, trainable,
     dropout_p, dropout_seeds, keep, grad_sqnorm) = tensors_and_settings
    ctx.save_for_backward(x, weight, lora_a, lora_b, saved, client_ids, sorted_rows, offsets, counts, scaling,
                          ranks, trainable, dropout_seeds, keep)
    # Not saved with save_for_backward: every layer's backward adds into the same norms, which
    # would fail the saved-tensor version check of the layers after the first.
    ctx.grad_sqnorm = grad_sqnorm
    ctx.contiguous, ctx.dropout_p, ctx.backend = contiguous, dropout_p, backend


def _lora_part(ctx, dy: Tensor, need_dx: bool, weight_grads: bool):
    """The LoRA share of a backward through ``lora_backward``: ``(x, weight, lora_a, lora_b, (dx_lora,
    dA, dB), dy2d, x2d)``, ``None`` for what was not asked."""
    (x, weight, lora_a, lora_b, saved, client_ids, sorted_rows, offsets, counts, scaling, ranks, trainable,
     dropout_seeds, keep) = ctx.saved_tensors
    if records_graph(dy, x, lora_a, lora_b):
        refuse_create_graph(f"torch.ops.fedhello ({ctx.backend} backend)", "the registered op's backward")
    rows = client_ids.numel()
    dy2d, x2d = rows2d(dy, rows), rows2d(x, rows)
    dx, d_a, d_b = torch.ops.fedhello.lora_backward(
        dy2d, x2d, lora_a, lora_b, saved, client_ids, sorted_rows, offsets, counts, ctx.contiguous, scaling, ranks,
        trainable, ctx.dropout_p, dropout_seeds, keep, ctx.grad_sqnorm, ctx.backend, need_dx, weight_grads)
    return (x, weight, lora_a, lora_b,
            (dx if need_dx else None, d_a if weight_grads else None, d_b if weight_grads else None), dy2d, x2d)
