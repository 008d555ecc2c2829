"""Fisher-information block scores and the sampling probabilities built from them.

The score of block l is an empirical Fisher information: the squared norm of the loss
gradient with respect to the block's LoRA parameters, averaged over steps (or samples).
Two sources feed a ``FisherTracker``:

* client-side (default): with its update every client reports, for each block it trained,
  its accumulated squared gradient norm divided by its number of local steps. The server
  averages the reports of a round over the clients that trained the block and folds that mean
  into an exponential moving average over rounds; a block nobody trained keeps its last value.
* proxy-set: the server back-propagates a held-out labelled proxy set through every block and
  hands the per-block averages over *all* proxy samples to ``FisherTracker.set``.

Scores become probabilities by ranking blocks into groups with an exact 1-D k-means whose
clusters are ordered by centroid (the released code took sklearn's arbitrary cluster labels as
ranks) and weighting the groups 1:2:3 from least to most important, or proportionally.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

__all__ = ["kmeans_1d", "fisher_probabilities", "FisherTracker", "FISHER_MODES"]

FISHER_MODES = ("groups", "proportional")


def kmeans_1d(values: Sequence[float] | np.ndarray, num_groups: int) -> np.ndarray:
    """Globally optimal 1-D k-means, groups numbered by increasing centroid.

    Solved exactly by dynamic programming over the sorted distinct values (weighted by
    multiplicity), so equal values always share a group and the result has no random seed.
    When there are fewer distinct values than ``num_groups``, each distinct value is a group.

    Args:
        values: float ``[n]``, finite.
        num_groups: requested number of groups (>= 1).

    Returns:
        int64 ``[n]``: the group of each value, 0 for the lowest centroid.
    """
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"values: expected a non-empty 1-D array, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError("values: expected finite numbers, got NaN or inf")
    if isinstance(num_groups, bool) or not isinstance(num_groups, (int, np.integer)) or num_groups < 1:
        raise ValueError(f"num_groups: expected an int >= 1, got {num_groups!r}")
    levels, inverse, weight = np.unique(x, return_inverse=True, return_counts=True)
    m = levels.size
    g = min(int(num_groups), m)
    # Prefix sums give the weighted squared error of any run levels[i:j] in O(1).
    cw = np.concatenate([[0.0], np.cumsum(weight)])
    cx = np.concatenate([[0.0], np.cumsum(weight * levels)])
    cxx = np.concatenate([[0.0], np.cumsum(weight * levels * levels)])

    def sse(i: int, j: int) -> float:
        w = cw[j] - cw[i]
        s = cx[j] - cx[i]
        return max(0.0, (cxx[j] - cxx[i]) - s * s / w)

    cost = np.full((g + 1, m + 1), math.inf)
    split = np.zeros((g + 1, m + 1), dtype=np.int64)
    cost[0, 0] = 0.0
    for k in range(1, g + 1):
        for j in range(k, m + 1):
            for i in range(k - 1, j):
                c = cost[k - 1, i] + sse(i, j)
                if c < cost[k, j]:
                    cost[k, j], split[k, j] = c, i
    group_of_level = np.empty(m, dtype=np.int64)
    j = m
    for k in range(g, 0, -1):
        i = split[k, j]
        group_of_level[i:j] = k - 1
        j = i
    return group_of_level[inverse]


def fisher_probabilities(scores: Sequence[float] | np.ndarray, mode: str = "groups",
                         weights: Sequence[float] = (1.0, 2.0, 3.0)) -> np.ndarray:
    """Block sampling probabilities from Fisher scores.

    Args:
        scores: float ``[L]``, finite and >= 0.
        mode: ``"groups"``: 1-D k-means into ``len(weights)`` groups ordered by centroid, group
            g (0 = least important) weighted ``weights[g]`` (with fewer distinct scores than
            groups, the lowest group still gets ``weights[0]``); ``"proportional"``: p ∝ score
            (uniform when every score is 0).
        weights: group weights, increasing with importance (default 1:2:3 as in the paper).

    Returns:
        float64 ``[L]`` summing to 1.
    """
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 1 or s.size == 0:
        raise ValueError(f"scores: expected a non-empty 1-D array, got shape {s.shape}")
    if not np.all(np.isfinite(s)) or np.any(s < 0):
        raise ValueError(f"scores: expected finite values >= 0, got {s.tolist()}")
    if mode == "groups":
        w = np.asarray(weights, dtype=np.float64)
        if w.ndim != 1 or w.size == 0 or not np.all(np.isfinite(w)) or np.any(w <= 0):
            raise ValueError(f"weights: expected a non-empty list of finite numbers > 0, got {list(weights)}")
        p = w[kmeans_1d(s, w.size)]
    elif mode == "proportional":
        p = s if s.sum() > 0 else np.ones_like(s)
    else:
        raise ValueError(f"mode: expected one of {FISHER_MODES}, got {mode!r}")
    return p / p.sum()


class FisherTracker:
    """Running per-block Fisher scores kept by the server.

    Args:
        num_blocks: L.
        decay: weight of the previous estimate in the exponential moving average over rounds,
            in [0, 1); 0 keeps only the latest round.

    Attributes:
        scores: float64 ``[L]``; NaN for a block never observed.
    """

    def __init__(self, num_blocks: int, decay: float = 0.9) -> None:
        if isinstance(num_blocks, bool) or not isinstance(num_blocks, (int, np.integer)) or num_blocks < 1:
            raise ValueError(f"num_blocks: expected an int >= 1, got {num_blocks!r}")
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 <= decay < 1:
            raise ValueError(f"decay: expected a number in [0, 1), got {decay!r}")
        self.num_blocks = int(num_blocks)
        self.decay = float(decay)
        self.scores = np.full(self.num_blocks, np.nan)

    @property
    def observed(self) -> np.ndarray:
        """bool ``[L]``: blocks with a score."""
        return ~np.isnan(self.scores)

    def update(self, scores: np.ndarray, trained: np.ndarray) -> np.ndarray:
        """Fold one round of client reports into the estimate.

        Args:
            scores: float ``[L, n]``: each reporting client's squared gradient norm per block,
                already divided by its number of local steps (torch tensors are accepted).
            trained: bool ``[L, n]``: which blocks each client trained; only those entries count.

        Returns:
            float64 ``[L]``: this round's mean over the clients that trained each block
            (NaN where nobody did).
        """
        s = np.asarray(scores, dtype=np.float64)
        t = np.asarray(trained, dtype=bool)
        if s.ndim != 2 or s.shape[0] != self.num_blocks:
            raise ValueError(f"scores: expected shape [L, n] with L = {self.num_blocks}, got {s.shape}")
        if t.shape != s.shape:
            raise ValueError(f"trained: expected shape {s.shape} (the shape of scores), got {t.shape}")
        if not np.all(np.isfinite(s[t])) or np.any(s[t] < 0):
            raise ValueError("scores: expected finite values >= 0 where trained")
        counts = t.sum(axis=1)
        sums = np.where(t, s, 0.0).sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            round_mean = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
        seen = counts > 0
        fresh = seen & np.isnan(self.scores)
        ema = seen & ~fresh
        self.scores[fresh] = round_mean[fresh]
        self.scores[ema] = self.decay * self.scores[ema] + (1.0 - self.decay) * round_mean[ema]
        return round_mean

    def set(self, scores: np.ndarray) -> None:
        """Replace the estimate by externally computed scores (proxy-set mode), float ``[L]``."""
        s = np.asarray(scores, dtype=np.float64)
        if s.shape != (self.num_blocks,):
            raise ValueError(f"scores: expected shape [L] = ({self.num_blocks},), got {s.shape}")
        if not np.all(np.isfinite(s)) or np.any(s < 0):
            raise ValueError(f"scores: expected finite values >= 0, got {s.tolist()}")
        self.scores = s.copy()

    def filled(self) -> np.ndarray:
        """Scores with never-observed blocks set to the largest observed score, float64 ``[L]``.

        Unobserved blocks are treated as important so that they get trained and measured;
        with nothing observed at all every block scores 1 (a uniform distribution).
        """
        if not self.observed.any():
            return np.ones(self.num_blocks)
        return np.where(self.observed, self.scores, np.nanmax(self.scores))

    def state_dict(self) -> dict:
        """JSON-serialisable state (NaN written as None)."""
        return {"scores": [None if math.isnan(v) else float(v) for v in self.scores], "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        scores = state["scores"]
        if len(scores) != self.num_blocks:
            raise ValueError(f"state: expected {self.num_blocks} scores, got {len(scores)}")
        self.scores = np.array([np.nan if v is None else float(v) for v in scores], dtype=np.float64)
        self.decay = float(state["decay"])
