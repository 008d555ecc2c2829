"""FIM-HLA and Fed-HeLLo: allocation driven by Fisher scores (Fed-HeLLo: times a geometric prior)."""

from __future__ import annotations

from abc import abstractmethod
from typing import Any, Mapping, Sequence

import numpy as np

from ..fisher import FISHER_MODES, FisherTracker, fisher_probabilities
from .base import (Allocation, AllocationContext, AllocationStrategy, _allocation, _check_choice, _check_int,
                   register_strategy)
from .patterns import PATTERNS, rgd_probabilities, sample_blocks

__all__ = ["FISHER_SOURCES", "SCHEDULES", "COMBINES", "FIMStrategy", "FedHeLLoStrategy"]

FISHER_SOURCES = ("client", "proxy")
SCHEDULES = ("codesign", "released", "fork")
COMBINES = ("product", "fim_only")


class _FisherStrategy(AllocationStrategy):
    """Shared Fisher bookkeeping of FIM-HLA and Fed-HeLLo."""

    uses_fisher = True

    def __init__(self, context: AllocationContext, mode: str, weights: Sequence[float], fisher_source: str,
                 decay: float) -> None:
        super().__init__(context)
        self.mode = _check_choice("mode", mode, FISHER_MODES)
        try:
            self.weights = tuple(float(w) for w in weights)
        except (TypeError, ValueError):
            raise ValueError(f"weights: expected a list of numbers > 0, got {weights!r}") from None
        fisher_probabilities(np.ones(self.num_blocks), self.mode, self.weights)  # validates the weights
        self.fisher_source = _check_choice("fisher_source", fisher_source, FISHER_SOURCES)
        self.tracker = FisherTracker(self.num_blocks, decay)
        self._proxy_round: int | None = None

    @abstractmethod
    def _is_refresh_round(self, round_idx: int) -> bool:
        """Rounds at which the Fisher distribution is recomputed."""

    def needs_proxy_scores(self, round_idx: int) -> bool:
        return self.fisher_source == "proxy" and self._is_refresh_round(round_idx)

    def observe_fisher(self, round_idx: int, scores: np.ndarray, trained: np.ndarray) -> None:
        if self.fisher_source == "client":
            self.tracker.update(scores, trained)

    def observe_proxy_scores(self, round_idx: int, scores: np.ndarray) -> None:
        if self.fisher_source != "proxy":
            raise ValueError(f"scores: strategy {self.name!r} uses client-side Fisher scores (fisher_source='client')")
        self.tracker.set(scores)
        self._proxy_round = _check_int("round_idx", round_idx, 0)

    @property
    def fisher_scores(self) -> np.ndarray:
        return self.tracker.scores.copy()

    def _fisher_distribution(self, round_idx: int) -> np.ndarray:
        if self.fisher_source == "proxy" and self._proxy_round != round_idx:
            raise ValueError(f"round_idx: round {round_idx} refreshes the Fisher distribution but no proxy scores "
                             f"were given for it (call observe_proxy_scores when needs_proxy_scores is True)")
        return fisher_probabilities(self.tracker.filled(), self.mode, self.weights)

    def _fisher_state(self) -> dict:
        return {"tracker": self.tracker.state_dict(), "proxy_round": self._proxy_round}

    def _load_fisher_state(self, state: Mapping[str, Any]) -> None:
        self.tracker.load_state_dict(state["tracker"])
        self._proxy_round = state["proxy_round"]


def _as_list(p: np.ndarray | None) -> list[float] | None:
    return None if p is None else [float(v) for v in p]


def _as_array(p: list[float] | None) -> np.ndarray | None:
    return None if p is None else np.asarray(p, dtype=np.float64)


