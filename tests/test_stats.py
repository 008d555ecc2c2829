"""Paired differences over seeds (fedhello.stats) on synthetic metrics files, against hand computations."""

from __future__ import annotations

import json
import math

import pytest

from fedhello.stats import compare, main, paired_difference, render_markdown, run_metric, seed_values

T_975_DF2 = 4.302652729749462  # Student t quantile 0.975 with 2 degrees of freedom (tables: 4.303)


def _write_run(folder, setting, method, seed, accuracies):
    run = folder / setting / method / f"seed-{seed}"
    run.mkdir(parents=True)
    lines = []
    for rnd, acc in enumerate(accuracies):
        lines.append({"round": 2 * rnd, "train_loss": 1.0})  # a round without evaluation
        lines.append({"round": 2 * rnd + 1, "train_loss": 1.0, "test_accuracy": acc})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))


@pytest.fixture
def suite(tmp_path):
    # Method A beats B by 2, 4, 6 points on the final evaluation of seeds 0, 1, 2 and by 3, 4, 5
    # on the mean of the last three; C has only seed 0.
    # B's last three evaluations are all b; A's are b + u, b + u, a.
    for seed, (a, b, u) in enumerate([(0.80, 0.78, 0.035), (0.70, 0.66, 0.04), (0.90, 0.84, 0.045)]):
        _write_run(tmp_path, "skew", "A", seed, [0.5, b + u, b + u, a])
        _write_run(tmp_path, "skew", "B", seed, [0.6, b, b, b])
    _write_run(tmp_path, "skew", "C", 0, [0.1, 0.2, 0.3])
    return tmp_path


def test_run_metrics(suite):
    run = suite / "skew" / "A" / "seed-0"
    assert run_metric(run, "final") == pytest.approx(80.0)
    assert run_metric(run, "best") == pytest.approx(81.5)
    assert run_metric(run, "last3") == pytest.approx((81.5 + 81.5 + 80) / 3)
    with pytest.raises(ValueError, match="metric: expected one of"):
        run_metric(run, "median")
    with pytest.raises(ValueError, match="run_dir: expected a run folder"):
        run_metric(suite / "nothing", "final")


def test_paired_interval_hand_computed():
    seeds, diffs, mean, low, high = paired_difference({0: 82.0, 1: 74.0, 2: 96.0, 7: 1.0}, {0: 80.0, 1: 70.0, 2: 90.0})
    assert seeds == (0, 1, 2) and diffs == pytest.approx((2.0, 4.0, 6.0))
    half = T_975_DF2 * 2.0 / math.sqrt(3)  # sample std of (2, 4, 6) is 2
    assert (mean, low, high) == pytest.approx((4.0, 4.0 - half, 4.0 + half))
    with pytest.raises(ValueError, match="needs >= 2 common seeds"):
        paired_difference({0: 1.0, 1: 2.0}, {1: 1.0})
    with pytest.raises(ValueError, match="confidence: expected"):
        paired_difference({0: 1.0, 1: 2.0}, {0: 1.0, 1: 1.0}, confidence=95)


def test_compare_says_not_separable_when_the_interval_covers_zero(suite):
    assert seed_values(suite, "skew", "B", "final") == pytest.approx({0: 78.0, 1: 66.0, 2: 84.0})
    (final,) = compare(suite, "A", ["B", "C", "missing"], "final")  # C (1 seed) and missing are left out
    assert final.differences == pytest.approx((2.0, 4.0, 6.0))
    assert final.low < 0 < final.high and not final.separable and final.verdict == "not separable"
    (last3,) = compare(suite, "A", ["B"], "last3")
    assert last3.differences == pytest.approx((3.0, 4.0, 5.0))  # sample std 1: the interval is 4 ± 2.48
    assert last3.low == pytest.approx(4.0 - T_975_DF2 / math.sqrt(3)) and last3.separable
    assert last3.verdict == "A higher"
    (reverse,) = compare(suite, "B", ["A"], "last3")
    assert reverse.verdict == "B lower" and reverse.high == pytest.approx(-last3.low)
    table = render_markdown([final, last3])
    assert "| skew | A − B | final | 3 | +2.00, +4.00, +6.00 | +4.00 |" in table


def test_command_line_prints_one_table_per_folder(suite, capsys):
    assert main([str(suite), "--reference", "A", "--against", "B", "--metric", "final"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"### {suite}\n") and out.count("| skew | A − B | final |") == 1


def test_run_metrics_of_a_causal_lm_run_are_perplexities(tmp_path):
    run = tmp_path / "lm"
    run.mkdir()
    records = [{"round": i, "test_perplexity": p, "test_loss": math.log(p)} for i, p in enumerate([40.0, 30.0, 33.0])]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert run_metric(run, "final") == 33.0 and run_metric(run, "best") == 30.0  # best: the lowest
    assert run_metric(run, "last3") == pytest.approx(103 / 3)


def test_a_seed_stopped_before_its_first_evaluation_is_left_out(suite):
    run = suite / "skew" / "B" / "seed-3"  # killed during its first round: metrics, no evaluation
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"round": 0, "train_loss": None}) + "\n")
    assert sorted(seed_values(suite, "skew", "B", "final")) == [0, 1, 2]
    (pair,) = compare(suite, "A", ["B"], "final")
    assert list(pair.seeds) == [0, 1, 2]


def test_a_mistyped_reference_or_a_folder_without_runs_is_an_error(suite, tmp_path, capsys):
    """Not "no pairs" and exit 0, which reads as a result."""
    with pytest.raises(ValueError, match=r"^reference: no method 'a' in .*; its methods: \['A', 'B', 'C'\]"):
        compare(suite, "a", ["B"], "final")
    assert main([str(suite), "--reference", "FedHello", "--against", "B"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("python -m fedhello.stats: error: reference: no method 'FedHello'") and "\n" not in err
    empty = tmp_path / "not-a-suite"
    (empty / "some" / "folder").mkdir(parents=True)
    assert main([str(empty), "--reference", "A", "--against", "B"]) == 2
    assert capsys.readouterr().err.startswith(f"python -m fedhello.stats: error: folder: {empty} holds no suite runs")
    with pytest.raises(ValueError, match="^folder: .* holds no suite runs"):
        compare(empty, "A", ["B"], "final")
