"""Where the benchmark scripts write their JSON when ``--out`` is not given."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import _common  # noqa: E402  (a sibling module of the benchmark scripts, as they import it)


def test_smoke_runs_write_outside_the_tracked_results():
    first = _common.results_path("kernels", "cpu-x", smoke=True)
    second = _common.results_path("kernels", "cpu-x", smoke=True)
    for path in (first, second):
        assert path.parent.is_dir() and path.name.startswith("kernels-cpu-x-") and path.suffix == ".json"
        assert REPO not in path.parents
    assert first.parent != second.parent  # a fresh folder per run: two smoke runs never collide
    for path in (first, second):
        path.parent.rmdir()


def test_full_runs_write_into_benchmarks_results():
    path = _common.results_path("rounds", "cuda-h100", smoke=False)
    assert path.parent == REPO / "benchmarks" / "results" and path.name.startswith("rounds-cuda-h100-")