@register_strategy
class FIMStrategy(_FisherStrategy):
    """FIM-HLA: blocks drawn from Fisher-score probabilities (dynamic importance alone).

    Args:
        mode: ``groups`` (3 groups by ordered 1-D k-means, weights 1:2:3) or ``proportional``.
        weights: group weights, least to most important.
        fisher_source: ``client`` (running estimate from client reports) or ``proxy``
            (server-side proxy set, computed in refresh rounds).
        refresh: the distribution is recomputed every ``refresh`` rounds (from round 0).
        decay: EMA weight of the previous estimate (client source).

    Before any score is known every block is equally likely.
    """

    name = "fim"

    def __init__(self, context: AllocationContext, *, mode: str = "groups", weights: Sequence[float] = (1.0, 2.0, 3.0),
                 fisher_source: str = "client", refresh: int = 1, decay: float = 0.9) -> None:
        super().__init__(context, mode, weights, fisher_source, decay)
        self.refresh = _check_int("refresh", refresh, 1)
        self._distribution: np.ndarray | None = None

    def _is_refresh_round(self, round_idx: int) -> bool:
        return round_idx % self.refresh == 0

    def _allocate(self, round_idx: int, cohort: np.ndarray, capacities: np.ndarray,
                  rng: np.random.Generator) -> Allocation:
        if self._is_refresh_round(round_idx) or self._distribution is None:
            self._distribution = self._fisher_distribution(round_idx)
        p = self._distribution
        return _allocation(self.num_blocks, [sample_blocks(p, int(k), rng) for k in capacities], probabilities=p)

    def state_dict(self) -> dict:
        return {**self._fisher_state(), "distribution": _as_list(self._distribution)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._load_fisher_state(state)
        self._distribution = _as_array(state["distribution"])


@register_strategy
class FedHeLLoStrategy(_FisherStrategy):
    """Fed-HeLLo: geometric prior (intrinsic importance) co-designed with Fisher scores (dynamic).

    Rounds ``t < warmup`` draw from the RGD prior of ``pattern``. From ``warmup`` on, every
    ``refresh`` rounds (``(t - warmup) % refresh == 0``) the Fisher distribution ``q`` is
    recomputed and combined with the prior ``p``: ``normalize(p * q)`` (``combine="product"``)
    or ``q`` alone (``combine="fim_only"``). What the other rounds use depends on ``schedule``:

    * ``codesign`` (default): the combined distribution, fresh draws every round, until the
      next refresh;
    * ``released``: the released code's schedule — the combined distribution only in refresh
      rounds, the prior in all others (with ``combine="fim_only"`` this is the released code,
      whose condition ``t >= warmup and t % refresh == 0`` equals ours when ``warmup`` is a
      multiple of ``refresh``, as with its defaults 50/50);
    * ``fork``: the allocation drawn for a client in (or after) a refresh round is kept for
      that client until the next refresh, as in the public fork of the released code.

    Args:
        pattern: the prior's pattern (default ``bottleneck``).
        warmup, refresh: schedule in rounds (released defaults 50 and 50, of 500 rounds).
        schedule, combine: see above.
        mode, weights, fisher_source, decay: as for ``FIMStrategy``.
    """

    name = "fedhello"

    def __init__(self, context: AllocationContext, *, pattern: str = "bottleneck", warmup: int = 50,
                 refresh: int = 50, schedule: str = "codesign", combine: str = "product", mode: str = "groups",
                 weights: Sequence[float] = (1.0, 2.0, 3.0), fisher_source: str = "client",
                 decay: float = 0.9) -> None:
        super().__init__(context, mode, weights, fisher_source, decay)
        self.pattern = _check_choice("pattern", pattern, PATTERNS)
        self.warmup = _check_int("warmup", warmup, 0)
        self.refresh = _check_int("refresh", refresh, 1)
        self.schedule = _check_choice("schedule", schedule, SCHEDULES)
        self.combine = _check_choice("combine", combine, COMBINES)
        self.prior = rgd_probabilities(self.pattern, self.num_blocks, context.tier_capacities)
        self._distribution: np.ndarray | None = None
        self._kept: dict[int, np.ndarray] = {}

    def _is_refresh_round(self, round_idx: int) -> bool:
        return round_idx >= self.warmup and (round_idx - self.warmup) % self.refresh == 0

    def _combined(self, round_idx: int) -> np.ndarray:
        q = self._fisher_distribution(round_idx)
        if self.combine == "fim_only":
            return q
        joint = self.prior * q
        # A prior and a Fisher distribution with disjoint supports leave nothing: fall back on q.
        return joint / joint.sum() if joint.sum() > 0 else q

    def _allocate(self, round_idx: int, cohort: np.ndarray, capacities: np.ndarray,
                  rng: np.random.Generator) -> Allocation:
        if round_idx < self.warmup:
            p = self.prior
            return _allocation(self.num_blocks, [sample_blocks(p, int(k), rng) for k in capacities], probabilities=p)
        refreshing = self._is_refresh_round(round_idx)
        if refreshing or self._distribution is None:
            self._distribution = self._combined(round_idx)
            self._kept = {}
        if self.schedule == "released" and not refreshing:
            p = self.prior
        else:
            p = self._distribution
        sets = []
        for client, k in zip(cohort.tolist(), capacities.tolist()):
            kept = self._kept.get(client)
            if self.schedule == "fork" and kept is not None and kept.size == k:
                sets.append(kept)
                continue
            blocks = sample_blocks(p, k, rng)
            if self.schedule == "fork":
                self._kept[client] = blocks
            sets.append(blocks)
        return _allocation(self.num_blocks, sets, probabilities=p)

    def state_dict(self) -> dict:
        return {**self._fisher_state(), "distribution": _as_list(self._distribution),
                "kept": {str(c): b.tolist() for c, b in sorted(self._kept.items())}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._load_fisher_state(state)
        self._distribution = _as_array(state["distribution"])
        self._kept = {int(c): np.asarray(b, dtype=np.int64) for c, b in state["kept"].items()}
