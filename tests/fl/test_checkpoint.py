"""Run folders and checkpoint pairs without a model: refusal, resume rules, every broken pair, NaN checks."""

from __future__ import annotations

import json
import math
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load as load_safetensors

from fedhello.config import RunConfig, save_config
from fedhello.fl import checkpoint as ckpt
from fedhello.fl.checkpoint import (
    RESUME_ALLOWED,
    CheckpointError,
    RunFolderError,
    check_run_dir,
    clear_run_dir,
    config_changes,
    hold_run_dir,
    read_checkpoint,
    save_checkpoint,
)
from fedhello.fl.health import find_nonfinite

TENSORS = {"layer.lora_a": torch.arange(6.0).reshape(2, 3), "head.weight": torch.ones(2)}
STATE = {"rng": {"state": 1}, "strategy": {}}


def _config(out, **changes) -> RunConfig:
    raw = {"seed": 3, "model": {"name": "m"}, "data": {"name": "bbc_news", "num_clients": 4}, "rounds": 4,
           "cohort_size": 2, "output_dir": str(out), **changes}
    return RunConfig.from_dict(raw)


def _run_folder(tmp_path, done: int = 2):
    """A folder as a run leaves it after ``done`` rounds: config, metrics and a checkpoint pair."""
    out = tmp_path / "run"
    out.mkdir()
    save_config(_config(out), out / "config.yaml")
    (out / "metrics.jsonl").write_text("".join(json.dumps({"round": r}) + "\n" for r in range(done)))
    save_checkpoint(out, TENSORS, done, STATE)
    return out


def _snapshot(folder) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


def test_checkpoint_round_trip_and_file_mode(tmp_path):
    out = _run_folder(tmp_path, done=2)
    got = read_checkpoint(out)
    assert got.next_round == 2 and got.meta["rng"] == STATE["rng"]
    for name, tensor in load_safetensors(got.weights).items():
        assert torch.equal(tensor, TENSORS[name])
    # The weights get the mode of every other output (plain open under the umask).
    assert (out / "checkpoint.safetensors").stat().st_mode == (out / "metrics.jsonl").stat().st_mode
    assert not list(out.glob("*.tmp"))
    save_checkpoint(out, TENSORS, 3, {"rng": {"state": np.int64(5)}, "strategy": {}}, json_default=int)
    assert read_checkpoint(out).meta["rng"] == {"state": 5}  # numpy values through the caller's default


def _mismatched_round(out):
    other = out.parent / "other"
    other.mkdir()
    save_checkpoint(other, TENSORS, 1, STATE)
    os.replace(other / "checkpoint.safetensors", out / "checkpoint.safetensors")


def _truncate(out):
    path = out / "checkpoint.safetensors"
    path.write_bytes(path.read_bytes()[:-5])


def _flip_a_byte(out):
    path = out / "checkpoint.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("breakage, message", [
    (_mismatched_round, r"checkpoint.safetensors: the weights are after 1 rounds but checkpoint.json is after 2"),
    (_truncate, r"checkpoint.safetensors: truncated or corrupt"),
    (_flip_a_byte, r"checkpoint.safetensors: sha256 differs"),
    (lambda out: (out / "checkpoint.json").write_text("{garbage"), r"checkpoint.json: not valid JSON"),
    (lambda out: (out / "checkpoint.json").write_text('{"next_round": 5}'),
     r"checkpoint.json: missing keys \['weights', 'rng', 'strategy'\]"),
    (lambda out: (out / "checkpoint.json").write_text("[1]"), r"checkpoint.json: expected a JSON object"),
    (lambda out: (out / "checkpoint.safetensors").unlink(), r"checkpoint.safetensors: missing, but checkpoint.json"),
    (lambda out: (out / "checkpoint.json").unlink(), r"checkpoint.json: missing beside checkpoint.safetensors"),
    (lambda out: (out / "checkpoint.safetensors").write_bytes(b"abc"), r"checkpoint.safetensors: truncated"),
], ids=["round", "truncated", "corrupt", "garbage-json", "json-keys", "json-list", "no-weights", "no-json",
        "tiny"])
def test_every_broken_pair_is_one_line_naming_the_file(tmp_path, breakage, message):
    out = _run_folder(tmp_path)
    breakage(out)
    before = _snapshot(out)
    with pytest.raises(CheckpointError, match=message) as err:
        check_run_dir(_config(out), resume=True)
    assert str(out) in str(err.value) and "\n" not in str(err.value)
    assert _snapshot(out) == before  # nothing repaired, nothing deleted


