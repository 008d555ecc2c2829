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


def test_accuracy_starts_at_round_zero_with_the_untrained_model(tmp_path):
    from fedhello.plots import accuracy_curve

    run = _run(tmp_path, "r", 6, fisher=False)
    assert accuracy_curve(run) == ([2, 4], [pytest.approx(20.0), pytest.approx(60.0)])
    (run / "initial_eval.json").write_text(json.dumps({"accuracy": 0.25, "loss": 1.6, "macro_f1": 0.1}))
    assert accuracy_curve(run) == ([0, 2, 4], [25.0, pytest.approx(20.0), pytest.approx(60.0)])


def _capture_figures(monkeypatch) -> list:
    from fedhello import plots

    figures, save = [], plots._save

    def keep(fig, out):
        figures.append(fig)
        return save(fig, out)

    monkeypatch.setattr(plots, "_save", keep)
    return figures


def test_allocation_columns_use_the_accuracy_round_numbers(tmp_path, monkeypatch):
    figures = _capture_figures(monkeypatch)
    run = _run(tmp_path, "r", 6, fisher=False)
    plot_allocation(run, tmp_path / "a.png")
    image = figures[0].axes[0].images[0]
    # 4 rounds: column j spans [j + 0.5, j + 1.5], centred on round j + 1 (the accuracy plot's x)
    assert image.get_extent() == [0.5, 4.5, -0.5, 5.5]


def test_a_one_point_fisher_curve_is_a_marker(tmp_path, monkeypatch):
    figures = _capture_figures(monkeypatch)
    run = tmp_path / "one"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"round": 0, "allocation": {"0": [0]},
                                                   "fisher_scores": [0.1, 0.2]}) + "\n")
    plot_fisher(run, tmp_path / "f.png")
    plot_fisher(_run(tmp_path, "many", 2, fisher=True), tmp_path / "g.png")
    one, many = ([line.get_marker() for line in fig.axes[0].lines] for fig in figures)
    assert one == ["o", "o"] and many == ["None", "None"]


@pytest.mark.parametrize("command", [[], ["run"], ["flower"], ["suite"], ["plot"], ["doctor"]])
def test_help_is_plain_text(command, capsys):
    from fedhello.cli import main

    with pytest.raises(SystemExit):
        main([*command, "--help"])
    out = capsys.readouterr().out
    assert "usage: fedhello" in out and "`" not in out


def test_causal_lm_run_before_its_first_evaluation_plots(tmp_path):
    run = tmp_path / "lm"
    run.mkdir()
    (run / "initial_eval.json").write_text(json.dumps({"loss": 4.8, "perplexity": 128.4}))
    (run / "metrics.jsonl").write_text(json.dumps({"round": 0, "allocation": {"0": [0, 1]}, "probabilities": None,
                                                   "fisher_scores": None, "train_loss": 4.1, "bytes_up": 1,
                                                   "wall_time": 1.0, "num_blocks": 4}) + "\n")
    paths = plot_run(run, tmp_path / "plots")
    assert any(p.name == "perplexity.png" for p in paths) and all(p.stat().st_size > 0 for p in paths)


def test_allocation_rows_cover_blocks_nobody_trained():
    """A strategy without Fisher scores or probabilities (Straggler): the recorded block count, not
    the highest trained block, sets the rows, so the untrained blocks show as empty rows."""
    from fedhello.plots import _num_blocks

    records = [{"round": 0, "allocation": {"0": [0, 1]}, "fisher_scores": None, "probabilities": None,
                "num_blocks": 4}]
    assert _num_blocks(records) == 4 and allocation_matrix(records, 4)[2:].sum() == 0


def test_a_one_round_fisher_plot_ticks_whole_rounds(tmp_path, monkeypatch):
    figures = _capture_figures(monkeypatch)
    run = tmp_path / "one"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"round": 0, "fisher_scores": [0.1, 0.2]}) + "\n")
    plot_fisher(run, tmp_path / "f.png")
    ax = figures[0].axes[0]
    lo, hi = ax.get_xlim()
    ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
    assert ticks == [1.0]


def test_a_cut_last_line_is_left_out_and_a_broken_middle_line_names_the_file(tmp_path):
    """What a SIGKILL leaves (resume tolerates it, and so do the plots); a damaged record elsewhere
    is an error naming the file and the line."""
    from fedhello.cli import main

    run = _run(tmp_path, "killed", 3, fisher=True)
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"round": 4, "train_lo')
    assert len(read_metrics(run)) == 4
    assert main(["plot", str(run)]) == 0
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join([lines[0], lines[1][:10], *lines[2:]]) + "\n")
    with pytest.raises(ValueError, match=f"^{run / 'metrics.jsonl'}: line 2 is not a JSON record"):
        read_metrics(run)


def test_plotting_a_causal_lm_run_with_a_classification_run_is_one_line(tmp_path, capsys):
    from fedhello.cli import main

    accuracy = _run(tmp_path, "classifier", 3, fisher=False)
    lm = tmp_path / "lm"
    lm.mkdir()
    (lm / "metrics.jsonl").write_text(json.dumps({"round": 0, "test_perplexity": 20.0, "test_loss": 3.0}) + "\n")
    (lm / "initial_eval.json").write_text(json.dumps({"perplexity": 40.0, "loss": 3.7}))
    assert main(["plot", str(lm), str(accuracy)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"fedhello plot: error: run_dirs: {lm} is a causal LM run (perplexity) and {accuracy}")
    assert "\n" not in err


def test_per_client_accuracy_plot(tmp_path, monkeypatch):
    from fedhello.plots import plot_client_accuracy

    run = _run(tmp_path, "clients", 3, fisher=False)
    records = read_metrics(run)
    for r in records:
        if "test_accuracy" in r:
            r.update(test_client_accuracy_mean=0.7, test_client_accuracy_p10=0.5, test_client_accuracy_worst=0.4)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (run / "initial_eval.json").write_text(json.dumps({"accuracy": 0.2, "client_accuracy_mean": 0.2,
                                                       "client_accuracy_p10": 0.1, "client_accuracy_worst": 0.05}))
    assert "client_accuracy.png" in [p.name for p in plot_run(run)]
    figures = _capture_figures(monkeypatch)
    plot_client_accuracy(run, tmp_path / "c.png")
    lines = figures[0].axes[0].lines
    assert [list(line.get_xdata()) for line in lines] == [[0, 2, 4]] * 3
    np.testing.assert_allclose([line.get_ydata() for line in lines], [[20, 70, 70], [10, 50, 50], [5, 40, 40]])
    with pytest.raises(ValueError, match="^run_dir: .* has no per-client accuracy"):
        plot_client_accuracy(_run(tmp_path, "older", 3, fisher=False), tmp_path / "d.png")
