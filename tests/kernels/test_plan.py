"""LoRAPlan: sorting, counts, offsets and the fixed-size tile work list."""

from __future__ import annotations

import pytest
import torch

from fedhello.kernels import LoRAPlan


@pytest.mark.parametrize("seed", range(5))
def test_sorted_rows_group_clients_stably(seed):
    gen = torch.Generator().manual_seed(seed)
    n = 6
    ids = torch.randint(-1, n, (200,), generator=gen)
    plan = LoRAPlan.build(ids, n)
    off = plan.offsets.tolist()
    assert off[0] == int((ids == -1).sum()) and off[-1] == 200
    for c in range(n):
        rows = plan.sorted_rows[off[c]:off[c + 1]].long()
        expected = torch.nonzero(ids == c).flatten()
        assert torch.equal(rows, expected)  # same rows, original order kept
        assert plan.counts[c] == expected.numel()
    assert sorted(plan.sorted_rows.tolist()) == list(range(200))


@pytest.mark.parametrize("block_m", [1, 4, 16, 64])
def test_tiles_cover_every_routed_row_once(block_m):
    gen = torch.Generator().manual_seed(block_m)
    n = 9
    ids = torch.randint(-1, n, (137,), generator=gen)
    ids[ids == 4] = 5  # a client without rows
    plan = LoRAPlan.build(ids, n)
    tiles = plan.tiles(block_m)
    assert tiles.max_tiles == -(-137 // block_m) + n  # fixed: independent of the routing
    covered = []
    off = plan.offsets.tolist()
    for client, start in zip(tiles.tile_client.tolist(), tiles.tile_start.tolist()):
        if client < 0:
            continue
        assert off[client] <= start < off[client + 1]
        covered.extend(range(start, min(start + block_m, off[client + 1])))
    assert sorted(covered) == list(range(off[0], 137))
    assert plan.tiles(block_m) is tiles  # cached


def test_all_unrouted_has_no_work():
    plan = LoRAPlan.build(torch.full((10,), -1), 3)
    assert plan.counts.tolist() == [0, 0, 0]
    assert (plan.tiles(4).tile_client == -1).all()


def test_empty_batch():
    plan = LoRAPlan.build(torch.zeros(0, dtype=torch.long), 2)
    assert plan.num_rows == 0 and plan.offsets.tolist() == [0, 0, 0]
    assert plan.tiles(8).max_tiles == 2
