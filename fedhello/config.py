"""Run configuration: one YAML file fully describes a federated run.

``load_config(path, overrides)`` reads the YAML, applies ``--set key=value`` overrides (dotted
keys, YAML values), builds a ``RunConfig`` and validates it up front: every problem raises a
``ConfigError`` (a ``ValueError``) whose message starts with the dotted name of the field.

Layout (every field has a default except ``model.name`` and ``data.name``/``data.path``)::

    seed: 0
    task: classification       # or causal_lm (next-token loss, no head; fedhello.data.lm)
    model:       {name, target_modules, rank, alpha, dropout, rank_scaling, quantize, compute_dtype}
    data:        {name, path, split, test_split, text_column, image_column, label_column,
                  prompt_column, response_column, chat_template, max_chunks, max_samples, max_length,
                  num_clients, test_fraction, proxy_fraction,
                  partition: {kind, alpha, classes_per_client, min_size}}
    tiers:       {fractions: [1/2, 3/4, 1], shares: [1, 1, 1]}
    strategy:    {name: fedhello, options: {...}}   # options as in fedhello.fl.strategies
    aggregation: {weighting: samples, rank_normalize: all, heads: average}
    fisher:      {estimator: standard}
    rounds, cohort_size
    clients:     {dropout, over_selection}     # clients that never return (fedhello.fl.dropout)
    local:       {epochs, steps, batch_size, lr, optimizer, weight_decay, momentum}
    engine:      {kind: batched, parallel, device, dtype, eval_batch_size}
    eval_every, checkpoint_every, output_dir
    privacy:     null, or {noise_multiplier | target_epsilon, clip_norm, delta, fisher_clip,
                  fisher_noise_multiplier, adaptive_clip: {target_quantile, learning_rate,
                  count_noise_multiplier}, secure_rng}   # fedhello.fl.privacy
    report_to: none            # or [tensorboard, mlflow, wandb] (fedhello.fl.tracking)
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from fedhello.errors import UserError, require_extra

require_extra("fl", "fedhello.config")  # before yaml: without the extra, one line that names it

import numpy as np
import yaml

# Only light modules here (no torch, datasets, transformers): a bad config is reported in well
# under a second, before the CLI imports the training stack.
from fedhello.data.sources import BUILTIN_DATASETS, LOCAL_FORMATS, check_data_source
from fedhello.fl.strategies import (AllocationContext, AllocationStrategy, HetLoRAStrategy, available_strategies,
                                   make_strategy)
from fedhello.fl.capacity import CapacityTiers
from fedhello.fl.tracking import check_installed, check_report_to
from fedhello.seeds import purpose_seed
from fedhello.names import FISHER_ESTIMATORS, HEADS, PARTITION_KINDS, RANK_NORMALIZATIONS, RANK_SCALINGS, WEIGHTINGS
from fedhello.yaml_io import DuplicateKeyError, safe_load_strict
from fedhello.quantization import QUANTIZATIONS, require_bitsandbytes

__all__ = [
    "ConfigError",
    "ModelConfig",
    "PartitionConfig",
    "DataConfig",
    "TierConfig",
    "StrategyConfig",
    "AggregationConfig",
    "FisherConfig",
    "ClientsConfig",
    "LocalConfig",
    "EngineConfig",
    "AdaptiveClipConfig",
    "PrivacyConfig",
    "RunConfig",
    "apply_overrides",
    "parse_override_value",
    "load_config",
    "save_config",
]

OPTIMIZERS = ("adamw", "sgd")
TASKS = ("classification", "causal_lm")
ENGINES = ("batched", "sequential")
ENGINE_DTYPES = ("auto", "float32", "bfloat16", "float16")


class ConfigError(UserError):
    """An invalid run configuration; the message starts with the field's dotted name."""


@dataclass
class ModelConfig:
    """The backbone and its LoRA adapters.

    Attributes:
        name: Hub id, local folder, or an alias known to ``fedhello.models``.
        target_modules: module names to adapt; None for the model family's default.
        rank: LoRA rank r (HetLoRA's largest rank).
        alpha: LoRA alpha (scaling = alpha / rank).
        dropout: LoRA dropout probability.
        rank_scaling: scale of a HetLoRA client of rank r_c: ``client`` (alpha / r_c) or
            ``max`` (alpha / rank for every client: its slices keep the global model's scale).
        quantize: the frozen base's linear layers inside its blocks: ``none`` (full precision),
            ``nf4`` / ``fp4`` (bitsandbytes 4-bit, double quantization: QLoRA) or ``int8``
            (bitsandbytes LLM.int8()); embeddings, norms and heads stay in full precision.
            Needs the ``[quant]`` extra (bitsandbytes).
        compute_dtype: what 4-bit layers dequantize to and multiply in (QLoRA's
            ``bnb_4bit_compute_dtype``): ``auto`` (``engine.dtype``), ``float32``, ``bfloat16``
            or ``float16``; only with ``quantize: nf4`` or ``fp4``.
    """

    name: str | None = None
    target_modules: list[str] | None = None
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    rank_scaling: str = "client"
    quantize: str = "none"
    compute_dtype: str = "auto"


