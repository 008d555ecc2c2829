"""Client capacity tiers: how many of the model's L blocks each client can afford to train.

A tier is a fraction of L (its capacity ``k = round(fraction * L)``, at least 1) and a share
of the population. The default is the paper's setting: tiers {L/2, 3L/4, L} at shares 1:1:1
(6/9/12 of 12 ViT blocks). Which client lands in which tier is a seeded random assignment,
never contiguous ids: with contiguous ids the tier would correlate with the data of partitions
that are themselves built in id order.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

__all__ = ["parse_fraction", "CapacityTiers", "ClientCapacities", "blocks_for_fraction"]


def parse_fraction(value: object, name: str = "fraction") -> float:
    """A number, or a string such as ``"3/4"`` or ``"0.75"``, as a float.

    Raises:
        ValueError: the value is neither a real number nor such a string.
    """
    if isinstance(value, bool):
        raise ValueError(f"{name}: expected a number or a string like '3/4', got {value!r}")
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, str):
        try:
            return float(Fraction(value.strip()))
        except (ValueError, ZeroDivisionError):
            pass
    raise ValueError(f"{name}: expected a number or a string like '3/4', got {value!r}")


def blocks_for_fraction(fraction: float, num_blocks: int) -> int:
    """``round(fraction * num_blocks)`` with halves rounded up, at least 1."""
    return max(1, math.floor(fraction * num_blocks + 0.5))


@dataclass(frozen=True)
class ClientCapacities:
    """The tier and capacity of every client of a population.

    Attributes:
        tier: int64 ``[num_clients]``, each client's tier index (into the tiers' order).
        capacity: int64 ``[num_clients]``, ``k_c``: the number of blocks client c may train.
        tier_capacities: ``k`` of each tier, in the tiers' order.
        num_blocks: L.
    """

    tier: np.ndarray
    capacity: np.ndarray
    tier_capacities: tuple[int, ...]
    num_blocks: int

    @property
    def num_clients(self) -> int:
        return int(self.tier.size)

    def of(self, clients: np.ndarray | list[int]) -> np.ndarray:
        """Capacities of the given client ids, int64 ``[len(clients)]``."""
        return self.capacity[np.asarray(clients, dtype=np.int64)]


@dataclass(frozen=True)
class CapacityTiers:
    """Capacity tiers as fractions of L with population shares.

    Attributes:
        fractions: each tier's capacity as a fraction of L, in (0, 1].
        shares: each tier's relative share of the clients (> 0; normalised, so 1:1:1 and
            6:3:1 are written ``(1, 1, 1)`` and ``(6, 3, 1)``).
    """

    fractions: tuple[float, ...] = (0.5, 0.75, 1.0)
    shares: tuple[float, ...] = (1.0, 1.0, 1.0)

    def __post_init__(self) -> None:
        fractions = tuple(parse_fraction(f, "fractions") for f in self.fractions)
        shares = tuple(parse_fraction(s, "shares") for s in self.shares)
        if not fractions:
            raise ValueError("fractions: expected at least one tier, got none")
        for f in fractions:
            if not (0 < f <= 1):
                raise ValueError(f"fractions: a tier's capacity must be in (0, 1] of L (a client cannot train more "
                                 f"than all L blocks), got {f}")
        if len(shares) != len(fractions):
            raise ValueError(f"shares: expected one share per tier ({len(fractions)}), got {len(shares)}")
        for s in shares:
            if not (math.isfinite(s) and s > 0):
                raise ValueError(f"shares: expected finite numbers > 0, got {s}")
        object.__setattr__(self, "fractions", fractions)
        object.__setattr__(self, "shares", shares)

    def capacities(self, num_blocks: int) -> tuple[int, ...]:
        """``k`` of each tier for a model with ``num_blocks`` blocks."""
        if isinstance(num_blocks, bool) or not isinstance(num_blocks, (int, np.integer)) or num_blocks < 1:
            raise ValueError(f"num_blocks: expected an int >= 1, got {num_blocks!r}")
        return tuple(blocks_for_fraction(f, int(num_blocks)) for f in self.fractions)

    def tier_sizes(self, num_clients: int) -> np.ndarray:
        """Clients per tier, int64 ``[num_tiers]`` summing to ``num_clients``.

        Largest-remainder rounding of ``num_clients * share / sum(shares)``; ties go to the
        earlier tier.
        """
        if isinstance(num_clients, bool) or not isinstance(num_clients, (int, np.integer)) or num_clients < 1:
            raise ValueError(f"num_clients: expected an int >= 1, got {num_clients!r}")
        exact = np.asarray(self.shares) / sum(self.shares) * num_clients
        sizes = np.floor(exact).astype(np.int64)
        remainder = exact - sizes
        order = np.argsort(-remainder, kind="stable")
        sizes[order[: num_clients - int(sizes.sum())]] += 1
        return sizes

    def assign(self, num_clients: int, num_blocks: int, seed: int | np.random.Generator = 0) -> ClientCapacities:
        """Assign every client to a tier at random (seeded) with the tiers' shares.

        Returns:
            the tier and capacity of clients ``0 .. num_clients-1``.
        """
        rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
        caps = self.capacities(num_blocks)
        sizes = self.tier_sizes(num_clients)
        tier = rng.permutation(np.repeat(np.arange(len(sizes), dtype=np.int64), sizes))
        capacity = np.asarray(caps, dtype=np.int64)[tier]
        return ClientCapacities(tier=tier, capacity=capacity, tier_capacities=caps, num_blocks=int(num_blocks))
