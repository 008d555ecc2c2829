"""``RunConfig``: a whole run's configuration, its sections, and the checks it runs on itself."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

from fedhello.config.build import build
from fedhello.config.checks import ConfigError
from fedhello.config.sections import (AggregationConfig, ClientsConfig, DataConfig, EngineConfig, FisherConfig,
                                      LocalConfig, ModelConfig, PrivacyConfig, StrategyConfig, TierConfig)
from fedhello.config.validation import RunConfigChecks
from fedhello.data.sources import check_data_source
from fedhello.errors import UserError
from fedhello.fl.capacity import CapacityTiers
from fedhello.fl.tracking import check_installed, check_report_to
from fedhello.quantization import require_bitsandbytes
from fedhello.seeds import purpose_seed

__all__ = ["RunConfig"]


@dataclass
class RunConfig(RunConfigChecks):
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
        config = build(cls, raw, "")
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
