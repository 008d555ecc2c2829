"""``ClientHeadBank``: a per-client copy of a trainable linear head (PEFT's ``modules_to_save``).

In one batched pass every row goes through the head of its own client: the rows are grouped
by client with the batch's ``LoRAPlan`` (a stable sort), each group is multiplied by its
client's weight, and the results are put back in the original order. Each client's output
and gradient are therefore exactly those of the client's rows run alone through its head.

Rows routed to ``-1`` go through the original head, frozen: like the LoRA layers, where such
rows get the base output, an unrouted sample sees the unmodified model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .routing import RoutingContext

__all__ = ["ClientHeadBank"]


class ClientHeadBank(nn.Module):
    """N trainable copies of a linear head, applied per routed row.

    Args:
        base: the ``nn.Linear`` head; it is kept frozen as ``self.base`` and serves unrouted rows.
        num_clients: N.
        context: the routing shared with the rest of the model (a private one by default).
        name: the head's qualified name, used in error messages.

    Parameters: ``weight`` float32 ``[N, out, in]`` and ``bias`` float32 ``[N, out]`` (absent
    when the head has no bias), every slot a copy of the original head. Input ``[..., in]``
    with leading dim = batch (or ``[batch * seq, in]``), output ``[..., out]`` in the input dtype.
    """

    def __init__(
        self, base: nn.Linear, num_clients: int, context: RoutingContext | None = None, name: str = "ClientHeadBank"
    ) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"base: expected an nn.Linear head, got {type(base).__name__}")
        if isinstance(num_clients, bool) or not isinstance(num_clients, int) or num_clients < 1:
            raise ValueError(f"num_clients: expected an int >= 1, got {num_clients!r}")
        self.base = base.requires_grad_(False)
        self.num_clients = num_clients
        self.in_features, self.out_features = base.in_features, base.out_features
        self.context = context if context is not None else RoutingContext(num_clients)
        self.name = name
        self.weight = nn.Parameter(base.weight.detach().to(torch.float32).unsqueeze(0).repeat(num_clients, 1, 1))
        if base.bias is not None:
            self.bias = nn.Parameter(base.bias.detach().to(torch.float32).unsqueeze(0).repeat(num_clients, 1))
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        plan = self.context.plan_for(x, self.name)
        x2d = x.reshape(-1, self.in_features)
        order = plan.sorted_rows.long()
        offsets = plan.host_offsets()
        grouped = x2d[order]
        parts = []
        if offsets[0] > 0:
            parts.append(self.base(grouped[: offsets[0]]))
        for c in range(self.num_clients):
            start, end = offsets[c], offsets[c + 1]
            if end > start:
                bias = self.bias[c].to(x.dtype) if self.bias is not None else None
                parts.append(F.linear(grouped[start:end], self.weight[c].to(x.dtype), bias))
        out_grouped = torch.cat(parts) if parts else x2d.new_zeros(0, self.out_features)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        return out_grouped[inverse].reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, clients={self.num_clients}"