@dataclass
class PartitionConfig:
    """How the training data is split over clients (``fedhello.data.partition``).

    Attributes:
        kind: ``iid``, ``dirichlet`` or ``pathological``.
        alpha: Dirichlet concentration (dirichlet), > 0.
        classes_per_client: classes per client (pathological).
        min_size: fewest samples per client (dirichlet).
    """

    kind: str = "iid"
    alpha: float = 0.5
    classes_per_client: int = 2
    min_size: int = 1


@dataclass
class DataConfig:
    """Data source, held-out splits and client partition.

    Attributes:
        name: ``bbc_news``, ``fashion_mnist``, ``bbc_headlines`` (``task: causal_lm``: BBC News
            as story -> headline instructions), a Hub id, or None for local files.
        path: local file or folder (or the folder of a built-in set).
        split: split to read; ``test_split``: read the test set from this split instead of
            holding out ``test_fraction`` (then ``test_fraction`` is not used).
        text_column, image_column, label_column: input/label columns (found by name if None).
            With ``task: causal_lm`` the label column is optional: it only shapes the partition.
        prompt_column, response_column: instruction data (``task: causal_lm`` only): the loss
            covers the response tokens alone.
        chat_template: format each prompt with the tokenizer's chat template (a user turn).
        max_chunks: ``task: causal_lm`` plain text is cut into rows of ``max_length`` tokens; at
            most this many per text (1: truncation; None: all).
        max_samples: use a seeded random subset of this many samples (quick runs).
        max_length: tokens per text example.
        num_clients: clients in the population.
        test_fraction: share held out for global evaluation.
        proxy_fraction: share held out on the server for proxy-set Fisher scores.
    """

    name: str | None = None
    path: str | None = None
    split: str = "train"
    test_split: str | None = None
    text_column: str | None = None
    image_column: str | None = None
    label_column: str | None = None
    prompt_column: str | None = None
    response_column: str | None = None
    chat_template: bool = False
    max_chunks: int | None = None
    max_samples: int | None = None
    max_length: int = 128
    num_clients: int = 20
    test_fraction: float = 0.2
    proxy_fraction: float = 0.0
    partition: PartitionConfig = field(default_factory=PartitionConfig)


@dataclass
class TierConfig:
    """Capacity tiers: fractions of L (numbers or strings like ``"3/4"``) and population shares."""

    fractions: list[float | str] = field(default_factory=lambda: [0.5, 0.75, 1.0])
    shares: list[float | str] = field(default_factory=lambda: [1.0, 1.0, 1.0])

    def tiers(self) -> CapacityTiers:
        return CapacityTiers(tuple(self.fractions), tuple(self.shares))


@dataclass
class StrategyConfig:
    """Allocation strategy by registry name, with its options (see ``strategy_options(name)``)."""

    name: str = "fedhello"
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class AggregationConfig:
    """Aggregation weights (``samples``, ``uniform`` or ``norm``: each client by the Frobenius norm of
    its update ``B_c A_c``, as HetLoRA) and how HetLoRA's ranks are padded (``rank_normalize``:
    ``factors`` is HetLoRA's own zero-padding of the factors; ``all``, the default the published
    results used, pads the deltas; ``covering`` averages each rank slice over the clients that
    have it; ``fedhello.fl.aggregation.aggregate_rank_padded``). ``heads``: ``average`` the
    classification heads over the participants, or ``keep_initial``: never aggregate them, so the
    head stays the initial one for the whole run — a reproduction of the paper's released code for
    the ablation in docs/results.md, not a recommendation."""

    weighting: str = "samples"
    rank_normalize: str = "all"
    heads: str = "average"


@dataclass
class FisherConfig:
    """How the server estimates proxy-set Fisher scores (strategies with ``fisher_source: proxy``):
    ``standard`` (each proxy sample's squared loss-gradient norm per block, averaged over all of
    them) or ``released``: the paper's released code's estimate (the label's raw logit, only the
    first batch, per-tensor mean squares summed as Frobenius norms; ``fedhello.fl.released``) — a
    reproduction for the ablation in docs/results.md, not a recommendation."""

    estimator: str = "standard"


