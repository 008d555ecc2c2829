"""Torch backend: the LoRA part of ``multi_lora_linear`` as a plain loop over clients.

This is the readable statement of the contract (DESIGN.md section 3) and the CPU default.
It is what PEFT-style code does when each client is a separate adapter: one small GEMM
pair per client. All LoRA arithmetic runs in float32 whatever the input dtype; results are
rounded once into the output dtype (float64 inputs stay in float64, for gradcheck).

Backends share one interface, used by the autograd function in ``multi_lora.py``:

* ``lora_forward(x2d, lora_a, lora_b, plan, params, out)`` adds the LoRA term into
  ``out`` (which already holds the base output) and returns what the backward needs;
* ``lora_backward(dy2d, x2d, lora_a, lora_b, plan, params, saved, dx, weight_grads,
  grad_sqnorm)`` adds the LoRA part of ``dx`` into ``dx`` (when not ``None``) and returns
  ``(dA, dB)`` (``None`` when ``weight_grads`` is False), accumulating ``grad_sqnorm``.
"""

from __future__ import annotations

import torch

from .checks import ClientParams
from .plan import LoRAPlan

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _accumulation_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _client_settings(params: ClientParams) -> tuple[list[float], list[int], list[bool]]:
    return params.scaling.tolist(), params.ranks.tolist(), params.trainable.tolist()


def lora_forward(
    x2d: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    plan: LoRAPlan,
    params: ClientParams,
    out: torch.Tensor,
) -> None:
    """``out[t] += s_c * (x_t A_c[:r_c]^T) B_c[:, :r_c]^T`` for every routed row t (in place).

    Shapes: ``x2d [T, d_in]``, ``lora_a [N, r_max, d_in]``, ``lora_b [N, d_out, r_max]``,
    ``out [T, d_out]`` in the input dtype.
    """
    scaling, ranks, _ = _client_settings(params)
    acc = _accumulation_dtype(x2d)
    for c in range(plan.num_clients):
        rows = plan.client_rows(c)
        r = ranks[c]
        if rows.numel() == 0 or r == 0:
            continue
        h = x2d[rows].to(acc) @ lora_a[c, :r].to(acc).t()
        delta = (scaling[c] * h) @ lora_b[c, :, :r].to(acc).t()
        out[rows] = (out[rows].to(acc) + delta).to(out.dtype)
    return None


def lora_backward(
    dy2d: torch.Tensor,
    x2d: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    plan: LoRAPlan,
    params: ClientParams,
    saved: None,
    dx: torch.Tensor | None,
    weight_grads: bool,
    grad_sqnorm: torch.Tensor | None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """LoRA part of the backward pass.

    ``dx [T, d_in]`` (input dtype) receives ``G_c A_c[:r_c]`` in place. Returns
    ``dA [N, r_max, d_in]`` and ``dB [N, d_out, r_max]`` in the adapters' dtype, zero for
    frozen clients, clients without rows and entries beyond each rank; ``grad_sqnorm[c]``
    (float32 ``[N]``) gets ``+= ||dA_c||^2 + ||dB_c||^2`` for trainable clients.
    """
    scaling, ranks, trainable = _client_settings(params)
    acc = _accumulation_dtype(x2d)
    d_a = torch.zeros_like(lora_a) if weight_grads else None
    d_b = torch.zeros_like(lora_b) if weight_grads else None
    for c in range(plan.num_clients):
        rows = plan.client_rows(c)
        r = ranks[c]
        if rows.numel() == 0 or r == 0:
            continue
        dy_c = dy2d[rows].to(acc)
        a_c = lora_a[c, :r].to(acc)
        g = scaling[c] * (dy_c @ lora_b[c, :, :r].to(acc))
        if dx is not None:
            dx[rows] = (dx[rows].to(acc) + g @ a_c).to(dx.dtype)
        if not (weight_grads and trainable[c]):
            continue
        x_c = x2d[rows].to(acc)
        grad_a = g.t() @ x_c
        grad_b = scaling[c] * (dy_c.t() @ (x_c @ a_c.t()))
        d_a[c, :r] = grad_a.to(d_a.dtype)
        d_b[c, :, :r] = grad_b.to(d_b.dtype)
        if grad_sqnorm is not None:
            grad_sqnorm[c] += grad_a.square().sum() + grad_b.square().sum()
    return d_a, d_b
