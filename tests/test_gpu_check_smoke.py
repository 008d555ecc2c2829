"""benchmarks/gpu_check.sh end to end in its --smoke mode (CPU, TRITON_INTERPRET=1, tiny shapes),
and its summary arithmetic on hand-made benchmark records."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"
sys.path.insert(0, str(BENCH))
try:
    import gpu_check
finally:
    sys.path.remove(str(BENCH))


def test_smoke_runs_every_step_and_writes_at_most_eight_files(tmp_path) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(BENCH / "gpu_check.sh"), "--smoke"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8
    assert {"gpu_check.json", "gpu_check.log", "kernels.json", "variants.json", "pytest.log"} <= set(files)
    doc = json.loads((out / "gpu_check.json").read_text())
    assert doc["env"]["triton_interpret"] is True and doc["env"]["smoke"] is True
    steps = doc["steps"]
    assert [s for s in ("env", "ceilings", "headline", "graph", "variants", "gpu_tests") if steps[s]["status"] != "ok"] == []
    assert steps["rounds"]["status"] == "skipped" and steps["variants_n1"]["status"] == "skipped"
    # The QLoRA step runs a toy Llama where bitsandbytes is installed, and says why not elsewhere.
    if importlib.util.find_spec("bitsandbytes") is None:
        assert steps["qlora"]["status"] == "skipped" and "bitsandbytes" in steps["qlora"]["note"]
    else:
        assert steps["qlora"]["status"] == "ok"
        qlora = json.loads((out / "qlora.json").read_text())
        assert {c["pattern"] for c in qlora["cases"] if c["status"] == "ok"} == {"fedhello", "peft-loop"}
    assert doc["graph"]["status"] == "skipped"  # CUDA graphs need CUDA
    # The background build of the CUDA extension ran and stopped at once on a CPU torch, saying why.
    assert steps["ext_build"]["status"] == "failed" and steps["ext_build"]["rc"] == 1
    assert "is a CPU build" in (out / "gpu_check.log").read_text()
    assert doc["ceilings"]["copy"]["bytes_per_s"] > 0
    summary = doc["summary"]
    assert summary["headline_case"] == "n2-t64-d32-r8-uniform-fp32"
    assert set(summary["goals"]) == set(gpu_check.GOALS)
    assert [v["case"] for v in summary["variants"]] == ["n2-t64-d32-r8-uniform-fp32-contiguous",
                                                       "n2-t64-d32-r8-uniform-fp32-zipf2"]
    assert "tests collected" in summary["pytest"]
    assert "=== gpu_check summary ===" in done.stdout
    assert "=== gpu_check summary ===" in (out / "gpu_check.log").read_text()


def _case(name: str, routing: str, n: int, triton_lora: float, **extra) -> dict:
    return {"name": name, "routing": routing, "n": n, "status": "ok",
            "impls": {"triton": {"status": "ok", "lora_ms": {"fwd_bwd": triton_lora}}}, **extra}


def test_summary_derives_the_goals(tmp_path) -> None:
    ratios = {"lora_speedup_vs_torch_loop": {"triton": {"fwd_bwd": 3.5}},
              "lora_overhead_vs_base": {"triton": {"fwd_bwd": 0.2}},
              "fused_norm_cost_frac_of_bwd": 0.08}
    profile = {"triton": {"lora_kernels": [{"name": "a", "median_us": 30.0, "frac_of_copy": 0.8},
                                           {"name": "b", "median_us": 40.0, "frac_of_copy": 0.6}]}}
    head = _case("head", "scattered", 32, 0.2, ratios=ratios, profile=profile)
    variants = {"cases": [_case("zipf2", "zipf2", 32, 0.3), _case("n1", "scattered", 1, 0.25),
                          {"name": "oom", "status": "skipped"}]}
    log = tmp_path / "pytest.log"
    log.write_text("....\n12 passed, 1 failed in 30.0s\n")
    s = gpu_check.summarise({"graph": {"status": "ok"}}, {"cases": [head]}, variants, log, {"complete": True})
    goals = {k: (v["value"], v["verdict"]) for k, v in s["goals"].items()}
    assert goals == {"K1_lora_fwd_bwd_speedup_vs_torch_loop": (3.5, "MET"),
                     "K2_lora_overhead_vs_base_fwd_dgrad": (0.2, "MET"),
                     "K3_fused_norm_cost_frac_of_bwd": (0.08, "NOT MET"),
                     "K4_min_kernel_frac_of_copy": (0.6, "NOT MET")}
    rows = {r["case"]: (r["vs_headline"], r["verdict"]) for r in s["variants"]}
    assert rows["zipf2"] == (pytest.approx(1.5), "NOT MET") and rows["n1"] == (pytest.approx(1.25), "MET")
    assert rows["oom"] == (None, "n/a")
    assert s["pytest"] == "12 passed, 1 failed in 30.0s" and s["graph"] == "ok" and s["rounds"] == "ok"
    text = gpu_check.format_summary({"steps": {"x": {"status": "timeout", "rc": 124, "seconds": 9}}}, s)
    assert "K3_fused_norm_cost_frac_of_bwd" in text and "step x: timeout (rc 124, 9 s)" in text


@pytest.mark.parametrize("text, expected", [
    ("....\n=========== 200 passed, 3 skipped, 12 deselected in 95.11s (0:01:35) ===========\n",
     "200 passed, 3 skipped, 12 deselected in 95.11s (0:01:35)"),
    ("collected\n540 tests collected in 3.21s\n", "540 tests collected in 3.21s"),
    # Killed by its timeout mid-run: the last lines are a failure's traceback, not a summary.
    ("..F.\nE   AssertionError: error 0.3 passed the tolerance\n", "no pytest summary line (killed by its timeout?)"),
    ("", None),
])
def test_pytest_line_is_only_the_closing_summary(tmp_path, text, expected) -> None:
    log = tmp_path / "pytest.log"
    log.write_text(text)
    assert gpu_check._pytest_line(log) == expected