@dataclass
class ClientsConfig:
    """System heterogeneity: sampled clients that never send their update back.

    Attributes:
        dropout: probability that a sampled client never returns, drawn independently for each
            client and round (``fedhello.fl.dropout``); a list gives one probability per capacity
            tier (the order of ``tiers.fractions``), tying dropout to a client's tier.
        over_selection: sample ``ceil(cohort_size * (1 + over_selection))`` clients (at most the
            population) and aggregate the first ``cohort_size`` participants that return; the others
            are late and discarded, as production FL servers over-select.
    """

    dropout: float | list[float] = 0.0
    over_selection: float = 0.0

    @property
    def active(self) -> bool:
        """Whether any client can fail to return or be over-selected."""
        rates = self.dropout if isinstance(self.dropout, list) else [self.dropout]
        return any(rate > 0 for rate in rates) or self.over_selection > 0


@dataclass
class LocalConfig:
    """Local training of each client in a round.

    Attributes:
        epochs: passes over the client's data (when ``steps`` is None).
        steps: a fixed number of local steps instead.
        batch_size, lr, optimizer (``adamw``/``sgd``), weight_decay, momentum (sgd).
    """

    epochs: int = 1
    steps: int | None = None
    batch_size: int = 16
    lr: float = 5e-4
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    momentum: float = 0.0


@dataclass
class EngineConfig:
    """Simulation engine: ``batched`` (client-parallel) or ``sequential``; clients per batched
    pass (``parallel``: an int, None = the whole cohort, or ``auto``: waves sized from a token
    budget, on CUDA from the free memory measured on the first wave); ``device`` (``auto``,
    ``cpu``, ``cuda``...); ``dtype`` the frozen backbone computes in (``auto``: float32 on CPU,
    bfloat16 on CUDA; adapters, optimizer state and aggregation stay float32)."""

    kind: str = "batched"
    parallel: int | str | None = None
    device: str = "auto"
    dtype: str = "auto"
    eval_batch_size: int = 64


@dataclass
class AdaptiveClipConfig:
    """Adaptive clipping (Andrew et al., 2021): the clip norm tracks ``target_quantile`` of the
    update norms, ``C <- C * exp(-learning_rate * (b - target_quantile))`` with ``b`` the share of
    members within the clip, counted with Gaussian noise of std ``count_noise_multiplier``
    (accounted; Andrew et al. suggest about cohort_size / 20)."""

    target_quantile: float = 0.5
    learning_rate: float = 0.2
    count_noise_multiplier: float | None = None


@dataclass
class PrivacyConfig:
    """Client-level differential privacy of the run (``fedhello.fl.privacy``); the unit of
    privacy is one client's whole data set.

    Attributes:
        noise_multiplier: sigma: the sum of the clipped updates gets N(0, sigma^2 clip_norm^2) per
            coordinate; 0 clips without noise (a robustness bound, no privacy claim). Exactly one
            of ``noise_multiplier`` and ``target_epsilon``.
        target_epsilon: calibrate sigma so that epsilon after ``rounds`` rounds is this.
        clip_norm: C, the L2 bound of one client's whole update (the first round's C with
            ``adaptive_clip``).
        delta: the delta epsilon is reported at, in (0, 1).
        fisher_clip: L2 bound of a client's Fisher score vector.
        fisher_noise_multiplier: the noise std on the sum of the clipped scores over ``fisher_clip``.
            Both are used (and accounted) only with a strategy that allocates from client-side
            Fisher scores (``strategy.options.fisher_source: client``), and such a strategy
            needs them under privacy; a suite may set them for every method.
        adaptive_clip: adaptive clipping, or None for a fixed C.
        secure_rng: draw the noise from the OS CSPRNG (not reproducible) instead of the run's
            seeded generator.
    """

    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    clip_norm: float | None = None
    delta: float = 1e-5
    fisher_clip: float | None = None
    fisher_noise_multiplier: float | None = None
    adaptive_clip: AdaptiveClipConfig | None = None
    secure_rng: bool = False


