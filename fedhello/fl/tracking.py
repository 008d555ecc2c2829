"""Experiment tracking: a run's records, config and plots sent to TensorBoard, MLflow or W&B.

``report_to`` in the run config names the trackers (``none``, the default, sends nothing), as
in Hugging Face's ``TrainingArguments.report_to``. Each tracker gets, from ``FederatedRun``:

* at the start: the resolved config as parameters (TensorBoard: its YAML as a text summary);
* every round: the numeric fields of the round's record (the dict appended to
  ``metrics.jsonl``, under the same names), with ``step`` = the record's ``round``;
* at the end: the run's plots (``fedhello.plots.plot_run``) as artifacts (TensorBoard: images).

Everything stays local and offline unless the tracker's own environment variable says
otherwise: TensorBoard event files in ``<output_dir>/tensorboard``; an MLflow file store in
``<output_dir>/mlruns`` (``MLFLOW_TRACKING_URI`` chooses another store); W&B in offline mode
under ``<output_dir>/wandb`` (``WANDB_MODE=online`` to upload, ``WANDB_PROJECT`` names the
project, default ``fedhello``).

Resume continues the same tracked run without a duplicate step. ``tracking.json`` in the run
folder holds each tracker's identity (MLflow's run id, W&B's run id). The rounds played after
the last checkpoint are played again on resume: TensorBoard discards their first events
(``purge_step``, which its readers honour); MLflow and W&B skip the steps they already hold.
A tracker added on resume first receives the rounds already played.

This module imports no tracker package at import time (config validation uses
``check_report_to``/``check_installed`` without them).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from fedhello.errors import UserError
from fedhello.run_folder import TRACKING_FILE

__all__ = ["TRACKERS", "STATE_FILE", "OUTPUTS", "Tracker", "Tracking", "check_installed", "check_report_to",
           "clear_tracking", "scalars_of"]

# report_to name -> (package imported, pyproject extra that installs it)
TRACKERS: dict[str, tuple[str, str]] = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "mlflow": ("mlflow", "mlflow"),
    "wandb": ("wandb", "wandb"),
}
STATE_FILE = TRACKING_FILE
# What tracking writes into a run folder: removed with the run's files by ``--overwrite``.
OUTPUTS = (STATE_FILE, "tensorboard", "mlruns", "wandb")


def check_report_to(value: str | Sequence[str], field: str = "report_to") -> tuple[str, ...]:
    """``report_to`` as a tuple of tracker names: ``"none"`` (or ``[]``) is none, a name is one.

    Raises:
        UserError: starting with ``field``, for an unknown or repeated name, or ``none`` in a list.
    """
    names = [value] if isinstance(value, str) else list(value)
    if names == ["none"]:
        return ()
    for i, name in enumerate(names):
        where = field if isinstance(value, str) else f"{field}[{i}]"
        if name not in TRACKERS:
            raise UserError(f"{where}: expected 'none' or one of {tuple(TRACKERS)}, got {name!r}")
        if name in names[:i]:
            raise UserError(f"{where}: {name!r} is named twice")
    return tuple(names)


def check_installed(names: Iterable[str], field: str = "report_to") -> None:
    """Refuse, in one line naming the pip extra, a tracker whose package is not installed (no import)."""
    for name in names:
        package, extra = TRACKERS[name]
        if importlib.util.find_spec(package) is None:
            raise UserError(f"{field}: {name!r} needs the package {package!r}, which is not installed; "
                            f"pip install 'fedhello[{extra}]' (or 'fedhello[tracking]' for every tracker)")


def clear_tracking(out: str | os.PathLike) -> list[Path]:
    """Delete what tracking wrote into the run folder ``out`` (``OUTPUTS``); the removed paths."""
    removed = [Path(out) / name for name in OUTPUTS if (Path(out) / name).exists()]
    for path in removed:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    return removed


def scalars_of(record: Mapping[str, Any]) -> dict[str, float]:
    """The numeric fields of a round record (not ``round``, which is the step; no bools, no None)."""
    return {k: float(v) for k, v in record.items()
            if k != "round" and isinstance(v, (int, float)) and not isinstance(v, bool)}


def _flat_params(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """A nested config as dotted keys -> text (trackers' parameters are flat strings)."""
    flat: dict[str, str] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping) and value:
            flat.update(_flat_params(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = json.dumps(value) if not isinstance(value, str) else value
    return flat


class Tracker(ABC):
    """One tracking backend, built as ``Backend(out, state, config, start_step)``: ``out`` the
    run folder, ``state`` its part of ``tracking.json`` (empty for a new tracked run; it may
    update it), ``config`` the resolved run config as nested dicts, ``start_step`` the first
    round this process plays."""

    @abstractmethod
    def log(self, step: int, scalars: dict[str, float]) -> None:
        """Log one round's scalars at ``step``; a step the tracked run already holds is not logged twice."""

    @abstractmethod
    def log_plots(self, step: int, paths: list[Path]) -> None:
        """Attach the run's plot images."""

    @abstractmethod
    def close(self) -> None:
        """Flush and release the backend."""


class TensorBoardTracker(Tracker):
    def __init__(self, out: Path, state: dict[str, Any], config: dict[str, Any], start_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        resumed = bool(state)
        # purge_step: readers drop the events of steps >= start_step written before (rounds played again).
        self.writer = SummaryWriter(log_dir=str(out / "tensorboard"), purge_step=start_step if resumed else None)
        if not resumed or start_step == 0:  # purge_step 0 drops the first attempt's config text too
            import yaml

            self.writer.add_text("config", "```\n" + yaml.safe_dump(config, sort_keys=False) + "```", 0)
        state["log_dir"] = "tensorboard"

    def log(self, step, scalars):
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()  # a killed run keeps every round logged before its last checkpoint

    def log_plots(self, step, paths):
        from matplotlib.image import imread

        for path in paths:
            self.writer.add_image(f"plots/{path.stem}", imread(path), step, dataformats="HWC")
        self.writer.flush()

    def close(self):
        self.writer.close()


class MLflowTracker(Tracker):
    def __init__(self, out: Path, state: dict[str, Any], config: dict[str, Any], start_step: int) -> None:
        # MLflow 3 keeps its file store behind this opt-out; a local folder is the point here.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.tracking import MlflowClient

        store = out / "mlruns"
        uri = state.get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI") or store.resolve().as_uri()
        if uri == store.resolve().as_uri() and not store.exists():
            # MLflow caches a store per URI and lays out its folder only when it first builds it:
            # after --overwrite removed the folder, the cached store would find none.
            from mlflow.store.tracking.file_store import FileStore

            FileStore(str(store.resolve()))
        self.client = MlflowClient(tracking_uri=uri)
        if "run_id" in state:
            self.run_id = state["run_id"]
            history = [m.step for key in self.client.get_run(self.run_id).data.metrics
                       for m in self.client.get_metric_history(self.run_id, key)]
            self.last_step = max(history, default=-1)
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "fedhello")
            experiment = self.client.get_experiment_by_name(name)
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
            self.run_id = self.client.create_run(experiment_id, run_name=out.name).info.run_id
            from mlflow.entities import Param

            params = [Param(k, v) for k, v in _flat_params(config).items()]
            for start in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
                self.client.log_batch(self.run_id, params=params[start:start + 100])
            self.last_step = -1
            state.update(tracking_uri=uri, run_id=self.run_id)

    def log(self, step, scalars):
        if step <= self.last_step:
            return
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        # NaN is kept (MLflow stores it); +-inf are not JSON in its file store.
        metrics = [Metric(k, v, now, step) for k, v in scalars.items() if not math.isinf(v)]
        self.client.log_batch(self.run_id, metrics=metrics)
        self.last_step = step

    def log_plots(self, step, paths):
        for path in paths:
            self.client.log_artifact(self.run_id, str(path), "plots")

    def close(self):
        self.client.set_terminated(self.run_id)


class WandbTracker(Tracker):
    def __init__(self, out: Path, state: dict[str, Any], config: dict[str, Any], start_step: int) -> None:
        import wandb

        if "id" not in state:
            state["id"] = wandb.util.generate_id()
        (out / "wandb").mkdir(parents=True, exist_ok=True)
        self.state = state
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "fedhello"), name=out.name, id=state["id"],
                              resume="allow", dir=str(out), config=config,
                              mode=os.environ.get("WANDB_MODE", "offline"))

    def log(self, step, scalars):
        # An offline W&B run cannot be asked what it holds: tracking.json keeps its last step.
        if step <= self.state.get("last_step", -1):
            return
        self.run.log(scalars, step=step)
        self.state["last_step"] = step

    def log_plots(self, step, paths):
        import wandb

        self.run.log({f"plots/{p.stem}": wandb.Image(str(p)) for p in paths},
                     step=max(step, self.state.get("last_step", step)))

    def close(self):
        self.run.finish()


