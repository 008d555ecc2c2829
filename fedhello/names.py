"""Names a run config chooses among, kept free of torch and datasets (config, fl and nn share them).

``fedhello.config`` checks these choices before anything heavy is imported, so a wrong field
is reported in well under a second; the modules that implement them import them from here.
"""

from __future__ import annotations

__all__ = ["FISHER_ESTIMATORS", "HEADS", "PARTITION_KINDS", "RANK_NORMALIZATIONS", "RANK_SCALINGS", "WEIGHTINGS"]

WEIGHTINGS = ("samples", "uniform", "norm")
RANK_NORMALIZATIONS = ("all", "covering", "factors")
# What aggregation does with the classification heads: average them over the participants, or
# keep the initial head for the whole run (a reproduction of the paper's released code, which
# sends back LoRA tensors only).
HEADS = ("average", "keep_initial")
# How the server estimates proxy-set Fisher scores: from the loss of every proxy sample, or as the
# released code does (``fedhello.fl.released.released_proxy_fisher``; a reproduction).
FISHER_ESTIMATORS = ("standard", "released")
PARTITION_KINDS = ("iid", "dirichlet", "pathological")
# LoRA scale of client c: alpha / r_c ("client", as PEFT) or alpha / r_max for every client ("max").
RANK_SCALINGS = ("client", "max")
