"""A suite's summary: the table over settings x methods x seeds, its plots, and publishing it.

``summarize(suite)`` reads every finished run of a ``Suite`` (``fedhello.suite_spec``) and writes
``summary.json``, ``results.md`` and the plots of each setting; ``render_table`` renders the
table; ``publish`` copies a summarized suite's small files beside a report.
"""

from __future__ import annotations

import json
import math
import platform
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np

from fedhello import run_folder
from fedhello.errors import UserError
from fedhello.suite_spec import Suite

__all__ = ["summarize", "render_table", "publish", "scores_perplexity", "SHORT_MARK"]


def _mean_std(values: list[float]) -> tuple[float, float]:
    arr = np.asarray(values, dtype=float)
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else 0.0


def _device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    cpuinfo = Path("/proc/cpuinfo")
    model = platform.processor() or platform.machine()
    if cpuinfo.exists():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")]
        model = names[0] if names else model
    return f"CPU ({model}, {torch.get_num_threads()} threads)"


def _finished_runs(suite: Suite, setting: str, method: str) -> list[tuple[Path, list[dict[str, Any]], float]]:
    """(run folder, evaluated records, MB sent up per round) of every seed of one cell that has
    evaluated rounds; the upload is the mean over all of the run's rounds."""
    from fedhello.plots import read_metrics

    runs = []
    for seed in suite.seeds:
        run_dir = suite.output_dir / setting / method / f"seed-{seed}"
        if not (run_dir / run_folder.METRICS_FILE).exists():
            continue
        records = read_metrics(run_dir)
        evaluated = [r for r in records if r.get("test_accuracy", r.get("test_perplexity")) is not None]
        if evaluated:
            runs.append((run_dir, evaluated, float(np.mean([r["bytes_up"] for r in records])) / 1e6))
    return runs


def _client_perplexity(runs: list[tuple[Path, list[dict[str, Any]], float]]) -> dict[str, Any]:
    """Per-client held-out perplexity of the final global model: the mean over clients and the
    worst client, each as (mean, std) over seeds, and the same two for the untrained model."""
    final = [recs[-1]["test_client_perplexity"] for _, recs, _ in runs]
    untrained = [run_folder.read_initial_eval(d)["client_perplexity"] for d, _, _ in runs]
    return {"client_mean": _mean_std([float(np.mean(c)) for c in final]),
            "client_worst": _mean_std([float(np.max(c)) for c in final]),
            "untrained_client_mean": _mean_std([float(np.mean(c)) for c in untrained]),
            "untrained_client_worst": _mean_std([float(np.max(c)) for c in untrained])}


def _client_accuracy(runs: list[tuple[Path, list[dict[str, Any]], float]]) -> dict[str, Any]:
    """Per-client held-out accuracy (%) of the final global model: the mean over clients, the 10th
    percentile and the worst client, each as (mean, std) over seeds, and the same for the untrained
    model; empty for runs recorded before fedhello measured it."""
    final = [recs[-1] for _, recs, _ in runs]
    if any(r.get("test_client_accuracy_mean") is None for r in final):
        return {}
    untrained = [run_folder.read_initial_eval(d) or {} for d, _, _ in runs]
    out = {}
    for stat in ("mean", "p10", "worst"):
        out[f"client_{stat}"] = _mean_std([100 * r[f"test_client_accuracy_{stat}"] for r in final])
        values = [r.get(f"client_accuracy_{stat}") for r in untrained]
        out[f"untrained_client_{stat}"] = _mean_std([math.nan if v is None else 100 * v for v in values])
    return out


def _untrained(run_dir: Path, metric: str) -> float:
    """``metric`` of the run's untrained model, NaN without its ``initial_eval.json``."""
    initial = run_folder.read_initial_eval(run_dir)
    return float("nan") if initial is None else initial[metric]


