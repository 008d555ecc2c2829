"""GD-HLA and RGD-HLA: a geometric pattern, deterministic or as block probabilities."""

from __future__ import annotations

import numpy as np

from .base import Allocation, AllocationContext, AllocationStrategy, _allocation, _check_choice, register_strategy
from .patterns import PATTERNS, _uniform_offsets, gd_blocks, rgd_probabilities, sample_blocks

__all__ = ["GDStrategy", "RGDStrategy"]


@register_strategy
class GDStrategy(AllocationStrategy):
    """GD-HLA: each client trains the first ``k_c`` blocks of a geometric ``pattern`` (deterministic).

    Args:
        pattern: ``bottleneck`` (default), ``triangle``, ``inverted_triangle`` or ``uniform``
            (see the module docstring; the last three are our definitions).
    """

    name = "gd"

    def __init__(self, context: AllocationContext, *, pattern: str = "bottleneck") -> None:
        super().__init__(context)
        self.pattern = _check_choice("pattern", pattern, PATTERNS)

    def _allocate(self, round_idx: int, cohort: np.ndarray, capacities: np.ndarray,
                  rng: np.random.Generator) -> Allocation:
        offsets = _uniform_offsets(cohort.size, self.num_blocks)
        return _allocation(self.num_blocks, [gd_blocks(self.pattern, self.num_blocks, int(k), int(o))
                                             for k, o in zip(capacities, offsets)])


@register_strategy
class RGDStrategy(AllocationStrategy):
    """RGD-HLA: each client draws ``k_c`` blocks without replacement from the pattern's probabilities.

    Args:
        pattern: as for GD (default ``bottleneck``).
    """

    name = "rgd"

    def __init__(self, context: AllocationContext, *, pattern: str = "bottleneck") -> None:
        super().__init__(context)
        self.pattern = _check_choice("pattern", pattern, PATTERNS)
        self.probabilities = rgd_probabilities(self.pattern, self.num_blocks, context.tier_capacities)

    def _allocate(self, round_idx: int, cohort: np.ndarray, capacities: np.ndarray,
                  rng: np.random.Generator) -> Allocation:
        p = self.probabilities
        return _allocation(self.num_blocks, [sample_blocks(p, int(k), rng) for k in capacities], probabilities=p)
