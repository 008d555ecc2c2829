"""Per-batch routing of samples to client adapters, shared by every multi-client module of a model.

A ``RoutingContext`` holds the client id of each *sample* of the current batch (set with
``route``). Wrapped layers see rows, not samples: a linear layer inside a transformer gets
``[batch, seq, d]`` (or its flattening ``[batch * seq, d]``), a pooled classifier ``[batch, d]``.
``plan_for`` expands the sample ids over the rows of the tensor a layer receives and builds
the ``LoRAPlan`` once per row count, so every layer of one forward pass (and their backward)
shares one plan.

The context also owns the per-client streams of LoRA dropout: a base seed and a call counter per
client, from which each layer call takes that client's seed (``fedhello.kernels.dropout``). The
counter of a client advances only in calls where it has rows, so a client's masks do not depend
on which other clients share the batch.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Mapping, Sequence

import numpy as np
import torch

from fedhello.kernels import LoRAPlan
from fedhello.kernels.dropout import MASK32 as _MASK32
from fedhello.kernels.dropout import next_call_seeds
from fedhello.seeds import client_seed

__all__ = ["RoutingContext", "normalize_client_ids"]


def normalize_client_ids(
    client_ids: torch.Tensor | Sequence[int] | int, num_clients: int, device: torch.device | None,
    *, check_range: bool = True,
) -> torch.Tensor | int:
    """Validate a routing: one int for the whole batch, or int64 ``[batch]`` per-sample ids.

    Args:
        check_range: check the values of a tensor of ids against ``[-1, num_clients)``. That
            check reads the tensor back to the host (a device sync); a caller that built the ids
            itself passes False.

    Raises:
        TypeError: not an int, an integer tensor or a sequence of ints.
        ValueError: not 1-D, or a value outside ``[-1, num_clients)``.
    """
    if isinstance(client_ids, bool):
        raise TypeError("client_ids: expected an int, an integer tensor [batch] or a list of ints, got bool")
    if isinstance(client_ids, (int, np.integer)):
        if not -1 <= int(client_ids) < num_clients:
            raise ValueError(f"client_ids: expected a client id in [-1, {num_clients}), got {int(client_ids)}")
        return int(client_ids)
    if isinstance(client_ids, torch.Tensor):
        ids = client_ids
    elif isinstance(client_ids, Sequence) and not isinstance(client_ids, (str, bytes)):
        if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in client_ids):
            raise TypeError(f"client_ids: expected a list of ints, got {list(client_ids)!r}")
        ids = torch.tensor(list(client_ids), dtype=torch.int64)
    else:
        raise TypeError(
            f"client_ids: expected an int, an integer tensor [batch] or a list of ints, got {type(client_ids).__name__}"
        )
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise TypeError(f"client_ids: expected an integer dtype, got {ids.dtype}")
    if ids.dim() != 1:
        raise ValueError(f"client_ids: expected a 1-D tensor [batch] (one id per sample), got shape {tuple(ids.shape)}")
    if check_range and ids.numel() > 0:
        lo, hi = (int(v) for v in torch.aminmax(ids))
        if lo < -1 or hi >= num_clients:
            raise ValueError(
                f"client_ids: expected values in [-1, {num_clients}) (num_clients={num_clients}), "
                f"got min {lo} and max {hi}"
            )
    ids = ids.to(torch.int64)
    return ids.to(device) if device is not None else ids


class RoutingContext:
    """Which client each sample of the current batch belongs to, and the plans built from it.

    Args:
        num_clients: N, the number of adapter slots.
        seed: base seed of the per-client LoRA-dropout generators.
    """

    def __init__(self, num_clients: int, seed: int = 0) -> None:
        self.num_clients = num_clients
        self._client_ids: torch.Tensor | int | None = None
        self._plans: dict[tuple[int, torch.device], LoRAPlan] = {}
        self._trusted, self._contiguous = False, None
        self._base_seeds = torch.tensor([client_seed(seed, c) & _MASK32 for c in range(num_clients)],
                                        dtype=torch.int64)
        self._draws = torch.zeros(num_clients, dtype=torch.int64)

    @property
    def active(self) -> bool:
        """True inside ``route``."""
        return self._client_ids is not None

    @property
    def client_ids(self) -> torch.Tensor | int | None:
        """The current routing: int64 ``[batch]``, one int for all samples, or None outside ``route``."""
        return self._client_ids

    @contextmanager
    def route(
        self, client_ids: torch.Tensor | Sequence[int] | int, device: torch.device | None = None,
        *, trusted: bool = False, contiguous: bool | None = None,
    ) -> Iterator["RoutingContext"]:
        """Route the forward passes run inside the block.

        Args:
            client_ids: int64 ``[batch]``, the client slot of each sample, ``-1`` for samples that
                use the frozen base model only; or one int for the whole batch.
            device: where the ids go (the model's device).
            trusted: the caller vouches that every id is in ``[-1, N)``: no range check, which
                would read the ids back to the host (one device sync per routing and per plan).
            contiguous: whether the ids are non-decreasing (each client one block of rows);
                ``None`` lets each plan test it (a host read). With ``trusted`` and a bool here,
                routing and plan building read nothing back.
        """
        if not isinstance(trusted, bool):
            raise TypeError(f"trusted: expected a bool, got {type(trusted).__name__}")
        if contiguous is not None and not isinstance(contiguous, bool):
            raise TypeError(f"contiguous: expected None or a bool, got {type(contiguous).__name__}")
        ids = normalize_client_ids(client_ids, self.num_clients, device, check_range=not trusted)
        saved = self._client_ids, self._plans, self._trusted, self._contiguous
        self._client_ids, self._plans, self._trusted, self._contiguous = ids, {}, trusted, contiguous
        try:
            yield self
        finally:
            self._client_ids, self._plans, self._trusted, self._contiguous = saved

    def row_client_ids(self, x: torch.Tensor, where: str) -> torch.Tensor:
        """int64 ``[rows]``: the client of every row of ``x [..., d]`` (rows = product of leading dims).

        The leading dimension of ``x`` must be the batch (``[batch, ..., d]``), or ``x`` is 2-D with
        a multiple of the batch as rows (the sample-major flattening ``[batch * seq, d]``).
        """
        if self._client_ids is None:
            raise RuntimeError(
                f"{where}: no routing is set; run the forward inside `with model.route(client_ids):` "
                "(with activation checkpointing, the backward too: it runs the forward again)"
            )
        rows = x.numel() // x.shape[-1] if x.dim() >= 1 and x.shape[-1] else 0
        ids = self._client_ids
        if isinstance(ids, int):
            return torch.full((rows,), ids, dtype=torch.int64, device=x.device)
        batch = ids.numel()
        if x.dim() >= 2 and x.shape[0] == batch:
            per_sample = rows // batch if batch else 0
        elif x.dim() == 2 and batch > 0 and rows % batch == 0:
            per_sample = rows // batch
        else:
            raise ValueError(
                f"client_ids: routing has {batch} samples but {where} got input of shape {tuple(x.shape)} "
                f"(expected [batch={batch}, ..., d] or [batch * seq, d])"
            )
        return ids.to(x.device).repeat_interleave(per_sample)

    def plan_for(self, x: torch.Tensor, where: str) -> LoRAPlan:
        """The ``LoRAPlan`` of the rows of ``x`` (built once per row count and device, then reused)."""
        rows = x.numel() // x.shape[-1] if x.dim() >= 1 and x.shape[-1] else 0
        key = (rows, x.device)
        plan = self._plans.get(key)
        if plan is None:
            # Rows repeat their sample's id, so the sample ids' range and order hold for the rows.
            plan = LoRAPlan.build(self.row_client_ids(x, where), self.num_clients,
                                  validate=not self._trusted, contiguous=self._contiguous)
            self._plans[key] = plan
        return plan

    def seed_dropout(self, seeds: int | Mapping[int, int]) -> None:
        """Restart the LoRA-dropout streams.

        Args:
            seeds: one base seed for every client (client c gets ``client_seed(seed, c)``), or
                ``{client: seed}`` to restart only those clients from exactly these seeds (so a
                client seeded with ``s`` draws the same masks in whatever slot it sits).
        """
        if isinstance(seeds, Mapping):
            for client, seed in seeds.items():
                if not 0 <= int(client) < self.num_clients:
                    raise ValueError(f"seeds: expected client keys in [0, {self.num_clients}), got {client}")
                self._base_seeds[int(client)] = int(seed) & _MASK32
                self._draws[int(client)] = 0
            return
        if isinstance(seeds, bool) or not isinstance(seeds, (int, np.integer)):
            raise TypeError(f"seeds: expected an int or a mapping client -> seed, got {type(seeds).__name__}")
        self._base_seeds.copy_(torch.tensor([client_seed(int(seeds), c) & _MASK32 for c in range(self.num_clients)]))
        self._draws.zero_()

    def dropout_seeds(self, plan: LoRAPlan) -> torch.Tensor:
        """int64 ``[N]`` dropout seeds of one layer call routed by ``plan``, on the plan's device.

        Advances the stream of every client with rows in ``plan`` (device ops only: no host read).
        """
        if self._draws.device != plan.device:
            self._base_seeds = self._base_seeds.to(plan.device)
            self._draws = self._draws.to(plan.device)
        self._draws += (plan.counts > 0).to(torch.int64)
        return next_call_seeds(self._base_seeds, self._draws)
