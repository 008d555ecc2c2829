"""Allocation strategies: geometric sets, RGD probabilities and sampling, capacities, FIM, schedules, state."""

from __future__ import annotations

import json
from itertools import combinations

import numpy as np
import pytest

from fedhello.fl.strategies import (
    Allocation,
    AllocationContext,
    AllocationStrategy,
    available_strategies,
    gd_blocks,
    make_strategy,
    pattern_order,
    register_strategy,
    rgd_probabilities,
    sample_blocks,
    strategy_options,
)
from fedhello.fl.fisher import fisher_probabilities
from fedhello.fl.strategies import base as strategy_base

L = 12
TIERS = (6, 9, 12)
CTX = AllocationContext(L, TIERS, lora_rank=8)


def _cohort(rng: np.random.Generator, n: int = 10, population: int = 40) -> tuple[np.ndarray, np.ndarray]:
    ids = rng.choice(population, size=n, replace=False)
    caps = rng.choice(np.asarray(TIERS), size=n)
    return ids, caps


# --- geometric patterns ------------------------------------------------------------------


def test_bottleneck_gd_sets_match_released_code():
    assert gd_blocks("bottleneck", 12, 6).tolist() == [0, 1, 2, 9, 10, 11]
    assert gd_blocks("bottleneck", 12, 9).tolist() == [0, 1, 2, 3, 4, 8, 9, 10, 11]
    assert gd_blocks("bottleneck", 12, 12).tolist() == list(range(12))


def test_triangle_and_inverted_triangle_sets():
    assert gd_blocks("triangle", 12, 6).tolist() == [0, 1, 2, 3, 4, 5]
    assert gd_blocks("inverted_triangle", 12, 6).tolist() == [6, 7, 8, 9, 10, 11]
    # Odd depth: the bottleneck order alternates ends and meets in the middle.
    assert pattern_order("bottleneck", 5).tolist() == [0, 4, 1, 3, 2]


def test_gd_uniform_windows_spread_evenly():
    strategy = make_strategy("gd", CTX, {"pattern": "uniform"})
    alloc = strategy.allocate(0, [3, 8, 1, 20], [6, 6, 6, 6], np.random.default_rng(0))
    assert alloc.blocks(0) == [0, 1, 2, 3, 4, 5]
    assert alloc.blocks(1) == [3, 4, 5, 6, 7, 8]
    assert alloc.blocks(3) == [0, 1, 2, 9, 10, 11]  # offset 9, cyclic
    assert alloc.trainable.sum(axis=1).tolist() == [2] * 12


def test_rgd_bottleneck_probabilities():
    expected = np.array([3, 3, 3, 2, 2, 1, 1, 1, 2, 3, 3, 3]) / 27
    np.testing.assert_allclose(rgd_probabilities("bottleneck", 12, TIERS), expected, rtol=0, atol=1e-15)


def test_rgd_other_patterns_probabilities():
    np.testing.assert_allclose(rgd_probabilities("triangle", 12, TIERS),
                               np.array([3] * 6 + [2] * 3 + [1] * 3) / 27, atol=1e-15)
    np.testing.assert_allclose(rgd_probabilities("inverted_triangle", 12, TIERS),
                               np.array([1] * 3 + [2] * 3 + [3] * 6) / 27, atol=1e-15)
    np.testing.assert_allclose(rgd_probabilities("uniform", 12, TIERS), np.full(12, 1 / 12), atol=1e-15)


def _exact_inclusion(p: np.ndarray, k: int) -> np.ndarray:
    """Inclusion probabilities of successive sampling without replacement, by DP over subsets.

    prob[S] = probability that the first |S| draws are exactly the set S (in any order);
    prob[S + j] += prob[S] * p_j / (1 - p(S)).
    """
    n = p.size
    prob = np.zeros(1 << n)
    prob[0] = 1.0
    mass = np.array([sum(p[j] for j in range(n) if s >> j & 1) for s in range(1 << n)])
    for size in range(k):
        for members in combinations(range(n), size):
            s = sum(1 << j for j in members)
            if prob[s] == 0:
                continue
            rest = 1.0 - mass[s]
            for j in range(n):
                if not s >> j & 1:
                    prob[s | 1 << j] += prob[s] * p[j] / rest
    incl = np.zeros(n)
    for members in combinations(range(n), k):
        s = sum(1 << j for j in members)
        incl[list(members)] += prob[s]
    return incl


