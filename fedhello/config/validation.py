"""Validation of a whole run config: ``RunConfigChecks``, the checks ``RunConfig.validate`` runs, and
``make_run_strategy``, the run's allocation strategy (checked again once the model's depth is known).

Every check raises ``ConfigError`` whose message starts with the dotted name of the field. The
checks read the config's fields only; ``RunConfig`` (``fedhello.config.run``) inherits them.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from fedhello.config.checks import ConfigError, at_least_zero, choice, int_at_least, positive
from fedhello.config.sections import ENGINE_DTYPES, ENGINES, OPTIMIZERS, TASKS
from fedhello.data.sources import BUILTIN_DATASETS, LOCAL_FORMATS
from fedhello.errors import UserError
from fedhello.fl.capacity import CapacityTiers
from fedhello.fl.strategies import (AllocationContext, AllocationStrategy, HetLoRAStrategy, available_strategies,
                                   make_strategy)
from fedhello.fl.tracking import check_report_to
from fedhello.names import FISHER_ESTIMATORS, HEADS, PARTITION_KINDS, RANK_NORMALIZATIONS, RANK_SCALINGS, WEIGHTINGS
from fedhello.quantization import QUANTIZATIONS

__all__ = ["RunConfigChecks", "make_run_strategy", "PROBE_MIN_BLOCKS", "PROBE_MAX_BLOCKS", "NAME_MAX"]

PROBE_MIN_BLOCKS, PROBE_MAX_BLOCKS = 2, 64
NAME_MAX = 255  # bytes in one file or folder name (ext4, xfs, btrfs, APFS, NTFS in UTF-16 units)


class RunConfigChecks:
    """The field checks of ``RunConfig`` (its base class): ``_validate_fields`` runs them all."""

    def _validate_fields(self) -> None:
        int_at_least("seed", self.seed, 0)
        choice("task", self.task, TASKS)
        self._validate_model()
        self._validate_data()
        try:
            tiers = self.tiers.tiers()
        except ValueError as err:
            raise ConfigError(f"tiers.{err}") from None
        strategy = self._validate_strategy(tiers)
        choice("aggregation.weighting", self.aggregation.weighting, WEIGHTINGS)
        choice("aggregation.rank_normalize", self.aggregation.rank_normalize, RANK_NORMALIZATIONS)
        choice("aggregation.heads", self.aggregation.heads, HEADS)
        int_at_least("rounds", self.rounds, 1)
        int_at_least("cohort_size", self.cohort_size, 1)
        if self.cohort_size > self.data.num_clients:
            raise ConfigError(f"cohort_size: expected <= data.num_clients ({self.data.num_clients}), "
                              f"got {self.cohort_size}")
        self._validate_clients()
        self._validate_local()
        choice("engine.kind", self.engine.kind, ENGINES)
        if isinstance(self.engine.parallel, str):
            choice("engine.parallel", self.engine.parallel, ("auto",))
        elif self.engine.parallel is not None:
            int_at_least("engine.parallel", self.engine.parallel, 1)
        choice("engine.dtype", self.engine.dtype, ENGINE_DTYPES)
        if not self.engine.device:
            raise ConfigError("engine.device: expected 'auto' or a torch device string, got ''")
        int_at_least("engine.eval_batch_size", self.engine.eval_batch_size, 1)
        int_at_least("eval_every", self.eval_every, 1)
        int_at_least("checkpoint_every", self.checkpoint_every, 0)
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

    def _validate_model(self) -> None:
        m = self.model
        if not m.name:
            raise ConfigError("model.name: required (a Hub id, a local folder or a fedhello.models alias)")
        if m.target_modules is not None and (not m.target_modules or not all(m.target_modules)):
            raise ConfigError(f"model.target_modules: expected a non-empty list of module names or null, "
                              f"got {m.target_modules}")
        int_at_least("model.rank", m.rank, 1)
        positive("model.alpha", m.alpha)
        if not 0 <= m.dropout < 1:
            raise ConfigError(f"model.dropout: expected a probability in [0, 1), got {m.dropout}")
        choice("model.rank_scaling", m.rank_scaling, RANK_SCALINGS)
        choice("model.quantize", m.quantize, QUANTIZATIONS)
        choice("model.compute_dtype", m.compute_dtype, ENGINE_DTYPES)
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
            int_at_least("data.max_samples", d.max_samples, d.num_clients)
        int_at_least("data.max_length", d.max_length, 1)
        int_at_least("data.num_clients", d.num_clients, 1)
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
        choice("data.partition.kind", p.kind, PARTITION_KINDS)
        positive("data.partition.alpha", p.alpha)
        int_at_least("data.partition.classes_per_client", p.classes_per_client, 1)
        int_at_least("data.partition.min_size", p.min_size, 1)  # a client without samples cannot train

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
            int_at_least("data.max_chunks", d.max_chunks, 1)
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
        choice("fisher.estimator", self.fisher.estimator, FISHER_ESTIMATORS)
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
            at_least_zero("privacy.noise_multiplier", p.noise_multiplier)
        else:
            positive("privacy.target_epsilon", p.target_epsilon)
        if p.clip_norm is None:
            raise ConfigError("privacy.clip_norm: required (the L2 bound of one client's update), got null")
        positive("privacy.clip_norm", p.clip_norm)
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
            positive("privacy.fisher_clip", p.fisher_clip)
            at_least_zero("privacy.fisher_noise_multiplier", p.fisher_noise_multiplier)
        if client_fisher and private and not (p.fisher_noise_multiplier or 0) > 0:
            raise ConfigError(f"privacy.fisher_noise_multiplier: strategy {self.strategy.name!r} allocates from "
                              "client-side Fisher scores, private data sent in the clear; set it > 0 (with "
                              "privacy.fisher_clip) or use strategy.options.fisher_source: proxy")
        a = p.adaptive_clip
        if a is not None:
            if not 0 < a.target_quantile < 1:
                raise ConfigError(f"privacy.adaptive_clip.target_quantile: expected a number in (0, 1), got "
                                  f"{a.target_quantile}")
            positive("privacy.adaptive_clip.learning_rate", a.learning_rate)
            if a.count_noise_multiplier is None:
                raise ConfigError("privacy.adaptive_clip.count_noise_multiplier: required (the noise on the count "
                                  "of clients within the clip; about cohort_size / 20), got null")
            (positive if private else at_least_zero)("privacy.adaptive_clip.count_noise_multiplier",
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
        int_at_least("local.epochs", lc.epochs, 1)
        if lc.steps is not None:
            int_at_least("local.steps", lc.steps, 1)
        int_at_least("local.batch_size", lc.batch_size, 1)
        positive("local.lr", lc.lr)
        choice("local.optimizer", lc.optimizer, OPTIMIZERS)
        if lc.weight_decay < 0:
            raise ConfigError(f"local.weight_decay: expected >= 0, got {lc.weight_decay}")
        if not 0 <= lc.momentum < 1:
            raise ConfigError(f"local.momentum: expected a number in [0, 1), got {lc.momentum}")


def make_run_strategy(config: RunConfigChecks, num_blocks: int, tier_capacities: tuple[int, ...],
                      population: np.ndarray | None = None) -> AllocationStrategy:
    """``config``'s (a ``RunConfig``) allocation strategy for a model of ``num_blocks`` blocks whose tiers have
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


def _strategy_or_none(config: RunConfigChecks, num_blocks: int,
                      tier_capacities: tuple[int, ...]) -> AllocationStrategy | None:
    try:
        return make_run_strategy(config, num_blocks, tier_capacities)
    except ConfigError:
        return None
