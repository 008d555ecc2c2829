"""Geometric block sets and RGD probabilities.

Geometric patterns (GD-HLA). A pattern is a priority order over the L blocks and a client of
capacity k trains the first k blocks of it, so the sets of the tiers are nested:

* ``bottleneck``: ends inward, ``0, L-1, 1, L-2, ...`` (the paper's pattern; for L = 12 and
  k = 6/9/12: {0,1,2,9,10,11}, {0-4, 8-11}, all blocks — as in the released code);
* ``triangle``: ``0, 1, ..., L-1`` (the k shallowest blocks);
* ``inverted_triangle``: ``L-1, ..., 0`` (the k deepest blocks);
* ``uniform``: no common order; the client at cohort position i of n takes k consecutive
  blocks (cyclically) from offset ``floor(i * L / n)``, spreading training evenly over depth.

The paper's own definitions of Triangle, Inverted Triangle and Uniform were not available;
these three are ours.

RGD-HLA turns a pattern into probabilities ``p_l = c_l / sum(c)``, where ``c_l`` counts the
tiers whose GD set contains block l (``uniform``: 1/L), and every client draws its ``k_c``
blocks from p without replacement (successive sampling, ``Generator.choice``).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .base import _check_choice, _check_int

__all__ = ["PATTERNS", "pattern_order", "gd_blocks", "strided_blocks", "rgd_probabilities", "sample_blocks"]

PATTERNS = ("triangle", "inverted_triangle", "bottleneck", "uniform")


def pattern_order(pattern: str, num_blocks: int) -> np.ndarray:
    """Priority order of a nested pattern: int64 ``[L]``, most important block first.

    Defined for ``triangle``, ``inverted_triangle`` and ``bottleneck``; ``uniform`` has no
    common order (see ``gd_blocks``).
    """
    L = _check_int("num_blocks", num_blocks, 1)
    if pattern == "triangle":
        return np.arange(L, dtype=np.int64)
    if pattern == "inverted_triangle":
        return np.arange(L - 1, -1, -1, dtype=np.int64)
    if pattern == "bottleneck":
        order = np.empty(L, dtype=np.int64)
        order[0::2] = np.arange((L + 1) // 2)
        order[1::2] = np.arange(L - 1, (L + 1) // 2 - 1, -1)
        return order
    if pattern == "uniform":
        raise ValueError("pattern: 'uniform' has no common priority order; use gd_blocks with an offset")
    raise ValueError(f"pattern: expected one of {PATTERNS}, got {pattern!r}")


def gd_blocks(pattern: str, num_blocks: int, capacity: int, offset: int = 0) -> np.ndarray:
    """The GD-HLA set of a client: sorted int64 ``[capacity]`` block ids.

    ``offset`` is the window start of the ``uniform`` pattern and is ignored by the others.
    """
    L = _check_int("num_blocks", num_blocks, 1)
    k = _check_int("capacity", capacity, 1, L)
    if pattern == "uniform":
        return np.sort((offset + np.arange(k, dtype=np.int64)) % L)
    return np.sort(pattern_order(pattern, L)[:k])


def strided_blocks(num_blocks: int, capacity: int) -> np.ndarray:
    """``capacity`` blocks evenly spaced over depth: ``floor(i * L / k)`` for ``i < k``, int64 ``[k]``.

    6 of 12 gives ``[0, 2, 4, 6, 8, 10]``, the set every client is allotted in the released
    Straggler runs of Fed-HeLLo (whose name-match freeze then leaves block 10 untrained:
    ``fedhello.fl.released``).
    """
    L = _check_int("num_blocks", num_blocks, 1)
    k = _check_int("capacity", capacity, 1, L)
    return (np.arange(k, dtype=np.int64) * L) // k


def _uniform_offsets(n: int, num_blocks: int) -> np.ndarray:
    return (np.arange(n, dtype=np.int64) * num_blocks) // max(n, 1)


def rgd_probabilities(pattern: str, num_blocks: int, tier_capacities: Sequence[int]) -> np.ndarray:
    """RGD-HLA block probabilities, float64 ``[L]`` summing to 1.

    ``p_l = c_l / sum(c)`` with ``c_l`` the number of tiers whose GD set contains block l;
    ``uniform`` gives 1/L. Bottleneck at 6/9/12 of 12: ``[3,3,3,2,2,1,1,1,2,3,3,3] / 27``.
    """
    L = _check_int("num_blocks", num_blocks, 1)
    _check_choice("pattern", pattern, PATTERNS)
    if pattern == "uniform":
        return np.full(L, 1.0 / L)
    if len(tier_capacities) == 0:
        raise ValueError("tier_capacities: expected at least one tier, got none")
    counts = np.zeros(L)
    for k in tier_capacities:
        counts[gd_blocks(pattern, L, k)] += 1
    return counts / counts.sum()


def sample_blocks(probabilities: np.ndarray, capacity: int, rng: np.random.Generator) -> np.ndarray:
    """Draw ``capacity`` distinct blocks from ``probabilities`` without replacement.

    Successive sampling (each draw from the remaining blocks, renormalised). If fewer blocks
    than ``capacity`` have a positive probability, all of them are taken and the rest is drawn
    uniformly from the zero-probability blocks, so the client's capacity is always met.

    Returns:
        sorted int64 ``[capacity]``.
    """
    p = np.asarray(probabilities, dtype=np.float64)
    k = _check_int("capacity", capacity, 0, p.size)
    positive = np.flatnonzero(p > 0)
    if positive.size >= k:
        return np.sort(rng.choice(p.size, size=k, replace=False, p=p / p.sum()))
    zero = np.flatnonzero(p <= 0)
    return np.sort(np.concatenate([positive, rng.choice(zero, size=k - positive.size, replace=False)]))
