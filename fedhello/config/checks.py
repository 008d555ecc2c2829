"""The config's error class and the field checks every section's validation uses."""

from __future__ import annotations

import math
from typing import Sequence

from fedhello.errors import UserError

__all__ = ["ConfigError", "int_at_least", "at_least_zero", "positive", "choice"]


class ConfigError(UserError):
    """An invalid run configuration; the message starts with the field's dotted name."""


def int_at_least(name: str, value: int, low: int) -> None:
    if value < low:
        raise ConfigError(f"{name}: expected an int >= {low}, got {value}")


def at_least_zero(name: str, value: float) -> None:
    if not (math.isfinite(value) and value >= 0):
        raise ConfigError(f"{name}: expected a finite number >= 0, got {value}")


def positive(name: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"{name}: expected a finite number > 0, got {value}")


def choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ConfigError(f"{name}: expected one of {tuple(choices)}, got {value!r}")
