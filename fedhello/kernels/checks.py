"""Validation of ``multi_lora_linear`` arguments.

Every check raises a ``TypeError`` (wrong kind or dtype) or ``ValueError`` (wrong shape,
device or range) whose message starts with the argument's name and states the expected
and the actual value, so that a bad call fails here and never inside a kernel.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Sequence

import torch

from .plan import LoRAPlan

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# Half-precision activations: computed with float32 master adapters and float32 intermediates.
HALF_DTYPES = (torch.float16, torch.bfloat16)


def in_torch_func_transform() -> bool:
    """Whether this call runs inside a ``torch.func`` transform (grad, vmap, ...): its tensors are
    torch.func's wrappers, which kernels cannot read and saved-tensor hooks (checkpoints) cannot serve."""
    return torch._C._functorch.peek_interpreter_stack() is not None


@dataclass(frozen=True)
class ClientParams:
    """Per-client settings of one call, normalised onto the device of ``x``.

    Attributes:
        scaling: float32 ``[N]``.
        ranks: int32 ``[N]``, each in ``[0, r_max]``.
        trainable: bool ``[N]``.
        dropout_p: LoRA dropout probability on the adapters' input, in ``[0, 1)``.
        dropout_seeds: int64 ``[N]`` per-client seeds of this call's dropout masks (only used,
            and only set, when ``dropout_p > 0``).
    """

    scaling: torch.Tensor
    ranks: torch.Tensor
    trainable: torch.Tensor
    dropout_p: float = 0.0
    dropout_seeds: torch.Tensor | None = None


