"""Plots of federated runs, read from their ``metrics.jsonl``.

* ``plot_accuracy``: test accuracy against round, one line per run (held-out perplexity for
  ``task: causal_lm`` runs);
* ``plot_allocation``: heat map of blocks x rounds, the share of each round's participants
  that trained each block; ``plot_allocation_grid``: those of several runs side by side;
* ``plot_fisher``: the server's Fisher score of each block against round;
* ``plot_client_accuracy``: the clients' held-out accuracy (mean, 10th percentile, worst) against round;
* ``plot_accuracy_vs_epsilon``: a privacy suite's final accuracy against its epsilon, one line per method.

Rounds are numbered alike in every plot: round k (1, 2, ...) is the k-th round of training
(record ``"round": k - 1`` in ``metrics.jsonl``); accuracy at k is measured after it, and
round 0 is the untrained model (``initial_eval.json``, when the run folder has one).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.cm import ScalarMappable  # noqa: E402
from matplotlib.colors import Normalize  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from fedhello.errors import UserError
from fedhello import run_folder

__all__ = ["read_metrics", "run_label", "allocation_matrix", "accuracy_curve", "is_causal_lm_run",
           "perplexity_curve", "plot_accuracy", "plot_allocation",
           "plot_allocation_grid", "plot_client_accuracy", "plot_fisher", "plot_run", "plot_accuracy_vs_epsilon"]


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The per-round records of a run folder (``metrics.jsonl``); ``"round"`` counts from 0 there."""
    if not (Path(run_dir) / run_folder.METRICS_FILE).exists():
        raise UserError(f"run_dir: expected a run folder with {run_folder.METRICS_FILE}, got {run_dir} (no such file)")
    # A cut last line (a run killed while appending it) is left out, as resume does.
    return run_folder.read_records(run_dir)


def run_label(run_dir: str | Path) -> str:
    return Path(run_dir).name


def accuracy_curve(run_dir: str | Path) -> tuple[list[int], list[float]]:
    """(rounds, test accuracy in %) of a run: round 0 is the untrained model when
    ``initial_eval.json`` exists, then every evaluated round k (1-based, as in the other plots)."""
    rounds, accuracy = [], []
    initial = run_folder.read_initial_eval(run_dir)
    if initial is not None:
        rounds.append(0)
        accuracy.append(100 * initial["accuracy"])
    for r in read_metrics(run_dir):
        if r.get("test_accuracy") is not None:
            rounds.append(r["round"] + 1)
            accuracy.append(100 * r["test_accuracy"])
    return rounds, accuracy


def is_causal_lm_run(run_dir: str | Path) -> bool:
    """Whether a run folder holds a ``task: causal_lm`` run (its evaluations report perplexity; before
    the first one, its evaluation of the untrained model does)."""
    if any(r.get("test_perplexity") is not None for r in read_metrics(run_dir)):
        return True
    initial = run_folder.read_initial_eval(run_dir)
    return initial is not None and "perplexity" in initial


def perplexity_curve(run_dir: str | Path) -> tuple[list[int], list[float]]:
    """(rounds, held-out perplexity) of a causal LM run, from round 0 (untrained) as ``accuracy_curve``."""
    rounds, perplexity = [], []
    initial = run_folder.read_initial_eval(run_dir)
    if initial is not None:
        rounds.append(0)
        perplexity.append(initial["perplexity"])
    for r in read_metrics(run_dir):
        if r.get("test_perplexity") is not None:
            rounds.append(r["round"] + 1)
            perplexity.append(r["test_perplexity"])
    return rounds, perplexity


def plot_accuracy(run_dirs: Sequence[str | Path], out: str | Path, labels: Sequence[str] | None = None,
                  title: str = "Test accuracy of the global model") -> Path:
    """One line per run: test accuracy at each evaluated round, from round 0 (untrained).

    When every run is a causal LM run, its held-out perplexity instead (the title's "Test
    accuracy" becomes "Held-out perplexity").
    """
    labels = list(labels) if labels is not None else [run_label(d) for d in run_dirs]
    kinds = [is_causal_lm_run(d) for d in run_dirs]
    if any(kinds) and not all(kinds):  # perplexity and accuracy share no axis
        raise UserError(f"run_dirs: {run_dirs[kinds.index(True)]} is a causal LM run (perplexity) and "
                         f"{run_dirs[kinds.index(False)]} a classification run (accuracy); plot them separately")
    lm = bool(run_dirs) and all(kinds)
    curve = perplexity_curve if lm else accuracy_curve
    fig, ax = plt.subplots(figsize=(7, 4.5))
    # Ten colours, then the same colours dashed, so that up to 20 methods stay apart.
    colors = plt.get_cmap("tab10").colors
    for i, (run_dir, label) in enumerate(zip(run_dirs, labels)):
        ax.plot(*curve(run_dir), marker="o", markersize=3, label=label, color=colors[i % 10], linestyle="-" if i < 10 else "--")
    _round_axis(ax)
    ax.set_ylabel("held-out perplexity" if lm else "test accuracy (%)")
    if lm:
        title = title.replace("Test accuracy", "Held-out perplexity")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    return _save(fig, out)


