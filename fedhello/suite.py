"""Experiment suites: several methods x settings x seeds over one base config, one table.

A suite file (YAML)::

    base: ../quickstart.yaml          # a run config, relative to this file
    output_dir: runs/suite-quickstart
    seeds: [0]
    settings:                         # named overrides: partitions, tier mixes, ...
      dirichlet-0.5: {data.partition.kind: dirichlet, data.partition.alpha: 0.5}
    methods:                          # named overrides: strategies and their options
      Fed-HeLLo: {strategy.name: fedhello}
      FedRA: {strategy.name: fedra}
    presets:                          # optional, chosen with --preset NAME; replaces any of
      gpu: {overrides: {rounds: 100}, seeds: [0, 1, 2], settings: {...}, methods: {...}}

Every run goes to ``output_dir/<setting>/<method>/seed-<s>``; finished runs are skipped when
resuming. The summary (``summary.json``, ``results.md``, one accuracy plot per setting) gives
final and best test accuracy as mean ± std over seeds, and the wall time of each run.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from fedhello.config import ConfigError, load_config, parse_override_value
from fedhello.errors import UserError
from fedhello.jsonl_io import read_jsonl
from fedhello.yaml_io import DuplicateKeyError, safe_load_strict

__all__ = ["Suite", "load_suite", "run_suite", "summarize", "publish", "render_table"]


@dataclass
class Suite:
    """A resolved suite: the base config file, overrides, and the grid to run."""

    base: Path
    output_dir: Path
    seeds: list[int]
    settings: dict[str, dict[str, Any]]
    methods: dict[str, dict[str, Any]]
    overrides: dict[str, Any] = field(default_factory=dict)
    name: str = "suite"

    def runs(self) -> list[tuple[str, str, int, Path]]:
        """(setting, method, seed, run folder) of every run, in execution order."""
        return [(s, m, seed, self.output_dir / s / m / f"seed-{seed}")
                for s in self.settings for m in self.methods for seed in self.seeds]


def _mapping(name: str, value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{name}: expected a mapping, got {type(value).__name__}")
    return dict(value)


# Setting and method names become folder names: keep them valid on every OS a results folder may
# be cloned to (Windows rejects these characters and names ending in a dot or space).
_UNPORTABLE = set('<>:"/\\|?*')


def _folder_names(name: str, value: dict[str, Any]) -> None:
    for key in value:
        if (not isinstance(key, str) or not key.strip() or key in (".", "..") or key[-1] in ". "
                or _UNPORTABLE & set(key)):
            raise ConfigError(f"{name}: {key!r} is not usable as a folder name on every OS "
                              f"(expected a non-empty name without any of {''.join(sorted(_UNPORTABLE))} "
                              "that does not end in '.' or ' ')")


def _flatten(prefix: str, value: Any) -> list[str]:
    """``{a: {b: 1}}`` -> ``["a.b=1"]``, except for the values of ``options`` mappings."""
    if isinstance(value, dict) and not prefix.endswith("options"):
        out = []
        for k, v in value.items():
            out.extend(_flatten(f"{prefix}.{k}" if prefix else str(k), v))
        return out
    return [f"{prefix}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"]


def load_suite(path: str | Path, preset: str | None = None, overrides: list[str] | tuple = ()) -> Suite:
    """Read a suite file; ``preset`` picks one of its ``presets``; ``overrides`` apply to every run."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"suite: no such file {path}")
    try:
        raw = safe_load_strict(path.read_text()) or {}
    except DuplicateKeyError as err:
        raise ConfigError(f"{err.key}: given twice in {path} (lines {err.lines[0]} and {err.lines[1]}); "
                          "keep one") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"suite: expected a mapping at the top of {path}")
    presets = _mapping("presets", raw.get("presets"))
    chosen: dict[str, Any] = {}
    if preset is not None:
        if preset not in presets:
            raise ConfigError(f"preset: expected one of {sorted(presets)}, got {preset!r}")
        chosen = _mapping(f"presets.{preset}", presets[preset])
    if "base" not in raw:
        raise ConfigError("base: expected the path of a run config")
    base = (path.parent / raw["base"]).resolve()
    if not base.exists():
        raise ConfigError(f"base: no such file {base}")
    run_overrides = {**_mapping("overrides", raw.get("overrides")), **_mapping("overrides", chosen.get("overrides"))}
    for key in _SUITE_FIELDS:
        if key in run_overrides:
            raise ConfigError(f"overrides.{key}: {_SUITE_FIELDS[key]}")
    out = chosen.get("output_dir", raw.get("output_dir", f"runs/{path.stem}"))
    for item in overrides:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set: expected KEY=VALUE, got {item!r}")
        if key == "output_dir":  # the suite's folder: every run goes below it
            out = parse_override_value(key, value)
            if not isinstance(out, str) or not out:
                raise ConfigError(f"output_dir: expected a folder path, got {out!r}")
            continue
        if key in _SUITE_FIELDS:
            raise ConfigError(f"{key}: {_SUITE_FIELDS[key]}")
        run_overrides[key] = parse_override_value(key, value)
    settings = _mapping("settings", chosen.get("settings", raw.get("settings"))) or {"default": {}}
    methods = _mapping("methods", chosen.get("methods", raw.get("methods")))
    _folder_names("settings", settings)
    _folder_names("methods", methods)
    if not methods:
        raise ConfigError("methods: expected at least one method")
    for group, entries in (("settings", settings), ("methods", methods)):
        for entry, value in entries.items():
            keys = {item.partition("=")[0] for item in _flatten("", _mapping(f"{group}.{entry}", value))}
            clash = sorted(keys & set(_SUITE_FIELDS))
            if clash:
                raise ConfigError(f"{group}.{entry}.{clash[0]}: {_SUITE_FIELDS[clash[0]]}")
    seeds = chosen.get("seeds", raw.get("seeds", [0]))
    if not (isinstance(seeds, list) and seeds and all(isinstance(s, int) for s in seeds)):
        raise ConfigError(f"seeds: expected a non-empty list of ints, got {seeds!r}")
    twice = sorted({s for s in seeds if seeds.count(s) > 1})
    if twice:  # one run folder, counted as two seeds in the table
        raise ConfigError(f"seeds: {twice[0]} is given twice in {seeds}; each seed is one run")
    suite = Suite(base, Path(out), seeds, settings, methods, run_overrides,
                  name=f"{path.stem}" + (f" ({preset})" if preset else ""))
    # Validate every run up front, and check once per distinct model and data source that they can
    # load here (no torch import yet: a bad suite is reported in about a second).
    checked = set()
    same_run: dict[tuple[str, int, str], str] = {}
    for setting, method, seed, run_dir in suite.runs():
        config = _run_config(suite, setting, method, seed, run_dir)
        settings_of_run = (setting, seed, repr({**config.to_dict(), "output_dir": None}))
        if settings_of_run in same_run:  # two names for one run: the table would count it twice
            raise ConfigError(f"methods: {same_run[settings_of_run]!r} and {method!r} give the same run "
                              f"(setting {setting!r}, seed {seed}); keep one")
        same_run[settings_of_run] = method
        sources = (config.task, repr(config.model.name), repr(config.data))
        if sources not in checked:
            config.check_sources()
            checked.add(sources)
    return suite


