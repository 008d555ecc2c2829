"""benchmarks/bench_rounds.py --quantize: every implementation over one bitsandbytes base, guard passed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("bitsandbytes")

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_quantized_smoke_round(tmp_path, kind):
    out = tmp_path / "rounds.json"
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_rounds.py"), "--smoke", "--device", "cpu",
                           "--quantize", kind, "--n", "3", "--repeats", "1", "--out", str(out)],
                          cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert doc["meta"]["settings"]["quantize"] == kind
    case = doc["cases"][0]
    assert case["n"] == 3 and all(e["status"] == "ok" for e in case["impls"].values()), case["impls"]
    assert set(case["guard"]) == {"batched", "peft"} and all(g["ok"] for g in case["guard"].values())
