"""Torch backend (``backend="torch"``): the LoRA part of ``multi_lora_linear`` as a plain loop over clients.

This is the readable statement of the contract (``contract.Backend``; docs/design.md, section 1),
the CPU default where the csrc extension is not built, and the backend of float64 inputs and of
higher-order gradients: every op below is a differentiable torch op, so a backward run under
``create_graph=True`` records its own graph.
It is what PEFT-style code does when each client is a separate adapter: one small GEMM
pair per client. All LoRA arithmetic runs in float32 whatever the input dtype; results are
rounded once into the output dtype (float64 inputs stay in float64, for gradcheck). Dropout is
not fused: the caller masks ``x`` (``multi_lora.prepare_dropout``).
"""

from __future__ import annotations

import torch

from ..checks import ClientParams
from ..contract import Grads
from ..plan import LoRAPlan

NAME = "torch"
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
FUSED_DROPOUT = False


def _accumulation_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _client_settings(params: ClientParams) -> tuple[list[float], list[int], list[bool]]:
    return params.scaling.tolist(), params.ranks.tolist(), params.trainable.tolist()


def saved_shape(rows: int, r_max: int) -> tuple[int, ...]:
    """Shape of what ``lora_forward`` keeps for the backward: nothing (the registered ops pass an
    empty float32 tensor in its place)."""
    return (0,)


def lora_forward(x2d: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, bias: torch.Tensor | None,
                 plan: LoRAPlan, params: ClientParams) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``contract.Backend.lora_forward``: one GEMM pair per client with rows; keeps nothing (``saved`` is
    ``None``), since the backward recomputes ``x A_c^T`` from the inputs."""
    scaling, ranks, _ = _client_settings(params)
    acc = _accumulation_dtype(x2d)
    t, d_out = x2d.shape[0], lora_b.shape[1]
    if bias is None:
        out = x2d.new_zeros(t, d_out)
    else:
        out = bias.expand(t, d_out).clone()
    for c in range(plan.num_clients):
        rows = plan.client_rows(c)
        r = ranks[c]
        if rows.numel() == 0 or r == 0:
            continue
        h = x2d[rows].to(acc) @ lora_a[c, :r].to(acc).t()
        delta = (scaling[c] * h) @ lora_b[c, :, :r].to(acc).t()
        out[rows] = (out[rows].to(acc) + delta).to(out.dtype)
    return out, None


def lora_backward(dy2d: torch.Tensor, x2d: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, plan: LoRAPlan,
                  params: ClientParams, saved: torch.Tensor | None, need_dx: bool, weight_grads: bool,
                  grad_sqnorm: torch.Tensor | None) -> Grads:
    """``contract.Backend.lora_backward`` in differentiable torch ops (``saved`` is unused); under
    ``create_graph=True`` the gradients carry their own graph."""
    scaling, ranks, trainable = _client_settings(params)
    acc = _accumulation_dtype(x2d)
    dx = x2d.new_zeros(x2d.shape) if need_dx else None
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
            dx[rows] = (g @ a_c).to(dx.dtype)
        if not (weight_grads and trainable[c]):
            continue
        x_c = x2d[rows].to(acc)
        grad_a = g.t() @ x_c
        grad_b = scaling[c] * (dy_c.t() @ (x_c @ a_c.t()))
        d_a[c, :r] = grad_a.to(d_a.dtype)
        d_b[c, :, :r] = grad_b.to(d_b.dtype)
        if grad_sqnorm is not None:
            grad_sqnorm[c] += (grad_a.square().sum() + grad_b.square().sum()).detach()  # a statistic, not part of any graph
    return dx, d_a, d_b
