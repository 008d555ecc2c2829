"""Typed construction of config dataclasses from nested mappings (parsed YAML).

``build(cls, raw, prefix)`` checks every key of ``raw`` against the fields of ``cls`` and each value
against the field's type hint (ints stay ints, YAML strings like ``1e-3`` become floats, nested
sections recurse); a problem raises ``ConfigError`` naming the dotted field.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Mapping

from fedhello.config.checks import ConfigError
from fedhello.config.sections import PartitionConfig

__all__ = ["build"]

# The partition fields that only some kinds use: a mapping that sets one must name its kind.
_PARTITION_KIND_FIELDS = {"alpha": "dirichlet", "min_size": "dirichlet", "classes_per_client": "pathological"}


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
        return build(hint, value, name + ".")
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


def build(cls: type, raw: Any, prefix: str) -> Any:
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
