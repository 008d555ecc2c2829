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

Modules: ``sections`` (one dataclass per section), ``run`` (``RunConfig``), ``validation`` (its
checks and ``make_run_strategy``), ``build`` (typed construction from mappings), ``loading``
(YAML files and overrides), ``checks`` (``ConfigError`` and the field checks). Every public name
is importable from ``fedhello.config``.
"""

from __future__ import annotations

from fedhello.errors import require_extra

require_extra("fl", "fedhello.config")  # before yaml: without the extra, one line that names it

# Only light modules below (no torch, datasets, transformers): a bad config is reported in well
# under a second, before the CLI imports the training stack.
from fedhello.config.checks import ConfigError  # noqa: E402
from fedhello.config.loading import apply_overrides, load_config, parse_override_value, save_config  # noqa: E402
from fedhello.config.run import RunConfig  # noqa: E402
from fedhello.config.sections import (AdaptiveClipConfig, AggregationConfig, ClientsConfig, DataConfig,  # noqa: E402
                                      EngineConfig, FisherConfig, LocalConfig, ModelConfig, PartitionConfig,
                                      PrivacyConfig, StrategyConfig, TierConfig)
from fedhello.config.validation import make_run_strategy  # noqa: E402

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
    "make_run_strategy",
]
