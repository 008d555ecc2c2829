"""Flower nodes over a bitsandbytes base, and client dropout on Flower: the same run as ``fedhello run``.

The quantized runs use the tiny random LLaMA causal LM of ``tests/fl/conftest.py`` (hidden 32, 2
blocks), its blocks quantized by ``model.quantize`` on every node (the global state that crosses to
the nodes and back holds the float32 adapters only); the dropout runs use ``test_flower``'s tiny BERT.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import yaml
from flwr.supercore.task_identity import TaskIdentity
from safetensors.torch import load_file

from fedhello.cli import main as cli_main
from fedhello.config import RunConfig
from fedhello.fl.flower import client_app, run_on_grid, split_tasks
from fedhello.fl.server import FederatedRun

# tiny_model is test_flower's fixture (a 4-block BERT folder), imported to be used here.
from tests.fl.test_flower import _InProcessGrid, _failing_app, _max_rel, _raw, _records, tiny_model  # noqa: F401
from tests.nn.tiny import tiny_lm_run_config

TOL = 1e-4


DECISIONS = ("round", "cohort", "participants", "allocation", "bytes_up", "bytes_down")
LM_METRICS = ("train_loss", "test_perplexity", "test_client_perplexity")


def _assert_same_run(got: Path, want: Path, decisions: tuple[str, ...] = DECISIONS,
                     metrics: tuple[str, ...] = LM_METRICS) -> None:
    """The same global adapters (fp32 tolerance) and base record, the same per-round decisions and metrics."""
    got_state, want_state = (load_file(str(d / "checkpoint.safetensors")) for d in (got, want))
    assert _max_rel(got_state, want_state) < TOL
    got_meta, want_meta = (json.loads((d / "checkpoint.json").read_text()) for d in (got, want))
    assert got_meta["base"] == want_meta["base"]
    for g, w in zip(_records(got), _records(want), strict=True):
        assert {k: g[k] for k in decisions} == {k: w[k] for k in decisions}
        for key in metrics:
            assert g[key] == pytest.approx(w[key], rel=TOL), key
        assert "lost" not in g


def test_flower_simulation_over_an_nf4_base_matches_fedhello_run(tiny_lm_files, tmp_path, capfd):
    """``fedhello flower`` (Ray, 2 nodes, each building its own NF4 base from the config) == ``fedhello run``."""
    pytest.importorskip("bitsandbytes")
    model_dir, data = tiny_lm_files
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(tiny_lm_run_config(model_dir, data, tmp_path / "unused", quantize="nf4")))
    for command, out_dir in (["run", "--no-progress"], "single"), (["flower", "--nodes", "2"], "flower"):
        capfd.readouterr()
        assert cli_main([command[0], str(config), *command[1:], "--set", f"output_dir={tmp_path / out_dir}"]) == 0
    out, _ = capfd.readouterr()
    assert "(nf4; quantized layers" in out and "round 2/2: train loss" in out, out
    _assert_same_run(tmp_path / "flower", tmp_path / "single")
    assert json.loads((tmp_path / "flower" / "checkpoint.json").read_text())["base"]["quantize"] == "nf4"
    assert (tmp_path / "flower" / "peft_adapter").is_dir()


@pytest.fixture
def flower_runtime(monkeypatch):
    """What Flower's runtime sets before a ServerApp runs (the in-process grid skips it)."""
    for attr in ("_task_id", "_run_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1)


def test_flower_nodes_over_an_int8_base_match_fedhello_run(tiny_lm_files, tmp_path, flower_runtime, capsys):
    """The real ClientApp on two in-process nodes over an int8 base: the same run as ``fedhello run``."""
    pytest.importorskip("bitsandbytes")
    model_dir, data = tiny_lm_files

    def config(out: str) -> RunConfig:
        return RunConfig.from_dict(tiny_lm_run_config(model_dir, data, tmp_path / out, quantize="int8"))

    FederatedRun(config("single"), progress=False).run()
    grid = _InProcessGrid([11, 22], client_app, dead=set())
    run_on_grid(grid, config("flower"))
    assert "(int8; quantized layers" in capsys.readouterr().out
    _assert_same_run(tmp_path / "flower", tmp_path / "single")


def _dropout_config(model: Path, out: Path) -> RunConfig:
    raw = _raw(model, out)
    raw.update(rounds=3, clients={"dropout": 0.3, "over_selection": 0.25})  # all 8 clients sampled, 6 aggregated
    return RunConfig.from_dict(raw)


def test_client_dropout_on_flower_nodes_matches_fedhello_run(tiny_model, tmp_path, flower_runtime, caplog):
    """clients.dropout and over_selection through the Flower server loop and the real ClientApp on two
    nodes: the same clients fail or come late in every round, the same records and global state as
    ``fedhello run``. A node that really fails adds its clients to the round's ``lost``."""
    want = FederatedRun(_dropout_config(tiny_model, tmp_path / "single"), progress=False).run()
    assert any(r["dropped"] for r in want) and any(r["late"] for r in want)
    run_on_grid(_InProcessGrid([11, 22], client_app, dead=set()), _dropout_config(tiny_model, tmp_path / "flower"))
    _assert_same_run(tmp_path / "flower", tmp_path / "single", DECISIONS + ("dropped", "late"),
                     ("train_loss", "test_accuracy"))

    # Node 11 (the first group of round 0's participants) raises in round 0.
    group = split_tasks(want[0]["participants"], 2)[0]
    grid = _InProcessGrid([11, 22], _failing_app(group[0]), dead=set())
    with caplog.at_level(logging.WARNING, logger="fedhello.fl.flower"):
        failed = run_on_grid(grid, _dropout_config(tiny_model, tmp_path / "failed"))
    first = failed[0]
    assert first["lost"] == sorted(group)
    assert first["participants"] == [c for c in want[0]["participants"] if c not in group]
    assert (first["dropped"], first["late"]) == (want[0]["dropped"], want[0]["late"])  # simulated: unchanged
    assert all("lost" not in r for r in failed[1:])
    saved = [json.loads(line) for line in (tmp_path / "failed" / "metrics.jsonl").read_text().splitlines()]
    assert saved[0]["lost"] == sorted(group)
