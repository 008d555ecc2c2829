"""Federated layer: capacity tiers, allocation strategies, Fisher scores, aggregation; ``run``
(``fedhello.fl.api``): a whole run over your own model and ``datasets.Dataset`` objects.

The engine (``fedhello.fl.engine``) is imported from its module directly: it needs the model
layer, these building blocks do not. Its masked optimizers are the model layer's
(``fedhello.nn.optim``).
``fedhello.fl.run`` (``fedhello.fl.api``) runs federated training over your own model and
``datasets.Dataset`` objects. Names load on first use, so ``fedhello.fl.strategies`` alone (what config validation needs)
does not import torch or datasets.
"""

from fedhello._lazy import lazy_exports
from fedhello.errors import require_extra

# The building blocks and the engine need the model layer only ([hf]), so benchmarks run them on
# machines without the federated layer's data stack; the server, the Python API and fedhello.data
# ask for [fl] when they are imported.
require_extra("hf", "fedhello.fl")

_EXPORTS = {
    **dict.fromkeys(["ClientUpdate", "aggregate_layerwise", "aggregate_rank_padded", "lora_rank_dims"],
                    "aggregation"),
    **dict.fromkeys(["PATTERNS", "Allocation", "AllocationContext", "AllocationStrategy", "available_strategies",
                     "gd_blocks", "make_strategy", "register_strategy", "rgd_probabilities", "sample_blocks",
                     "strategy_options"], "strategies"),
    **dict.fromkeys(["CapacityTiers", "ClientCapacities"], "capacity"),
    **dict.fromkeys(["FisherTracker", "fisher_probabilities", "kmeans_1d"], "fisher"),
    **dict.fromkeys(["run", "RunResult"], "api"),
}

__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
