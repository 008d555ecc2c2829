"""Routing plan: which rows of a batch belong to which client's adapter.

A ``LoRAPlan`` is built once per training step from the per-row client ids and then
reused by every wrapped layer, in the forward and in the backward pass. It holds

* ``sorted_rows``: the row indices stably sorted by client id; rows routed to ``-1``
  (no adapter) come first;
* ``counts`` / ``offsets``: how many rows each client owns and where its run starts
  in ``sorted_rows`` (``offsets[c] .. offsets[c + 1]``);
* ``contiguous``: True when the ids are already sorted (``sorted_rows`` is the identity),
  as in the batched engine, which gives each client one contiguous block of rows. The
  kernels then address rows directly instead of gathering them through ``sorted_rows``;
* per row-block size, a work list of ``(client, row-tile)`` items for the Triton
  kernels. The list has a fixed length (``cdiv(T, block_m) + N``, one more when the
  unrouted rows get items too): an upper bound on the real number of tiles, so a launch
  grid never depends on the routing and can be captured by CUDA graphs. Unused items
  carry client ``-1`` and the kernels exit early on them.

Everything is computed with device ops. ``build`` reads one small tensor back to the host
(the range check of the ids and the contiguity test); a caller that already knows both
passes ``validate=False, contiguous=...`` and the build reads nothing back.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["LoRAPlan", "TileList"]


@dataclass(frozen=True)
class TileList:
    """Work items of one row-block size.

    Attributes:
        block_m: rows per tile.
        tile_client: int32 ``[max_tiles]``, the client of each item; ``num_clients`` for an item
            of unrouted rows (only in lists built with ``include_unrouted``), ``-1`` for unused items.
        tile_start: int32 ``[max_tiles]``, the item's first position in ``sorted_rows``.
        client_first: int32 ``[N + 1]``, index of each client's first item (``client_first[c] ..
            client_first[c + 1]`` are client c's items; the unrouted items, if any, come first).
    """

    block_m: int
    tile_client: torch.Tensor
    tile_start: torch.Tensor
    client_first: torch.Tensor

    @property
    def max_tiles(self) -> int:
        return self.tile_client.numel()


@dataclass(frozen=True)
class LoRAPlan:
    """Routing work list shared by all multi-LoRA layers of one step.

    Attributes:
        client_ids: int64 ``[T]``, the client of each row, ``-1`` for rows without adapter.
        num_clients: N, the number of adapter slots.
        sorted_rows: int32 ``[T]``, row indices stably sorted by client (``-1`` rows first).
        counts: int32 ``[N]``, rows per client.
        offsets: int32 ``[N + 1]``, start of each client's run in ``sorted_rows``;
            ``offsets[0]`` is the number of unrouted rows.
        contiguous: ``sorted_rows`` is ``arange(T)`` (the ids are non-decreasing).
    """

    client_ids: torch.Tensor
    num_clients: int
    sorted_rows: torch.Tensor
    counts: torch.Tensor
    offsets: torch.Tensor
    contiguous: bool = False
    _tiles: dict = field(default_factory=dict, repr=False, compare=False)
    _host_offsets: list = field(default_factory=list, repr=False, compare=False)

    @staticmethod
    def build(
        client_ids: torch.Tensor,
        num_clients: int,
        *,
        validate: bool = True,
        contiguous: bool | None = None,
    ) -> "LoRAPlan":
        """Build the plan of one batch.

        Args:
            client_ids: integer tensor ``[T]`` (any order) with values in ``[-1, num_clients)``; the
                plan keeps its own int64 copy.
            num_clients: number of adapter slots N (>= 1).
            validate: check the range of the ids (and a ``contiguous`` claim) on the host.
            contiguous: whether the ids are non-decreasing; ``None`` tests it. With
                ``validate=False`` and a bool here, building reads nothing back to the host
                (the caller vouches for both facts).

        Raises:
            TypeError: ``client_ids`` is not an integer tensor or ``num_clients`` not an int.
            ValueError: wrong rank of ``client_ids``, ``num_clients < 1``, ids out of range, or
                ``contiguous=True`` for ids that are not sorted (when validating).
        """
        if not isinstance(client_ids, torch.Tensor):
            raise TypeError(f"client_ids: expected a torch.Tensor, got {type(client_ids).__name__}")
        if client_ids.dtype.is_floating_point or client_ids.dtype.is_complex or client_ids.dtype == torch.bool:
            raise TypeError(f"client_ids: expected an integer dtype, got {client_ids.dtype}")
        if client_ids.dim() != 1:
            raise ValueError(f"client_ids: expected a 1-D tensor [T], got shape {tuple(client_ids.shape)}")
        if isinstance(num_clients, bool) or not isinstance(num_clients, int):
            raise TypeError(f"num_clients: expected an int, got {type(num_clients).__name__}")
        if num_clients < 1:
            raise ValueError(f"num_clients: expected >= 1, got {num_clients}")
        if contiguous is not None and not isinstance(contiguous, bool):
            raise TypeError(f"contiguous: expected None or a bool, got {type(contiguous).__name__}")
        # A copy even when the dtype already matches: the plan must not change meaning when the
        # caller later reuses its ids tensor in place (dropout masks read the ids).
        ids = client_ids.to(torch.int64, copy=True)
        if ids.numel() > 0 and (validate or contiguous is None):
            # One read for all host facts: min, max and whether the ids are sorted.
            lo, hi = torch.aminmax(ids)
            is_sorted = (ids[1:] >= ids[:-1]).all()
            lo, hi, is_sorted = torch.stack([lo, hi, is_sorted.to(torch.int64)]).tolist()
            if lo < -1 or hi >= num_clients:
                raise ValueError(
                    f"client_ids: expected values in [-1, {num_clients}) for num_clients={num_clients}, "
                    f"got min {lo} and max {hi}"
                )
            if contiguous and not is_sorted:
                raise ValueError("contiguous: True was given but client_ids are not sorted (non-decreasing)")
            contiguous = bool(is_sorted)
        elif contiguous is None:  # an empty batch
            contiguous = True
        if contiguous:
            sorted_rows = torch.arange(ids.numel(), dtype=torch.int32, device=ids.device)
        else:
            # Stable sort keeps each client's rows in their original order, which makes
            # per-client reductions reproducible and the reference loop easy to compare.
            sorted_rows = torch.sort(ids, stable=True).indices.to(torch.int32)
        # scatter_add_ rather than bincount: on CUDA bincount reads the max back to size its output.
        per_bucket = torch.zeros(num_clients + 1, dtype=torch.int64, device=ids.device)
        per_bucket.scatter_add_(0, ids + 1, torch.ones_like(ids))
        offsets = torch.cumsum(per_bucket, 0).to(torch.int32)
        counts = per_bucket[1:].to(torch.int32)
        return LoRAPlan(ids, num_clients, sorted_rows, counts, offsets, contiguous)

    @property
    def num_rows(self) -> int:
        """T, the number of rows the plan routes (routed or not)."""
        return self.client_ids.numel()

    @property
    def device(self) -> torch.device:
        return self.client_ids.device

    def host_offsets(self) -> list[int]:
        """``offsets`` as a Python list (one device sync, cached). Used by loop backends."""
        if not self._host_offsets:
            self._host_offsets.extend(self.offsets.tolist())
        return self._host_offsets

    def client_rows(self, client: int) -> torch.Tensor:
        """int64 row indices of one client, in original order."""
        off = self.host_offsets()
        return self.sorted_rows[off[client] : off[client + 1]].long()

    def tiles(self, block_m: int, include_unrouted: bool = False) -> TileList:
        """The ``(client, row-tile)`` work list for tiles of ``block_m`` rows (cached).

        With ``include_unrouted`` the rows routed to ``-1`` get items too (client value
        ``num_clients``), for kernels that must write every row of their output.
        """
        key = (block_m, include_unrouted)
        cached = self._tiles.get(key)
        if cached is not None:
            return cached
        n = self.num_clients
        # Buckets in position order: [unrouted,] client 0, ..., client N-1.
        buckets = torch.diff(self.offsets, prepend=self.offsets.new_zeros(1)).to(torch.int64)
        starts = torch.cat([self.offsets.new_zeros(1), self.offsets[:-1]]).to(torch.int64)
        labels = torch.arange(-1, n, device=self.device, dtype=torch.int64)
        if not include_unrouted:
            buckets, starts, labels = buckets[1:], starts[1:], labels[1:]
        max_tiles = -(-self.num_rows // block_m) + buckets.numel()
        tiles_per_bucket = (buckets + block_m - 1) // block_m
        tile_end = torch.cumsum(tiles_per_bucket, 0)
        item = torch.arange(max_tiles, device=self.device, dtype=torch.int64)
        owner = torch.searchsorted(tile_end, item, right=True)
        valid = owner < buckets.numel()
        owner_c = owner.clamp(max=buckets.numel() - 1)
        first_of_owner = tile_end[owner_c] - tiles_per_bucket[owner_c]
        start = starts[owner_c] + (item - first_of_owner) * block_m
        label = torch.where(labels[owner_c] < 0, n, labels[owner_c])
        tile_client = torch.where(valid, label, -1).to(torch.int32)
        tile_start = torch.where(valid, start, 0).to(torch.int32)
        client_ends = tile_end[-n:]
        client_first = torch.cat([client_ends[:1] - tiles_per_bucket[-n:][:1], client_ends]).to(torch.int32)
        result = TileList(block_m, tile_client.contiguous(), tile_start.contiguous(), client_first.contiguous())
        self._tiles[key] = result
        return result

    def to(self, device: torch.device | str) -> "LoRAPlan":
        """The same plan on another device."""
        return LoRAPlan(
            self.client_ids.to(device),
            self.num_clients,
            self.sorted_rows.to(device),
            self.counts.to(device),
            self.offsets.to(device),
            self.contiguous,
        )
