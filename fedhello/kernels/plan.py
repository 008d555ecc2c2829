"""Routing plan: which rows of a batch belong to which client's adapter.

A ``LoRAPlan`` is built once per training step from the per-row client ids and then
reused by every wrapped layer, in the forward and in the backward pass. It holds

* ``sorted_rows``: the row indices stably sorted by client id; rows routed to ``-1``
  (no adapter) come first and are never part of any work item;
* ``counts`` / ``offsets``: how many rows each client owns and where its run starts
  in ``sorted_rows`` (``offsets[c] .. offsets[c + 1]``);
* per row-block size, a work list of ``(client, row-tile)`` items for the Triton
  kernels. The list has a fixed length ``cdiv(T, BLOCK_M) + N`` (an upper bound on
  the real number of tiles); unused items carry client ``-1`` and the kernels exit
  early on them. A fixed grid keeps launches capturable by CUDA graphs.

Everything is computed with device ops, so building a plan on the GPU needs one
host synchronisation only: the range check of the client ids.
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
        tile_client: int32 ``[max_tiles]``, the client of each item, ``-1`` for unused items.
        tile_start: int32 ``[max_tiles]``, the item's first position in ``sorted_rows``.
    """

    block_m: int
    tile_client: torch.Tensor
    tile_start: torch.Tensor

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
    """

    client_ids: torch.Tensor
    num_clients: int
    sorted_rows: torch.Tensor
    counts: torch.Tensor
    offsets: torch.Tensor
    _tiles: dict = field(default_factory=dict, repr=False, compare=False)
    _host_offsets: list = field(default_factory=list, repr=False, compare=False)

    @staticmethod
    def build(client_ids: torch.Tensor, num_clients: int) -> "LoRAPlan":
        """Build the plan of one batch.

        Args:
            client_ids: integer tensor ``[T]`` (any order) with values in ``[-1, num_clients)``.
            num_clients: number of adapter slots N (>= 1).

        Raises:
            TypeError: ``client_ids`` is not an integer tensor or ``num_clients`` not an int.
            ValueError: wrong rank of ``client_ids``, ``num_clients < 1`` or ids out of range.
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
        ids = client_ids.to(torch.int64)
        if ids.numel() > 0:
            lo, hi = torch.aminmax(ids)
            lo, hi = int(lo), int(hi)
            if lo < -1 or hi >= num_clients:
                raise ValueError(
                    f"client_ids: expected values in [-1, {num_clients}) for num_clients={num_clients}, "
                    f"got min {lo} and max {hi}"
                )
        # Stable sort keeps each client's rows in their original order, which makes
        # per-client reductions reproducible and the reference loop easy to compare.
        sorted_rows = torch.sort(ids, stable=True).indices.to(torch.int32)
        per_bucket = torch.bincount(ids + 1, minlength=num_clients + 1)
        offsets = torch.cumsum(per_bucket, 0).to(torch.int32)
        counts = per_bucket[1:].to(torch.int32)
        return LoRAPlan(ids, num_clients, sorted_rows, counts, offsets)

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

    def tiles(self, block_m: int) -> TileList:
        """The ``(client, row-tile)`` work list for tiles of ``block_m`` rows (cached)."""
        cached = self._tiles.get(block_m)
        if cached is not None:
            return cached
        n = self.num_clients
        max_tiles = -(-self.num_rows // block_m) + n
        counts = self.counts.to(torch.int64)
        tiles_per_client = (counts + block_m - 1) // block_m
        tile_end = torch.cumsum(tiles_per_client, 0)
        item = torch.arange(max_tiles, device=self.device, dtype=torch.int64)
        owner = torch.searchsorted(tile_end, item, right=True)
        valid = owner < n
        owner_c = owner.clamp(max=n - 1)
        first_tile_of_owner = tile_end[owner_c] - tiles_per_client[owner_c]
        start = self.offsets[owner_c].to(torch.int64) + (item - first_tile_of_owner) * block_m
        tile_client = torch.where(valid, owner_c, -1).to(torch.int32)
        tile_start = torch.where(valid, start, 0).to(torch.int32)
        tl_ = TileList(block_m, tile_client.contiguous(), tile_start.contiguous())
        self._tiles[block_m] = tl_
        return tl_

    def to(self, device: torch.device | str) -> "LoRAPlan":
        """The same plan on another device."""
        return LoRAPlan(
            self.client_ids.to(device),
            self.num_clients,
            self.sorted_rows.to(device),
            self.counts.to(device),
            self.offsets.to(device),
        )
