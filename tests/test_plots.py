"""Plots from run folders: the allocation matrix they draw, and every plot on synthetic metrics."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedhello.plots import (allocation_matrix, plot_accuracy, plot_allocation, plot_allocation_grid, plot_fisher,
                            plot_run, read_metrics)


def _run(tmp_path, name: str, num_blocks: int, fisher: bool):
    """A run folder with 4 rounds of 2 participants; evaluations after rounds 2 and 4."""
    rng = np.random.default_rng(num_blocks)
    run_dir = tmp_path / name
    run_dir.mkdir()
    recs = []
    for rnd in range(4):
        rec = {"round": rnd, "participants": [0, 1],
               "allocation": {"0": list(range(num_blocks)), "1": [0]},
               "fisher_scores": rng.random(num_blocks).tolist() if fisher else None}
        if rnd % 2 == 1:
            rec["test_accuracy"] = 0.2 * rnd
        recs.append(rec)
    (run_dir / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    return run_dir


def test_allocation_matrix_counts_share_of_participants():
    recs = [{"allocation": {"0": [0, 1, 2], "1": [0]}}, {"allocation": {}}, {"allocation": {"3": [2]}}]
    expected = np.array([[1.0, 0.0, 0.0], [0.5, 0.0, 0.0], [0.5, 0.0, 1.0]])
    np.testing.assert_array_equal(allocation_matrix(recs, 3), expected)


@pytest.mark.parametrize("num_blocks", [6, 30])  # a legend names 6 blocks; 30 get a colour bar
def test_every_plot_writes_a_png(tmp_path, num_blocks):
    run = _run(tmp_path, "fisher-run", num_blocks, fisher=True)
    other = _run(tmp_path, "plain-run", num_blocks, fisher=False)
    paths = [
        plot_accuracy([run, other], tmp_path / "acc.png", labels=["A", "B"]),
        plot_allocation(run, tmp_path / "alloc.png"),
        plot_allocation_grid([run, other], tmp_path / "grid.png"),
        plot_fisher(run, tmp_path / "fisher.png", title="Fisher"),
    ]
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in plot_run(other)) == ["accuracy.png", "allocation.png"]
    assert sorted(p.name for p in plot_run(run)) == ["accuracy.png", "allocation.png", "fisher.png"]


def test_plot_errors(tmp_path):
    with pytest.raises(ValueError, match="^run_dir: .*has no Fisher scores"):
        plot_fisher(_run(tmp_path, "plain", 6, fisher=False), tmp_path / "f.png")
    with pytest.raises(ValueError, match="^run_dir: expected a run folder with metrics.jsonl"):
        read_metrics(tmp_path / "missing")
    with pytest.raises(ValueError, match="^run_dirs: expected at least one"):
        plot_allocation_grid([], tmp_path / "g.png")