def allocation_matrix(records: Sequence[dict[str, Any]], num_blocks: int) -> np.ndarray:
    """float ``[L, rounds]``: share of each round's participants that trained each block."""
    mat = np.zeros((num_blocks, len(records)))
    for j, r in enumerate(records):
        alloc = r.get("allocation") or {}
        for blocks in alloc.values():
            mat[blocks, j] += 1
        if alloc:
            mat[:, j] /= len(alloc)
    return mat


def _num_blocks(records: Sequence[dict[str, Any]]) -> int:
    """The model's block count L: recorded by runs since it was added, else read off the Fisher scores
    or probabilities, else (older runs of strategies with neither) the highest trained block + 1."""
    for r in records:
        if r.get("num_blocks") is not None:
            return int(r["num_blocks"])
        if r.get("fisher_scores") is not None:
            return len(r["fisher_scores"])
        if r.get("probabilities") is not None:
            return len(r["probabilities"])
    return 1 + max((b for r in records for blocks in (r.get("allocation") or {}).values() for b in blocks), default=0)


def _draw_allocation(ax, records: Sequence[dict[str, Any]]):
    mat = allocation_matrix(records, _num_blocks(records))
    _round_axis(ax)
    ax.set_ylabel("block")
    # Column j is round j + 1, as in the accuracy and Fisher plots (round 0: the untrained model).
    extent = (0.5, mat.shape[1] + 0.5, -0.5, mat.shape[0] - 0.5)
    return ax.imshow(mat, aspect="auto", origin="lower", cmap="viridis", vmin=0, vmax=1, interpolation="nearest",
                     extent=extent)


def plot_allocation(run_dir: str | Path, out: str | Path) -> Path:
    """Heat map blocks x rounds of the share of participants training each block."""
    recs = read_metrics(run_dir)
    fig, ax = plt.subplots(figsize=(8, 0.25 * _num_blocks(recs) + 2))
    im = _draw_allocation(ax, recs)
    ax.set_title(f"Allocation: share of participants training each block ({run_label(run_dir)})")
    fig.colorbar(im, ax=ax, label="share of participants")
    return _save(fig, out)


def plot_allocation_grid(run_dirs: Sequence[str | Path], out: str | Path, labels: Sequence[str] | None = None,
                         title: str = "Allocation: share of participants training each block",
                         columns: int = 5) -> Path:
    """The allocation heat maps of several runs side by side, on one colour scale."""
    labels = list(labels) if labels is not None else [run_label(d) for d in run_dirs]
    if not run_dirs:
        raise UserError("run_dirs: expected at least one run folder")
    cols = min(columns, len(run_dirs))
    rows = -(-len(run_dirs) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.8 * cols + 1.2, 2.2 * rows + 0.6), squeeze=False,
                             sharex=True, sharey=True, layout="constrained")
    im = None
    for i, (ax, run_dir, label) in enumerate(zip(axes.flat, run_dirs, labels)):
        im = _draw_allocation(ax, read_metrics(run_dir))
        ax.set_title(label, fontsize=9)
        ax.label_outer()  # axis labels on the left column and bottom row only
    for ax in list(axes.flat)[len(run_dirs):]:
        ax.axis("off")
    fig.suptitle(title)
    fig.colorbar(im, ax=axes, label="share of participants", shrink=0.8)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def plot_fisher(run_dir: str | Path, out: str | Path, title: str | None = None) -> Path:
    """The server's Fisher score estimate of every block against round (log scale)."""
    recs = [r for r in read_metrics(run_dir) if r.get("fisher_scores") is not None]
    if not recs:
        raise UserError(f"run_dir: {run_dir} has no Fisher scores (its strategy does not use them)")
    scores = np.array([[np.nan if v is None else v for v in r["fisher_scores"]] for r in recs], dtype=float)
    rounds = [r["round"] + 1 for r in recs]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    cmap = plt.get_cmap("coolwarm")
    marker = "o" if len(rounds) == 1 else None  # a one-point line would be invisible
    for b in range(scores.shape[1]):
        ax.plot(rounds, scores[:, b], color=cmap(b / max(scores.shape[1] - 1, 1)), label=f"block {b}", marker=marker)
    ax.set_yscale("log")
    _round_axis(ax, rounds)
    ax.set_ylabel("Fisher score (mean squared gradient norm)")
    ax.set_title(title or f"Fisher scores per block ({run_label(run_dir)})")
    if scores.shape[1] <= 12:
        ax.legend(fontsize=7, ncol=2)
    else:  # too many lines to name: a colour bar maps colour to block depth
        norm = Normalize(vmin=0, vmax=scores.shape[1] - 1)
        fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax, label="block")
    return _save(fig, out)


