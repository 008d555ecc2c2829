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


@pytest.mark.parametrize("block_m", [1, 4, 16])
def test_tiles_with_unrouted_cover_every_row_once(block_m):
    gen = torch.Generator().manual_seed(100 + block_m)
    n = 5
    ids = torch.randint(-1, n, (97,), generator=gen)
    ids[ids == 2] = 3
    plan = LoRAPlan.build(ids, n)
    tiles = plan.tiles(block_m, include_unrouted=True)
    assert tiles.max_tiles == -(-97 // block_m) + n + 1
    off = plan.offsets.tolist()
    covered = []
    for client, start in zip(tiles.tile_client.tolist(), tiles.tile_start.tolist()):
        if client < 0:
            continue
        lo, hi = (0, off[0]) if client == n else (off[client], off[client + 1])
        assert lo <= start < hi
        covered.extend(range(start, min(start + block_m, hi)))
    assert sorted(covered) == list(range(97))


def test_client_first_indexes_each_clients_items():
    ids = torch.tensor([-1, 0, 0, 0, 2, 2, 1, 0, 2, -1, 2])
    plan = LoRAPlan.build(ids, 4)
    tiles = plan.tiles(2)
    first = tiles.client_first.tolist()
    clients = tiles.tile_client.tolist()
    for c in range(4):
        assert clients[first[c]:first[c + 1]] == [c] * ((int((ids == c).sum()) + 1) // 2)


def test_contiguous_is_detected_and_skips_the_sort():
    ids = torch.tensor([-1, -1, 0, 0, 1, 3, 3, 3])
    plan = LoRAPlan.build(ids, 4)
    assert plan.contiguous and torch.equal(plan.sorted_rows, torch.arange(8, dtype=torch.int32))
    assert not LoRAPlan.build(torch.tensor([1, 0, 0]), 2).contiguous


def test_contiguous_claim_is_checked():
    with pytest.raises(ValueError, match="contiguous"):
        LoRAPlan.build(torch.tensor([1, 0]), 2, contiguous=True)


def test_trusted_build_reads_nothing_back(monkeypatch):
    calls = []
    for name in ("item", "tolist", "cpu", "__int__", "__bool__"):
        orig = getattr(torch.Tensor, name)

        def spy(self, *a, _orig=orig, _name=name, **k):
            calls.append(_name)
            return _orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, spy)
    plan = LoRAPlan.build(torch.tensor([0, 0, 1, 2]), 3, validate=False, contiguous=True)
    plan.tiles(2)
    plan.tiles(2, include_unrouted=True)
    monkeypatch.undo()
    assert calls == []
    assert plan.contiguous


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_plan_does_not_alias_the_callers_ids(backend):
    """Reusing the ids tensor in place after building leaves the plan, and dropout's masks, as they were."""
    from fedhello.kernels import multi_lora_linear
    from fedhello.kernels.multi_lora import _extension

    if backend == "cpu" and _extension("cpu") is None:
        pytest.skip("csrc extension for cpu is not built")
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(-1, 3, (40,), generator=gen)
    plan = LoRAPlan.build(ids, 3)
    x, w = torch.randn(40, 16, generator=gen), torch.randn(12, 16, generator=gen)
    a, b = torch.randn(3, 4, 16, generator=gen), torch.randn(3, 12, 4, generator=gen)

    def call():
        return multi_lora_linear(x, w, None, a, b, plan, 2.0, backend=backend, dropout_p=0.5, dropout_seeds=[7, 8, 9])

    before = call()
    ids.copy_(ids.flip(0))
    ids[:5] = 2
    assert torch.equal(call(), before)