@dataclass
class RunConfig:
    """A whole run. ``rounds`` of ``cohort_size`` clients; evaluate every ``eval_every`` rounds,
    checkpoint every ``checkpoint_every`` rounds (0: never) into ``output_dir``. ``task``:
    ``classification`` (a head per client) or ``causal_lm`` (next-token loss on target tokens,
    the model's output head frozen)."""

    seed: int = 0
    task: str = "classification"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tiers: TierConfig = field(default_factory=TierConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    aggregation: AggregationConfig = field(default_factory=AggregationConfig)
    fisher: FisherConfig = field(default_factory=FisherConfig)
    rounds: int = 50
    cohort_size: int = 10
    clients: ClientsConfig = field(default_factory=ClientsConfig)
    local: LocalConfig = field(default_factory=LocalConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    eval_every: int = 1
    checkpoint_every: int = 10
    output_dir: str = "runs/default"
    privacy: PrivacyConfig | None = None
    # Experiment trackers that also receive the run (fedhello.fl.tracking): none, a name, or a list.
    report_to: str | list[str] = "none"

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> "RunConfig":
        """Build and validate a config from nested mappings (e.g. parsed YAML)."""
        config = _build(cls, raw, "")
        config.validate()
        return config

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dicts/lists, as written to YAML."""
        return dataclasses.asdict(self)

    def seed_for(self, purpose: str) -> int:
        """``fedhello.seeds.purpose_seed(self.seed, purpose)``."""
        return purpose_seed(self.seed, purpose)

    def capacity_tiers(self) -> CapacityTiers:
        return self.tiers.tiers()

    def validate(self) -> None:
        """Check every field; raise ``ConfigError`` naming the first bad one.

        Whatever validation refuses is the user's config to fix, never a bug: a check that raises a
        plain ``ValueError`` (its message starts with the field, as every check here does) is
        re-raised as ``ConfigError``, so the command line prints it in one line.
        """
        try:
            self._validate_fields()
        except UserError:
            raise
        except ValueError as err:
            raise ConfigError(str(err)) from err

    def _validate_fields(self) -> None:
        _int_at_least("seed", self.seed, 0)
        _choice("task", self.task, TASKS)
        self._validate_model()
        self._validate_data()
        try:
            tiers = self.tiers.tiers()
        except ValueError as err:
            raise ConfigError(f"tiers.{err}") from None
        strategy = self._validate_strategy(tiers)
        _choice("aggregation.weighting", self.aggregation.weighting, WEIGHTINGS)
        _choice("aggregation.rank_normalize", self.aggregation.rank_normalize, RANK_NORMALIZATIONS)
        _choice("aggregation.heads", self.aggregation.heads, HEADS)
        _int_at_least("rounds", self.rounds, 1)
        _int_at_least("cohort_size", self.cohort_size, 1)
        if self.cohort_size > self.data.num_clients:
            raise ConfigError(f"cohort_size: expected <= data.num_clients ({self.data.num_clients}), "
                              f"got {self.cohort_size}")
        self._validate_clients()
        self._validate_local()
        _choice("engine.kind", self.engine.kind, ENGINES)
        if isinstance(self.engine.parallel, str):
            _choice("engine.parallel", self.engine.parallel, ("auto",))
        elif self.engine.parallel is not None:
            _int_at_least("engine.parallel", self.engine.parallel, 1)
        _choice("engine.dtype", self.engine.dtype, ENGINE_DTYPES)
        if not self.engine.device:
            raise ConfigError("engine.device: expected 'auto' or a torch device string, got ''")
        _int_at_least("engine.eval_batch_size", self.engine.eval_batch_size, 1)
        _int_at_least("eval_every", self.eval_every, 1)
        _int_at_least("checkpoint_every", self.checkpoint_every, 0)
        if not self.output_dir:
            raise ConfigError("output_dir: expected a directory path, got ''")
        if self.privacy is not None:
            self._validate_privacy(strategy)
        long = [part for part in Path(self.output_dir).parts if len(os.fsencode(part)) > NAME_MAX]
        if long:  # the OS refuses such a folder name (ENAMETOOLONG) only once the run starts writing
            raise ConfigError(f"output_dir: the folder name {long[0][:40]!r}... has {len(os.fsencode(long[0]))} "
                              f"bytes; file systems take at most {NAME_MAX} per name")
        try:
            check_report_to(self.report_to)
        except UserError as err:
            raise ConfigError(str(err)) from None

    def check_sources(self) -> None:
        """Check that ``model.name`` and the data source can load now, without loading them.

        Separate from ``validate`` because the answer depends on this machine (installed
        packages, files, network), not on the config alone. Fast: no torch or datasets import,
        at most one connection attempt to the hub of a few seconds.

        Raises:
            UserError: naming the field, what is missing and how to fix it.
        """
        from fedhello.models.loading import check_backbone_name

        check_backbone_name(self.model.name, "model.name")
        if self.model.quantize != "none":
            require_bitsandbytes("model.quantize", self.model.quantize)
        check_data_source(self.data, needs_label=self.task == "classification")
        check_installed(check_report_to(self.report_to))

    def _validate_model(self) -> None:
        m = self.model
        if not m.name:
            raise ConfigError("model.name: required (a Hub id, a local folder or a fedhello.models alias)")
        if m.target_modules is not None and (not m.target_modules or not all(m.target_modules)):
            raise ConfigError(f"model.target_modules: expected a non-empty list of module names or null, "
                              f"got {m.target_modules}")
        _int_at_least("model.rank", m.rank, 1)
        _positive("model.alpha", m.alpha)
        if not 0 <= m.dropout < 1:
            raise ConfigError(f"model.dropout: expected a probability in [0, 1), got {m.dropout}")
        _choice("model.rank_scaling", m.rank_scaling, RANK_SCALINGS)
        _choice("model.quantize", m.quantize, QUANTIZATIONS)
        _choice("model.compute_dtype", m.compute_dtype, ENGINE_DTYPES)
        if m.compute_dtype != "auto" and m.quantize not in ("nf4", "fp4"):
            raise ConfigError(f"model.compute_dtype: only for model.quantize nf4 or fp4 (4-bit layers), got "
                              f"{m.compute_dtype!r} with model.quantize {m.quantize!r}; the other layers compute "
                              f"in engine.dtype")

    def _validate_data(self) -> None:
        d = self.data
        if not d.name and not d.path:
            raise ConfigError("data.name: expected a built-in name (bbc_news, bbc_headlines, fashion_mnist), a Hub id, "
                              "or a local data.path; got neither")
        if d.path is not None:
            local = Path(os.path.expanduser(d.path))
            if not local.exists():
                raise ConfigError(f"data.path: {d.path!r} does not exist")
            if not d.name and local.is_file() and local.suffix.lower() not in LOCAL_FORMATS:
                raise ConfigError(f"data.path: unsupported file type {local.suffix or '(none)'!r} of {d.path!r}; "
                                  f"expected one of {sorted(LOCAL_FORMATS)} or a folder of class sub-folders")
        if d.name and d.name not in BUILTIN_DATASETS and d.path is not None:
            raise ConfigError(f"data.path: not used with the Hub data set {d.name!r}; set data.name or data.path")
        if not d.split:
            raise ConfigError("data.split: expected a split name, got ''")
        if d.max_samples is not None:
            _int_at_least("data.max_samples", d.max_samples, d.num_clients)
        _int_at_least("data.max_length", d.max_length, 1)
        _int_at_least("data.num_clients", d.num_clients, 1)
        if d.test_split is None and not 0 < d.test_fraction < 1:
            raise ConfigError(f"data.test_fraction: expected a number in (0, 1), got {d.test_fraction}")
        if not 0 <= d.proxy_fraction < 1:
            raise ConfigError(f"data.proxy_fraction: expected a number in [0, 1), got {d.proxy_fraction}")
        test = 0.0 if d.test_split is not None else d.test_fraction
        if test + d.proxy_fraction >= 1:
            raise ConfigError(f"data.proxy_fraction: test_fraction + proxy_fraction must be < 1, got "
                              f"{test} + {d.proxy_fraction}")
        self._validate_task_data()
        p = d.partition
        _choice("data.partition.kind", p.kind, PARTITION_KINDS)
        _positive("data.partition.alpha", p.alpha)
        _int_at_least("data.partition.classes_per_client", p.classes_per_client, 1)
        _int_at_least("data.partition.min_size", p.min_size, 1)  # a client without samples cannot train

    def _validate_task_data(self) -> None:
        """Fields that only one task uses must not be set for the other."""
        d = self.data
        if self.task == "classification":
            for name in ("prompt_column", "response_column", "chat_template", "max_chunks"):
                if getattr(d, name) not in (None, False):
                    raise ConfigError(f"data.{name}: only used with task: causal_lm (instruction data), "
                                      f"got {getattr(d, name)!r} with task: classification")
            if d.name == "bbc_headlines":
                raise ConfigError("data.name: bbc_headlines is story -> headline instruction data for "
                                  "task: causal_lm; for topic classification use bbc_news")
            if d.name in ("bbc_news", "fashion_mnist"):
                for name in ("text_column", "image_column", "label_column"):
                    if getattr(d, name) is not None:
                        raise ConfigError(f"data.{name}: {d.name} has fixed columns (they apply to data.path and "
                                          f"Hub data sets); leave it unset, got {getattr(d, name)!r}")
            return
        if d.image_column is not None or d.name == "fashion_mnist":
            field_name = "image_column" if d.image_column is not None else "name"
            raise ConfigError(f"data.{field_name}: images are classification-only; task: causal_lm needs text "
                              f"(data.text_column) or instructions (data.prompt_column/response_column)")
        if (d.prompt_column is None) != (d.response_column is None):
            missing = "prompt_column" if d.prompt_column is None else "response_column"
            raise ConfigError(f"data.{missing}: instruction data needs both data.prompt_column and "
                              f"data.response_column, got only one")
        if d.prompt_column is not None and d.text_column is not None:
            raise ConfigError(f"data.text_column: plain text and instruction columns are exclusive, got "
                              f"text_column {d.text_column!r} with prompt_column {d.prompt_column!r}")
        if d.max_chunks is not None:
            _int_at_least("data.max_chunks", d.max_chunks, 1)
        if d.name == "bbc_headlines":
            for name in ("text_column", "prompt_column", "response_column", "label_column"):
                if getattr(d, name) is not None:
                    raise ConfigError(f"data.{name}: bbc_headlines has fixed columns (prompt, response, label: the "
                                      f"topic); leave it unset, got {getattr(d, name)!r}")
            return
        if d.chat_template and d.prompt_column is None:
            raise ConfigError("data.chat_template: formats instruction prompts; set data.prompt_column and "
                              "data.response_column")

    def _validate_strategy(self, tiers: CapacityTiers) -> AllocationStrategy:
        s = self.strategy
        if s.name not in available_strategies():
            raise ConfigError(f"strategy.name: unknown strategy {s.name!r}; expected one of {available_strategies()}")
        # The model's depth L is not known before it loads. Options are checked on a 12-block
        # stand-in; a complaint about the tiers' capacities (which round with L) only stops the
        # config when no depth in PROBE_MIN_BLOCKS..PROBE_MAX_BLOCKS would do (at one block every
        # tier is full, so that depth proves nothing); otherwise it waits for the real L
        # (``make_run_strategy`` once the model has loaded).
        try:
            strategy = make_run_strategy(self, 12, tiers.capacities(12))
        except ConfigError as err:
            if not str(err).startswith("tiers.fractions:"):
                raise
            strategy = next((found for blocks in range(PROBE_MIN_BLOCKS, PROBE_MAX_BLOCKS + 1)
                             if (found := _strategy_or_none(self, blocks, tiers.capacities(blocks))) is not None), None)
            if strategy is None:
                raise ConfigError(f"{err}; no model depth from {PROBE_MIN_BLOCKS} to {PROBE_MAX_BLOCKS} blocks "
                                  f"gives one") from None
        _choice("fisher.estimator", self.fisher.estimator, FISHER_ESTIMATORS)
        if self.fisher.estimator == "released" and (getattr(strategy, "fisher_source", None) != "proxy"
                                                    or self.task != "classification"):
            raise ConfigError("fisher.estimator: 'released' estimates proxy-set scores of a classifier; it needs "
                              "task: classification and a strategy with strategy.options.fisher_source: proxy")
        if getattr(strategy, "fisher_source", None) == "proxy" and self.data.proxy_fraction <= 0:
            raise ConfigError(f"data.proxy_fraction: strategy {s.name!r} uses proxy-set Fisher scores "
                              f"(strategy.options.fisher_source = 'proxy') and needs a proxy set, got 0")
        return strategy

    def _validate_privacy(self, strategy: AllocationStrategy) -> None:
        p = self.privacy
        if (p.noise_multiplier is None) == (p.target_epsilon is None):
            raise ConfigError("privacy.noise_multiplier: expected exactly one of privacy.noise_multiplier and "
                              f"privacy.target_epsilon, got {p.noise_multiplier} and {p.target_epsilon}")
        if p.noise_multiplier is not None:
            _at_least_zero("privacy.noise_multiplier", p.noise_multiplier)
        else:
            _positive("privacy.target_epsilon", p.target_epsilon)
        if p.clip_norm is None:
            raise ConfigError("privacy.clip_norm: required (the L2 bound of one client's update), got null")
        _positive("privacy.clip_norm", p.clip_norm)
        if not 0 < p.delta < 1:
            raise ConfigError(f"privacy.delta: expected a number in (0, 1), got {p.delta}")
        private = p.target_epsilon is not None or p.noise_multiplier > 0
        if self.aggregation.weighting != "uniform":
            raise ConfigError(f"aggregation.weighting: under privacy expected 'uniform' (weights from sample counts "
                              f"or update norms are private and break the sensitivity bound), got "
                              f"{self.aggregation.weighting!r}")
        if self.clients.over_selection > 0:
            raise ConfigError(f"clients.over_selection: under privacy expected 0 (the accountant assumes a cohort of "
                              f"cohort_size clients drawn each round), got {self.clients.over_selection}")
        if self.aggregation.heads != "average":
            # The clip and the noise cover everything a client sends, heads included.
            raise ConfigError(f"aggregation.heads: under privacy expected 'average', got {self.aggregation.heads!r} "
                              "(a reproduction switch of the released code, not combined with DP)")
        if isinstance(strategy, HetLoRAStrategy):
            raise ConfigError(f"strategy.name: {self.strategy.name!r} trains clients at different ranks, which has "
                              "no private aggregation; choose a layer-allocation strategy")
        client_fisher = strategy.uses_fisher and getattr(strategy, "fisher_source", None) == "client"
        if p.fisher_noise_multiplier is not None or p.fisher_clip is not None:  # used by client-side FIM only
            if p.fisher_clip is None or p.fisher_noise_multiplier is None:
                missing = "fisher_clip" if p.fisher_clip is None else "fisher_noise_multiplier"
                raise ConfigError(f"privacy.{missing}: client-side Fisher scores need both privacy.fisher_clip and "
                                  "privacy.fisher_noise_multiplier")
            _positive("privacy.fisher_clip", p.fisher_clip)
            _at_least_zero("privacy.fisher_noise_multiplier", p.fisher_noise_multiplier)
        if client_fisher and private and not (p.fisher_noise_multiplier or 0) > 0:
            raise ConfigError(f"privacy.fisher_noise_multiplier: strategy {self.strategy.name!r} allocates from "
                              "client-side Fisher scores, private data sent in the clear; set it > 0 (with "
                              "privacy.fisher_clip) or use strategy.options.fisher_source: proxy")
        a = p.adaptive_clip
        if a is not None:
            if not 0 < a.target_quantile < 1:
                raise ConfigError(f"privacy.adaptive_clip.target_quantile: expected a number in (0, 1), got "
                                  f"{a.target_quantile}")
            _positive("privacy.adaptive_clip.learning_rate", a.learning_rate)
            if a.count_noise_multiplier is None:
                raise ConfigError("privacy.adaptive_clip.count_noise_multiplier: required (the noise on the count "
                                  "of clients within the clip; about cohort_size / 20), got null")
            (_positive if private else _at_least_zero)("privacy.adaptive_clip.count_noise_multiplier",
                                                       a.count_noise_multiplier)
        if private:  # dp-accounting is imported for DP configs only (an optional extra)
            from fedhello.fl.accounting import calibrate_noise_multiplier, dp_accounting

            dp_accounting()
        if p.target_epsilon is not None:
            calibrate_noise_multiplier(p.target_epsilon, p.delta, self.rounds, self.data.num_clients,
                                       self.cohort_size, p.fisher_noise_multiplier,
                                       None if a is None else a.count_noise_multiplier)

    def _validate_clients(self) -> None:
        c = self.clients
        rates = c.dropout if isinstance(c.dropout, list) else [c.dropout]
        if isinstance(c.dropout, list) and len(c.dropout) != len(self.tiers.fractions):
            raise ConfigError(f"clients.dropout: expected one probability per tier ({len(self.tiers.fractions)}, "
                              f"as tiers.fractions) or a single one, got {len(c.dropout)}")
        for rate in rates:
            if not 0 <= rate < 1:  # a client that never returns would never train
                raise ConfigError(f"clients.dropout: expected probabilities in [0, 1), got {c.dropout}")
        if not (math.isfinite(c.over_selection) and c.over_selection >= 0):
            raise ConfigError(f"clients.over_selection: expected a number >= 0, got {c.over_selection}")

    def _validate_local(self) -> None:
        lc = self.local
        _int_at_least("local.epochs", lc.epochs, 1)
        if lc.steps is not None:
            _int_at_least("local.steps", lc.steps, 1)
        _int_at_least("local.batch_size", lc.batch_size, 1)
        _positive("local.lr", lc.lr)
        _choice("local.optimizer", lc.optimizer, OPTIMIZERS)
        if lc.weight_decay < 0:
            raise ConfigError(f"local.weight_decay: expected >= 0, got {lc.weight_decay}")
        if not 0 <= lc.momentum < 1:
            raise ConfigError(f"local.momentum: expected a number in [0, 1), got {lc.momentum}")


PROBE_MIN_BLOCKS, PROBE_MAX_BLOCKS = 2, 64
NAME_MAX = 255  # bytes in one file or folder name (ext4, xfs, btrfs, APFS, NTFS in UTF-16 units)
# The partition fields that only some kinds use: a mapping that sets one must name its kind.
_PARTITION_KIND_FIELDS = {"alpha": "dirichlet", "min_size": "dirichlet", "classes_per_client": "pathological"}


def make_run_strategy(config: "RunConfig", num_blocks: int, tier_capacities: tuple[int, ...],
                      population: np.ndarray | None = None) -> AllocationStrategy:
    """``config``'s allocation strategy for a model of ``num_blocks`` blocks whose tiers have
    ``tier_capacities`` and, when given, checked against the ``population``'s capacities (int
    ``[num_clients]``: e.g. Exclusive with no full-capacity client would never train anyone); a bad
    option or tier setting raises ``ConfigError`` naming the config field."""
    context = AllocationContext(num_blocks, tier_capacities, lora_rank=config.model.rank)
    try:
        strategy = make_strategy(config.strategy.name, context, config.strategy.options)
        if population is not None:
            strategy.check_population(population)
        return strategy
    except (TypeError, ValueError) as err:
        message = str(err)
        for inner, outer in (("tier_capacities:", "tiers.fractions:"), ("lora_rank:", "model.rank:"),
                             ("population:", "tiers.shares:")):
            if message.startswith(inner):
                raise ConfigError(outer + message[len(inner):]) from None
        raise ConfigError(f"strategy.options.{message}") from None


def _strategy_or_none(config: "RunConfig", num_blocks: int,
                      tier_capacities: tuple[int, ...]) -> AllocationStrategy | None:
    try:
        return make_run_strategy(config, num_blocks, tier_capacities)
    except ConfigError:
        return None


def _int_at_least(name: str, value: int, low: int) -> None:
    if value < low:
        raise ConfigError(f"{name}: expected an int >= {low}, got {value}")


def _at_least_zero(name: str, value: float) -> None:
    if not (math.isfinite(value) and value >= 0):
        raise ConfigError(f"{name}: expected a finite number >= 0, got {value}")


def _positive(name: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"{name}: expected a finite number > 0, got {value}")


def _choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ConfigError(f"{name}: expected one of {tuple(choices)}, got {value!r}")


def _coerce(name: str, hint: Any, value: Any) -> Any:
    """``value`` checked (and, for numbers, converted) against the type ``hint``."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(name, option, value)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{name}: expected {_describe(hint)}, got {value!r}")
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, name + ".")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}: expected a list, got {value!r}")
        (item,) = typing.get_args(hint)
        return [_coerce(f"{name}[{i}]", item, v) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{name}: expected a mapping, got {value!r}")
        return dict(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name}: expected an int, got {value!r}")
        return value
    if hint is float:
        # PyYAML reads 1e-3 (no dot) as a string; accept any string float() understands.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name}: expected a string, got {value!r}")
        return value
    raise TypeError(f"hint: unsupported config field type {hint!r}")


def _describe(hint: Any) -> str:
    return " or ".join("null" if a is type(None) else getattr(a, "__name__", str(a)) for a in typing.get_args(hint))


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(raw) - set(names))
    if unknown:
        raise ConfigError(f"{prefix}{unknown[0]}: unknown field; expected one of {names}")
    if cls is PartitionConfig and "kind" not in raw:
        # {alpha: 0.1} alone would be an IID partition that never reads alpha.
        used = [name for name in _PARTITION_KIND_FIELDS if name in raw]
        if used:
            raise ConfigError(f"{prefix}kind: required when {prefix}{used[0]} is set (a field of "
                              f"kind: {_PARTITION_KIND_FIELDS[used[0]]}); without it the partition is iid")
    return cls(**{key: _coerce(prefix + key, hints[key], value) for key, value in raw.items()})


