"""Non-finite client updates: find them once per update, so one client's NaN cannot poison the model.

The server checks every ``LocalResult`` of a round before aggregating (``find_nonfinite``): its
mean loss, its Fisher scores and every tensor of its state. A client with anything non-finite
is dropped from that round's aggregation (and from the strategy's Fisher statistics); if every
participant is dropped the run stops with ``NonFiniteRoundError``. The check costs one
host-device transfer per client update, none inside the local training steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch

from fedhello.errors import UserError

__all__ = ["NonFiniteUpdate", "NonFiniteRoundError", "find_nonfinite"]


class NonFiniteRoundError(UserError):
    """Every participant of a round sent a non-finite update; nothing could be aggregated."""


@dataclass
class NonFiniteUpdate:
    """What was non-finite in one client's update.

    Attributes:
        client: the client's id.
        loss: its mean training loss was NaN or infinite.
        blocks: transformer blocks with a non-finite adapter tensor or Fisher score (sorted).
        head: a head tensor (block None) was non-finite.
    """

    client: int
    loss: bool = False
    blocks: list[int] = field(default_factory=list)
    head: bool = False

    def describe(self) -> str:
        """``"loss, blocks [2, 3], head"``: the parts that were non-finite."""
        parts = (["loss"] if self.loss else []) + ([f"blocks {self.blocks}"] if self.blocks else [])
        return ", ".join(parts + (["head"] if self.head else []))

    def to_record(self) -> dict[str, Any]:
        """JSON-ready, for the round's ``metrics.jsonl`` record."""
        return {"client": self.client, "loss": self.loss, "blocks": self.blocks, "head": self.head}


def find_nonfinite(results: Sequence[Any], tensor_blocks: Mapping[str, int | None]) -> dict[int, NonFiniteUpdate]:
    """Position in ``results`` -> what was non-finite, for every ``LocalResult`` with a NaN or Inf.

    Args:
        results: ``LocalResult``-like objects (``client``, ``loss``, ``fisher`` float ``[L]``,
            ``state`` name -> tensor on any device).
        tensor_blocks: state name -> block (None for head tensors); names not in it are not checked.
    """
    found: dict[int, NonFiniteUpdate] = {}
    for i, res in enumerate(results):
        names = [n for n in res.state if n in tensor_blocks]
        # One flag per tensor, fetched in one transfer: the only sync this check adds.
        flags = torch.stack([torch.isfinite(res.state[n]).all() for n in names]).tolist() if names else []
        bad_tensors = [n for n, ok in zip(names, flags) if not ok]
        fisher = torch.as_tensor(res.fisher).detach().cpu()
        blocks = {tensor_blocks[n] for n in bad_tensors if tensor_blocks[n] is not None}
        blocks |= set(torch.nonzero(~torch.isfinite(fisher)).flatten().tolist())
        loss_bad = not math.isfinite(float(res.loss))
        head_bad = any(tensor_blocks[n] is None for n in bad_tensors)
        if loss_bad or blocks or head_bad:
            found[i] = NonFiniteUpdate(int(res.client), loss_bad, sorted(blocks), head_bad)
    return found
