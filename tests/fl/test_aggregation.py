"""Layer-wise and rank-padded aggregation against hand-computed values."""

from __future__ import annotations

import pytest
import torch

from fedhello.fl.aggregation import ClientUpdate, aggregate_layerwise, aggregate_rank_padded, lora_rank_dims

BLOCKS = {"b0.lora_A": 0, "b1.lora_A": 1, "b2.lora_A": 2, "head.weight": None}


def _global() -> dict[str, torch.Tensor]:
    return {name: torch.full((2, 3), 10.0) for name in BLOCKS}


def _delta(value: float) -> torch.Tensor:
    return torch.full((2, 3), value)


def _updates() -> list[ClientUpdate]:
    return [
        # Client 0 also sends a delta for block 1, which it did not train: it must be ignored.
        ClientUpdate({"b0.lora_A": _delta(1.0), "b1.lora_A": _delta(-50.0), "head.weight": _delta(1.0)},
                     num_samples=1, trained_blocks={0}),
        ClientUpdate({"b0.lora_A": _delta(2.0), "b1.lora_A": _delta(3.0), "head.weight": _delta(2.0)},
                     num_samples=3, trained_blocks=[0, 1]),
        ClientUpdate({"b1.lora_A": _delta(6.0), "head.weight": _delta(4.0)},
                     num_samples=6, trained_blocks=torch.tensor([False, True, False])),
    ]


def test_layerwise_weighted_by_samples():
    g = _global()
    new = aggregate_layerwise(g, _updates(), BLOCKS)
    torch.testing.assert_close(new["b0.lora_A"], _delta(10 + (1 * 1 + 3 * 2) / 4))
    torch.testing.assert_close(new["b1.lora_A"], _delta(10 + (3 * 3 + 6 * 6) / 9))
    torch.testing.assert_close(new["head.weight"], _delta(10 + (1 * 1 + 3 * 2 + 6 * 4) / 10))
    assert new["b2.lora_A"] is g["b2.lora_A"]  # nobody trained block 2
    assert torch.equal(g["b0.lora_A"], _delta(10.0))  # the input is not modified


def test_layerwise_uniform_weighting():
    new = aggregate_layerwise(_global(), _updates(), BLOCKS, weighting="uniform")
    torch.testing.assert_close(new["b0.lora_A"], _delta(10 + 1.5))
    torch.testing.assert_close(new["b1.lora_A"], _delta(10 + 4.5))
    torch.testing.assert_close(new["head.weight"], _delta(10 + 7 / 3))


def test_layerwise_keeps_dtype_and_precision():
    g = {"w": torch.full((4,), 1.0, dtype=torch.bfloat16)}
    updates = [ClientUpdate({"w": torch.full((4,), 0.5)}, 1, {0}) for _ in range(3)]
    new = aggregate_layerwise(g, updates, {"w": 0})
    assert new["w"].dtype == torch.bfloat16 and torch.equal(new["w"], torch.full((4,), 1.5, dtype=torch.bfloat16))
    # fp64 state accumulates in fp64: a 1e-12 step survives (it would vanish in fp32).
    g64 = {"w": torch.ones(2, dtype=torch.float64)}
    new64 = aggregate_layerwise(g64, [ClientUpdate({"w": torch.full((2,), 1e-12, dtype=torch.float64)}, 1, {0})],
                                {"w": 0})
    assert new64["w"].dtype == torch.float64
    torch.testing.assert_close(new64["w"] - 1, torch.full((2,), 1e-12, dtype=torch.float64), rtol=1e-3, atol=0)


def test_layerwise_errors():
    g = _global()
    with pytest.raises(ValueError, match=r"^updates\[0\].delta: missing tensor of trained block 2"):
        aggregate_layerwise(g, [ClientUpdate({"head.weight": _delta(0)}, 1, {2})], BLOCKS)
    with pytest.raises(ValueError, match=r"^updates\[0\].delta: missing head tensor"):
        aggregate_layerwise(g, [ClientUpdate({}, 1, set())], BLOCKS)
    with pytest.raises(ValueError, match=r"^updates\[0\].delta: tensor 'extra'"):
        aggregate_layerwise(g, [ClientUpdate({"extra": _delta(0)}, 1, set())], BLOCKS)
    with pytest.raises(ValueError, match="^tensor_blocks"):
        aggregate_layerwise(g, _updates(), {"b0.lora_A": 0})
    with pytest.raises(ValueError, match="^weighting"):
        aggregate_layerwise(g, _updates(), BLOCKS, weighting="batches")
    with pytest.raises(ValueError, match="^updates"):
        aggregate_layerwise(g, [], BLOCKS)
    with pytest.raises(ValueError, match="^num_samples"):
        ClientUpdate({}, 0, set())


