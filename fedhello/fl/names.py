"""Names a run config chooses among, kept free of torch and datasets.

``fedhello.config`` checks these choices before anything heavy is imported, so a wrong field
is reported in well under a second; the modules that implement them import them from here.
"""

from __future__ import annotations

__all__ = ["PARTITION_KINDS", "RANK_NORMALIZATIONS", "WEIGHTINGS"]

WEIGHTINGS = ("samples", "uniform")
RANK_NORMALIZATIONS = ("all", "covering")
PARTITION_KINDS = ("iid", "dirichlet", "pathological")
