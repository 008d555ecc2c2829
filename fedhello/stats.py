"""Paired comparisons of methods over seeds, read from the metrics files a suite publishes.

Runs of one suite with the same seed share the partition, the tier membership and the cohorts,
so the per-seed difference ``reference - other`` removes what a seed does to every method alike.
For n seeds the mean difference gets the 95 % Student-t interval ``mean ± t(0.975, n-1) s / sqrt(n)``
(``s`` the sample standard deviation of the differences); when the interval covers 0 the two
methods are *not separable* with these seeds.

Metrics of one run, in % test accuracy of the global model: ``final`` (the last evaluation),
``last3`` (the mean of the last three evaluations) and ``best`` (the highest evaluation). For
``task: causal_lm`` runs the held-out perplexity instead (``best``: the lowest; a negative
difference then means the reference is better).

Command line (one markdown table for every published suite folder given)::

    python -m fedhello.stats docs/results/minilm-seeds docs/results/smollm2 \\
        --reference Fed-HeLLo --against FedRA Full Straggler Exclusive --metric last3 final
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from fedhello.errors import UserError
from fedhello import run_folder

__all__ = ["METRICS", "PairedDifference", "run_metric", "seed_values", "paired_difference", "compare",
           "render_markdown", "main"]

METRICS = ("final", "last3", "best")


def run_metric(run_dir: str | Path, metric: str) -> float:
    """One run's ``metric`` (see module doc) in % (perplexity for causal LM runs), from its ``metrics.jsonl``.

    Raises:
        ValueError: unknown metric, no metrics file, or no evaluated round.
    """
    if metric not in METRICS:
        raise ValueError(f"metric: expected one of {METRICS}, got {metric!r}")
    path = Path(run_dir) / run_folder.METRICS_FILE
    if not path.is_file():
        raise ValueError(f"run_dir: expected a run folder with {run_folder.METRICS_FILE}, got {run_dir}")
    value = _metric(run_folder.read_records(run_dir), metric)
    if value is None:
        raise ValueError(f"run_dir: {path} has no evaluated round (no test_accuracy or test_perplexity)")
    return value


def _metric(records: Sequence[Mapping], metric: str) -> float | None:
    """``metric`` of one run's records, None when no round was evaluated."""
    accuracy = [100.0 * r["test_accuracy"] for r in records if r.get("test_accuracy") is not None]
    perplexity = [r["test_perplexity"] for r in records if r.get("test_perplexity") is not None]
    values, best = (accuracy, max) if accuracy or not perplexity else (perplexity, min)
    if not values:
        return None
    if metric == "final":
        return values[-1]
    if metric == "best":
        return best(values)
    return float(np.mean(values[-3:]))


def seed_values(folder: str | Path, setting: str, method: str, metric: str) -> dict[int, float]:
    """``seed -> metric`` of every ``<folder>/<setting>/<method>/seed-<s>`` run with an evaluated round
    (a run stopped before its first evaluation has no value and is left out, as the suite table does)."""
    if metric not in METRICS:
        raise ValueError(f"metric: expected one of {METRICS}, got {metric!r}")
    base = Path(folder) / setting / method
    values = {}
    for run in sorted(base.glob("seed-*")):
        suffix = run.name.removeprefix("seed-")
        if suffix.isdigit() and (run / run_folder.METRICS_FILE).is_file():
            value = _metric(run_folder.read_records(run), metric)
            if value is not None:
                values[int(suffix)] = value
    return values


@dataclass(frozen=True)
class PairedDifference:
    """``reference - other`` over the seeds both have, with its 95 % t-interval.

    Attributes:
        seeds: the common seeds, sorted; ``differences``: the per-seed differences (points of %).
        mean, low, high: the mean difference and its interval.
    """

    setting: str
    reference: str
    other: str
    metric: str
    seeds: tuple[int, ...]
    differences: tuple[float, ...]
    mean: float
    low: float
    high: float

    @property
    def separable(self) -> bool:
        """True when the interval excludes 0."""
        return self.low > 0 or self.high < 0

    @property
    def verdict(self) -> str:
        if not self.separable:
            return "not separable"
        return f"{self.reference} {'higher' if self.mean > 0 else 'lower'}"


