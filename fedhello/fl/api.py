"""A federated run over your own objects: a transformers model and ``datasets.Dataset`` objects.

``run(model=..., tokenizer=..., train=..., test=..., config=...)`` is ``fedhello run`` without
names: the model is used as given (built, quantized or not; LoRA adapters are injected into it in
place), ``train`` is partitioned over the clients by ``config``'s ``data.partition`` exactly as
the YAML path partitions its training split (or is a ``client -> Dataset`` mapping, a natural
partition), and ``test`` evaluates the global model. Everything else (strategy, tiers, local
training, dropout, checkpoints and resume in ``output_dir``) comes from the config, so the same
config over the same rows gives the metrics of the YAML run to the digit::

    from fedhello.fl.api import run

    result = run(model=AutoModelForSequenceClassification.from_pretrained(path, num_labels=5),
                 tokenizer=AutoTokenizer.from_pretrained(path), train=train_ds, test=test_ds,
                 config={"rounds": 10, "cohort_size": 5, "data": {"num_clients": 20,
                         "partition": {"kind": "dirichlet", "alpha": 0.5}}, "output_dir": "runs/mine"})
    result.records[-1]["test_accuracy"], result.global_state  # per-round records, adapters + heads
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Mapping

from fedhello.config import ConfigError, RunConfig

__all__ = ["RunResult", "run"]

OBJECT_DATA = "<datasets objects>"  # data.name of a config whose data came as objects


@dataclass
class RunResult:
    """What ``run`` returns.

    Attributes:
        records: one metrics record per round (as in ``metrics.jsonl``).
        global_state: the final global adapters and heads, name -> tensor (``MultiLoRAModel.client_state``).
        config: the resolved config (written to ``output_dir/config.yaml``).
    """

    records: list[dict[str, Any]]
    global_state: dict[str, Any]
    config: RunConfig


def run(*, model: Any, train: Any, test: Any, config: RunConfig | Mapping[str, Any], tokenizer: Any = None,
        resume: bool = False, overwrite: bool = False, progress: bool = False) -> RunResult:
    """Run ``config`` on ``model`` and the given data sets (see the module doc).

    Args:
        model: a transformers model: a sequence/image classifier whose ``config.num_labels`` is the
            number of classes (``task: classification``), or a causal LM (``task: causal_lm``).
        train: a ``datasets.Dataset`` with ``text`` (or ``image``) and a ``ClassLabel`` ``label``, or
            a mapping client -> such a data set.
        test: the held-out ``datasets.Dataset``, same columns.
        config: a ``RunConfig`` or its nested mapping; ``model.name`` and ``data.name`` may be left
            out (they only label the run here).
        tokenizer: the model's tokenizer (text data).
        resume, overwrite: as ``fedhello run --resume/--overwrite`` for ``config.output_dir``.

    Raises:
        ConfigError: a bad config field, or objects that do not fit it (naming the field).
    """
    from fedhello.data import federated_from_datasets
    from fedhello.fl.server import FederatedRun, RunObjects

    if not isinstance(config, RunConfig):
        if not isinstance(config, Mapping):
            raise ConfigError(f"config: expected a RunConfig or a mapping, got {type(config).__name__}")
        raw = copy.deepcopy(dict(config))
        raw.setdefault("model", {}).setdefault("name", getattr(model, "name_or_path", None) or "model")
        data = raw.setdefault("data", {})
        if not data.get("name") and not data.get("path"):
            data["name"] = OBJECT_DATA
        config = RunConfig.from_dict(raw)
    federated = federated_from_datasets(train, test, config.data, config.seed)
    labels = getattr(getattr(model, "config", None), "num_labels", None)
    if config.task == "classification" and labels != federated.num_classes:
        raise ConfigError(f"model: its head has {labels} labels (config.num_labels), the data "
                          f"{federated.num_classes} classes ({federated.label_names})")
    federated_run = FederatedRun(config, progress=progress, objects=RunObjects(model, tokenizer, federated))
    records = federated_run.run(resume=resume, overwrite=overwrite)
    return RunResult(records, federated_run.global_state, config)
