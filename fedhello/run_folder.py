"""The files of a run folder (``config.output_dir``): their names, and the readers and writers of the plain ones.

Every module that touches a run folder (the server loop, checkpoints, Flower, the commands,
plots, statistics, suites, trackers) names its files through this module:

* ``CONFIG_FILE`` (``config.yaml``): the resolved configuration (``fedhello.config.save_config``);
* ``INITIAL_EVAL_FILE`` (``initial_eval.json``): metrics of the untrained global model;
* ``METRICS_FILE`` / ``METRICS_CSV_FILE`` (``metrics.jsonl`` / ``metrics.csv``): one record per round;
* ``COMPLETIONS_FILE`` (``completions.jsonl``, causal LM): greedy completions of fixed prompts;
* ``WEIGHTS_FILE`` + ``META_FILE`` (``checkpoint.safetensors`` + ``checkpoint.json``): the
  checkpoint pair, written and verified by ``fedhello.fl.checkpoint``;
* ``WALL_TIME_FILE`` (``wall_time.json``): a suite run's wall time;
* ``LOCK_FILE`` (``.fedhello.lock``): held by the one process writing the folder;
* ``TRACKING_FILE`` (``tracking.json``): the experiment trackers' run ids (``fedhello.fl.tracking``);
* ``PEFT_FOLDER`` (``peft_adapter/``, causal LM): the final adapters as a PEFT LoRA folder;
* the plots (``*_PLOT``), drawn into the run folder or a suite's setting folder.

A suite folder holds ``RESULTS_FILE`` and ``SUMMARY_FILE`` beside its runs. This module needs
numpy alone, so plots and statistics read run folders without the training stack.
"""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from fedhello.jsonl_io import read_jsonl

__all__ = [
    "CONFIG_FILE", "INITIAL_EVAL_FILE", "METRICS_FILE", "METRICS_CSV_FILE", "COMPLETIONS_FILE", "WEIGHTS_FILE",
    "META_FILE", "WALL_TIME_FILE", "LOCK_FILE", "TRACKING_FILE", "PEFT_FOLDER", "RUN_FILES", "PUBLISHED_RUN_FILES",
    "RESULTS_FILE", "SUMMARY_FILE", "ACCURACY_PLOT", "PERPLEXITY_PLOT", "ALLOCATION_PLOT", "CLIENT_ACCURACY_PLOT",
    "FISHER_PLOT", "EPSILON_PLOT", "curve_plot", "CSV_FIELDS", "json_default", "json_floats", "read_records", "append_record",
    "write_records", "write_metrics_csv", "read_initial_eval", "write_initial_eval", "append_completions", "keep_completions",
    "read_wall_time", "write_wall_time", "checkpoint_round",
]

CONFIG_FILE = "config.yaml"
INITIAL_EVAL_FILE = "initial_eval.json"
METRICS_FILE = "metrics.jsonl"
METRICS_CSV_FILE = "metrics.csv"
COMPLETIONS_FILE = "completions.jsonl"
WEIGHTS_FILE = "checkpoint.safetensors"
META_FILE = "checkpoint.json"
WALL_TIME_FILE = "wall_time.json"
LOCK_FILE = ".fedhello.lock"  # not a run file: it stays, unlocked, when its run ends
TRACKING_FILE = "tracking.json"
PEFT_FOLDER = "peft_adapter"
# Every file a run writes into its folder that a later run would replace (plots are redrawn).
RUN_FILES = (CONFIG_FILE, INITIAL_EVAL_FILE, METRICS_FILE, METRICS_CSV_FILE, WEIGHTS_FILE, META_FILE,
             COMPLETIONS_FILE)
# What a published suite keeps of each run: its small text records (no checkpoints).
PUBLISHED_RUN_FILES = (CONFIG_FILE, METRICS_FILE, METRICS_CSV_FILE, INITIAL_EVAL_FILE, WALL_TIME_FILE,
                       COMPLETIONS_FILE)
RESULTS_FILE = "results.md"
SUMMARY_FILE = "summary.json"
ACCURACY_PLOT = "accuracy.png"
PERPLEXITY_PLOT = "perplexity.png"
ALLOCATION_PLOT = "allocation.png"
CLIENT_ACCURACY_PLOT = "client_accuracy.png"
FISHER_PLOT = "fisher.png"
EPSILON_PLOT = "accuracy-vs-epsilon.png"  # a privacy suite's, in the suite folder