def paired_difference(reference: Mapping[int, float], other: Mapping[int, float],
                      confidence: float = 0.95) -> tuple[tuple[int, ...], tuple[float, ...], float, float, float]:
    """(seeds, differences, mean, low, high) of ``reference - other`` over their common seeds.

    Raises:
        ValueError: fewer than 2 common seeds, or ``confidence`` outside (0, 1).
    """
    from scipy.stats import t as student_t

    if not 0 < confidence < 1:
        raise ValueError(f"confidence: expected a number in (0, 1), got {confidence}")
    seeds = tuple(sorted(set(reference) & set(other)))
    if len(seeds) < 2:
        raise ValueError(f"reference, other: a paired interval needs >= 2 common seeds, got {list(seeds)}")
    diffs = np.array([reference[s] - other[s] for s in seeds], dtype=np.float64)
    mean = float(diffs.mean())
    half = float(student_t.ppf(0.5 + confidence / 2, diffs.size - 1) * diffs.std(ddof=1) / math.sqrt(diffs.size))
    return seeds, tuple(float(d) for d in diffs), mean, mean - half, mean + half


def compare(folder: str | Path, reference: str, against: Sequence[str], metric: str,
            settings: Sequence[str] | None = None) -> list[PairedDifference]:
    """Paired differences of ``reference`` against each method of ``against`` in every setting of
    a published suite folder (sub-folders holding method folders); pairs with < 2 common seeds,
    or a method absent from a setting, are left out.

    Raises:
        ValueError: ``folder`` holds no suite runs, or ``reference`` is in none of its settings.
    """
    root = Path(folder)
    if not root.is_dir():
        raise UserError(f"folder: expected a published suite folder, got {folder}")
    # <setting>/<method>/seed-<s>/metrics.jsonl: which methods each setting has
    found: dict[str, set[str]] = {}
    for metrics in root.glob(f"*/*/seed-*/{run_folder.METRICS_FILE}"):
        found.setdefault(metrics.parents[2].name, set()).add(metrics.parents[1].name)
    if not found:
        raise UserError(f"folder: {folder} holds no suite runs (<setting>/<method>/seed-<s>/{run_folder.METRICS_FILE})")
    methods = sorted(set().union(*found.values()))
    if reference not in methods:  # a typo would otherwise read as "no pairs"
        raise UserError(f"reference: no method {reference!r} in {folder}; its methods: {methods}")
    if settings is None:
        settings = sorted(s for s, names in found.items() if reference in names)
    results = []
    for setting in settings:
        ref = seed_values(root, setting, reference, metric)
        for other in against:
            values = seed_values(root, setting, other, metric)
            if len(set(ref) & set(values)) < 2:
                continue
            seeds, diffs, mean, low, high = paired_difference(ref, values)
            results.append(PairedDifference(setting, reference, other, metric, seeds, diffs, mean, low, high))
    return results


def render_markdown(results: Sequence[PairedDifference]) -> str:
    """A markdown table: one row per comparison and metric (differences in points of %)."""
    lines = ["| setting | comparison | metric | seeds | per-seed differences | mean | 95 % interval | verdict |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        per_seed = ", ".join(f"{d:+.2f}" for d in r.differences)
        lines.append(f"| {r.setting} | {r.reference} − {r.other} | {r.metric} | {len(r.seeds)} | {per_seed} | "
                     f"{r.mean:+.2f} | [{r.low:+.2f}, {r.high:+.2f}] | {r.verdict} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedhello.stats", description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", help="published suite folders (e.g. docs/results/minilm-seeds)")
    parser.add_argument("--reference", required=True, help="the method every other is compared with")
    parser.add_argument("--against", nargs="+", required=True,
                        help="methods to compare with (skipped in settings that lack them)")
    parser.add_argument("--metric", nargs="+", default=["last3", "final"], choices=METRICS)
    args = parser.parse_args(argv)
    for folder in args.folders:
        try:
            results = [r for metric in args.metric for r in compare(folder, args.reference, args.against, metric)]
        except ValueError as err:
            print(f"{parser.prog}: error: {err}", file=sys.stderr)
            return 2
        results.sort(key=lambda r: (r.setting, args.against.index(r.other), args.metric.index(r.metric)))
        print(f"### {folder}\n\n{render_markdown(results) if results else 'no pairs with >= 2 common seeds'}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