def summarize(suite: Suite) -> dict[str, Any]:
    """Final/best accuracy (mean, std over seeds), the untrained model's accuracy and wall time per
    setting and method; one accuracy plot, one allocation grid and the Fisher plots per setting.
    Causal LM suites (``task: causal_lm``) report held-out perplexity instead (best = lowest)."""
    import torch

    from fedhello.plots import is_causal_lm_run, plot_accuracy, plot_allocation_grid, plot_fisher, read_metrics

    table: dict[str, dict[str, Any]] = {}
    for setting in suite.settings:
        table[setting] = {}
        method_dirs = []
        for method in suite.methods:
            runs = _finished_runs(suite, setting, method)
            if not runs:
                continue
            # Causal LM runs are scored by held-out perplexity (lower is better), others by accuracy in %.
            lm = "test_perplexity" in runs[0][1][-1]
            metric, scale, best = ("perplexity", 1.0, min) if lm else ("accuracy", 100.0, max)
            key = f"test_{metric}"
            table[setting][method] = {
                "final": _mean_std([scale * recs[-1][key] for _, recs, _ in runs]),
                "best": _mean_std([scale * best(r[key] for r in recs) for _, recs, _ in runs]),
                # One evaluation swings by several points under label skew; the mean of the
                # last three is the steadier end-of-run number.
                "last3": _mean_std([scale * np.mean([r[key] for r in recs[-3:]]) for _, recs, _ in runs]),
                "last3_of": min(len(recs[-3:]) for _, recs, _ in runs),  # < 3: a short run averages fewer
                "macro_f1": _mean_std([math.nan if lm else 100 * recs[-1]["test_macro_f1"] for _, recs, _ in runs]),
                "untrained": _mean_std([scale * _untrained(d, metric) for d, _, _ in runs]),
                "metric": metric,
                "wall_time_s": float(np.nanmean([run_folder.read_wall_time(d) for d, _, _ in runs])),
                # What the participants send up per round (adapters they trained + head), in MB.
                "upload_mb_per_round": float(np.mean([mb for _, _, mb in runs])),
                "seeds": len(runs),
            }
            # The personalisation view: the global model on each client's own mix of topics or classes.
            table[setting][method].update(_client_perplexity(runs) if lm else _client_accuracy(runs))
            epsilons = [recs[-1].get("epsilon") for _, recs, _ in runs]
            if any(e is not None for e in epsilons):  # a private setting: its epsilon after the last round
                table[setting][method]["epsilon"] = _mean_std([math.inf if e is None else e for e in epsilons])
            method_dirs.append((method, runs[0][0]))
        if not method_dirs:
            continue
        out = suite.output_dir / setting
        labels, dirs = [m for m, _ in method_dirs], [d for _, d in method_dirs]
        curve = run_folder.curve_plot(is_causal_lm_run(dirs[0]))
        plot_accuracy(dirs, out / curve, labels=labels,
                      title=f"Test accuracy, {setting}")
        plot_allocation_grid(dirs, out / run_folder.ALLOCATION_PLOT, labels=labels,
                             title=f"Share of participants training each block, {setting}")
        for method, run_dir in method_dirs:
            if any(r.get("fisher_scores") is not None for r in read_metrics(run_dir)):
                plot_fisher(run_dir, out / f"fisher-{_slug(method)}.png",
                            title=f"Fisher scores per block, {method}, {setting}")
    if any("epsilon" in row for rows in table.values() for row in rows.values()):
        _plot_privacy(table, suite.output_dir / run_folder.EPSILON_PLOT)
    summary = {
        "suite": suite.name,
        "device": _device_name(),
        "torch": torch.__version__,
        "seeds": suite.seeds,
        "table": table,
    }
    suite.output_dir.mkdir(parents=True, exist_ok=True)
    (suite.output_dir / run_folder.SUMMARY_FILE).write_text(json.dumps(summary, indent=1))
    (suite.output_dir / run_folder.RESULTS_FILE).write_text(render_table(summary) + "\n")
    return summary


def _plot_privacy(table: dict[str, dict[str, Any]], out: Path) -> None:
    """Final accuracy against epsilon per method, a point per setting (None: a non-private setting)."""
    from fedhello.plots import plot_accuracy_vs_epsilon

    points: dict[str, list[tuple[float | None, float, float]]] = {}
    for rows in table.values():
        for method, row in rows.items():
            epsilon = row["epsilon"][0] if "epsilon" in row else None
            points.setdefault(method, []).append((epsilon, *row["final"]))
    plot_accuracy_vs_epsilon(points, out)


