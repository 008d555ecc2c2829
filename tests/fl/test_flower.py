"""Fed-HeLLo on Flower: a simulation equals ``fedhello run``, failed nodes are skipped, deployment on localhost.

A tiny 4-block BERT (MiniLM's tokenizer, hidden 32) on 160 BBC News articles keeps each Flower
run to seconds of training; the rest is Flower's and Ray's start-up.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
import yaml
from flwr.app import Context, Error, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation
from flwr.supercore.task_identity import TaskIdentity
from safetensors.torch import load_file

from fedhello.cli import main as cli_main
from fedhello.config import RunConfig, load_config
from fedhello.fl.checkpoint import hold_run_dir
from fedhello.fl.flower import FedHelloStrategy, client_app, run_on_grid, simulate, split_tasks, train_group
from fedhello.fl.flower_processes import processes_with_env
from fedhello.fl.server import FederatedRun

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
TOL = 1e-4


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A 4-block BERT with every weight saved (head included), so every process loads the same model."""
    from transformers import BertConfig, BertForSequenceClassification

    from fedhello.models import load_tokenizer

    root = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = load_tokenizer("all-MiniLM-L6-v2")
    torch.manual_seed(0)
    BertForSequenceClassification(BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
        intermediate_size=48, max_position_embeddings=32, num_labels=5)).save_pretrained(root)
    tokenizer.save_pretrained(root)
    return root


def _raw(model: Path, out: Path) -> dict:
    return {
        "seed": 3,
        "model": {"name": str(model), "rank": 4, "alpha": 8},
        "data": {"name": "bbc_news", "max_samples": 160, "max_length": 16, "num_clients": 8, "test_fraction": 0.25},
        "strategy": {"name": "fedhello", "options": {"pattern": "bottleneck", "warmup": 1, "refresh": 1}},
        "rounds": 2,
        "cohort_size": 6,
        "local": {"steps": 2, "batch_size": 4, "lr": 0.01},
        "engine": {"device": "cpu"},
        "eval_every": 1,
        "checkpoint_every": 1,
        "output_dir": str(out),
    }


def _write_config(model: Path, path: Path, out: Path) -> Path:
    path.write_text(yaml.safe_dump(_raw(model, out)))
    return path


