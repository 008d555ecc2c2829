"""Run config: YAML loading, --set overrides, round trip, and one test per validation error."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fedhello.config import ConfigError, RunConfig, apply_overrides, load_config, make_run_strategy, save_config
from fedhello.seeds import purpose_seed

BASE = {
    "seed": 3,
    "model": {"name": "minilm", "rank": 4, "alpha": 8},
    "data": {"name": "bbc_news", "num_clients": 10, "partition": {"kind": "dirichlet", "alpha": 0.5}},
    "strategy": {"name": "fedhello", "options": {"warmup": 5, "refresh": 5}},
    "rounds": 20,
    "cohort_size": 4,
    "local": {"lr": "1e-3", "batch_size": 8},
}


def _write(tmp_path, raw) -> str:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def test_load_with_defaults_overrides_and_round_trip(tmp_path):
    config = load_config(_write(tmp_path, BASE), ["rounds=7", "strategy.options.schedule=fork",
                                                  "tiers.fractions=['1/2', 1]", "tiers.shares=[2, 1]"])
    assert config.seed == 3 and config.rounds == 7 and config.cohort_size == 4
    assert config.model.rank == 4 and config.model.alpha == 8.0 and isinstance(config.model.alpha, float)
    assert config.local.lr == 1e-3  # PyYAML reads 1e-3 as a string; the float field accepts it
    assert config.local.optimizer == "adamw" and config.local.epochs == 1
    assert config.data.partition.kind == "dirichlet" and config.data.test_fraction == 0.2
    assert config.strategy.options == {"warmup": 5, "refresh": 5, "schedule": "fork"}
    assert config.capacity_tiers().capacities(12) == (6, 12)
    assert config.capacity_tiers().tier_sizes(9).tolist() == [6, 3]

    out = tmp_path / "resolved.yaml"
    save_config(config, out)
    assert load_config(out) == config


def test_apply_overrides_copies_and_creates_nested_keys():
    raw = {"data": {"partition": {"kind": "iid"}}}
    result = apply_overrides(raw, ["data.partition.alpha=0.1", "strategy.options.weights=[1, 2, 4]",
                                   "engine.parallel="])
    assert raw == {"data": {"partition": {"kind": "iid"}}}
    assert result["data"]["partition"] == {"kind": "iid", "alpha": 0.1}
    assert result["strategy"]["options"]["weights"] == [1, 2, 4]
    assert result["engine"]["parallel"] is None
    with pytest.raises(ConfigError, match="^--set"):
        apply_overrides(raw, ["rounds"])
    with pytest.raises(ConfigError, match="^data.partition.kind: is not a mapping"):
        apply_overrides(raw, ["data.partition.kind.x=1"])


def test_seeds_are_stable_and_distinct():
    config = RunConfig.from_dict(BASE)
    assert config.seed_for("partition") == purpose_seed(3, "partition")
    assert purpose_seed(3, "partition") != purpose_seed(3, "split") != purpose_seed(4, "split")
    assert purpose_seed(3, "split") == purpose_seed(3, "split")


def _with(path: str, value) -> dict:
    raw = apply_overrides(BASE, [])
    node = raw
    keys = path.split(".")
    for key in keys[:-1]:
        node = node.setdefault(key, {})
    node[keys[-1]] = value
    return raw


@pytest.mark.parametrize("path, value, field", [
    ("strategy.name", "greedy", "strategy.name"),
    ("tiers.fractions", [0.5, 1.5], "tiers.fractions"),
    ("tiers.fractions", [0.0, 1.0], "tiers.fractions"),
    ("tiers.shares", [1, 1], "tiers.shares"),
    ("data.partition.alpha", 0.0, "data.partition.alpha"),
    ("data.partition.alpha", -0.5, "data.partition.alpha"),
    ("data.partition.kind", "shards", "data.partition.kind"),
    ("cohort_size", 11, "cohort_size"),
    ("data.path", "/nonexistent/data.csv", "data.path"),
    ("data.name", None, "data.name"),
    ("data.test_fraction", 1.0, "data.test_fraction"),
    ("data.proxy_fraction", 0.9, "data.proxy_fraction"),
    ("data.num_clients", 0, "data.num_clients"),
    ("data.max_samples", 5, "data.max_samples"),
    ("data.colour", "red", "data.colour"),
    ("model.name", None, "model.name"),
    ("model.rank", 0, "model.rank"),
    ("model.alpha", "big", "model.alpha"),
    ("rounds", 2.5, "rounds"),
    ("rounds", 0, "rounds"),
    ("strategy.options", {"warmup": 5, "bogus": 1}, "strategy.options.bogus"),
    ("strategy.options", {"pattern": "diamond"}, "strategy.options.pattern"),
    ("strategy.options", {"warmup": -1}, "strategy.options.warmup"),
    ("local.optimizer", "adam", "local.optimizer"),
    ("local.lr", 0, "local.lr"),
    ("local.steps", 0, "local.steps"),
    ("engine.kind", "threads", "engine.kind"),
    ("aggregation.weighting", "batches", "aggregation.weighting"),
    ("eval_every", 0, "eval_every"),
    ("data.partition.min_size", 0, "data.partition.min_size"),
    ("data.text_column", "body", "data.text_column"),
    ("checkpoint_every", -1, "checkpoint_every"),
])
def test_each_config_error_names_its_field(path, value, field):
    with pytest.raises(ConfigError) as info:
        RunConfig.from_dict(_with(path, value))
    assert str(info.value).startswith(field + ":"), str(info.value)
    assert isinstance(info.value, ValueError)


def test_strategy_dependent_errors():
    raw = _with("strategy", {"name": "exclusive"})
    raw["tiers"] = {"fractions": [0.25, 0.5], "shares": [1, 1]}  # no tier is full at any depth
    with pytest.raises(ConfigError, match=r"^tiers\.fractions: exclusive needs a full-capacity tier.*no model depth"):
        RunConfig.from_dict(raw)
    # 0.92 of a block count rounds to all of them for L <= 6 (MiniLM) but not for L = 12: the
    # config is valid, the check waits for the model's depth.
    raw["tiers"] = {"fractions": [0.5, 0.92], "shares": [1, 1]}
    config = RunConfig.from_dict(raw)
    tiers = config.capacity_tiers()
    assert make_run_strategy(config, 6, tiers.capacities(6)).name == "exclusive"
    with pytest.raises(ConfigError, match=r"^tiers\.fractions: exclusive .*got capacities \(6, 11\) of L = 12"):
        make_run_strategy(config, 12, tiers.capacities(12))
    raw = _with("strategy", {"name": "fim", "options": {"fisher_source": "proxy"}})
    with pytest.raises(ConfigError, match=r"^data\.proxy_fraction"):
        RunConfig.from_dict(raw)
    raw["data"]["proxy_fraction"] = 0.05
    assert RunConfig.from_dict(raw).strategy.options["fisher_source"] == "proxy"


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="^config"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n- not a mapping\n")
    with pytest.raises(ConfigError, match="^config"):
        load_config(bad)
    local = tmp_path / "data.csv"
    local.write_text("text,label\nx,a\n")
    raw = _with("data", {"path": str(local), "num_clients": 10})
    assert RunConfig.from_dict(raw).data.path == str(local)
    raw["data"]["name"] = "some/hub-set"
    with pytest.raises(ConfigError, match=r"^data\.path"):
        RunConfig.from_dict(raw)


CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_every_shipped_run_config_is_valid(name):
    """Each run config in configs/ passes validation (sources are checked where they are used)."""
    config = load_config(CONFIGS / name)
    assert config.rounds >= 1 and config.model.name
