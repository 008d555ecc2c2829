"""``ClientHeadBank``: a per-client copy of a trainable linear head (PEFT's ``modules_to_save``).

In one batched pass every row goes through the head of its own client: each row gathers its
client's weight by its id (a device op, no host read of the routing) and takes its own dot
products, so a row's output does not depend on the other rows of the batch. A client's
weight gradient is the sum of its rows' outer products, accumulated in row order. The gather
holds ``rows x out x in`` values: heads are small (``out`` is the number of classes).

Rows routed to ``-1`` go through the original head, frozen: like the LoRA layers, where such
rows get the base output, an unrouted sample sees the unmodified model.
"""

from __future__ import annotations

import torch
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
        ids = self.context.row_client_ids(x, self.name)
        x2d = x.reshape(-1, self.in_features)
        routed = ids >= 0
        slot = ids.clamp(min=0)
        # Each row's own client weight, gathered by the row's id: no host read of the routing,
        # and every row's dot products are the same whatever else is in the batch. Rows of -1
        # gather slot 0 but are replaced by the frozen head below (their gradient there is 0).
        # Gather, then cast: the backward sums the rows' gradients into the bank in float32
        # even when the backbone computes in half precision.
        weight = self.weight.index_select(0, slot).to(x.dtype)  # [rows, out, in]
        out = (x2d.unsqueeze(1) * weight).sum(-1)
        if self.bias is not None:
            out = out + self.bias.index_select(0, slot).to(x.dtype)
        out = torch.where(routed.unsqueeze(1), out, self.base(x2d))
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, clients={self.num_clients}"