def test_kill_between_the_two_renames_finishes_the_save(tmp_path, monkeypatch):
    out = _run_folder(tmp_path, done=2)
    (out / "metrics.jsonl").write_text("".join(json.dumps({"round": r}) + "\n" for r in range(3)))
    real_replace = os.replace

    def killed_before_meta(src, dst):
        if str(dst).endswith("checkpoint.json"):
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", killed_before_meta)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(out, TENSORS, 3, STATE)
    monkeypatch.setattr(ckpt.os, "replace", real_replace)
    assert json.loads((out / "checkpoint.json").read_text())["next_round"] == 2  # the old metadata
    assert check_run_dir(_config(out), resume=True).next_round == 3
    assert json.loads((out / "checkpoint.json").read_text())["next_round"] == 3
    assert not (out / "checkpoint.json.tmp").exists()


def test_refuses_a_folder_with_a_run_unless_told(tmp_path):
    out = _run_folder(tmp_path)
    with pytest.raises(RunFolderError, match=f"^output_dir: {out} already holds a run .*--resume.*--overwrite"):
        check_run_dir(_config(out))
    with pytest.raises(RunFolderError, match="--resume and --overwrite"):
        check_run_dir(_config(out), resume=True, overwrite=True)
    assert check_run_dir(_config(out), overwrite=True) is None
    (out / "notes.txt").write_text("mine")
    removed = clear_run_dir(out)
    assert {p.name for p in removed} == {"config.yaml", "metrics.jsonl", "checkpoint.json", "checkpoint.safetensors"}
    assert [p.name for p in out.iterdir()] == ["notes.txt"]  # only the run's own files go
    assert check_run_dir(_config(out)) is None and check_run_dir(_config(tmp_path / "new"), resume=True) is None


def test_resume_allows_only_fields_that_keep_the_run(tmp_path):
    out = _run_folder(tmp_path, done=2)
    allowed = _config(tmp_path / "moved", rounds=9, eval_every=3, checkpoint_every=2, report_to=["tensorboard"])
    allowed.output_dir = str(out)
    assert check_run_dir(allowed, resume=True).next_round == 2
    with pytest.raises(RunFolderError) as err:
        check_run_dir(_config(out, seed=1, model={"name": "m", "rank": 4}, local={"lr": 0.1},
                              strategy={"name": "fedhello", "options": {"warmup": 2}},
                              engine={"eval_batch_size": 8}), resume=True)
    text = str(err.value)
    for field in ("seed: 3 -> 1", "model.rank: 8 -> 4", "local.lr: 0.0005 -> 0.1",
                  "strategy.options.warmup: 50 -> 2", "engine.eval_batch_size: 64 -> 8"):
        assert field in text, field
    assert "rounds" in text and str(out / "config.yaml") in text
    with pytest.raises(RunFolderError, match="^rounds: 1 is below the 2 rounds already done"):
        check_run_dir(_config(out, rounds=1), resume=True)
    assert set(RESUME_ALLOWED) == {"rounds", "eval_every", "checkpoint_every", "output_dir", "report_to"}


def test_resume_of_a_run_saved_before_a_field_existed(tmp_path):
    import yaml

    out = _run_folder(tmp_path, done=2)
    raw = yaml.safe_load((out / "config.yaml").read_text())
    del raw["task"], raw["data"]["prompt_column"]  # as written before these fields were added
    (out / "config.yaml").write_text(yaml.safe_dump(raw))
    assert check_run_dir(_config(out), resume=True).next_round == 2  # their defaults are what it ran with
    with pytest.raises(RunFolderError, match="task: <absent> -> 'causal_lm'"):
        check_run_dir(_config(out, task="causal_lm"), resume=True)


def test_config_changes_names_dotted_fields():
    old = {"seed": 1, "model": {"rank": 8, "target_modules": None}, "strategy": {"options": {}}}
    new = {"seed": 1, "model": {"rank": 4, "target_modules": ["q"]}, "strategy": {"options": {"warmup": 1}},
           "extra": 2}
    assert [c[0] for c in config_changes(old, new)] == ["model.rank", "model.target_modules",
                                                        "strategy.options.warmup", "extra"]
    assert config_changes(old, old) == []


def test_resume_needs_every_earlier_metrics_record(tmp_path):
    out = _run_folder(tmp_path, done=2)
    (out / "metrics.jsonl").write_text(json.dumps({"round": 0}) + "\n" + '{"round": 1, "tr')  # killed mid-line
    with pytest.raises(CheckpointError, match=r"metrics.jsonl: no record of rounds \[1\]"):
        check_run_dir(_config(out), resume=True)
    (out / "metrics.jsonl").write_text("".join(json.dumps({"round": r}) + "\n" for r in range(2)) + '{"rou')
    assert check_run_dir(_config(out), resume=True).next_round == 2  # a half-written later round is dropped
    (out / "metrics.jsonl").unlink()
    with pytest.raises(CheckpointError, match="metrics.jsonl: missing"):
        check_run_dir(_config(out), resume=True)
    # Killed before its first checkpoint: nothing to continue from, the run starts again (and says so).
    (out / "checkpoint.json").unlink()
    (out / "checkpoint.safetensors").unlink()
    assert check_run_dir(_config(out), resume=True) is None


