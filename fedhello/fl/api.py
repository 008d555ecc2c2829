"""A federated run over your own objects: a ``transformers`` model and ``datasets.Dataset`` rows.

``fedhello.fl.run(model=..., tokenizer=..., train=..., test=..., config=...)`` plays the same
run as ``fedhello run`` on a YAML file (``FederatedRun``, same allocation, training,
aggregation, evaluation, files, checkpoints, resume and trackers); only where the model and the
data come from differs. ``train`` is one data set, split over ``data.num_clients`` clients by
``data.partition`` (as a data set loaded by name would be), or a mapping client -> data set: a
natural partition, the clients numbered in the mapping's order.

Rows are read through the config's column fields (``data.text_column``, ``image_column``,
``label_column``; for ``task: causal_lm`` also ``prompt_column``/``response_column``), as for
local files; ``train`` and ``test`` (and every client's rows) are read together, so string
labels get the same class ids in all of them. The run's ``config.yaml`` records the model and
the data by labels (``model.name: <object ...>``), not by names a later ``fedhello run`` could load.

The model may come quantized by bitsandbytes (transformers' ``BitsAndBytesConfig``, or
``fedhello.models.load_backbone(..., quantize=...)``): its ``Linear4bit``/``Linear8bitLt`` layers
serve as the frozen base, as ``model.quantize`` builds it, and the run's config and checkpoint
record the kind (``model.quantize``). A full-precision model with ``model.quantize`` set is
quantized in place, as a model loaded by name would be.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from fedhello.config import ConfigError, RunConfig
from fedhello.data import FederatedData, federate, federate_clients, standardize, standardize_lm_dataset
from fedhello.errors import UserError
from fedhello.fl.checkpoint import check_run_dir
from fedhello.fl.server import FederatedRun
from fedhello.fl.tracking import check_installed, check_report_to
from fedhello.models.quantize import BaseQuantization, base_quantization, quantize_backbone

__all__ = ["RunResult", "ObjectRun", "run"]


@dataclass
class RunResult:
    """What ``run`` returns.

    Attributes:
        records: one dict per round, as the lines of ``metrics.jsonl``.
        global_state: the final global adapters and heads, name -> float32 tensor (the tensors
            of ``checkpoint.safetensors``; a client's slot of ``run.model`` loads them with
            ``load_client_state``).
        run: the ``FederatedRun`` itself: ``run.model`` (the model with its adapter banks),
            ``run.data`` (the split and partitioned data), ``run.out`` (the run folder).
    """

    records: list[dict[str, Any]]
    global_state: dict[str, torch.Tensor]
    run: FederatedRun


class ObjectRun(FederatedRun):
    """A ``FederatedRun`` whose backbone, tokenizer and data are given objects, not names.

    Args:
        config: the run's configuration (its ``model.name`` and data source fields are labels).
        model: the backbone, adapted in place (``inject_multi_lora``).
        tokenizer: its tokenizer (text data), or None (images).
        data: the split and partitioned rows (``fedhello.data.federate``/``federate_clients``).
        progress: show a progress bar over rounds.
        quantization: how ``model`` arrived quantized (``base_quantization``; None reads it here).
    """

    def __init__(self, config: RunConfig, model: nn.Module, tokenizer: Any, data: FederatedData,
                 progress: bool = True, quantization: BaseQuantization | None = None) -> None:
        self._model, self._tokenizer, self._data = model, tokenizer, data
        self._quantization = quantization or _quantization_of(model)
        super().__init__(config, progress)

    def load_data(self) -> FederatedData:
        return self._data

    def load_backbone(self, task: str, num_labels: int | None = None, seed: int | None = None,
                      quantize: str = "none", compute_dtype: torch.dtype | None = None,
                      device: torch.device | None = None) -> nn.Module:
        """The given model, checked against the run: a causal LM for ``task: causal_lm``, a head of
        ``num_labels`` classes otherwise. ``seed`` (the head's initialisation by name) does not
        apply: the model comes with its head. A model that came quantized is used as it was built
        (its 4-bit layers' compute dtype must be ``compute_dtype``); a full-precision one with
        ``quantize`` set is quantized here, on ``device``, as ``fedhello.models.load_backbone`` does."""
        model, arrived = self._model, self._quantization
        if arrived.kind not in ("none", quantize):
            raise ConfigError(_quantize_mismatch(quantize, arrived.kind))
        if arrived.compute_dtype not in (None, compute_dtype):
            name = str(arrived.compute_dtype).removeprefix("torch.")
            raise UserError(f"model.compute_dtype: the model's 4-bit layers compute in {name} "
                            f"({arrived.layers[0]}, ...), the run's resolves to "
                            f"{str(compute_dtype).removeprefix('torch.')}; set model.compute_dtype: {name}")
        if task == "causal-lm":
            if not getattr(model, "can_generate", lambda: False)():
                raise UserError(f"model: task causal_lm needs a causal LM (AutoModelForCausalLM), got "
                                f"{type(model).__name__}")
        else:
            labels = getattr(model.config, "num_labels", None)
            if labels != num_labels:
                raise UserError(f"model: its head has {labels} labels (config.num_labels), the data has "
                                f"{num_labels} classes ({', '.join(self._data.label_names)})")
            if task == "sequence-classification" and getattr(model.config, "pad_token_id", None) is None:
                # As fedhello.models.load_backbone: the head reads the last non-padding token.
                model.config.pad_token_id = self.load_tokenizer().pad_token_id
        if arrived.kind == "none" and quantize != "none":
            try:
                quantize_backbone(model.to(device) if device is not None else model, quantize, compute_dtype)
            except ValueError as err:  # e.g. GPT-2's Conv1D blocks; the message names model.quantize
                raise UserError(str(err)) from None
        return model.eval()

    def load_tokenizer(self):
        if self._tokenizer is None:
            raise UserError("tokenizer: required for text data (its rows are tokenized with it); pass tokenizer=")
        if self._tokenizer.pad_token is None and self._tokenizer.eos_token is not None:
            self._tokenizer.pad_token = self._tokenizer.eos_token
        return self._tokenizer


def run(*, model: nn.Module, train: Any, tokenizer: Any = None, test: Any = None,
        config: RunConfig | Mapping[str, Any] | None = None, resume: bool = False, overwrite: bool = False,
        progress: bool = True) -> RunResult:
    """Run federated training of ``model`` over ``train``'s clients; the records and the global state.

    Args:
        model: a ``transformers`` model, built and loaded (``AutoModelForSequenceClassification``
            or ``AutoModelForImageClassification`` with ``num_labels`` = the data's classes and
            its head, ``AutoModelForCausalLM`` for ``task: causal_lm``), with floating-point
            weights or bitsandbytes ``Linear4bit``/``Linear8bitLt`` layers (of one kind; int8
            with ``llm_int8_threshold=0.0``): ``model.quantize`` is then that kind, unless the
            config names another (refused). Weights packed by other libraries (GPTQ, AWQ, ...)
            are refused. It is changed in place: its target modules get the run's adapter banks
            (and, full precision with ``model.quantize`` set, its blocks are quantized).
        train: a ``datasets.Dataset`` (partitioned by ``data.partition``) or a mapping client ->
            ``datasets.Dataset`` (a natural partition; ``data.num_clients`` defaults to its size).
        tokenizer: the model's tokenizer; required for text.
        test: a ``datasets.Dataset`` to evaluate on; None holds out ``data.test_fraction`` of ``train``.
        config: a ``RunConfig`` or the nested mapping a YAML file holds (``model.name`` and
            ``data.name`` may be left out; ``data.name``, ``path``, ``split`` and ``test_split``
            are not read).
        resume, overwrite: as ``FederatedRun.run``.
        progress: show a progress bar over rounds.

    Raises:
        UserError: naming the argument or config field, before the model is touched.
    """
    clients = isinstance(train, Mapping)
    if not isinstance(model, nn.Module) or not hasattr(model, "config"):
        raise TypeError(f"model: expected a transformers model (PreTrainedModel), got {type(model).__name__}")
    quantization = _quantization_of(model)
    cfg = _run_config(config, model, train, quantization.kind)
    check_installed(check_report_to(cfg.report_to))
    data = _federated_data(train, test, cfg, clients)
    check_run_dir(cfg, resume=resume, overwrite=overwrite)  # before the model gets its adapters
    federated = ObjectRun(cfg, model, tokenizer, data, progress=progress, quantization=quantization)
    records = federated.run(resume=resume, overwrite=overwrite)
    return RunResult(records, federated.global_state, federated)


def _label(obj: Any) -> str:
    return f"<object {obj}>"


def _run_config(config: RunConfig | Mapping[str, Any] | None, model: Any, train: Any,
                quantized: str = "none") -> RunConfig:
    """``config`` with the objects' labels in place of the source names and ``model.quantize`` the
    model's own quantization ``quantized`` (if not ``"none"``), validated."""
    if isinstance(config, RunConfig):
        raw = config.to_dict()
    elif config is None or isinstance(config, Mapping):
        raw = dict(config or {})
    else:
        raise TypeError(f"config: expected a RunConfig or a mapping, got {type(config).__name__}")
    clients = isinstance(train, Mapping)
    data = raw["data"] = dict(raw.get("data") or {})
    if clients:
        if not train:
            raise UserError("train: the client mapping is empty")
        data.setdefault("num_clients", len(train))
        if data["num_clients"] != len(train):
            raise ConfigError(f"data.num_clients: the train mapping has {len(train)} clients, the config says "
                              f"{data['num_clients']}")
    name = getattr(model, "name_or_path", "") or type(model).__name__
    raw["model"] = {**(raw.get("model") or {}), "name": _label(name)}
    if quantized != "none":  # the run (config.yaml, checkpoint, resume check) records the base as it came
        given = raw["model"].get("quantize", "none")
        if given not in ("none", quantized):
            raise ConfigError(_quantize_mismatch(given, quantized))
        raw["model"]["quantize"] = quantized
    data.update(name=_label(f"{len(train)} clients" if clients else "datasets.Dataset"), path=None, split="train",
                test_split=None)
    return RunConfig.from_dict(raw)


def _quantize_mismatch(given: str, quantized: str) -> str:
    return (f"model.quantize: {given!r}, but the model's layers are bitsandbytes {quantized}; leave it unset "
            f"(or 'none') to take the model's, or set it to {quantized!r}")


def _quantization_of(model: nn.Module) -> BaseQuantization:
    """``base_quantization(model)``, its refusals as ``UserError`` naming ``model``."""
    try:
        return base_quantization(model, "model")
    except ValueError as err:
        raise UserError(str(err)) from None


def _federated_data(train: Any, test: Any, cfg: RunConfig, clients: bool) -> FederatedData:
    """Read the rows through the config's column fields (all sets together), then split them."""
    import datasets

    named = [(f"train[{k!r}]", v) for k, v in train.items()] if clients else [("train", train)]
    for where, ds in named + ([("test", test)] if test is not None else []):
        if not isinstance(ds, datasets.Dataset):
            raise TypeError(f"{where}: expected a datasets.Dataset, got {type(ds).__name__}")
    sets = [ds for _, ds in named] + ([test] if test is not None else [])
    try:
        joined = sets[0] if len(sets) == 1 else datasets.concatenate_datasets(sets)
    except ValueError as err:
        raise UserError(f"{'test' if test is not None else 'train'}: the data sets do not have the same columns and "
                        f"features ({err})") from None
    d = cfg.data
    try:
        rows = (standardize_lm_dataset(joined, d) if cfg.task == "causal_lm"
                else standardize(joined, d.text_column, d.image_column, d.label_column))
    except ValueError as err:
        message = str(err)
        raise UserError(message if message.startswith("data.") else f"data.{message}") from None
    n_train = sum(len(ds) for _, ds in named)
    test_rows = rows.select(range(n_train, len(rows))) if test is not None else None
    train_rows = rows.select(range(n_train)) if test is not None else rows
    if not clients:
        return federate(train_rows, d, cfg.seed, test=test_rows)
    if d.partition.kind != "iid" or d.max_samples is not None:
        field = "partition.kind" if d.partition.kind != "iid" else "max_samples"
        raise ConfigError(f"data.{field}: a client mapping is its own partition of all its rows; leave data.{field} "
                          "unset")
    owners = np.repeat(np.arange(len(named)), [len(ds) for _, ds in named])
    return federate_clients(train_rows, owners, d, cfg.seed, test=test_rows)