_BACKENDS: dict[str, type[Tracker]] = {"tensorboard": TensorBoardTracker, "mlflow": MLflowTracker,
                                      "wandb": WandbTracker}


class Tracking:
    """The trackers of one run (none when ``report_to`` is ``none``). ``FederatedRun`` calls
    ``start`` once the start round is known, ``log`` for each new record, ``finish`` at the
    end; used as a context manager, it closes the trackers when the run stops early.

    Args:
        report_to: the config's ``report_to``.
        out: the run folder.
        config: the resolved run config as nested dicts (the parameters).
    """

    def __init__(self, report_to: str | Sequence[str], out: str | os.PathLike, config: dict[str, Any]) -> None:
        self.names = check_report_to(report_to)
        self.out = Path(out)
        self.config = config
        self.trackers: list[Tracker] = []
        self.state: dict[str, Any] = {}
        self.last_step = -1

    def __enter__(self) -> "Tracking":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self, start_round: int, played: Sequence[Mapping[str, Any]] = ()) -> None:
        """Open the trackers for a run that continues at ``start_round``; ``played`` are the
        records of the rounds before it, sent to a tracker that is new to this run folder."""
        if not self.names:
            return
        check_installed(self.names)
        path = self.out / STATE_FILE
        self.state = json.loads(path.read_text()) if path.exists() else {}
        for name in self.names:
            new = name not in self.state
            tracker = _BACKENDS[name](self.out, self.state.setdefault(name, {}), self.config, start_round)
            self.trackers.append(tracker)
            if new:
                for record in played:
                    tracker.log(record["round"], scalars_of(record))
        self.last_step = max(start_round - 1, 0)
        self._save_state()

    def log(self, record: Mapping[str, Any]) -> None:
        """Send one round record (``step`` = its ``round``) to every tracker."""
        if not self.trackers:
            return
        self.last_step = record["round"]
        scalars = scalars_of(record)
        for tracker in self.trackers:
            tracker.log(record["round"], scalars)
        self._save_state()

    def finish(self) -> None:
        """Draw the run's plots, attach them to every tracker and close the trackers."""
        if self.trackers:
            from fedhello.plots import plot_run

            paths = [Path(p) for p in plot_run(self.out)]
            for tracker in self.trackers:
                tracker.log_plots(self.last_step, paths)
        self.close()

    def close(self) -> None:
        trackers, self.trackers = self.trackers, []
        for tracker in trackers:
            tracker.close()
        if trackers:
            self._save_state()

    def _save_state(self) -> None:
        path = self.out / STATE_FILE
        tmp = path.with_name(STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(self.state, indent=1))
        tmp.replace(path)