@pytest.mark.parametrize("capacity", [6, 9])
def test_rgd_inclusion_frequencies_match_exact_probabilities(capacity):
    p = rgd_probabilities("bottleneck", L, TIERS)
    exact = _exact_inclusion(p, capacity)
    assert exact.sum() == pytest.approx(capacity)
    strategy = make_strategy("rgd", CTX)
    rng = np.random.default_rng(1234)
    draws, per_round = 20000, 1000
    counts = np.zeros(L)
    for r in range(draws // per_round):
        alloc = strategy.allocate(r, np.arange(per_round), np.full(per_round, capacity), rng)
        counts += alloc.trainable.sum(axis=1)
    freq = counts / draws
    # Each frequency is a mean of `draws` Bernoulli(exact) variables: 5 standard errors bound the
    # deviation with probability > 1 - 6e-7 per block.
    sigma = np.sqrt(exact * (1 - exact) / draws)
    assert np.all(np.abs(freq - exact) <= 5 * sigma + 1e-12), (freq, exact)
    # The check can tell successive sampling from the naive "k * p" guess.
    assert np.max(np.abs(np.minimum(capacity * p, 1) - exact)) > 10 * sigma.max()


def test_sample_blocks_fills_capacity_when_few_blocks_have_mass():
    p = np.array([0.5, 0.5, 0, 0, 0])
    blocks = sample_blocks(p, 4, np.random.default_rng(0))
    assert blocks.size == 4 and {0, 1} <= set(blocks.tolist())


# --- capacities --------------------------------------------------------------------------

EXACT = {"gd", "rgd", "fim", "fedhello", "fedra"}


def _options(name: str) -> dict:
    return {"warmup": 2, "refresh": 3} if name == "fedhello" else {"refresh": 2} if name == "fim" else {}


@pytest.mark.parametrize("name", available_strategies())
def test_every_strategy_respects_every_capacity(name):
    strategy = make_strategy(name, CTX, _options(name))
    rng = np.random.default_rng(7)
    for r in range(12):
        ids, caps = _cohort(rng)
        alloc = strategy.allocate(r, ids, caps, rng)
        assert alloc.trainable.shape == (L, ids.size) and alloc.trainable.dtype == bool
        used = alloc.trainable.sum(axis=0)
        assert np.all(used[~alloc.participating] == 0)
        if strategy.respects_capacity:
            assert np.all(used <= caps)
        if name in EXACT:
            assert np.array_equal(used, caps) and alloc.participating.all()
        elif name == "straggler":
            assert np.all(used == min(TIERS))
            assert np.all(alloc.trainable == alloc.trainable[:, :1])
        elif name == "exclusive":
            assert np.array_equal(alloc.participating, caps == L)
            assert np.all(used[alloc.participating] == L)
        elif name == "full":
            assert np.all(used == L)
        elif name == "hetlora":
            assert np.all(used == L)
            assert alloc.ranks.tolist() == [{6: 4, 9: 6, 12: 8}[int(k)] for k in caps]
        strategy.observe_fisher(r, rng.random((L, ids.size)), alloc.trainable)


def test_allocate_rejects_bad_arguments():
    strategy = make_strategy("rgd", CTX)
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="^capacities"):
        strategy.allocate(0, [1, 2], [6, 13], rng)
    with pytest.raises(ValueError, match="^capacities"):
        strategy.allocate(0, [1, 2], [6], rng)
    with pytest.raises(ValueError, match="^cohort"):
        strategy.allocate(0, [1, 1], [6, 6], rng)
    with pytest.raises(TypeError, match="^rng"):
        strategy.allocate(0, [1], [6], 0)
    with pytest.raises(ValueError, match="^tier_capacities"):
        make_strategy("exclusive", AllocationContext(12, (6, 9)))
    with pytest.raises(ValueError, match="^lora_rank"):
        make_strategy("hetlora", AllocationContext(12, TIERS))
    with pytest.raises(ValueError, match="^capacities"):
        make_strategy("straggler", CTX).allocate(0, [0], [3], rng)