def _tensor(name: str, value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    return value


def _shape(name: str, t: torch.Tensor, expected: tuple, what: str) -> None:
    if tuple(t.shape) != expected:
        raise ValueError(f"{name}: expected shape {what} = {expected}, got {tuple(t.shape)}")


def _same_device(name: str, t: torch.Tensor, device: torch.device) -> None:
    if t.device != device:
        raise ValueError(f"{name}: expected a tensor on {device} (the device of x), got {t.device}")


def _per_client(name: str, value: object, n: int, device: torch.device) -> torch.Tensor:
    """A sequence or tensor of N per-client values, as a tensor on ``device``."""
    if isinstance(value, torch.Tensor):
        t = value
    elif isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        t = torch.tensor(list(value))
    else:
        raise TypeError(f"{name}: expected a tensor or sequence of {n} values, got {type(value).__name__}")
    if t.dim() != 1 or t.numel() != n:
        raise ValueError(f"{name}: expected shape [N] = ({n},), got {tuple(t.shape)}")
    return t.to(device)


def check_inputs(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, *lora_args) -> ClientParams:
    """Validate a ``multi_lora_linear`` call (``lora_args``: the arguments after ``bias``, as
    ``check_lora_inputs`` takes them after ``x``); return its per-client settings on x's device."""
    return check_lora_inputs(x, *lora_args, d_out=check_base_layer(x, weight, bias))


def check_base_layer(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> int:
    """Validate ``multi_lora_linear``'s frozen layer; return its ``d_out``."""
    x = _tensor("x", x)
    weight = _tensor("weight", weight)
    _check_x(x)
    if weight.dtype != x.dtype:
        raise TypeError(f"weight: expected dtype {x.dtype} (the dtype of x), got {weight.dtype}")
    if weight.dim() != 2:
        raise ValueError(f"weight: expected shape [d_out, d_in], got {tuple(weight.shape)}")
    d_out, d_in = weight.shape
    if x.shape[-1] != d_in:
        raise ValueError(f"x: expected last dimension d_in = {d_in} (weight.shape[1]), got {x.shape[-1]}")
    _same_device("weight", weight, x.device)
    if bias is not None:
        bias = _tensor("bias", bias)
        if bias.dtype != x.dtype:
            raise TypeError(f"bias: expected dtype {x.dtype} (the dtype of x), got {bias.dtype}")
        _shape("bias", bias, (d_out,), "[d_out]")
        _same_device("bias", bias, x.device)
    return d_out


def adapter_dtypes(x_dtype: torch.dtype) -> tuple[torch.dtype, ...]:
    """The adapter dtypes allowed with activations of ``x_dtype``: the same one, or float32 master
    adapters under float16/bfloat16 activations."""
    if x_dtype in HALF_DTYPES:
        return (x_dtype, torch.float32)
    return (x_dtype,)


def _check_x(x: torch.Tensor) -> None:
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"x: expected dtype float32, float16, bfloat16 or float64, got {x.dtype}")
    if x.dim() < 1:
        raise ValueError("x: expected shape [..., d_in], got a 0-d tensor")


def check_lora_inputs(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    plan: LoRAPlan,
    scaling: float | torch.Tensor | Sequence[float],
    ranks: torch.Tensor | Sequence[int] | None,
    trainable: torch.Tensor | Sequence[bool] | None,
    grad_sqnorm: torch.Tensor | None,
    dropout_p: float = 0.0,
    dropout_seeds: torch.Tensor | Sequence[int] | None = None,
    *,
    d_out: int | None = None,
) -> ClientParams:
    """Validate the LoRA arguments of a call (``lora_delta``'s, and ``multi_lora_linear``'s after its
    base-layer ones); ``d_out`` is the base layer's output width when there is one.

    Nothing is read back from the device: tensor ``ranks`` and ``scaling`` are range-checked with
    an asynchronous device assertion (``_assert_on_device``), so a call can run inside a CUDA graph.
    """
    x = _tensor("x", x)
    lora_a = _tensor("lora_a", lora_a)
    lora_b = _tensor("lora_b", lora_b)
    if not isinstance(plan, LoRAPlan):
        raise TypeError(f"plan: expected a LoRAPlan (LoRAPlan.build), got {type(plan).__name__}")
    _check_x(x)
    allowed = adapter_dtypes(x.dtype)
    for name, t in (("lora_a", lora_a), ("lora_b", lora_b)):
        if t.dtype not in allowed:
            what = " or ".join(str(d) for d in allowed)
            raise TypeError(f"{name}: expected dtype {what} (allowed with x of dtype {x.dtype}), got {t.dtype}")
    if lora_b.dtype != lora_a.dtype:
        raise TypeError(f"lora_b: expected dtype {lora_a.dtype} (the dtype of lora_a), got {lora_b.dtype}")
    device = x.device
    d_in = x.shape[-1]

    if lora_a.dim() != 3:
        raise ValueError(f"lora_a: expected shape [N, r_max, d_in], got {tuple(lora_a.shape)}")
    n, r_max, _ = lora_a.shape
    _shape("lora_a", lora_a, (n, r_max, d_in), "[N, r_max, d_in]")
    if d_out is None:
        if lora_b.dim() != 3:
            raise ValueError(f"lora_b: expected shape [N, d_out, r_max], got {tuple(lora_b.shape)}")
        d_out = lora_b.shape[1]
    _shape("lora_b", lora_b, (n, d_out, r_max), "[N, d_out, r_max]")
    _same_device("lora_a", lora_a, device)
    _same_device("lora_b", lora_b, device)

    rows = math.prod(x.shape[:-1])
    if plan.num_rows != rows:
        raise ValueError(f"plan: expected num_rows = {rows} (rows of x), got {plan.num_rows}")
    if plan.num_clients != n:
        raise ValueError(f"plan: expected num_clients = {n} (lora_a.shape[0]), got {plan.num_clients}")
    _same_device("plan", plan.client_ids, device)

    scale_t = _check_scaling(scaling, n, device)

    if ranks is None:
        ranks_t = torch.full((n,), r_max, dtype=torch.int32, device=device)
    else:
        ranks_t = _per_client("ranks", ranks, n, device)
        if ranks_t.dtype.is_floating_point or ranks_t.dtype == torch.bool:
            raise TypeError(f"ranks: expected an integer dtype, got {ranks_t.dtype}")
        _check_ranks(ranks_t, r_max)
        ranks_t = ranks_t.to(torch.int32)

    if trainable is None:
        train_t = torch.ones(n, dtype=torch.bool, device=device)
    else:
        train_t = _per_client("trainable", trainable, n, device)
        if train_t.dtype != torch.bool:
            raise TypeError(f"trainable: expected dtype torch.bool, got {train_t.dtype}")

    if grad_sqnorm is not None:
        grad_sqnorm = _tensor("grad_sqnorm", grad_sqnorm)
        if grad_sqnorm.dtype != torch.float32:
            raise TypeError(f"grad_sqnorm: expected dtype torch.float32, got {grad_sqnorm.dtype}")
        _shape("grad_sqnorm", grad_sqnorm, (n,), "[N]")
        _same_device("grad_sqnorm", grad_sqnorm, device)
        if not grad_sqnorm.is_contiguous():
            raise ValueError("grad_sqnorm: expected a contiguous tensor (it is accumulated in place)")
    seeds_t = _check_dropout(dropout_p, dropout_seeds, n, device)
    return ClientParams(scale_t.contiguous(), ranks_t.contiguous(), train_t.contiguous(), float(dropout_p), seeds_t)


def _check_scaling(scaling: object, n: int, device: torch.device) -> torch.Tensor:
    """float32 ``[N]`` finite scales on ``device`` (a NaN or infinite scale would silently poison
    every output row of its client)."""
    if isinstance(scaling, bool):
        raise TypeError("scaling: expected a float or a float tensor [N], got bool")
    if isinstance(scaling, numbers.Real):
        if not math.isfinite(float(scaling)):
            raise ValueError(f"scaling: expected a finite float, got {scaling}")
        return torch.full((n,), float(scaling), dtype=torch.float32, device=device)
    if isinstance(scaling, torch.Tensor) and scaling.requires_grad:
        raise ValueError("scaling: expected constant scales (no gradient flows to them), got a tensor "
                         "that requires grad; pass scaling.detach()")
    scale_t = _per_client("scaling", scaling, n, device)
    if not scale_t.dtype.is_floating_point:
        raise TypeError(f"scaling: expected a floating dtype, got {scale_t.dtype}")
    scale_t = scale_t.to(torch.float32)
    if scale_t.numel():
        _assert_on_device(torch.isfinite(scale_t).all(), "scaling: expected finite values",
                          lambda: f"got {scale_t.tolist()}")
    return scale_t


def _check_ranks(ranks: torch.Tensor, r_max: int) -> None:
    """Range check of ``ranks`` without a host read (see ``_assert_on_device``)."""
    if ranks.numel() == 0:
        return
    _assert_on_device(((ranks >= 0) & (ranks <= r_max)).all(), f"ranks: expected values in [0, r_max={r_max}]",
                      lambda: f"got min {ranks.min().item()} and max {ranks.max().item()}")


def _assert_on_device(ok: torch.Tensor, message: str, actual) -> None:
    """Check a bool scalar tensor without a host read.

    On CPU the check runs at once and a violation raises ``ValueError`` (``message``, then what
    ``actual()`` says was given); on a GPU it is a device-side assertion that fails the next
    synchronising call with ``message`` (the price of never stalling the launch queue).
    """
    if ok.device.type == "cpu":
        try:
            torch._assert_async(ok, message)
        except RuntimeError:
            raise ValueError(f"{message}, {actual()}") from None
    else:
        torch._assert_async(ok, message)


def _check_dropout(p: object, seeds: object, n: int, device: torch.device) -> torch.Tensor | None:
    """Validate ``dropout_p``/``dropout_seeds``; return int64 ``[N]`` seeds on ``device`` (or None)."""
    if isinstance(p, bool) or not isinstance(p, numbers.Real):
        raise TypeError(f"dropout_p: expected a float in [0, 1), got {type(p).__name__}")
    if not 0.0 <= float(p) < 1.0:
        raise ValueError(f"dropout_p: expected a probability in [0, 1), got {p}")
    if float(p) == 0.0:
        return None
    if seeds is None:
        raise ValueError(f"dropout_seeds: expected int64 [N] = ({n},) per-client seeds when dropout_p > 0, got None")
    seeds_t = _per_client("dropout_seeds", seeds, n, device)
    if seeds_t.dtype.is_floating_point or seeds_t.dtype == torch.bool or seeds_t.dtype.is_complex:
        raise TypeError(f"dropout_seeds: expected an integer dtype, got {seeds_t.dtype}")
    return seeds_t.to(torch.int64).contiguous()