def plot_client_accuracy(run_dir: str | Path, out: str | Path, title: str | None = None) -> Path:
    """The clients' held-out accuracy (each on its own label mix) against round: the mean over
    clients, the 10th percentile and the worst client, from round 0 (untrained) as ``accuracy_curve``."""
    points = []
    first = run_folder.read_initial_eval(run_dir)
    if first is not None and first.get("client_accuracy_mean") is not None:
        points.append((0, first["client_accuracy_mean"], first["client_accuracy_p10"], first["client_accuracy_worst"]))
    points += [(r["round"] + 1, r["test_client_accuracy_mean"], r["test_client_accuracy_p10"],
                r["test_client_accuracy_worst"])
               for r in read_metrics(run_dir) if r.get("test_client_accuracy_mean") is not None]
    if not points:
        raise UserError(f"run_dir: {run_dir} has no per-client accuracy (a causal LM run, or recorded before "
                         "fedhello measured it)")
    rounds, *curves = zip(*points)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for values, label, style in zip(curves, ("mean over clients", "10th percentile", "worst client"),
                                    ("-", "--", ":")):
        ax.plot(rounds, [100 * v for v in values], marker="o", markersize=3, linestyle=style, label=label)
    _round_axis(ax, rounds)
    ax.set_ylabel("held-out accuracy on the client's own label mix (%)")
    ax.set_title(title or f"Per-client accuracy of the global model ({run_label(run_dir)})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, out)


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Every plot of one run into ``out_dir`` (default: the run folder)."""
    out_dir = Path(out_dir or run_dir)
    curve = run_folder.curve_plot(is_causal_lm_run(run_dir))
    paths = [plot_accuracy([run_dir], out_dir / curve), plot_allocation(run_dir, out_dir / run_folder.ALLOCATION_PLOT)]
    if any(r.get("test_client_accuracy_mean") is not None for r in read_metrics(run_dir)):
        paths.append(plot_client_accuracy(run_dir, out_dir / run_folder.CLIENT_ACCURACY_PLOT))
    try:
        paths.append(plot_fisher(run_dir, out_dir / run_folder.FISHER_PLOT))
    except ValueError:
        pass  # strategies without Fisher scores have no such plot
    return paths


def plot_accuracy_vs_epsilon(points: dict[str, list[tuple[float | None, float, float]]], out: str | Path,
                             title: str = "Final test accuracy against epsilon") -> Path:
    """One line per method through its ``(epsilon, accuracy mean, accuracy std)`` points (accuracy
    in %, one point per privacy level); a point whose epsilon is None (the non-private run) is drawn
    as a dashed line across the plot in the method's colour, since it has no place on the epsilon axis.

    Epsilon is on a log axis: the levels of a suite usually differ by factors.
    """
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = plt.get_cmap("tab10").colors
    for i, (method, rows) in enumerate(points.items()):
        color = colors[i % 10]
        private = sorted((eps, mean, std) for eps, mean, std in rows if eps is not None)
        if private:
            eps, mean, std = (np.asarray(v, dtype=float) for v in zip(*private))
            ax.errorbar(eps, mean, yerr=std, marker="o", markersize=4, capsize=3, color=color, label=method)
        for eps, mean, _ in rows:
            if eps is None:
                ax.axhline(mean, color=color, linestyle="--", linewidth=1,
                           label=f"{method}, non-private" if not private else None)
    ax.set_xscale("log")
    ax.set_xlabel("epsilon at the run's delta (log scale; dashed: the non-private run)")
    ax.set_ylabel("final test accuracy (%), mean ± std over seeds")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return _save(fig, out)


def _round_axis(ax, rounds: Sequence[int] = ()) -> None:
    """x axis in rounds: whole numbers only (short runs would otherwise get ticks at 0.5); a curve of
    one round spans no range, so its round is the one tick (the locator would tick fractions)."""
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if len(set(rounds)) == 1:
        ax.set_xticks(list(rounds)[:1])


def _save(fig, out: str | Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