def _result(client: int, loss: float = 0.5, fisher=(1.0, 1.0), **state) -> SimpleNamespace:
    base = {"b0.a": torch.zeros(2), "b1.a": torch.zeros(2), "head.w": torch.zeros(3)}
    return SimpleNamespace(client=client, loss=loss, fisher=torch.tensor(fisher), state={**base, **state})


def test_find_nonfinite_names_client_loss_blocks_and_head():
    blocks = {"b0.a": 0, "b1.a": 1, "head.w": None}
    results = [
        _result(4),
        _result(5, loss=math.nan),
        _result(6, **{"b1.a": torch.tensor([0.0, math.inf])}),
        _result(7, fisher=(math.nan, 0.0), **{"head.w": torch.tensor([math.nan, 0.0, 0.0])}),
    ]
    found = find_nonfinite(results, blocks)
    assert sorted(found) == [1, 2, 3]
    assert found[1].to_record() == {"client": 5, "loss": True, "blocks": [], "head": False}
    assert found[2].describe() == "blocks [1]"
    assert found[3].to_record() == {"client": 7, "loss": False, "blocks": [0], "head": True}
    assert find_nonfinite(results[:1], blocks) == {}


def test_one_writer_per_run_folder(tmp_path):
    """The lock refuses a second holder (naming the first's pid) unless it reuses its own process's
    hold (the command line holds it before the run loads its model), is free again after the block,
    and its file is not a run file: a folder holding only it holds no run, and --overwrite keeps it."""
    out = tmp_path / "new" / "run"
    with hold_run_dir(out) as held:
        assert held == out and (out / ckpt.LOCK_FILE).read_text() == f"{os.getpid()}\n"
        with pytest.raises(RunFolderError, match=rf"^output_dir: {out} is being written by another process "
                                                 rf"\(pid {os.getpid()}\)"):
            with hold_run_dir(out):
                pass
        with hold_run_dir(out, reuse=True):
            pass
        with pytest.raises(RunFolderError, match="is being written by another process"):  # still held
            with hold_run_dir(out):
                pass
    with pytest.raises(RunFolderError, match="is being written by another process"):
        with hold_run_dir(out, reuse=True):  # not held here: reuse takes a hold like any other
            with hold_run_dir(out):
                pass
    with hold_run_dir(out):
        pass
    assert check_run_dir(_config(out)) is None and clear_run_dir(out) == []
    assert (out / ckpt.LOCK_FILE).exists() and ckpt.LOCK_FILE not in ckpt.RUN_FILES



def test_resume_compares_what_settings_mean_not_how_they_are_written(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    saved = {"tiers": {"fractions": ["1/2", "3/4", 1], "shares": [1, 1, 1]},
             "strategy": {"name": "fedhello", "options": {"warmup": 2}}}
    save_config(_config(out, **saved), out / "config.yaml")
    (out / "metrics.jsonl").write_text("")
    same = {"tiers": {"fractions": [0.5, 0.75, 1.0], "shares": [1, 1, 1]},
            "strategy": {"name": "fedhello", "options": {"warmup": 2, "schedule": "codesign"}}}  # the default
    assert check_run_dir(_config(out, **same), resume=True) is None  # accepted (no checkpoint yet)
    other = {**same, "strategy": {"name": "fedhello", "options": {"warmup": 2, "schedule": "fork"}}}
    with pytest.raises(RunFolderError, match=r"strategy\.options\.schedule: 'codesign' -> 'fork'"):
        check_run_dir(_config(out, **other), resume=True)
    with pytest.raises(RunFolderError, match=r"tiers\.fractions: .*0\.5.*0\.25"):
        check_run_dir(_config(out, **{**same, "tiers": {"fractions": [0.25, 0.75, 1.0], "shares": [1, 1, 1]}}),
                      resume=True)


def test_read_jsonl_leaves_out_a_half_written_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    assert ckpt.read_jsonl(path) == []
    path.write_text('{"round": 0, "wall_time": 1.5}\n{"round": 1, "wall_time": 2.0}\n{"round": 2, "wal')
    assert [r["round"] for r in ckpt.read_jsonl(path)] == [0, 1]
    path.write_text('{"round": 0}\nnot json\n{"round": 2}\n')
    with pytest.raises(ValueError, match=f"^{path}: line 2 is not a JSON record"):  # not a kill: refused
        ckpt.read_jsonl(path)


def test_suite_resume_counts_kept_rounds_of_a_run_killed_mid_write(tmp_path):
    from fedhello.suite import _kept_rounds_seconds

    (tmp_path / "metrics.jsonl").write_text('{"round": 0, "wall_time": 1.5}\n{"round": 1, "wall_time": 2.0}\n'
                                            '{"round": 2, "wal')
    (tmp_path / "checkpoint.json").write_text(json.dumps({"next_round": 2}))
    assert _kept_rounds_seconds(tmp_path) == 3.5
