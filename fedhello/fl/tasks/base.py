"""What a federated run does differently per task: the ``RunTask`` interface ``FederatedRun`` plays through.

``FederatedRun`` (``fedhello.fl.server``) owns the round loop: plan, local training, aggregation,
checkpoints. Everything that depends on ``config.task`` sits behind this interface: which backbone
to load, the clients' and evaluation tensors, evaluating the global model, what is written after
an evaluation (causal LM: completions) and what is exported at the end (causal LM: a PEFT folder).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from fedhello.config import RunConfig
from fedhello.data import FederatedData
from fedhello.nn import MultiLoRAModel

__all__ = ["RunTask", "Batch"]

Batch = dict[str, torch.Tensor]


class RunTask(ABC):
    """The task-specific half of a ``FederatedRun``.

    Args:
        config: the run's configuration.
        out: the run folder (``config.output_dir``), for the files a task writes itself.

    Attributes:
        head_modules: ``inject_multi_lora``'s ``head_modules``: ``"auto"`` (a trained head per
            client) or None (the backbone's output head stays frozen).
        tensors: after ``prepare``: ``"clients"`` (one ``Batch`` per client), ``"test"``,
            ``"proxy"`` (a ``Batch`` or None) and whatever else the task keeps.
    """

    head_modules: str | None = None

    def __init__(self, config: RunConfig, out: Path) -> None:
        self.config, self.out = config, out
        self.tensors: dict[str, Any] = {}

    @abstractmethod
    def load_backbone(self, load: Callable[..., nn.Module], data: FederatedData, **base: Any) -> nn.Module:
        """The backbone, through the run's loader ``load`` (``FederatedRun.load_backbone``); ``base``:
        ``quantize``, ``compute_dtype``, ``device``."""

    @abstractmethod
    def prepare(self, data: FederatedData, backbone: nn.Module, load_tokenizer: Callable[[], Any]) -> dict[str, Any]:
        """Build (and keep as ``tensors``) every client's training tensors, the test and proxy tensors."""

    @abstractmethod
    def evaluate(self, model: MultiLoRAModel, device: torch.device) -> dict[str, Any]:
        """Metrics of slot 0 of ``model`` (the global model, full rank) on the held-out test split."""

    def evaluated(self, model: MultiLoRAModel, rounds_done: int) -> None:
        """After an evaluation of the global model (loaded in slot 0) once ``rounds_done`` rounds are done."""

    def resumed(self, next_round: int) -> None:
        """The run continues from its checkpoint before round ``next_round``: forget later outputs."""

    def export(self, model: MultiLoRAModel, global_state: dict[str, torch.Tensor]) -> None:
        """At the end of the run: write the final global adapters in the task's export format."""
