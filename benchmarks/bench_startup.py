"""How long ``fedhello`` takes to report a bad config or name (goal: under 2 s), measured, not asserted.

    python benchmarks/bench_startup.py            # each case 3 times, median wall seconds
    python benchmarks/bench_startup.py --repeat 1

Every case runs ``python -m fedhello ...`` in a fresh process (what a user waits for) and must
exit with status 2; the last line gives, for scale, the time to import the training stack
(``fedhello.fl.server``) that the checks run before.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from timing import wall_time  # a sibling module: the script runs with benchmarks/ on sys.path

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "quickstart.yaml")
CPU = torch.device("cpu")  # a process start: nothing to synchronise
CASES = {
    "missing config file": ["run", "nope.yaml"],
    "bad field (local.lr=-1)": ["run", CONFIG, "--set", "local.lr=-1"],
    "unknown strategy option": ["run", CONFIG, "--set", "strategy.options.nope=1"],
    "unknown model, HF_HUB_OFFLINE=1": ["run", CONFIG, "--set", "model.name=not-a-model-xyz"],
    "unknown data set, HF_HUB_OFFLINE=1": ["run", CONFIG, "--set", "data.name=not_a_dataset"],
    "unsupported data.path": ["run", CONFIG, "--set", "data.name=null", "--set", "data.path=/etc/hostname"],
}


def _seconds(args: list[str], expect: int) -> float:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    done, elapsed = wall_time(lambda: subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True,
                                                     text=True), CPU)
    if done.returncode != expect:
        raise SystemExit(f"{args}: exit status {done.returncode}, expected {expect}: {done.stderr[-500:]}")
    return elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="runs per case (median reported)")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error(f"--repeat: expected an int >= 1, got {args.repeat}")
    for name, case in CASES.items():
        times = [_seconds(["-m", "fedhello", *case], 2) for _ in range(args.repeat)]
        print(f"{name:<36} {statistics.median(times):6.2f} s")
    stack = [_seconds(["-c", "import fedhello.fl.server"], 0) for _ in range(args.repeat)]
    print(f"{'(import fedhello.fl.server, for scale)':<36} {statistics.median(stack):6.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
