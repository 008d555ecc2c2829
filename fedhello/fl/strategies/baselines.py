"""The baselines: Full, Exclusive, Straggler, FedRA and HetLoRA."""

from __future__ import annotations

import numpy as np

from .base import Allocation, AllocationContext, AllocationStrategy, _allocation, _check_choice, register_strategy
from .patterns import gd_blocks, strided_blocks

__all__ = ["FullStrategy", "ExclusiveStrategy", "StragglerStrategy", "FedRAStrategy", "HetLoRAStrategy"]


@register_strategy
class FullStrategy(AllocationStrategy):
    """Every client trains every block: the resource-ignoring upper bound (FedIT / FedAvg-LoRA)."""

    name = "full"
    respects_capacity = False

    def _allocate(self, round_idx: int, cohort: np.ndarray, capacities: np.ndarray,
                  rng: np.random.Generator) -> Allocation:
        return Allocation(np.ones((self.num_blocks, cohort.size), dtype=bool), np.ones(cohort.size, dtype=bool))


@register_strategy
class ExclusiveStrategy(AllocationStrategy):
    """Only full-capacity clients (``k_c = L``) take part, training every block; the others sit out."""

    name = "exclusive"

    def __init__(self, context: AllocationContext) -> None:
        super().__init__(context)
        if context.num_blocks not in context.tier_capacities:
            raise ValueError(f"tier_capacities: exclusive needs a full-capacity tier (a fraction that rounds to all "
                             f"L blocks), got capacities {context.tier_capacities} of L = {context.num_blocks}")

    def check_population(self, capacities: np.ndarray) -> None:
        if not (np.asarray(capacities) == self.num_blocks).any():
            raise ValueError(f"population: exclusive trains only full-capacity clients (k = L = {self.num_blocks}), "
                             f"and none of the {len(capacities)} clients is in a full-capacity tier; use more "
                             f"clients or a larger share for that tier")

    def _allocate(self, round_idx: int, cohort: np.ndarray, capacities: np.ndarray,
                  rng: np.random.Generator) -> Allocation:
        participating = capacities == self.num_blocks
        mask = np.zeros((self.num_blocks, cohort.size), dtype=bool)
        mask[:, participating] = True
        return Allocation(mask, participating)


@register_strategy
class StragglerStrategy(AllocationStrategy):
    """Every client trains the same ``k_min`` blocks, ``k_min`` being the smallest tier's capacity.

    Args:
        pattern: which ``k_min`` blocks: the GD set of a nested pattern (``bottleneck``, the
            default, ``triangle`` or ``inverted_triangle``), or ``strided``: evenly spaced over
            depth (``strided_blocks``; the released runs' ``[0, 2, ..., 10]`` for 6 of 12).
    """

    name = "straggler"

    def __init__(self, context: AllocationContext, *, pattern: str = "bottleneck") -> None:
        super().__init__(context)
        self.pattern = _check_choice("pattern", pattern, ("triangle", "inverted_triangle", "bottleneck", "strided"))
        self.capacity = min(context.tier_capacities)
        if self.pattern == "strided":
            self.blocks = strided_blocks(self.num_blocks, self.capacity)
        else:
            self.blocks = gd_blocks(self.pattern, self.num_blocks, self.capacity)

    def _allocate(self, round_idx: int, cohort: np.ndarray, capacities: np.ndarray,
                  rng: np.random.Generator) -> Allocation:
        if capacities.min() < self.capacity:
            raise ValueError(f"capacities: expected >= {self.capacity} (the smallest tier), got {capacities.tolist()}")
        return _allocation(self.num_blocks, [self.blocks] * cohort.size)


@register_strategy
class FedRAStrategy(AllocationStrategy):
    """FedRA: every round each client trains ``k_c`` blocks drawn uniformly at random."""

    name = "fedra"

    def _allocate(self, round_idx: int, cohort: np.ndarray, capacities: np.ndarray,
                  rng: np.random.Generator) -> Allocation:
        return _allocation(self.num_blocks, [np.sort(rng.choice(self.num_blocks, size=int(k), replace=False))
                                             for k in capacities])


@register_strategy
class HetLoRAStrategy(AllocationStrategy):
    """HetLoRA: every client trains every block at a LoRA rank proportional to its capacity.

    ``rank_c = max(1, round(lora_rank * k_c / L))``, so a client's adapter cost matches that of
    training ``k_c`` full-rank blocks. Aggregate with ``aggregate_rank_padded``.
    """

    name = "hetlora"
    respects_capacity = False

    def __init__(self, context: AllocationContext) -> None:
        super().__init__(context)
        if context.lora_rank is None:
            raise ValueError("lora_rank: hetlora needs the model's LoRA rank in the AllocationContext, got None")

    def ranks(self, capacities: np.ndarray) -> np.ndarray:
        """int64 ranks for capacities ``[n]``."""
        r = np.floor(self.context.lora_rank * np.asarray(capacities) / self.num_blocks + 0.5).astype(np.int64)
        return np.maximum(r, 1)

    def _allocate(self, round_idx: int, cohort: np.ndarray, capacities: np.ndarray,
                  rng: np.random.Generator) -> Allocation:
        return Allocation(np.ones((self.num_blocks, cohort.size), dtype=bool), np.ones(cohort.size, dtype=bool),
                          ranks=self.ranks(capacities))
