"""Helpers shared by the benchmark scripts: run metadata, JSON output, statistics, CLI parsers.

Imported by ``bench_kernels.py`` and ``bench_rounds.py`` as a sibling module (the scripts run
with ``benchmarks/`` as their first ``sys.path`` entry).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.metadata
import json
import math
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

if TYPE_CHECKING:  # torch is imported where it is used: gpu_check.py's bookkeeping starts without it
    import torch

__all__ = [
    "REPO_ROOT",
    "RESULTS_DIR",
    "device_name",
    "finish_run",
    "finite",
    "git",
    "int_list",
    "name_list",
    "package_versions",
    "percentile",
    "results_path",
    "run_metadata",
    "slug",
    "write_json",
]

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"


# --------------------------------------------------------------------------------------- metadata


def git(*args: str) -> str | None:
    """Output of ``git <args>`` in the repository (stripped), or None when git fails."""
    try:
        done = subprocess.run(["git", "--no-optional-locks", *args], cwd=REPO_ROOT,
                              capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU model name from ``/proc/cpuinfo``."""
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def slug(text: str) -> str:
    """File-name form of a device name: ``"NVIDIA H100 80GB HBM3"`` -> ``nvidia-h100-80gb-hbm3``."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "device"


def package_versions(names: Sequence[str]) -> dict[str, str | None]:
    """Installed version of each distribution (None when it is not installed), without importing it."""
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def run_metadata(device: torch.device, argv: Sequence[str]) -> dict:
    """What every benchmark records about its run: the device (name, type, file-name slug; on
    CUDA its capability, SM count and memory), python/torch/CUDA versions, CPU intra-op threads,
    the git commit and whether tracked files were modified (None when git is unavailable), the
    UTC date and the command-line arguments."""
    import torch

    name = device_name(device)
    status = git("status", "--porcelain", "--untracked-files=no")
    meta = {
        "device": name,
        "device_type": device.type,
        "device_slug": slug(name if device.type == "cuda" else f"cpu-{name}"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cpu_threads": torch.get_num_threads(),
        "git_commit": git("rev-parse", "HEAD") or "unknown",
        "git_dirty": None if status is None else bool(status),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "argv": list(argv),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        meta.update(capability=f"{props.major}.{props.minor}", sm_count=props.multi_processor_count,
                    total_memory_bytes=props.total_memory)
    return meta


# ------------------------------------------------------------------------------------------ output


def results_path(kind: str, device_slug: str, smoke: bool) -> Path:
    """Default JSON path of a benchmark run: ``benchmarks/results/<kind>-<device>-<date>.json``.

    ``--smoke`` runs (CI, a first try) go to a fresh temporary folder instead, so they never
    dirty the tracked results folder; ``--out`` overrides both.
    """
    folder = Path(tempfile.mkdtemp(prefix=f"fedhello-{kind}-smoke-")) if smoke else RESULTS_DIR
    return folder / f"{kind}-{device_slug}-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}.json"


def write_json(doc: dict, path: Path) -> None:
    """Write ``doc`` to ``path`` atomically (a temporary file renamed over it); NaN/inf rejected."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1, allow_nan=False) + "\n")
    tmp.replace(path)


def finite(obj: object) -> object:
    """JSON has no NaN/inf: write them as strings so the file stays valid."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [finite(v) for v in obj]
    return obj


# -------------------------------------------------------------------------------------- statistics


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The ``q``-quantile (0..1) of ascending ``sorted_values``, linearly interpolated."""
    idx = q * (len(sorted_values) - 1)
    lo, hi = math.floor(idx), math.ceil(idx)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (idx - lo)


# --------------------------------------------------------------------------------------------- CLI


def int_list(text: str) -> list[int]:
    """argparse type: ``"1k,8192,32K"`` -> ``[1024, 8192, 32768]``."""
    out = []
    for item in text.split(","):
        item = item.strip().lower()
        mult = 1024 if item.endswith("k") else 1
        try:
            value = int(item.removesuffix("k")) * mult
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated ints (1k = 1024), got {text!r}")
        if value < 1:
            raise argparse.ArgumentTypeError(f"expected positive sizes, got {text!r}")
        out.append(value)
    return out


def name_list(choices: Sequence[str]) -> Callable[[str], list[str]]:
    """argparse type: a comma-separated, non-empty list of names from ``choices``."""
    def parse(text: str) -> list[str]:
        names = [n.strip() for n in text.split(",") if n.strip()]
        bad = [n for n in names if n not in choices]
        if bad or not names:
            raise argparse.ArgumentTypeError(f"expected names from {tuple(choices)}, got {text!r}")
        return names
    return parse


def guard_exit_status(cases: Sequence[dict]) -> int:
    """1 (and a message on stderr) when any case's correctness guard failed, else 0."""
    mismatches = [(r["name"], k) for r in cases for k, v in r.get("guard", {}).items() if not v["ok"]]
    if mismatches:
        print(f"correctness guard failed for: {mismatches}", file=sys.stderr)
        return 1
    return 0


def finish_run(doc: dict, out: str | Path, started: float, report: Callable[[dict], str]) -> int:
    """End a benchmark run: mark ``doc`` complete with its elapsed time (since ``started``, a
    ``time.monotonic()``), write it to ``out``, print ``report(doc)``; the exit status of
    ``guard_exit_status``."""
    doc["complete"] = True
    doc["elapsed_s"] = round(time.monotonic() - started, 3)
    write_json(doc, out)
    print("\n" + report(doc))
    print(f"\nwrote {out}")
    return guard_exit_status(doc["cases"])
