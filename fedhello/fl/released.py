"""Reproductions of the paper's released code where it departs from the paper's text.

They exist for one purpose: to measure how much these departures change a comparison (the
ablation in docs/results.md). None of them is a recommended setting, and each is off by default.

``released_frozen_blocks``: the released local training gives learning rate 0 to every parameter
whose name contains the *string* of a block the client was not allotted. The block index is the
only number in the names of its LoRA parameters (``...encoder.layer.10.attention...``), so
block ``b`` is frozen whenever the decimal string of some unallotted block is a substring of
``str(b)``: at 12 blocks, block 10 whenever block 0 or 1 is missing and block 11 whenever block 1
is. A frozen block is still sent back (an exact-zero delta) and still counted in the average.
"""

from __future__ import annotations

import numpy as np

__all__ = ["released_frozen_blocks"]


def released_frozen_blocks(allotted: np.ndarray) -> np.ndarray:
    """The allotted blocks the released code's name match freezes.

    Args:
        allotted: bool ``[L]`` (one client) or ``[L, n]`` (a cohort, one column per client).

    Returns:
        bool, the shape of ``allotted``: True where a block is allotted but some unallotted block
        ``u`` has ``str(u) in str(b)``.
    """
    mask = np.asarray(allotted)
    if mask.dtype != bool or mask.ndim not in (1, 2) or mask.shape[0] < 1:
        raise ValueError(f"allotted: expected a bool [L] or [L, n] mask, got {mask.dtype} of shape {mask.shape}")
    columns = mask.reshape(mask.shape[0], -1)
    frozen = np.zeros_like(columns)
    names = [str(b) for b in range(mask.shape[0])]
    for j in range(columns.shape[1]):
        missing = [names[u] for u in np.flatnonzero(~columns[:, j])]
        for b in np.flatnonzero(columns[:, j]):
            frozen[b, j] = any(u in names[b] for u in missing)
    return frozen.reshape(mask.shape)
