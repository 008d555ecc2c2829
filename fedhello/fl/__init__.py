"""Federated layer: partitions, capacity tiers, allocation strategies, Fisher scores, aggregation.

The engine (``fedhello.fl.engine``) and the optimizers (``fedhello.fl.optim``) are imported
from their modules directly: they need the model layer, these building blocks do not.
"""

from .aggregation import ClientUpdate, aggregate_layerwise, aggregate_rank_padded, lora_rank_dims
from .allocation import (
    PATTERNS,
    Allocation,
    AllocationContext,
    AllocationStrategy,
    available_strategies,
    gd_blocks,
    make_strategy,
    register_strategy,
    rgd_probabilities,
    sample_blocks,
    strategy_options,
)
from .capacity import CapacityTiers, ClientCapacities
from .fisher import FisherTracker, fisher_probabilities, kmeans_1d
from .partition import PARTITION_KINDS, label_counts, partition_dataset, partition_labels

__all__ = [
    "ClientUpdate",
    "aggregate_layerwise",
    "aggregate_rank_padded",
    "lora_rank_dims",
    "PATTERNS",
    "Allocation",
    "AllocationContext",
    "AllocationStrategy",
    "available_strategies",
    "gd_blocks",
    "make_strategy",
    "register_strategy",
    "rgd_probabilities",
    "sample_blocks",
    "strategy_options",
    "CapacityTiers",
    "ClientCapacities",
    "FisherTracker",
    "fisher_probabilities",
    "kmeans_1d",
    "PARTITION_KINDS",
    "label_counts",
    "partition_dataset",
    "partition_labels",
]
