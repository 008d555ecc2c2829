"""Run configs from and to YAML files, with ``--set key=value`` overrides."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from fedhello.config.checks import ConfigError
from fedhello.config.run import RunConfig
from fedhello.config.sections import StrategyConfig
from fedhello.yaml_io import DuplicateKeyError, safe_load_strict

__all__ = ["apply_overrides", "parse_override_value", "load_config", "save_config"]


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
