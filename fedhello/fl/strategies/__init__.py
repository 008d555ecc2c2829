"""Allocation strategies (heterogeneous LoRA allocation: which blocks each client trains), one module per family.

* ``base``: ``Allocation``, ``AllocationContext``, ``AllocationStrategy`` and the registry;
* ``patterns``: geometric block sets (GD), strided sets and RGD probabilities;
* ``baselines``: Full, Exclusive, Straggler, FedRA, HetLoRA;
* ``geometric``: GD-HLA and RGD-HLA;
* ``fisher_guided``: FIM-HLA and Fed-HeLLo.

Importing the package registers every strategy.
"""

from .base import (Allocation, AllocationContext, AllocationStrategy, available_strategies, make_strategy,
                   register_strategy, strategy_options)
from .baselines import ExclusiveStrategy, FedRAStrategy, FullStrategy, HetLoRAStrategy, StragglerStrategy
from .fisher_guided import COMBINES, FISHER_SOURCES, SCHEDULES, FedHeLLoStrategy, FIMStrategy
from .geometric import GDStrategy, RGDStrategy
from .patterns import PATTERNS, gd_blocks, pattern_order, rgd_probabilities, sample_blocks, strided_blocks

__all__ = [
    "PATTERNS",
    "FISHER_SOURCES",
    "SCHEDULES",
    "COMBINES",
    "pattern_order",
    "gd_blocks",
    "strided_blocks",
    "rgd_probabilities",
    "sample_blocks",
    "Allocation",
    "AllocationContext",
    "AllocationStrategy",
    "FullStrategy",
    "ExclusiveStrategy",
    "StragglerStrategy",
    "FedRAStrategy",
    "HetLoRAStrategy",
    "GDStrategy",
    "RGDStrategy",
    "FIMStrategy",
    "FedHeLLoStrategy",
    "register_strategy",
    "available_strategies",
    "strategy_options",
    "make_strategy",
]