# --- registry ----------------------------------------------------------------------------


def test_registry_errors_name_the_problem():
    with pytest.raises(ValueError, match="^name: unknown strategy 'nope'"):
        make_strategy("nope", CTX)
    with pytest.raises(ValueError, match="^bogus: unknown option"):
        make_strategy("gd", CTX, {"bogus": 1})
    with pytest.raises(ValueError, match="^pattern"):
        make_strategy("rgd", CTX, {"pattern": "diamond"})
    assert strategy_options("fedhello")["warmup"] == 50
    assert strategy_options("fedhello")["refresh"] == 50


def test_a_new_strategy_is_one_registered_class(monkeypatch):
    monkeypatch.setattr(strategy_base, "_REGISTRY", dict(strategy_base._REGISTRY))

    @register_strategy
    class Deepest(AllocationStrategy):
        name = "deepest-only"

        def __init__(self, context, *, depth: int = 1):
            super().__init__(context)
            self.depth = depth

        def _allocate(self, round_idx, cohort, capacities, rng):
            mask = np.zeros((self.num_blocks, cohort.size), dtype=bool)
            mask[-self.depth:] = True
            return Allocation(mask, np.ones(cohort.size, dtype=bool))

    assert "deepest-only" in available_strategies()
    alloc = make_strategy("deepest-only", CTX, {"depth": 2}).allocate(0, [4], [6], np.random.default_rng(0))
    assert alloc.blocks(0) == [10, 11]
    with pytest.raises(ValueError, match="^cls.name"):
        register_strategy(Deepest)


# --- Fisher-based strategies -------------------------------------------------------------


def _feed(strategy, scores: np.ndarray, r: int = 0) -> None:
    strategy.observe_fisher(r, np.repeat(scores[:, None], 2, axis=1), np.ones((L, 2), dtype=bool))


def test_fim_samples_from_ordered_group_probabilities():
    strategy = make_strategy("fim", CTX)
    scores = np.array([9.0, 1.0, 5.0, 1.1, 9.5, 5.3, 0.9, 9.2, 5.1, 1.2, 9.9, 4.8])
    _feed(strategy, scores)
    rng = np.random.default_rng(3)
    alloc = strategy.allocate(1, np.arange(3000), np.full(3000, 1), rng)
    groups = np.array([2, 0, 1, 0, 2, 1, 0, 2, 1, 0, 2, 1])  # by score: low 0, mid 1, high 2
    np.testing.assert_allclose(alloc.probabilities, (groups + 1) / (groups + 1).sum(), atol=1e-15)
    freq = alloc.trainable.sum(axis=1) / 3000
    for g in range(3):
        assert freq[groups == g].mean() == pytest.approx((g + 1) / 24, abs=0.01)


def test_fim_without_scores_is_uniform_and_proportional_mode():
    strategy = make_strategy("fim", CTX, {"mode": "proportional"})
    alloc = strategy.allocate(0, [0], [6], np.random.default_rng(0))
    np.testing.assert_allclose(alloc.probabilities, np.full(L, 1 / L))
    scores = np.arange(1.0, L + 1)
    _feed(strategy, scores)
    alloc = strategy.allocate(1, [0], [6], np.random.default_rng(0))
    np.testing.assert_allclose(alloc.probabilities, scores / scores.sum())


def test_fedhello_codesign_schedule():
    strategy = make_strategy("fedhello", CTX, {"warmup": 2, "refresh": 3})
    prior = rgd_probabilities("bottleneck", L, TIERS)
    rng = np.random.default_rng(0)
    scores = np.linspace(1, 12, L)
    for r in range(2):
        np.testing.assert_allclose(strategy.allocate(r, [0, 1], [6, 9], rng).probabilities, prior)
        _feed(strategy, scores, r)
    q = fisher_probabilities(scores)
    joint = prior * q / (prior * q).sum()
    for r in range(2, 5):  # refresh at 2, kept for 3 and 4
        np.testing.assert_allclose(strategy.allocate(r, [0, 1], [6, 9], rng).probabilities, joint)
        _feed(strategy, scores[::-1], r)
    # Round 5 refreshes from the EMA of the reversed scores.
    q5 = fisher_probabilities(strategy.fisher_scores)
    np.testing.assert_allclose(strategy.allocate(5, [0, 1], [6, 9], rng).probabilities,
                               prior * q5 / (prior * q5).sum())


