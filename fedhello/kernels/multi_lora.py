"""``multi_lora_linear``: a frozen linear layer shared by N clients, each with its own LoRA adapter.

The autograd function below is a thin shell. The LoRA part goes to a backend, which *writes*
``bias + LoRA term`` (forward) and the LoRA share of ``dx`` (backward) once; the frozen base
GEMMs then accumulate into those buffers through the vendor BLAS (``addmm_`` with beta = 1), so
no pass reads and rewrites ``y`` or ``dx`` a second time. Backends:

* ``"triton"``: fused Triton kernels (``backends/triton.py``); CUDA tensors, or CPU tensors
  under ``TRITON_INTERPRET=1``;
* ``"torch"``: a per-client loop (``backends/torch.py``), the readable contract, the only backend
  for float64 and the one with higher-order gradients;
* ``"cpu"`` / ``"cuda"``: the compiled extension from ``csrc/`` when it is built (``backends/compiled.py``);
* ``"auto"``: the fastest one available for the tensors' device: on CUDA tensors Triton, on CPU
  tensors the compiled ``cpu`` extension when it is built (or can be built on first use), else
  torch; float64, and every call inside a ``torch.func`` transform, go to torch.

Every backend implements ``contract.Backend``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from . import dropout
from .backends import torch as torch_backend
from .checks import ClientParams, check_inputs, in_torch_func_transform
from .contract import Backend
from .plan import LoRAPlan
from .runtime import triton_available, triton_interpreting

BACKENDS = ("auto", "triton", "torch", "cpu", "cuda")


def _extension(device_type: str) -> Backend | None:
    """The compiled csrc backend for ``device_type`` ("cpu" or "cuda"), if it is built."""
    try:
        from . import extension
    except ImportError:
        return None
    return extension.backend(device_type)


def resolve_backend(name: str, device: torch.device, dtype: torch.dtype | None = None) -> Backend:
    """Map a backend name to the backend that implements the LoRA part on ``device``.

    ``"auto"`` picks the fastest backend for ``device`` that takes ``dtype`` (when given): float64
    inputs go to the torch backend, the only one that takes them.
    """
    if not isinstance(name, str):
        raise TypeError(f"backend: expected one of {BACKENDS}, got {type(name).__name__}")
    if name not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {name!r}")
    if name == "torch":
        return torch_backend
    if name == "triton":
        if not triton_available():
            raise ValueError("backend: 'triton' requested but the triton package is not installed")
        if device.type != "cuda" and not triton_interpreting():
            raise ValueError(
                f"backend: 'triton' needs CUDA tensors (got {device}) or TRITON_INTERPRET=1 "
                "set before triton is imported"
            )
        from .backends import triton as triton_backend

        return triton_backend
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
    if device.type == "cuda" and triton_available():
        from .backends import triton as triton_backend

        impl: Backend = triton_backend
    else:
        impl = _extension(device.type) or torch_backend
    return impl if dtype is None or dtype in impl.DTYPES else torch_backend


def prepare_dropout(x: torch.Tensor, plan: LoRAPlan, params: ClientParams,
                    impl: Backend) -> tuple[torch.Tensor | None, ClientParams]:
    """The bool keep mask ``[T, d_in]`` and the settings a backend without fused dropout
    runs with; ``(None, params)`` when there is no dropout or the backend's kernels apply it.

    ``s/(1-p) * (x * keep) A^T B^T`` equals ``s * (x * keep / (1-p)) A^T B^T``, and the backward of
    that call gives exactly dropout's ``dA``/``dB``; only ``dx`` still needs the mask, applied by
    ``lora_backward``. The mask is the counter-based one of ``dropout.py``, the same bits as the kernels.
    """
    if params.dropout_p == 0 or impl.FUSED_DROPOUT:
        return None, params
    keep = dropout.row_keep(plan, params.dropout_seeds, params.dropout_p, x.shape[-1])
    return keep, ClientParams(params.scaling / (1.0 - params.dropout_p), params.ranks, params.trainable)


def rows2d(t: torch.Tensor, rows: int) -> torch.Tensor:
    """``t [..., d]`` as a contiguous ``[rows, d]`` matrix (a view when it already is one)."""
    return t.reshape(rows, t.shape[-1]).contiguous()


def lora_forward(impl: Backend, x2d: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                 bias: torch.Tensor | None, plan: LoRAPlan, params: ClientParams,
                 keep: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(bias + LoRA term [T, d_out], saved)`` from backend ``impl`` (see ``contract.Backend``)."""
    x_lora = x2d if keep is None else x2d * keep
    return impl.lora_forward(x_lora, lora_a.contiguous(), lora_b.contiguous(), bias, plan, params)


@dataclass(frozen=True)
class Call:
    """What the backward of one call needs besides tensors: the backend, the plan, the
    per-client settings, the norms to accumulate into and the public op name (for errors)."""

    impl: Backend
    plan: LoRAPlan
    params: ClientParams
    grad_sqnorm: torch.Tensor | None
    op: str


