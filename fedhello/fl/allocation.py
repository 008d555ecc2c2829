"""Heterogeneous LoRA allocation (HLA): which blocks each client of a round trains.

The strategies live in ``fedhello.fl.strategies``, one module per family: the ``Allocation``
interface, ``AllocationStrategy`` and the registry (``make_strategy(name, context, options)``) in
``base``, the geometric patterns and RGD probabilities in ``patterns``, the baselines in
``baselines``, GD-HLA and RGD-HLA in ``geometric``, FIM-HLA and Fed-HeLLo in ``fisher_guided``.
This module re-exports their public names; the rest of fedhello imports them from here.
"""

# Re-export: exactly the public names of fedhello.fl.strategies.
from .strategies import *  # noqa: F403
from .strategies import __all__  # noqa: F401