def curve_plot(causal_lm: bool) -> str:
    """The name of a run's learning-curve plot: held-out perplexity (causal LM) or test accuracy."""
    return PERPLEXITY_PLOT if causal_lm else ACCURACY_PLOT

# The columns of metrics.csv (participants: their count).
CSV_FIELDS = ("round", "train_loss", "test_accuracy", "test_loss", "test_macro_f1", "test_perplexity", "bytes_up",
              "bytes_down", "wall_time", "time_local", "time_aggregate", "time_eval", "participants",
              "test_client_accuracy_mean", "test_client_accuracy_worst", "test_client_accuracy_p10")

PathLike = str | os.PathLike


def json_default(obj: Any) -> Any:
    """``json.dumps``'s ``default`` for numpy scalars and arrays in records."""
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def json_floats(values: Any) -> list[float | None] | None:
    """A float array as a JSON-ready list in a record; NaN (a block nobody has scored yet) becomes
    None (JSON null: NaN is not JSON). None stays None."""
    if values is None:
        return None
    return [None if math.isnan(v) else v for v in np.asarray(values, dtype=np.float64).tolist()]


def _jsonl(records: Iterable[dict[str, Any]]) -> str:
    return "".join(json.dumps(r, default=json_default) + "\n" for r in records)


def read_records(run_dir: PathLike) -> list[dict[str, Any]]:
    """The per-round records of ``metrics.jsonl`` (``[]`` when missing; a cut last line is left out)."""
    return read_jsonl(Path(run_dir) / METRICS_FILE)


def append_record(run_dir: PathLike, record: dict[str, Any]) -> None:
    """Append one round's record to ``metrics.jsonl``."""
    with (Path(run_dir) / METRICS_FILE).open("a") as f:
        f.write(_jsonl([record]))


def write_records(run_dir: PathLike, records: list[dict[str, Any]]) -> None:
    """``metrics.jsonl`` holding exactly ``records``; a file that already does is left alone
    (a resume that drops nothing)."""
    _rewrite(Path(run_dir) / METRICS_FILE, _jsonl(records))


def _rewrite(path: Path, text: str) -> None:
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


def write_metrics_csv(run_dir: PathLike, records: list[dict[str, Any]]) -> None:
    """``metrics.csv``: the ``CSV_FIELDS`` of every record, ``participants`` as a count."""
    with (Path(run_dir) / METRICS_CSV_FILE).open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for r in records:
            writer.writerow({**r, "participants": len(r.get("participants", []))})


def read_initial_eval(run_dir: PathLike) -> dict[str, Any] | None:
    """The untrained model's metrics (``initial_eval.json``), None when the file is missing."""
    path = Path(run_dir) / INITIAL_EVAL_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def write_initial_eval(run_dir: PathLike, metrics: dict[str, Any]) -> None:
    """Write the untrained model's metrics to ``initial_eval.json``."""
    (Path(run_dir) / INITIAL_EVAL_FILE).write_text(json.dumps(metrics))


def append_completions(run_dir: PathLike, rounds_done: int, completions: Iterable[tuple[str, str]]) -> None:
    """Append ``(prompt, completion)`` texts of the global model after ``rounds_done`` rounds to
    ``completions.jsonl``."""
    with (Path(run_dir) / COMPLETIONS_FILE).open("a") as f:
        f.write(_jsonl({"round": rounds_done, "prompt": prompt, "completion": text} for prompt, text in completions))


def keep_completions(run_dir: PathLike, last_round: int) -> None:
    """Drop the completions written after ``last_round`` rounds (a resume writes them again)."""
    path = Path(run_dir) / COMPLETIONS_FILE
    if path.exists():
        _rewrite(path, _jsonl(c for c in read_jsonl(path) if c["round"] <= last_round))


def read_wall_time(run_dir: PathLike) -> float:
    """A suite run's wall time in seconds (``wall_time.json``), NaN when it is missing."""
    path = Path(run_dir) / WALL_TIME_FILE
    return json.loads(path.read_text())["seconds"] if path.exists() else math.nan


def write_wall_time(run_dir: PathLike, seconds: float) -> None:
    """Write a suite run's wall time in seconds to ``wall_time.json``."""
    (Path(run_dir) / WALL_TIME_FILE).write_text(json.dumps({"seconds": seconds}))


def checkpoint_round(run_dir: PathLike) -> int | None:
    """The ``next_round`` that ``checkpoint.json`` records (unverified: ``fedhello.fl.checkpoint``
    checks the pair), None without one."""
    path = Path(run_dir) / META_FILE
    return json.loads(path.read_text())["next_round"] if path.exists() else None