def test_fedhello_released_and_fork_schedules():
    prior = rgd_probabilities("bottleneck", L, TIERS)
    scores = np.linspace(1, 12, L)
    released = make_strategy("fedhello", CTX, {"warmup": 2, "refresh": 2, "schedule": "released",
                                                "combine": "fim_only"})
    rng = np.random.default_rng(0)
    _feed(released, scores)
    probs = [released.allocate(r, [0], [6], rng).probabilities for r in range(6)]
    for r in (0, 1, 3, 5):
        np.testing.assert_allclose(probs[r], prior)
    for r in (2, 4):
        np.testing.assert_allclose(probs[r], fisher_probabilities(scores))

    fork = make_strategy("fedhello", CTX, {"warmup": 1, "refresh": 3, "schedule": "fork"})
    _feed(fork, scores)
    first = fork.allocate(1, [5, 6], [6, 9], rng)
    again = fork.allocate(2, [6, 7, 5], [9, 6, 6], rng)
    assert again.blocks(0) == first.blocks(1) and again.blocks(2) == first.blocks(0)
    third = fork.allocate(3, [7], [6], rng)
    assert third.blocks(0) == again.blocks(1)
    # The next refresh (round 4) draws anew: over many clients the kept sets cannot all survive.
    before = fork.allocate(3, np.arange(10, 60), np.full(50, 6), rng).trainable
    after = fork.allocate(4, np.arange(10, 60), np.full(50, 6), rng).trainable
    assert not np.array_equal(before, after)


def test_proxy_mode_asks_for_scores_in_refresh_rounds():
    strategy = make_strategy("fedhello", CTX, {"warmup": 2, "refresh": 2, "fisher_source": "proxy"})
    assert [strategy.needs_proxy_scores(r) for r in range(6)] == [False, False, True, False, True, False]
    rng = np.random.default_rng(0)
    strategy.allocate(0, [0], [6], rng)
    _feed(strategy, np.ones(L))  # client reports are ignored in proxy mode
    assert np.isnan(strategy.fisher_scores).all()
    with pytest.raises(ValueError, match="^round_idx"):
        strategy.allocate(2, [0], [6], rng)
    scores = np.linspace(1, 2, L)
    strategy.observe_proxy_scores(2, scores)
    np.testing.assert_allclose(strategy.fisher_scores, scores)
    prior = rgd_probabilities("bottleneck", L, TIERS)
    q = fisher_probabilities(scores)
    np.testing.assert_allclose(strategy.allocate(2, [0], [6], rng).probabilities, prior * q / (prior * q).sum())
    with pytest.raises(ValueError, match="^scores"):
        make_strategy("fim", CTX).observe_proxy_scores(0, scores)


# --- determinism and resume ----------------------------------------------------------------


@pytest.mark.parametrize("name", available_strategies())
def test_resumed_strategy_allocates_like_an_uninterrupted_one(name):
    options = {"warmup": 2, "refresh": 2, "schedule": "fork"} if name == "fedhello" else _options(name)

    def run(strategy, rng, rounds, log):
        for r in rounds:
            ids, caps = _cohort(rng)
            alloc = strategy.allocate(r, ids, caps, rng)
            log.append(alloc.to_dict())
            strategy.observe_fisher(r, rng.random((L, ids.size)), alloc.trainable)

    straight: list = []
    run(make_strategy(name, CTX, options), np.random.default_rng(11), range(8), straight)

    resumed: list = []
    first, rng = make_strategy(name, CTX, options), np.random.default_rng(11)
    run(first, rng, range(4), resumed)
    checkpoint = json.loads(json.dumps({"strategy": first.state_dict(), "rng": rng.bit_generator.state}))
    second, rng2 = make_strategy(name, CTX, options), np.random.default_rng(0)
    second.load_state_dict(checkpoint["strategy"])
    rng2.bit_generator.state = checkpoint["rng"]
    run(second, rng2, range(4, 8), resumed)
    assert json.dumps(resumed) == json.dumps(straight)