def test_from_states_keeps_only_trained_blocks_and_head():
    g = _global()
    local = {name: t + 1 for name, t in g.items()}
    update = ClientUpdate.from_states(local, g, 5, [1], BLOCKS)
    assert sorted(update.delta) == ["b1.lora_A", "head.weight"]
    assert torch.equal(update.delta["b1.lora_A"], _delta(1.0))
    assert update.trained_blocks == frozenset({1}) and update.num_samples == 5


def test_rank_padded_zero_padding_hand_computed():
    # A: [r_max=4, d_in=3] (rank dim 0); B: [d_out=2, r_max=4] (rank dim -1).
    g = {"l.lora_A": torch.zeros(4, 3), "l.lora_B": torch.zeros(2, 4), "head": torch.zeros(2)}
    blocks = {"l.lora_A": 0, "l.lora_B": 0, "head": None}
    low = torch.full((4, 3), 2.0)
    low[2:] = 99.0  # beyond the client's rank: ignored
    updates = [
        ClientUpdate({"l.lora_A": low, "l.lora_B": torch.full((2, 2), 2.0), "head": torch.full((2,), 1.0)},
                     num_samples=1, trained_blocks={0}, rank=2),
        ClientUpdate({"l.lora_A": torch.full((4, 3), 4.0), "l.lora_B": torch.full((2, 4), 4.0),
                      "head": torch.full((2,), 5.0)}, num_samples=3, trained_blocks={0}, rank=4),
    ]
    dims = lora_rank_dims(g)
    assert dims == {"l.lora_A": 0, "l.lora_B": -1}

    new = aggregate_rank_padded(g, updates, blocks, dims)
    expected_a = torch.tensor([3.5] * 2 + [3.0] * 2).view(4, 1).expand(4, 3)  # (1*2 + 3*4)/4 and (3*4)/4
    torch.testing.assert_close(new["l.lora_A"], expected_a)
    torch.testing.assert_close(new["l.lora_B"], expected_a[:, 0].view(1, 4).expand(2, 4))
    torch.testing.assert_close(new["head"], torch.full((2,), 4.0))

    covering = aggregate_rank_padded(g, updates, blocks, dims, normalize="covering")
    expected_c = torch.tensor([3.5] * 2 + [4.0] * 2).view(4, 1).expand(4, 3)
    torch.testing.assert_close(covering["l.lora_A"], expected_c)
    assert list(new) == list(g)


def test_rank_padded_modes_differ_on_rows_few_clients_cover():
    """Global factors at 1; a rank-2 client (weight 1, delta 2) and a rank-4 client (weight 3, delta
    4). Rows 0-1 are covered by both, rows 2-3 by the rank-4 client only."""
    g = {"l.lora_A": torch.ones(4, 3)}
    blocks, dims = {"l.lora_A": 0}, {"l.lora_A": 0}
    updates = [ClientUpdate({"l.lora_A": torch.full((2, 3), 2.0)}, num_samples=1, trained_blocks={0}, rank=2),
               ClientUpdate({"l.lora_A": torch.full((4, 3), 4.0)}, num_samples=3, trained_blocks={0}, rank=4)]
    rows = {mode: aggregate_rank_padded(g, updates, blocks, dims, normalize=mode)["l.lora_A"][:, 0].tolist()
            for mode in ("factors", "all", "covering")}
    # factors (HetLoRA): (1*3 + 3*5)/4 = 4.5, then the rank-2 client's zero pulls rows 2-3: 3*5/4.
    assert rows["factors"] == [4.5, 4.5, 3.75, 3.75]
    assert rows["all"] == [4.5, 4.5, 4.0, 4.0]        # 1 + 3*4/4: the rank-2 client "keeps" 1
    assert rows["covering"] == [4.5, 4.5, 5.0, 5.0]   # 1 + 3*4/3


def test_rank_padded_shape_errors():
    g = {"l.lora_A": torch.zeros(4, 3)}
    bad = ClientUpdate({"l.lora_A": torch.zeros(3, 3)}, 1, {0}, rank=2)
    with pytest.raises(ValueError, match=r"^updates\[0\].delta"):
        aggregate_rank_padded(g, [bad], {"l.lora_A": 0}, {"l.lora_A": 0})
    with pytest.raises(ValueError, match="^normalize"):
        aggregate_rank_padded(g, [bad], {"l.lora_A": 0}, {"l.lora_A": 0}, normalize="mean")
