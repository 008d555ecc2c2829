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

import os
import time
from pathlib import Path
from typing import Any

from fedhello import run_folder
from fedhello.errors import UserError
from fedhello.suite_report import SHORT_MARK, publish, render_table, scores_perplexity, summarize
from fedhello.suite_spec import Suite, load_suite, run_config

# The suite's public names, from the modules that hold them: this module runs suites, suite_spec
# reads suite files, suite_report summarizes them.
__all__ = ["Suite", "load_suite", "run_suite", "summarize", "publish", "render_table", "SHORT_MARK"]


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
    configs = [run_config(suite, setting, method, seed, run_dir) for setting, method, seed, run_dir in runs]
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
    curve = run_folder.curve_plot(scores_perplexity(summary))
    print(f"\nsummary: {suite.output_dir / run_folder.RESULTS_FILE}; plots: {suite.output_dir}/<setting>/{curve}")
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
    run_folder.write_wall_time(config.output_dir, seconds)
    return seconds


def _kept_rounds_seconds(run_dir: Path) -> float:
    """Sum of the round wall times a resume keeps: rounds before the checkpoint's ``next_round``."""
    next_round = run_folder.checkpoint_round(run_dir)
    if next_round is None or not (run_dir / run_folder.METRICS_FILE).exists():
        return 0.0
    return float(sum(r["wall_time"] for r in run_folder.read_records(run_dir) if r["round"] < next_round))


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