def publish(suite: Suite, dest: str | Path) -> Path:
    """Copy a summarized suite's table, plots and every run's metrics (no weights) into ``dest``.

    ``dest`` gets ``results.md``, ``summary.json``, ``<setting>/*.png`` and
    ``<setting>/<method>/seed-<s>/{config.yaml, metrics.jsonl, completions.jsonl, ...}``: small files meant to be
    committed beside a report so that every number in it can be checked.
    """
    dest = Path(dest)
    src = suite.output_dir
    for name in (run_folder.RESULTS_FILE, run_folder.SUMMARY_FILE):
        if not (src / name).exists():
            raise UserError(f"publish: {src / name} does not exist; run or summarize the suite first")
    dest.mkdir(parents=True, exist_ok=True)
    for name in (run_folder.RESULTS_FILE, run_folder.SUMMARY_FILE):
        shutil.copy2(src / name, dest / name)
    for png in sorted(src.glob("*.png")):  # plots across settings (a privacy suite's accuracy against epsilon)
        shutil.copy2(png, dest / png.name)
    for setting in suite.settings:
        for png in sorted((src / setting).glob("*.png")):
            (dest / setting).mkdir(parents=True, exist_ok=True)
            shutil.copy2(png, dest / setting / png.name)
    for setting, method, seed, run_dir in suite.runs():
        target = dest / setting / method / f"seed-{seed}"
        for name in run_folder.PUBLISHED_RUN_FILES:
            if (run_dir / name).exists():
                target.mkdir(parents=True, exist_ok=True)
                shutil.copy2(run_dir / name, target / name)
    return dest


def _slug(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in name).strip("-").lower()


def scores_perplexity(summary: dict[str, Any]) -> bool:
    """Whether a summary scores causal LM runs (held-out perplexity) rather than accuracy."""
    return any(row.get("metric") == "perplexity" for rows in summary["table"].values() for row in rows.values())


SHORT_MARK = "†"  # a "last 3 evaluations" cell of runs that have fewer than 3


def render_table(summary: dict[str, Any]) -> str:
    """Markdown tables: rows = methods, columns = settings; first the final (best) test accuracy,
    then the mean of the last three evaluations, each with a last row for the untrained model and
    columns for the wall time per run and the MB sent up per round (means over settings); then
    the device the runs took."""
    table = summary["table"]
    settings = list(table)
    methods = list(dict.fromkeys(m for s in settings for m in table[s]))
    n_seeds = len(summary["seeds"])
    pm = " ± std" if n_seeds > 1 else ""

    lm = scores_perplexity(summary)
    unit = "perplexity (lower is better)" if lm else "%"

    def cell(row: dict[str, Any], stat: str) -> str:
        mean, std = row[stat]
        have = row["seeds"]  # seeds with an evaluated run; fewer when some failed or are running
        text = f"{mean:.2f}" + (SHORT_MARK if stat == "last3" and row.get("last3_of", 3) < 3 else "")
        if n_seeds > 1:
            text += (f" ± {std:.2f}" if have > 1 else " ± –") + (f" (n={have})" if have < n_seeds else "")
        return text + (f" ({row['best'][0]:.2f})" if stat == "final" else "")

    untrained_rows = _untrained_rows(table, settings, methods, lambda row: row["untrained"][0],
                                     lambda value: f"{value:.2f}")
    parts = []
    for stat, title in (("final", f"final{pm} (best) {unit}"), ("last3", f"mean of the last 3 evaluations{pm} {unit}")):
        lines = [f"| method | " + " | ".join(f"{s}: {title}" for s in settings)
                 + " | wall time / run | upload / round |",
                 "|" + "---|" * (len(settings) + 3)]
        for m in methods:
            rows = [row for row in (table[s].get(m) for s in settings) if row is not None]
            walls = [row["wall_time_s"] for row in rows]
            uploads = [row["upload_mb_per_round"] for row in rows]
            lines.append(f"| {m} | " + " | ".join("–" if table[s].get(m) is None else cell(table[s][m], stat)
                                                  for s in settings)
                         + f" | {np.nanmean(walls):.0f} s | {np.nanmean(uploads):.2f} MB |")
        lines += [f"| {label} | " + " | ".join(cells) + " | – | – |" for label, cells in untrained_rows]
        fewest = min((row.get("last3_of", 3) for rows in table.values() for row in rows.values()), default=3)
        if stat == "last3" and fewest < 3:
            lines.append(f"\n{SHORT_MARK} mean of all of the run's evaluations: it has fewer than 3 "
                         f"(fewest: {fewest})")
        parts.append("\n".join(lines))
    if any("client_mean" in row for rows in table.values() for row in rows.values()):
        parts.append(_render_client_table(table, settings, methods, pm, lm))
    if any("epsilon" in row for rows in table.values() for row in rows.values()):
        parts.append(_render_epsilon_table(table, settings, methods))
    parts.append(f"{n_seeds} seed(s); device: {summary['device']}, torch {summary['torch']}.")
    return "\n\n".join(parts)