def lora_backward(call: Call, dy2d: torch.Tensor, x2d: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                  saved: torch.Tensor | None, keep: torch.Tensor | None, need_dx: bool,
                  weight_grads: bool) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """``(dx_lora, dA, dB)`` of the LoRA term from the backend ``call.impl``, dropout's mask on dx.

    A backward that must record a graph (``create_graph=True`` over inputs that require grad) is
    refused on the kernel backends, whose backward is not itself differentiable, instead of
    returning gradients that silently lack their dependence on the inputs; the torch backend's
    backward is made of differentiable torch ops on the saved *inputs* (views and copies redone
    here, under the engine's grad mode), so it supports higher-order gradients.
    """
    if call.impl is not torch_backend and records_graph(dy2d, x2d, lora_a, lora_b):
        refuse_create_graph(call.op, f"the {call.impl.NAME} backend's backward")
    x_lora = x2d if keep is None else x2d * keep
    dx, d_a, d_b = call.impl.lora_backward(
        dy2d, x_lora, lora_a.contiguous(), lora_b.contiguous(), call.plan, call.params, saved, need_dx,
        weight_grads, call.grad_sqnorm,
    )
    if dx is not None and keep is not None:
        dx = dx * keep
    return dx, d_a, d_b


def records_graph(*tensors: torch.Tensor) -> bool:
    """Whether a backward over ``tensors`` must be differentiable: grad mode is on (the engine turns it
    on only for ``create_graph=True``) and one of them requires grad (so that a ``create_graph=True``
    over inputs that need no gradient, or a compiler tracing the backward, is not refused)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def refuse_create_graph(op: str, what: str) -> None:
    """Raise the error of a backward that cannot record a graph (``create_graph=True``)."""
    raise RuntimeError(f"{op}: {what} is not differentiable (create_graph=True); backend='torch' "
                       "supports higher-order gradients (called eagerly)")


def linear_forward(x, weight, bias, lora_a, lora_b, plan, params, keep, impl) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(y [..., d_out], saved)``: the backend writes ``bias + LoRA``, the BLAS adds ``x W^T`` into it."""
    x2d = rows2d(x, plan.num_rows)
    out, saved = lora_forward(impl, x2d, lora_a, lora_b, bias, plan, params, keep)
    out.addmm_(x2d, weight.t())
    return out.reshape(*x.shape[:-1], weight.shape[0]), saved


def base_grads(dx_lora: torch.Tensor | None, dy2d: torch.Tensor, x2d: torch.Tensor, weight: torch.Tensor,
               x_shape: torch.Size, need_w: bool, need_bias: bool) -> tuple:
    """``(dx, dW, dbias)`` of ``multi_lora_linear``: the BLAS adds ``dy W`` into the LoRA share of dx."""
    dx = dx_lora.addmm(dy2d, weight).reshape(x_shape) if dx_lora is not None else None
    d_w = dy2d.t() @ x2d if need_w else None  # the base path sees x without dropout
    return dx, d_w, dy2d.sum(0) if need_bias else None


