"""The task half of a federated run (``RunTask``): classification or causal LM, picked by ``config.task``."""

from __future__ import annotations

from pathlib import Path

from fedhello.config import RunConfig
from fedhello.fl.tasks.base import RunTask
from fedhello.fl.tasks.causal_lm import CausalLMTask
from fedhello.fl.tasks.classification import ClassificationTask

__all__ = ["RunTask", "ClassificationTask", "CausalLMTask", "make_task"]

_TASKS: dict[str, type[RunTask]] = {"classification": ClassificationTask, "causal_lm": CausalLMTask}


def make_task(config: RunConfig, out: Path) -> RunTask:
    """The ``RunTask`` of ``config.task`` writing into the run folder ``out``."""
    return _TASKS[config.task](config, out)