# Run fields a suite sets itself, which overrides must not set (they would be silently replaced).
_SUITE_FIELDS = {"seed": "set by the suite's seeds (one run per seed), not by an override",
                 "output_dir": "the suite's output_dir sets it (each run goes to "
                               "<output_dir>/<setting>/<method>/seed-<s>)"}


def _run_config(suite: Suite, setting: str, method: str, seed: int, run_dir: Path):
    items = (_flatten("", suite.overrides) + _flatten("", _mapping(f"settings.{setting}", suite.settings[setting]))
             + _flatten("", _mapping(f"methods.{method}", suite.methods[method]))
             + [f"seed={seed}", f"output_dir={run_dir}"])
    try:
        return load_config(suite.base, items)
    except ConfigError as err:
        raise ConfigError(f"{setting}/{method}: {err}") from err


def run_suite(suite: Suite, progress: bool = True, resume: bool = False, overwrite: bool = False,
              jobs: int = 1, threads_per_job: int | None = None) -> dict[str, Any]:
    """Run every (setting, method, seed) of ``suite``; write and print the summary.

    Run folders that already hold runs are refused (before any run starts) unless ``resume``
    (finished runs are skipped, the others continue) or ``overwrite`` (they start over).

    ``jobs`` > 1 runs that many runs at once, each in its own process with ``threads_per_job``
    intra-op threads (default: this process's threads divided among the jobs). On a CPU, small
    models use one thread poorly, so two one-thread runs finish sooner than two two-thread runs one
    after the other; a run's numbers depend on its thread count (float summation order), not on
    the order the runs finish in.
    """
    import torch

    from fedhello.fl.checkpoint import check_run_dir

    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise UserError(f"jobs: expected an integer >= 1, got {jobs!r}")
    if threads_per_job is None:
        threads_per_job = max(1, torch.get_num_threads() // jobs)
    if isinstance(threads_per_job, bool) or not isinstance(threads_per_job, int) or threads_per_job < 1:
        raise UserError(f"threads_per_job: expected an integer >= 1, got {threads_per_job!r}")
    runs = suite.runs()
    configs = [_run_config(suite, setting, method, seed, run_dir) for setting, method, seed, run_dir in runs]
    done = [check_run_dir(config, resume=resume, overwrite=overwrite) for config in configs]
    todo = []
    for i, ((setting, method, seed, _), config, checkpoint) in enumerate(zip(runs, configs, done), 1):
        label = f"[{i}/{len(runs)}] {setting} / {method} / seed {seed}"
        if checkpoint is not None and checkpoint.next_round == config.rounds:
            print(f"{label}: finished, skipped")
        else:
            todo.append((label, config))
    if jobs == 1:
        for label, config in todo:
            print(label)
            _run_one(config, progress, resume, overwrite)
    else:
        _run_parallel(todo, jobs, threads_per_job, resume, overwrite)
    summary = summarize(suite)
    print(render_table(summary))
    curve = "perplexity" if _scores_perplexity(summary) else "accuracy"
    print(f"\nsummary: {suite.output_dir / 'results.md'}; plots: {suite.output_dir}/<setting>/{curve}.png")
    return summary


def _run_one(config, progress: bool, resume: bool, overwrite: bool) -> float:
    """One run, then its ``wall_time.json``; returns its wall time in seconds.

    A run resumed from a checkpoint counts this invocation plus the recorded wall times of the
    rounds it kept (the earlier invocation's set-up and initial evaluation are not recorded)."""
    from fedhello.fl.server import FederatedRun

    earlier = _kept_rounds_seconds(Path(config.output_dir)) if resume else 0.0
    start = time.perf_counter()
    FederatedRun(config, progress=progress).run(resume=resume, overwrite=overwrite)
    seconds = time.perf_counter() - start + earlier
    (Path(config.output_dir) / "wall_time.json").write_text(json.dumps({"seconds": seconds}))
    return seconds


def _kept_rounds_seconds(run_dir: Path) -> float:
    """Sum of the round wall times a resume keeps: rounds before the checkpoint's ``next_round``."""
    checkpoint, metrics = run_dir / "checkpoint.json", run_dir / "metrics.jsonl"
    if not (checkpoint.exists() and metrics.exists()):
        return 0.0
    next_round = json.loads(checkpoint.read_text())["next_round"]
    return float(sum(r["wall_time"] for r in read_jsonl(metrics) if r["round"] < next_round))


def _init_worker(threads: int) -> None:
    import signal
    import threading

    import torch

    torch.set_num_threads(threads)
    # Ctrl-C reaches every process of the terminal's group; the parent alone decides what stops
    # (it cancels what has not started and sends SIGTERM to the workers), so a worker ignores SIGINT.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _stop_worker)
    # A suite that is killed must not leave its runs going: they would go on writing their folders,
    # beside the runs of the next suite started on them. Each worker ends when its parent is gone.
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True, name="exit-with-parent").start()


