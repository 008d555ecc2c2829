"""``multi_lora_linear``: a frozen linear layer shared by N clients, each with its own LoRA adapter.

The autograd function below is a thin shell. The LoRA part goes to a backend, which *writes*
``bias + LoRA term`` (forward) and the LoRA share of ``dx`` (backward) once; the frozen base
GEMMs then accumulate into those buffers through the vendor BLAS (``addmm_`` with beta = 1), so
no pass reads and rewrites ``y`` or ``dx`` a second time. Backends:

* ``"triton"``: fused Triton kernels (``triton_lora.py``); CUDA tensors, or CPU tensors
  under ``TRITON_INTERPRET=1``;
* ``"torch"``: a per-client loop (``reference.py``), the readable contract and CPU default;
* ``"cpu"`` / ``"cuda"``: the compiled extension from ``csrc/`` when it is built;
* ``"auto"``: the fastest one available for the tensors' device.
"""

from __future__ import annotations

from types import ModuleType
from typing import Sequence

import torch

from . import dropout, reference
from .checks import ClientParams, check_inputs
from .plan import LoRAPlan
from .runtime import triton_available, triton_interpreting

BACKENDS = ("auto", "triton", "torch", "cpu", "cuda")


def _extension(device_type: str) -> ModuleType | None:
    """The compiled csrc backend for ``device_type`` ("cpu" or "cuda"), if it is built."""
    try:
        from . import extension
    except ImportError:
        return None
    return extension.backend(device_type)


def resolve_backend(name: str, device: torch.device, dtype: torch.dtype | None = None) -> ModuleType:
    """Map a backend name to the module that implements the LoRA part on ``device``.

    ``"auto"`` picks the fastest backend for ``device`` that takes ``dtype`` (when given): float64
    inputs go to the torch backend, the only one that takes them.
    """
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
    if device.type == "cuda" and triton_available():
        from . import triton_lora

        impl = triton_lora
    else:
        impl = _extension(device.type) or reference
    return impl if dtype is None or dtype in impl.DTYPES else reference


def _unfused_dropout(x2d: torch.Tensor, plan: LoRAPlan, params: ClientParams) -> tuple[torch.Tensor, ClientParams]:
    """Dropout for backends without it in their kernels: a 0/1 mask on x and ``s_c / (1 - p)``.

    ``s/(1-p) * (x * keep) A^T B^T`` equals ``s * (x * keep / (1-p)) A^T B^T``, and the backward of
    that call gives exactly dropout's ``dA``/``dB``; only ``dx`` still needs the mask, applied by
    the caller. The mask is the counter-based one of ``dropout.py``, the same bits as the kernels.
    """
    keep = dropout.row_keep(plan, params.dropout_seeds, params.dropout_p, x2d.shape[1])
    scaled = ClientParams(params.scaling / (1.0 - params.dropout_p), params.ranks, params.trainable)
    return keep, scaled


class _MultiLoRALinearFn(torch.autograd.Function):
    """``y = x W^T + b + LoRA``: the backend *writes* ``bias + LoRA`` and the BLAS adds ``x W^T`` into it.

    The backward is built the same way: the backend writes the LoRA share of ``dx`` and the BLAS
    adds ``dy W`` into it, so neither ``y`` nor ``dx`` is read and written again by a second pass.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, plan, params, grad_sqnorm, backend):
        x2d = x.reshape(plan.num_rows, weight.shape[1]).contiguous()
        lora_a = lora_a.contiguous()
        lora_b = lora_b.contiguous()
        keep = None
        x_lora, lora_params = x2d, params
        if params.dropout_p > 0 and not getattr(backend, "FUSED_DROPOUT", False):
            keep, lora_params = _unfused_dropout(x2d, plan, params)
            x_lora = x2d * keep
        out, saved = backend.lora_forward(x_lora, lora_a, lora_b, bias, plan, lora_params)
        out.addmm_(x2d, weight.t())
        ctx.save_for_backward(x2d, weight, lora_a, lora_b, saved, keep)
        ctx.plan, ctx.params, ctx.grad_sqnorm, ctx.backend = plan, lora_params, grad_sqnorm, backend
        ctx.x_shape, ctx.has_bias = x.shape, bias is not None
        return out.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x2d, weight, lora_a, lora_b, saved, keep = ctx.saved_tensors
        x_lora = x2d if keep is None else x2d * keep
        need_x, need_w, need_b, need_a, need_lb = ctx.needs_input_grad[:5]
        dy2d = dy.reshape(ctx.plan.num_rows, weight.shape[0]).contiguous()
        dx, d_a, d_b = ctx.backend.lora_backward(
            dy2d, x_lora, lora_a, lora_b, ctx.plan, ctx.params, saved, need_x,
            need_a or need_lb, ctx.grad_sqnorm,
        )
        if dx is not None:
            if keep is not None:
                dx = dx * keep
            dx = dx.addmm_(dy2d, weight).reshape(ctx.x_shape)
        d_w = dy2d.t() @ x2d if need_w else None  # the base path sees x without dropout
        d_bias = dy2d.sum(0) if (need_b and ctx.has_bias) else None
        return (dx, d_w, d_bias, d_a if need_a else None, d_b if need_lb else None,
                None, None, None, None)


class _MultiLoRALinearOnceFn(_MultiLoRALinearFn):
    """The same function for the kernel backends, whose backward is not itself differentiable: a
    backward that records a graph (``create_graph=True``, e.g. a gradient penalty) raises instead of
    returning gradients that silently lack their dependence on the adapters. The torch backend's
    backward is made of differentiable torch ops and keeps ``_MultiLoRALinearFn``."""

    @staticmethod
    def backward(ctx, dy):
        if torch.is_grad_enabled():  # the engine enables grad mode only for create_graph=True
            raise RuntimeError(
                f"multi_lora_linear: the {ctx.backend.__name__.rsplit('.', 1)[-1]} backend's backward is not "
                "differentiable (create_graph=True); backend='torch' supports higher-order gradients")
        return _MultiLoRALinearFn.backward(ctx, dy)


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
    impl = resolve_backend(backend, x.device, x.dtype)
    if x.dtype not in impl.DTYPES:
        names = ", ".join(str(d).removeprefix("torch.") for d in impl.DTYPES)
        raise TypeError(f"x: backend {backend!r} supports dtypes {names}, got {x.dtype}")
    fn = _MultiLoRALinearFn if impl is reference else _MultiLoRALinearOnceFn
    return fn.apply(x, weight, bias, lora_a, lora_b, plan, params, grad_sqnorm, impl)