def _untrained_rows(table: dict[str, Any], settings: list[str], methods: list[str],
                    value: Callable[[dict[str, Any]], Any], text: Callable[[Any], str]) -> list[tuple[str, list[str]]]:
    """The untrained model's row(s) of a table: one row when every method of a setting starts from
    the same model (its mean over seeds), else one row per method. Methods that differ in the frozen
    base itself (e.g. a quantized and a full-precision one) start from different models, and an
    average of those would describe neither."""
    def values(s: str, ms: list[str]) -> list[Any]:
        found = [value(table[s][m]) for m in ms if m in table[s]]
        return [v for v in found if v is not None and not np.any(np.isnan(v))]

    def same(found: list[Any]) -> bool:
        return all(np.allclose(v, found[0], rtol=1e-9, atol=0) for v in found)

    if all(same(values(s, methods)) for s in settings):
        cells = [text(np.mean(found, axis=0)) if (found := values(s, methods)) else "–" for s in settings]
        return [("*untrained model*", cells)]
    return [(f"*untrained model, {m}*", [text(found[0]) if (found := values(s, [m])) else "–" for s in settings])
            for m in methods]


def _render_epsilon_table(table: dict[str, Any], settings: list[str], methods: list[str]) -> str:
    """Epsilon after the last round (mean over seeds; the seeds of a cell share it unless
    ``target_epsilon`` calibrated them apart), "∞" for a non-private setting."""
    def cell(row: dict[str, Any] | None) -> str:
        if row is None:
            return "–"
        return f"{row['epsilon'][0]:.2f}" if "epsilon" in row else "∞"

    lines = ["| method | " + " | ".join(f"{s}: epsilon after the last round" for s in settings) + " |",
             "|" + "---|" * (len(settings) + 1)]
    lines += [f"| {m} | " + " | ".join(cell(table[s].get(m)) for s in settings) + " |" for m in methods]
    return "\n".join(lines)


def _render_client_table(table: dict[str, Any], settings: list[str], methods: list[str], pm: str, lm: bool) -> str:
    """Each client's held-out perplexity (causal LMs) or accuracy (classification) under the final
    global model: the mean over clients, for accuracy the 10th percentile, and the worst client (each
    a mean over seeds), per setting."""
    stats = ("mean", "worst") if lm else ("mean", "p10", "worst")

    def cell(row: dict[str, Any] | None, prefix: str = "") -> str:
        if row is None or f"{prefix}client_mean" not in row:
            return "–"
        mean = row[f"{prefix}client_mean"]
        first = f"{mean[0]:.2f}" + (f" ± {mean[1]:.2f}" if pm else "")
        return " / ".join([first] + [f"{row[f'{prefix}client_{k}'][0]:.2f}" for k in stats[1:]])

    what = (f"clients' perplexity, mean{pm} / worst client" if lm
            else f"clients' accuracy %, mean{pm} / 10th percentile / worst client")
    lines = ["| method | " + " | ".join(f"{s}: {what}" for s in settings) + " |",
             "|" + "---|" * (len(settings) + 1)]
    for m in methods:
        lines.append(f"| {m} | " + " | ".join(cell(table[s].get(m)) for s in settings) + " |")
    def untrained(row: dict[str, Any]) -> Any:
        return None if "client_mean" not in row else np.array([row[f"untrained_client_{k}"] for k in stats])

    def text(value: np.ndarray) -> str:
        return cell({f"untrained_client_{k}": tuple(v) for k, v in zip(stats, value)}, "untrained_")

    lines += [f"| {label} | " + " | ".join(cells) + " |"
              for label, cells in _untrained_rows(table, settings, methods, untrained, text)]
    return "\n".join(lines)