def _max_rel(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert set(a) == set(b)
    return max(float((a[k] - b[k]).norm() / b[k].norm().clamp_min(1e-12)) for k in b)


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _assert_same_run(got: Path, want: Path) -> None:
    """Same global adapters and heads (fp32 tolerance) and the same per-round decisions."""
    got_state, want_state = (load_file(str(d / "checkpoint.safetensors")) for d in (got, want))
    assert _max_rel(got_state, want_state) < TOL
    for g, w in zip(_records(got), _records(want), strict=True):
        for key in ("round", "cohort", "participants", "allocation", "bytes_up", "bytes_down"):
            assert g[key] == w[key], key
        assert g["fisher_scores"] == pytest.approx(w["fisher_scores"], rel=TOL)
        assert g["train_loss"] == pytest.approx(w["train_loss"], rel=TOL)
        assert g["test_accuracy"] == pytest.approx(w["test_accuracy"], abs=1e-6)


def test_split_tasks_deals_contiguous_groups():
    tasks = list(range(7))
    assert split_tasks(tasks, 3) == [[0, 1, 2], [3, 4], [5, 6]]
    assert split_tasks(tasks, 1) == [tasks]
    assert split_tasks(tasks[:2], 4) == [[0], [1], [], []]  # idle nodes get no work
    with pytest.raises(ValueError, match="num_nodes"):
        split_tasks(tasks, 0)
    with pytest.raises(TypeError, match="num_nodes"):
        split_tasks(tasks, 2.0)


def test_simulation_matches_fedhello_run(tiny_model, tmp_path, capfd, monkeypatch):
    """Acceptance 1: 2 Flower nodes x 3 virtual clients, 2 rounds, Ray backend == ``fedhello run``;
    through ``flwr run`` (no deprecated API), one progress line per round, and no Flower or Ray
    process left afterwards (each inherits the marker variable, even when re-parented)."""
    marker = f"{os.getpid()}-{time.time_ns()}"
    monkeypatch.setenv("FEDHELLO_TEST_MARKER", marker)
    config = _write_config(tiny_model, tmp_path / "run.yaml", tmp_path / "unused")
    assert cli_main(["run", str(config), "--no-progress", "--set", f"output_dir={tmp_path / 'single'}"]) == 0
    capfd.readouterr()
    assert cli_main(["flower", str(config), "--nodes", "2", "--set", f"output_dir={tmp_path / 'flower'}"]) == 0
    out, err = capfd.readouterr()
    assert "final test accuracy" in out
    assert "round 1/2: train loss" in out and "round 2/2: train loss" in out, out
    assert "DEPRECATED" not in out + err
    assert not processes_with_env("FEDHELLO_TEST_MARKER", marker)
    _assert_same_run(tmp_path / "flower", tmp_path / "single")
    assert len(_records(tmp_path / "flower")[0]["participants"]) == 6


def _run_without(config: RunConfig, keep: int, nodes: int = 3) -> set[int]:
    """``fedhello run`` where, in round 0, only the clients of node ``keep`` (of ``nodes``) send their
    results; returns the clients lost in round 0 (the other nodes' groups)."""
    run = FederatedRun(config, progress=False)
    lost: set[int] = set()

    def play(rnd: int) -> dict:
        t0 = time.perf_counter()
        plan = run.plan_round(rnd)
        kept = plan.tasks
        if rnd == 0:
            kept = split_tasks(plan.tasks, nodes)[keep]
            lost.update({t.client for t in plan.tasks} - {t.client for t in kept})
        return run.finish_round(plan, run.engine.train(run.global_state, kept), t0)

    run.run(play_round=play)
    return lost


def _failing_app(fail_on: int) -> ClientApp:
    """The real ClientApp, except that the node given client ``fail_on`` raises in round 0."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        spec = msg.content.config_records["tasks"]
        if spec["round"] == 0 and fail_on in spec["clients"]:
            raise RuntimeError("injected node failure")
        return train_group(msg, context)

    return app


class _InProcessGrid(Grid):
    """Flower nodes running ``app`` in this process, as Flower's runtime does: an exception becomes
    an error reply (``Error(CLIENT_APP_RAISED_EXCEPTION)``); the ``dead`` nodes never answer.

    The strategy only lists nodes and sends/receives; the rest of ``Grid``'s abstract interface
    raises, so a server loop that started to rely on it would fail this test loudly."""

    def __init__(self, nodes: list[int], app: ClientApp, dead: set[int]) -> None:
        self.nodes, self.app, self.dead = nodes, app, dead

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def send_and_receive(self, messages, *, timeout=None) -> list[Message]:
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            if node in self.dead:
                continue
            context = Context(run_id=1, node_id=node, node_config={}, state=RecordDict(), run_config={})
            try:
                replies.append(self.app(msg, context))
            except Exception as err:  # what Flower's runtime does with any ClientApp exception
                error = Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, f"{type(err)}:<'{err}'>")
                replies.append(Message(error, reply_to=msg))
        return replies

    def set_run(self, run):
        raise NotImplementedError

    @property
    def run(self):
        raise NotImplementedError

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        raise NotImplementedError

    def push_messages(self, messages):
        raise NotImplementedError

    def pull_messages(self, message_ids):
        raise NotImplementedError


def test_failed_nodes_are_logged_and_skipped(tiny_model, tmp_path, caplog, monkeypatch):
    """Acceptance 3: in round 0 one node raises and one never answers (killed); the round aggregates
    the third node's clients, the failures are logged, round 1 runs in full."""
    for attr in ("_task_id", "_run_id", "_node_id"):  # what Flower's runtime sets before a ServerApp runs
        monkeypatch.setattr(TaskIdentity, attr, 1)
    lost = _run_without(RunConfig.from_dict(_raw(tiny_model, tmp_path / "reference")), keep=2)
    config = RunConfig.from_dict(_raw(tiny_model, tmp_path / "flower"))
    run = FederatedRun(config, progress=False)
    groups = split_tasks(FederatedRun(config, progress=False).plan_round(0).tasks, 3)
    raising, killed = [t.client for t in groups[0]], [t.client for t in groups[1]]
    assert lost == set(raising) | set(killed) and len(raising) == len(killed) == 2

    strategy = FedHelloStrategy(run)
    grid = _InProcessGrid([11, 22, 33], _failing_app(raising[0]), dead={22})
    with caplog.at_level(logging.WARNING, logger="fedhello.fl.flower"):
        first = strategy.play_round(grid, 0)
        grid.dead = set()
        second = strategy.play_round(grid, 1)
    assert [r.getMessage() for r in caplog.records if r.name == "fedhello.fl.flower"] == [
        f"round 0: node 11 failed (<class 'RuntimeError'>:<'injected node failure'>); lost clients {raising}",
        f"round 0: no reply from node 22; lost clients {killed}",
    ]
    assert first["participants"] == [t.client for t in groups[2]]
    assert first["lost"] == sorted(raising + killed) and "lost" not in second  # recorded, not only logged
    assert len(second["participants"]) == 6
    reference_state = load_file(str(tmp_path / "reference" / "checkpoint.safetensors"))
    assert _max_rel(run.global_state, reference_state) < TOL
    with pytest.raises(TypeError, match="run"):
        FedHelloStrategy(config)
    with pytest.raises(ValueError, match="timeout"):
        FedHelloStrategy(run, timeout=0)


def test_failed_node_in_ray_simulation(tiny_model, tmp_path, caplog):
    """Acceptance 3 on Flower's Ray runtime: the node whose ClientApp raises in round 0 loses its
    clients, the other node's are aggregated, round 1 runs in full."""
    lost = _run_without(RunConfig.from_dict(_raw(tiny_model, tmp_path / "reference")), keep=1, nodes=2)
    config = RunConfig.from_dict(_raw(tiny_model, tmp_path / "flower"))
    records: list[dict] = []
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        records.extend(run_on_grid(grid, config, min_nodes=2))

    with caplog.at_level(logging.WARNING, logger="fedhello.fl.flower"):
        run_simulation(server_app=server, client_app=_failing_app(min(lost)), num_supernodes=2,
                       backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}})
    [failure] = [r.getMessage() for r in caplog.records if r.name == "fedhello.fl.flower"]
    assert "injected node failure" in failure and f"lost clients {sorted(lost)}" in failure
    assert set(records[0]["participants"]) == set(records[0]["cohort"]) - lost
    assert len(records[1]["participants"]) == 6
    _assert_same_run(tmp_path / "flower", tmp_path / "reference")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _descendants(roots: set[int]) -> set[int]:
    """Every live process below ``roots`` (read from /proc)."""
    parent = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()
            if fields[0] != "Z":
                parent[int(entry.name)] = int(fields[1])
    found, frontier = set(), set(roots)
    while frontier:
        frontier = {pid for pid, ppid in parent.items() if ppid in frontier} - found
        found |= frontier
    return found


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def test_deployment_superlink_and_two_supernodes(tiny_model, tmp_path):
    """Acceptance 2: SuperLink + 2 SuperNodes on 127.0.0.1, ``flwr run`` 2 rounds, clean shutdown."""
    link, node_ports = _free_port(), [_free_port(), _free_port()]
    home = tmp_path / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "localhost"\n\n[superlink.localhost]\naddress = "127.0.0.1:{link}"\ninsecure = true\n')
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "FLWR_HOME": str(home),
           "FLWR_TELEMETRY_ENABLED": "0", "HF_HUB_OFFLINE": "1"}
    config = _write_config(tiny_model, tmp_path / "run.yaml", tmp_path / "flower")
    commands = [[str(BIN / "flower-superlink"), "--insecure", "--port", str(link),
                 "--disable-runtime-dependency-installation"]]
    commands += [[str(BIN / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{link}", "--port", str(port)]
                 for port in node_ports]
    procs: list[subprocess.Popen] = []
    tree: set[int] = set()
    try:
        for i, cmd in enumerate(commands):
            with open(tmp_path / f"process-{i}.log", "wb") as log:
                procs.append(subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
                                              start_new_session=True))
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{link}/health", timeout=1) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "the SuperLink did not come up"
            time.sleep(0.3)
        result = subprocess.run(
            [str(BIN / "flwr"), "run", str(REPO / "flower-app"), "localhost", "--stream",
             "--run-config", f"config='{config}' min-nodes=2"],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
        assert result.returncode == 0, result.stdout + result.stderr
        records = _records(tmp_path / "flower")
        assert [r["round"] for r in records] == [0, 1]
        assert all(len(r["participants"]) == 6 for r in records)
        reference = RunConfig.from_dict(_raw(tiny_model, tmp_path / "reference"))
        FederatedRun(reference, progress=False).run()
        _assert_same_run(tmp_path / "flower", tmp_path / "reference")
    finally:
        tree = _descendants({p.pid for p in procs}) | {p.pid for p in procs}
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        deadline = time.monotonic() + 20
        while any(_alive(pid) for pid in tree) and time.monotonic() < deadline:
            time.sleep(0.2)
        stray = sorted(pid for pid in tree if _alive(pid))
        for pid in stray:
            os.kill(pid, signal.SIGKILL)
    assert all(p.returncode is not None for p in procs)
    assert not stray, f"processes left after shutdown: {stray}"


def test_flower_cli_and_app_errors(tiny_model, tmp_path, capsys):
    config = _write_config(tiny_model, tmp_path / "run.yaml", tmp_path / "out")
    assert cli_main(["flower", str(config), "--nodes", "0"]) == 2
    assert "nodes: expected an int >= 1, got 0" in capsys.readouterr().err
    with pytest.raises(TypeError, match="config"):
        simulate(_raw(tiny_model, tmp_path), nodes=2)
    with pytest.raises(ValueError, match="timeout"):
        simulate(load_config(config), nodes=2, timeout=-1.0)
    with pytest.raises(ValueError, match="^num_cpus: expected a whole number"):
        simulate(load_config(config), nodes=2, num_cpus=0.5)


def test_flower_overwrite_deletes_nothing_before_its_checks_or_while_another_process_writes(
        tiny_model, tmp_path, capsys):
    out = tmp_path / "out"
    config = _write_config(tiny_model, tmp_path / "run.yaml", out)
    out.mkdir()
    for name in ("config.yaml", "metrics.jsonl", "initial_eval.json"):
        (out / name).write_text("kept\n")
    # A bad argument: refused with every file of the run in place.
    assert cli_main(["flower", str(config), "--nodes", "0", "--overwrite"]) == 2
    assert "nodes: expected an int >= 1" in capsys.readouterr().err
    # Another writer holds the folder (a second open file description: as another process would).
    with hold_run_dir(out):
        assert cli_main(["flower", str(config), "--nodes", "1", "--overwrite"]) == 2
    assert "is being written by another process" in capsys.readouterr().err
    assert all((out / name).read_text() == "kept\n" for name in ("config.yaml", "metrics.jsonl", "initial_eval.json"))


def test_processes_are_found_by_an_inherited_variable():
    marker = f"{os.getpid()}-{time.time_ns()}"
    child = subprocess.Popen(["sleep", "30"], env={**os.environ, "FEDHELLO_TEST_MARKER": marker})
    try:
        assert processes_with_env("FEDHELLO_TEST_MARKER", marker) == [child.pid]
    finally:
        child.kill()
        child.wait()
    assert processes_with_env("FEDHELLO_TEST_MARKER", marker) == []


def test_causal_lm_on_flower_nodes_matches_fedhello_run(tiny_lm_files, tmp_path, monkeypatch, capsys):
    """task: causal_lm through the Flower server loop and the real ClientApp on two in-process
    nodes: the same global adapters, decisions and held-out perplexity as ``fedhello run``."""
    for attr in ("_task_id", "_run_id", "_node_id"):  # what Flower's runtime sets before a ServerApp runs
        monkeypatch.setattr(TaskIdentity, attr, 1)
    model_dir, data = tiny_lm_files

    def config(out: Path) -> RunConfig:
        return RunConfig.from_dict({
            "seed": 1, "task": "causal_lm", "model": {"name": str(model_dir), "rank": 4, "alpha": 8},
            "data": {"path": str(data), "text_column": "text", "label_column": "topic", "max_length": 16,
                     "num_clients": 4, "test_fraction": 0.25, "partition": {"kind": "dirichlet", "alpha": 0.5}},
            "strategy": {"name": "fedhello", "options": {"pattern": "bottleneck", "warmup": 1, "refresh": 1}},
            "tiers": {"fractions": [0.5, 1.0], "shares": [1, 1]},
            "rounds": 2, "cohort_size": 3, "local": {"steps": 2, "batch_size": 4, "lr": 0.05},
            "engine": {"device": "cpu"}, "eval_every": 1, "checkpoint_every": 1, "output_dir": str(out)})

    FederatedRun(config(tmp_path / "single"), progress=False).run()
    grid = _InProcessGrid([11, 22], client_app, dead=set())
    records = run_on_grid(grid, config(tmp_path / "flower"))
    printed = capsys.readouterr().out
    assert "round 2/2: train loss" in printed and "held-out perplexity" in printed
    got_state, want_state = (load_file(str(tmp_path / d / "checkpoint.safetensors")) for d in ("flower", "single"))
    assert _max_rel(got_state, want_state) < TOL
    for g, w in zip(records, _records(tmp_path / "single"), strict=True):
        for key in ("cohort", "participants", "allocation", "bytes_up"):
            assert g[key] == w[key], key
        assert g["test_perplexity"] == pytest.approx(w["test_perplexity"], rel=TOL)
        assert g["test_client_perplexity"] == pytest.approx(w["test_client_perplexity"], rel=TOL)
    assert (tmp_path / "flower" / "peft_adapter").is_dir()


def test_private_simulation_matches_fedhello_run(tiny_model, tmp_path, capfd):
    """Client-level DP on Flower nodes: the same clipping, noise (the server's seeded generator)
    and accounting as ``fedhello run``, epsilon on each round's line."""
    raw = _raw(tiny_model, tmp_path / "unused")
    raw["aggregation"] = {"weighting": "uniform"}
    raw["privacy"] = {"noise_multiplier": 0.7, "clip_norm": 0.05, "fisher_clip": 0.5, "fisher_noise_multiplier": 1.0}
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(raw))
    assert cli_main(["run", str(config), "--no-progress", "--set", f"output_dir={tmp_path / 'single'}"]) == 0
    capfd.readouterr()
    assert cli_main(["flower", str(config), "--nodes", "2", "--set", f"output_dir={tmp_path / 'flower'}"]) == 0
    out, _ = capfd.readouterr()
    assert "round 2/2: train loss" in out and ", epsilon " in out, out
    _assert_same_run(tmp_path / "flower", tmp_path / "single")
    for got, want in zip(_records(tmp_path / "flower"), _records(tmp_path / "single"), strict=True):
        assert got["epsilon"] == want["epsilon"] > 0


def test_after_ctrl_c_flower_and_ray_processes_get_seconds_not_a_minute(tmp_path):
    """What simulate does on Ctrl-C: the SuperLink's group and every process with the run's FLWR_HOME
    (Ray's agents, re-parented) are killed once their short grace is over, even if they ignore SIGTERM."""
    from fedhello.fl.flower_processes import STOP_GRACE_S, stop_all

    home = str(tmp_path / "flwr-home")
    stubborn = "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nprint('up', flush=True)\ntime.sleep(300)\n"
    env = {**os.environ, "FLWR_HOME": home}
    superlink, agent = (subprocess.Popen([sys.executable, "-c", stubborn], env=env, start_new_session=True,
                                         stdout=subprocess.PIPE, text=True) for _ in range(2))
    try:
        assert superlink.stdout.readline() == agent.stdout.readline() == "up\n"
        start = time.monotonic()
        stop_all(superlink, home, grace=STOP_GRACE_S)
        took = time.monotonic() - start
        assert agent.wait(timeout=5) == -signal.SIGKILL and superlink.poll() == -signal.SIGKILL
        assert took < 2 * STOP_GRACE_S + 2, took
        assert not processes_with_env("FLWR_HOME", home)
    finally:
        for process in (superlink, agent):
            if process.poll() is None:
                process.kill()