def apply_overrides(raw: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` overrides (values parsed as YAML) to a copy of nested mappings.

    Example: ``["rounds=5", "strategy.options.warmup=2", "tiers.fractions=[0.5, 1]"]``.

    Strategy options belong to their strategy: an override that changes ``strategy.name`` starts
    the new strategy from its default options, keeping only options that the overrides set
    (``--set strategy.name=fedra`` on a Fed-HeLLo config does not hand Fed-HeLLo's ``pattern`` to FedRA).
    """
    result = _deep_copy(raw)
    base_strategy = result.get("strategy") if isinstance(result.get("strategy"), Mapping) else {}
    base_name = base_strategy.get("name", StrategyConfig.name)
    options_set: dict[str, Any] = {}  # strategy.options set by the overrides, in order
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"--set: expected key.sub=value, got {item!r}")
        node = result
        parts = key.split(".")
        for depth, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"{'.'.join(parts[:depth + 1])}: is not a mapping, cannot set {key!r}")
            node = child
        node[parts[-1]] = parse_override_value(key, text)
        if parts[:2] == ["strategy", "options"]:
            options_set = dict(node[parts[-1]] or {}) if len(parts) == 2 else {**options_set, parts[2]: None}
    strategy = result.get("strategy")
    if isinstance(strategy, dict) and strategy.get("name", StrategyConfig.name) != base_name:
        options = strategy.get("options") if isinstance(strategy.get("options"), dict) else {}
        strategy["options"] = {k: v for k, v in options.items() if k in options_set}
    return result


def parse_override_value(key: str, text: str) -> Any:
    """The value of ``--set key=text``: ``text`` read as YAML (a key given twice in it is refused)."""
    try:
        return safe_load_strict(text)
    except DuplicateKeyError as err:
        raise ConfigError(f"{key}.{err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{key}: cannot parse value {text!r} as YAML ({err})") from None


def _deep_copy(raw: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, Mapping) else v for k, v in raw.items()}


def load_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> RunConfig:
    """Read a YAML run config, apply ``--set`` overrides and validate."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config: {str(path)!r} is not a file")
    try:
        raw = safe_load_strict(path.read_text())
    except DuplicateKeyError as err:
        raise ConfigError(f"{err.key}: given twice in {str(path)!r} (lines {err.lines[0]} and {err.lines[1]}); "
                          "keep one") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"config: {str(path)!r} is not valid YAML ({err})") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"config: expected a mapping at the top of {str(path)!r}, got {type(raw).__name__}")
    return RunConfig.from_dict(apply_overrides(raw, overrides))


def save_config(config: RunConfig, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML (loading it back gives an equal config)."""
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