class _MultiLoRALinearFn(torch.autograd.Function):
    """``y = x W^T + b + LoRA`` (``linear_forward``); the backward is built the same way: the backend
    writes the LoRA share of ``dx`` and the BLAS adds ``dy W`` into it, so neither ``y`` nor ``dx``
    is read and written again by a second pass. The forward returns ``(y, saved)`` (the backend's
    intermediate) so that ``setup_context`` can keep it: that split is what ``torch.func`` needs.
    """

    @staticmethod
    def forward(x, weight, bias, lora_a, lora_b, plan, params, keep, grad_sqnorm, impl):
        return linear_forward(x, weight, bias, lora_a, lora_b, plan, params, keep, impl)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, lora_a, lora_b, plan, params, keep, grad_sqnorm, impl = inputs
        # The inputs themselves (not contiguous copies made in forward) are saved, so that a
        # backward under create_graph=True differentiates through the views it redoes.
        ctx.save_for_backward(x, weight, lora_a, lora_b, output[1], keep)
        ctx.call = Call(impl, plan, params, grad_sqnorm, "multi_lora_linear")
        ctx.has_bias = bias is not None
        if output[1] is not None:
            ctx.mark_non_differentiable(output[1])

    @staticmethod
    def backward(ctx, dy, _d_saved):
        x, weight, lora_a, lora_b, saved, keep = ctx.saved_tensors
        need_x, need_w, need_b, need_a, need_lb = ctx.needs_input_grad[:5]
        rows = ctx.call.plan.num_rows
        x2d, dy2d = rows2d(x, rows), rows2d(dy, rows)
        dx, d_a, d_b = lora_backward(ctx.call, dy2d, x2d, lora_a, lora_b, saved, keep, need_x, need_a or need_lb)
        dx, d_w, d_bias = base_grads(dx, dy2d, x2d, weight, x.shape, need_w, need_b and ctx.has_bias)
        return (dx, d_w, d_bias, d_a if need_a else None, d_b if need_lb else None,
                None, None, None, None, None)


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
    dropout_p: float = 0.0,
    dropout_seeds: torch.Tensor | Sequence[int] | None = None,
) -> torch.Tensor:
    """Frozen linear plus a per-row choice among N LoRA adapters.

    ``y_t = x_t W^T + b + s_c (x_t A_c[:r_c]^T) B_c[:, :r_c]^T`` with ``c = client(t)``
    from ``plan``; rows routed to ``-1`` get the base output only.

    Args:
        x: ``[..., d_in]``; the number of rows (product of leading dims) must equal
            ``plan.num_rows``. float32, float16 or bfloat16 (float64 on the torch backend).
        weight: ``[d_out, d_in]`` frozen base weight, same dtype and device as ``x``.
        bias: ``[d_out]`` or ``None``.
        lora_a: ``[N, r_max, d_in]`` down-projections, in x's dtype, or float32 (master adapters)
            under float16/bfloat16 activations: the torch and Triton backends read those as they
            are, the compiled ``cpu``/``cuda`` ones cast them to x's dtype in every call (and their
            gradients back to float32).
        lora_b: ``[N, d_out, r_max]`` up-projections, in ``lora_a``'s dtype.
        plan: the batch's ``LoRAPlan`` (``LoRAPlan.build(client_ids, N)``).
        scaling: one float for all clients or ``[N]`` per-client scales ``s_c``.
        ranks: ``None`` (every client uses ``r_max``) or int ``[N]`` ranks in ``[0, r_max]``;
            adapter entries beyond a client's rank are ignored and get zero gradient.
        trainable: ``None`` (all) or bool ``[N]``. A frozen client's adapter still acts in the
            forward pass and on ``dx``, but gets no ``dA``/``dB`` work (zero gradient).
        grad_sqnorm: ``None`` or float32 ``[N]`` on ``x``'s device; the backward adds
            ``||dA_c||_F^2 + ||dB_c||_F^2`` of every trainable client into it.
        backend: ``"auto"``, ``"triton"``, ``"torch"``, ``"cpu"`` or ``"cuda"``.
        dropout_p: LoRA dropout on the adapters' input (never on the base path), in ``[0, 1)``.
        dropout_seeds: int64 ``[N]`` per-client seeds, required when ``dropout_p > 0``. The keep
            bit of (client c, c's j-th row in this call, column k) is a pure function of
            ``(dropout_seeds[c] mod 2^32, j, k)`` (``fedhello.kernels.dropout``), the same on every
            backend, so a client's rows get the same mask alone or in a batch.

    With a built ``plan`` and tensor ``ranks``/``trainable``/``scaling`` on the device, neither
    the forward nor the backward reads anything back to the host (CUDA-graph capturable).

    Returns:
        ``[..., d_out]`` in the dtype of ``x``. LoRA arithmetic accumulates in float32.
    """
    params: ClientParams = check_inputs(
        x, weight, bias, lora_a, lora_b, plan, scaling, ranks, trainable, grad_sqnorm, dropout_p, dropout_seeds
    )
    impl = backend_for(backend, x)
    keep, params = prepare_dropout(x, plan, params, impl)
    if torch.compiler.is_compiling():  # one opaque graph node (see ops.py)
        return torch.ops.fedhello.multi_lora_linear(x, weight, bias, lora_a, lora_b, *op_arguments(plan, params, keep),
                                                    grad_sqnorm, impl.NAME)[0]
    return _MultiLoRALinearFn.apply(x, weight, bias, lora_a, lora_b, plan, params, keep, grad_sqnorm, impl)[0]


def op_arguments(plan: LoRAPlan, params: ClientParams, keep: torch.Tensor | None) -> tuple:
    """The plan and settings of a call in the argument order of the registered ops (``ops.py``)."""
    return (plan.client_ids, plan.sorted_rows, plan.offsets, plan.counts, plan.contiguous,
            params.scaling, params.ranks, params.trainable, params.dropout_p, params.dropout_seeds, keep)


def backend_for(name: str, x: torch.Tensor) -> Backend:
    """``resolve_backend`` for the tensors of a call, refusing an ``x`` dtype the backend lacks."""
    if not torch.compiler.is_compiling() and in_torch_func_transform():
        # Inside a torch.func transform (a compiled call goes through the registered ops instead).
        # The kernels cannot read torch.func's wrapped tensors; the torch backend is plain torch ops.
        if name not in ("auto", "torch"):
            raise ValueError(f"backend: {name!r} cannot run under torch.func transforms; use 'torch' or 'auto' "
                             "(which picks 'torch' there)")
        name = "torch"
    impl = resolve_backend(name, x.device, x.dtype)
    if x.dtype not in impl.DTYPES:
        names = ", ".join(str(d).removeprefix("torch.") for d in impl.DTYPES)
        raise TypeError(f"x: backend {name!r} supports dtypes {names}, got {x.dtype}")
    return impl