_WORKER_RUNNING = False  # whether this worker process is inside a run (its SIGTERM then stops the run)


def _stop_worker(signum: int, frame: Any) -> None:
    """SIGTERM in a worker: a run stops as on Ctrl-C (its lock released, metrics.csv written); an idle
    worker exits at once, so that it never picks up a run that was queued before the stop."""
    if _WORKER_RUNNING:
        raise KeyboardInterrupt
    os._exit(_INTERRUPTED)


def _run_in_worker(config, resume: bool, overwrite: bool) -> float:
    """``_run_one`` in a pool worker; a run stopped by SIGTERM ends the worker once the run has cleaned up."""
    global _WORKER_RUNNING
    _WORKER_RUNNING = True
    try:
        return _run_one(config, False, resume, overwrite)
    except KeyboardInterrupt:
        os._exit(_INTERRUPTED)
    finally:
        _WORKER_RUNNING = False


_INTERRUPTED = 130
STOP_GRACE_S = 5.0  # how long stopped workers get to leave their runs before they are killed


def _exit_with_parent(parent: int, poll_s: float = 1.0) -> None:
    while os.getppid() == parent:
        time.sleep(poll_s)
    os._exit(1)


def _run_parallel(todo: list[tuple[str, Any]], jobs: int, threads: int, resume: bool, overwrite: bool) -> None:
    """Runs ``todo`` ``jobs`` at a time in spawned processes (no progress bars: they would interleave).

    The first failure stops the runs not yet started and is raised once the running ones end;
    runs that finished stay finished (``--resume`` continues the rest). Ctrl-C or SIGTERM cancels
    the runs not yet started and stops the running ones within ``STOP_GRACE_S`` seconds (SIGTERM,
    then SIGKILL); each keeps its last checkpoint, so ``--resume`` continues it."""
    import multiprocessing
    import signal
    from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait

    print(f"{len(todo)} run(s), {jobs} at a time, {threads} thread(s) each", flush=True)
    context = multiprocessing.get_context("spawn")  # a forked torch may deadlock in its thread pools
    pool = ProcessPoolExecutor(max_workers=jobs, mp_context=context, initializer=_init_worker, initargs=(threads,))
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        futures = {pool.submit(_run_in_worker, config, resume, overwrite): label for label, config in todo}
        pending = set(futures)
        while pending:
            finished, pending = wait(pending, return_when=FIRST_EXCEPTION)
            for future in finished:
                if future.exception() is not None:
                    for other in pending:
                        other.cancel()
                    pool.shutdown(wait=True)
                    raise RuntimeError(f"{futures[future]} failed: {future.exception()}") from future.exception()
                print(f"{futures[future]}: done in {future.result():.0f} s", flush=True)
    except KeyboardInterrupt:
        _stop_pool(pool)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    pool.shutdown(wait=True)


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _stop_pool(pool) -> None:
    """Cancel the runs not started, SIGTERM the workers, SIGKILL any still there after ``STOP_GRACE_S``."""
    import signal

    workers = list((pool._processes or {}).values())  # the executor offers no public handle on them
    pool.shutdown(wait=False, cancel_futures=True)
    for process in workers:
        if process.is_alive():
            os.kill(process.pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    for process in workers:
        process.join(max(0.0, deadline - time.monotonic()))
        if process.is_alive():  # a run deep in one long kernel call; its last checkpoint stays valid
            process.kill()
            process.join()


def _mean_std(values: list[float]) -> tuple[float, float]:
    arr = np.asarray(values, dtype=float)
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else 0.0


def _device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    cpuinfo = Path("/proc/cpuinfo")
    model = platform.processor() or platform.machine()
    if cpuinfo.exists():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")]
        model = names[0] if names else model
    return f"CPU ({model}, {torch.get_num_threads()} threads)"


def _finished_runs(suite: Suite, setting: str, method: str) -> list[tuple[Path, list[dict[str, Any]], float]]:
    """(run folder, evaluated records, MB sent up per round) of every seed of one cell that has
    evaluated rounds; the upload is the mean over all of the run's rounds."""
    from fedhello.plots import read_metrics

    runs = []
    for seed in suite.seeds:
        run_dir = suite.output_dir / setting / method / f"seed-{seed}"
        if not (run_dir / "metrics.jsonl").exists():
            continue
        records = read_metrics(run_dir)
        evaluated = [r for r in records if r.get("test_accuracy", r.get("test_perplexity")) is not None]
        if evaluated:
            runs.append((run_dir, evaluated, float(np.mean([r["bytes_up"] for r in records])) / 1e6))
    return runs


def _client_perplexity(runs: list[tuple[Path, list[dict[str, Any]], float]]) -> dict[str, Any]:
    """Per-client held-out perplexity of the final global model: the mean over clients and the
    worst client, each as (mean, std) over seeds, and the same two for the untrained model."""
    final = [recs[-1]["test_client_perplexity"] for _, recs, _ in runs]
    untrained = [json.loads((d / "initial_eval.json").read_text())["client_perplexity"] for d, _, _ in runs]
    return {"client_mean": _mean_std([float(np.mean(c)) for c in final]),
            "client_worst": _mean_std([float(np.max(c)) for c in final]),
            "untrained_client_mean": _mean_std([float(np.mean(c)) for c in untrained]),
            "untrained_client_worst": _mean_std([float(np.max(c)) for c in untrained])}


def _client_accuracy(runs: list[tuple[Path, list[dict[str, Any]], float]]) -> dict[str, Any]:
    """Per-client held-out accuracy (%) of the final global model: the mean over clients, the 10th
    percentile and the worst client, each as (mean, std) over seeds, and the same for the untrained
    model; empty for runs recorded before fedhello measured it."""
    final = [recs[-1] for _, recs, _ in runs]
    if any(r.get("test_client_accuracy_mean") is None for r in final):
        return {}
    untrained = [json.loads(p.read_text()) if (p := d / "initial_eval.json").exists() else {} for d, _, _ in runs]
    out = {}
    for stat in ("mean", "p10", "worst"):
        out[f"client_{stat}"] = _mean_std([100 * r[f"test_client_accuracy_{stat}"] for r in final])
        values = [r.get(f"client_accuracy_{stat}") for r in untrained]
        out[f"untrained_client_{stat}"] = _mean_std([math.nan if v is None else 100 * v for v in values])
    return out


def _read_json(path: Path, key: str) -> float:
    return json.loads(path.read_text())[key] if path.exists() else float("nan")


def summarize(suite: Suite) -> dict[str, Any]:
    """Final/best accuracy (mean, std over seeds), the untrained model's accuracy and wall time per
    setting and method; one accuracy plot, one allocation grid and the Fisher plots per setting.
    Causal LM suites (``task: causal_lm``) report held-out perplexity instead (best = lowest)."""
    import torch

    from fedhello.plots import is_causal_lm_run, plot_accuracy, plot_allocation_grid, plot_fisher, read_metrics

    table: dict[str, dict[str, Any]] = {}
    for setting in suite.settings:
        table[setting] = {}
        method_dirs = []
        for method in suite.methods:
            runs = _finished_runs(suite, setting, method)
            if not runs:
                continue
            # Causal LM runs are scored by held-out perplexity (lower is better), others by accuracy in %.
            lm = "test_perplexity" in runs[0][1][-1]
            metric, scale, best = ("perplexity", 1.0, min) if lm else ("accuracy", 100.0, max)
            key = f"test_{metric}"
            table[setting][method] = {
                "final": _mean_std([scale * recs[-1][key] for _, recs, _ in runs]),
                "best": _mean_std([scale * best(r[key] for r in recs) for _, recs, _ in runs]),
                # One evaluation swings by several points under label skew; the mean of the
                # last three is the steadier end-of-run number.
                "last3": _mean_std([scale * np.mean([r[key] for r in recs[-3:]]) for _, recs, _ in runs]),
                "last3_of": min(len(recs[-3:]) for _, recs, _ in runs),  # < 3: a short run averages fewer
                "macro_f1": _mean_std([math.nan if lm else 100 * recs[-1]["test_macro_f1"] for _, recs, _ in runs]),
                "untrained": _mean_std([scale * _read_json(d / "initial_eval.json", metric) for d, _, _ in runs]),
                "metric": metric,
                "wall_time_s": float(np.nanmean([_read_json(d / "wall_time.json", "seconds") for d, _, _ in runs])),
                # What the participants send up per round (adapters they trained + head), in MB.
                "upload_mb_per_round": float(np.mean([mb for _, _, mb in runs])),
                "seeds": len(runs),
            }
            # The personalisation view: the global model on each client's own mix of topics or classes.
            table[setting][method].update(_client_perplexity(runs) if lm else _client_accuracy(runs))
            epsilons = [recs[-1].get("epsilon") for _, recs, _ in runs]
            if any(e is not None for e in epsilons):  # a private setting: its epsilon after the last round
                table[setting][method]["epsilon"] = _mean_std([math.inf if e is None else e for e in epsilons])
            method_dirs.append((method, runs[0][0]))
        if not method_dirs:
            continue
        out = suite.output_dir / setting
        labels, dirs = [m for m, _ in method_dirs], [d for _, d in method_dirs]
        curve = "perplexity.png" if is_causal_lm_run(dirs[0]) else "accuracy.png"
        plot_accuracy(dirs, out / curve, labels=labels,
                      title=f"Test accuracy, {setting}")
        plot_allocation_grid(dirs, out / "allocation.png", labels=labels,
                             title=f"Share of participants training each block, {setting}")
        for method, run_dir in method_dirs:
            if any(r.get("fisher_scores") is not None for r in read_metrics(run_dir)):
                plot_fisher(run_dir, out / f"fisher-{_slug(method)}.png",
                            title=f"Fisher scores per block, {method}, {setting}")
    if any("epsilon" in row for rows in table.values() for row in rows.values()):
        _plot_privacy(table, suite.output_dir / "accuracy-vs-epsilon.png")
    summary = {
        "suite": suite.name,
        "device": _device_name(),
        "torch": torch.__version__,
        "seeds": suite.seeds,
        "table": table,
    }
    suite.output_dir.mkdir(parents=True, exist_ok=True)
    (suite.output_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    (suite.output_dir / "results.md").write_text(render_table(summary) + "\n")
    return summary


def _plot_privacy(table: dict[str, dict[str, Any]], out: Path) -> None:
    """Final accuracy against epsilon per method, a point per setting (None: a non-private setting)."""
    from fedhello.plots import plot_accuracy_vs_epsilon

    points: dict[str, list[tuple[float | None, float, float]]] = {}
    for rows in table.values():
        for method, row in rows.items():
            epsilon = row["epsilon"][0] if "epsilon" in row else None
            points.setdefault(method, []).append((epsilon, *row["final"]))
    plot_accuracy_vs_epsilon(points, out)


# What a published suite keeps of each run: its small text records (no checkpoints).
_PUBLISHED_RUN_FILES = ("config.yaml", "metrics.jsonl", "metrics.csv", "initial_eval.json", "wall_time.json",
                        "completions.jsonl")


def publish(suite: Suite, dest: str | Path) -> Path:
    """Copy a summarized suite's table, plots and every run's metrics (no weights) into ``dest``.

    ``dest`` gets ``results.md``, ``summary.json``, ``<setting>/*.png`` and
    ``<setting>/<method>/seed-<s>/{config.yaml, metrics.jsonl, completions.jsonl, ...}``: small files meant to be
    committed beside a report so that every number in it can be checked.
    """
    dest = Path(dest)
    src = suite.output_dir
    for name in ("results.md", "summary.json"):
        if not (src / name).exists():
            raise UserError(f"publish: {src / name} does not exist; run or summarize the suite first")
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("results.md", "summary.json"):
        shutil.copy2(src / name, dest / name)
    for png in sorted(src.glob("*.png")):  # plots across settings (a privacy suite's accuracy against epsilon)
        shutil.copy2(png, dest / png.name)
    for setting in suite.settings:
        for png in sorted((src / setting).glob("*.png")):
            (dest / setting).mkdir(parents=True, exist_ok=True)
            shutil.copy2(png, dest / setting / png.name)
    for setting, method, seed, run_dir in suite.runs():
        target = dest / setting / method / f"seed-{seed}"
        for name in _PUBLISHED_RUN_FILES:
            if (run_dir / name).exists():
                target.mkdir(parents=True, exist_ok=True)
                shutil.copy2(run_dir / name, target / name)
    return dest


def _slug(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in name).strip("-").lower()


def _scores_perplexity(summary: dict[str, Any]) -> bool:
    """Whether a summary scores causal LM runs (held-out perplexity) rather than accuracy."""
    return any(row.get("metric") == "perplexity" for rows in summary["table"].values() for row in rows.values())


SHORT_MARK = "†"  # a "last 3 evaluations" cell of runs that have fewer than 3


def render_table(summary: dict[str, Any]) -> str:
    """Markdown tables: rows = methods, columns = settings; first the final (best) test accuracy,
    then the mean of the last three evaluations, each with a last row for the untrained model and
    columns for the wall time per run and the MB sent up per round (means over settings); then
    the device the runs took."""
    table = summary["table"]
    settings = list(table)
    methods = list(dict.fromkeys(m for s in settings for m in table[s]))
    n_seeds = len(summary["seeds"])
    pm = " ± std" if n_seeds > 1 else ""

    lm = _scores_perplexity(summary)
    unit = "perplexity (lower is better)" if lm else "%"

    def cell(row: dict[str, Any], stat: str) -> str:
        mean, std = row[stat]
        have = row["seeds"]  # seeds with an evaluated run; fewer when some failed or are running
        text = f"{mean:.2f}" + (SHORT_MARK if stat == "last3" and row.get("last3_of", 3) < 3 else "")
        if n_seeds > 1:
            text += (f" ± {std:.2f}" if have > 1 else " ± –") + (f" (n={have})" if have < n_seeds else "")
        return text + (f" ({row['best'][0]:.2f})" if stat == "final" else "")

    untrained = []
    for s in settings:
        values = [row["untrained"][0] for row in table[s].values() if not np.isnan(row["untrained"][0])]
        untrained.append(f"{np.mean(values):.2f}" if values else "–")
    parts = []
    for stat, title in (("final", f"final{pm} (best) {unit}"), ("last3", f"mean of the last 3 evaluations{pm} {unit}")):
        lines = [f"| method | " + " | ".join(f"{s}: {title}" for s in settings)
                 + " | wall time / run | upload / round |",
                 "|" + "---|" * (len(settings) + 3)]
        for m in methods:
            rows = [row for row in (table[s].get(m) for s in settings) if row is not None]
            walls = [row["wall_time_s"] for row in rows]
            uploads = [row["upload_mb_per_round"] for row in rows]
            lines.append(f"| {m} | " + " | ".join("–" if table[s].get(m) is None else cell(table[s][m], stat)
                                                  for s in settings)
                         + f" | {np.nanmean(walls):.0f} s | {np.nanmean(uploads):.2f} MB |")
        lines.append("| *untrained model* | " + " | ".join(untrained) + " | – | – |")
        fewest = min((row.get("last3_of", 3) for rows in table.values() for row in rows.values()), default=3)
        if stat == "last3" and fewest < 3:
            lines.append(f"\n{SHORT_MARK} mean of all of the run's evaluations: it has fewer than 3 "
                         f"(fewest: {fewest})")
        parts.append("\n".join(lines))
    if any("client_mean" in row for rows in table.values() for row in rows.values()):
        parts.append(_render_client_table(table, settings, methods, pm, lm))
    if any("epsilon" in row for rows in table.values() for row in rows.values()):
        parts.append(_render_epsilon_table(table, settings, methods))
    parts.append(f"{n_seeds} seed(s); device: {summary['device']}, torch {summary['torch']}.")
    return "\n\n".join(parts)


def _render_epsilon_table(table: dict[str, Any], settings: list[str], methods: list[str]) -> str:
    """Epsilon after the last round (mean over seeds; the seeds of a cell share it unless
    ``target_epsilon`` calibrated them apart), "∞" for a non-private setting."""
    def cell(row: dict[str, Any] | None) -> str:
        if row is None:
            return "–"
        return f"{row['epsilon'][0]:.2f}" if "epsilon" in row else "∞"

    lines = ["| method | " + " | ".join(f"{s}: epsilon after the last round" for s in settings) + " |",
             "|" + "---|" * (len(settings) + 1)]
    lines += [f"| {m} | " + " | ".join(cell(table[s].get(m)) for s in settings) + " |" for m in methods]
    return "\n".join(lines)


def _render_client_table(table: dict[str, Any], settings: list[str], methods: list[str], pm: str, lm: bool) -> str:
    """Each client's held-out perplexity (causal LMs) or accuracy (classification) under the final
    global model: the mean over clients, for accuracy the 10th percentile, and the worst client (each
    a mean over seeds), per setting."""
    stats = ("mean", "worst") if lm else ("mean", "p10", "worst")

    def cell(row: dict[str, Any] | None, prefix: str = "") -> str:
        if row is None or f"{prefix}client_mean" not in row:
            return "–"
        mean = row[f"{prefix}client_mean"]
        first = f"{mean[0]:.2f}" + (f" ± {mean[1]:.2f}" if pm else "")
        return " / ".join([first] + [f"{row[f'{prefix}client_{k}'][0]:.2f}" for k in stats[1:]])

    what = (f"clients' perplexity, mean{pm} / worst client" if lm
            else f"clients' accuracy %, mean{pm} / 10th percentile / worst client")
    lines = ["| method | " + " | ".join(f"{s}: {what}" for s in settings) + " |",
             "|" + "---|" * (len(settings) + 1)]
    for m in methods:
        lines.append(f"| {m} | " + " | ".join(cell(table[s].get(m)) for s in settings) + " |")
    untrained = []
    for s in settings:
        rows = [r for r in table[s].values() if "client_mean" in r]
        averaged = {f"untrained_client_{k}": tuple(np.mean([r[f"untrained_client_{k}"] for r in rows], axis=0))
                    for k in stats} if rows else None
        untrained.append(cell(averaged, "untrained_"))
    lines.append("| *untrained model* | " + " | ".join(untrained) + " |")
    return "\n".join(lines)
