"""Heterogeneous LoRA allocation (HLA): which blocks each client of a round trains.

Every method is one ``AllocationStrategy`` subclass registered under a name, built with
``make_strategy(name, context, options)``. Each round the server calls

* ``allocate(round_idx, cohort, capacities, rng)`` → ``Allocation``: the bool ``[L, n]``
  trainable mask of the cohort (plus who participates, and per-client LoRA ranks for HetLoRA);
* after local training, ``observe_fisher(round_idx, scores, trained)`` with the clients'
  per-block squared gradient norms (ignored by strategies that do not use them);
* in proxy-set Fisher mode, before ``allocate``: if ``needs_proxy_scores(round_idx)``, compute
  the per-block proxy-set scores and pass them to ``observe_proxy_scores``.

Strategies draw only from the ``numpy.random.Generator`` they are given (the caller owns and
checkpoints it), and keep everything else in ``state_dict()`` (plain JSON types), so a resumed
run allocates exactly like an uninterrupted one.

Geometric patterns (GD-HLA). A pattern is a priority order over the L blocks and a client of
capacity k trains the first k blocks of it, so the sets of the tiers are nested:

* ``bottleneck``: ends inward, ``0, L-1, 1, L-2, ...`` (the paper's pattern; for L = 12 and
  k = 6/9/12: {0,1,2,9,10,11}, {0-4, 8-11}, all blocks — as in the released code);
* ``triangle``: ``0, 1, ..., L-1`` (the k shallowest blocks);
* ``inverted_triangle``: ``L-1, ..., 0`` (the k deepest blocks);
* ``uniform``: no common order; the client at cohort position i of n takes k consecutive
  blocks (cyclically) from offset ``floor(i * L / n)``, spreading training evenly over depth.

The paper's own definitions of Triangle, Inverted Triangle and Uniform were not available;
these three are ours.

RGD-HLA turns a pattern into probabilities ``p_l = c_l / sum(c)``, where ``c_l`` counts the
tiers whose GD set contains block l (``uniform``: 1/L), and every client draws its ``k_c``
blocks from p without replacement (successive sampling, ``Generator.choice``).
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, Sequence

import numpy as np

from .fisher import FISHER_MODES, FisherTracker, fisher_probabilities

__all__ = [
    "PATTERNS",
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

PATTERNS = ("triangle", "inverted_triangle", "bottleneck", "uniform")
FISHER_SOURCES = ("client", "proxy")
SCHEDULES = ("codesign", "released", "fork")
COMBINES = ("product", "fim_only")


def _check_int(name: str, value: object, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if value < low or (high is not None and value > high):
        expected = f">= {low}" if high is None else f"in {low}..{high}"
        raise ValueError(f"{name}: expected an int {expected}, got {value}")
    return int(value)


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {choices}, got {value!r}")
    return str(value)


def pattern_order(pattern: str, num_blocks: int) -> np.ndarray:
    """Priority order of a nested pattern: int64 ``[L]``, most important block first.

    Defined for ``triangle``, ``inverted_triangle`` and ``bottleneck``; ``uniform`` has no
    common order (see ``gd_blocks``).
    """
    L = _check_int("num_blocks", num_blocks, 1)
    if pattern == "triangle":
        return np.arange(L, dtype=np.int64)
    if pattern == "inverted_triangle":
        return np.arange(L - 1, -1, -1, dtype=np.int64)
    if pattern == "bottleneck":
        order = np.empty(L, dtype=np.int64)
        order[0::2] = np.arange((L + 1) // 2)
        order[1::2] = np.arange(L - 1, (L + 1) // 2 - 1, -1)
        return order
    if pattern == "uniform":
        raise ValueError("pattern: 'uniform' has no common priority order; use gd_blocks with an offset")
    raise ValueError(f"pattern: expected one of {PATTERNS}, got {pattern!r}")


def gd_blocks(pattern: str, num_blocks: int, capacity: int, offset: int = 0) -> np.ndarray:
    """The GD-HLA set of a client: sorted int64 ``[capacity]`` block ids.

    ``offset`` is the window start of the ``uniform`` pattern and is ignored by the others.
    """
    L = _check_int("num_blocks", num_blocks, 1)
    k = _check_int("capacity", capacity, 1, L)
    if pattern == "uniform":
        return np.sort((offset + np.arange(k, dtype=np.int64)) % L)
    return np.sort(pattern_order(pattern, L)[:k])


def strided_blocks(num_blocks: int, capacity: int) -> np.ndarray:
    """``capacity`` blocks evenly spaced over depth: ``floor(i * L / k)`` for ``i < k``, int64 ``[k]``.

    6 of 12 gives ``[0, 2, 4, 6, 8, 10]``, the set every client trains in the released
    Straggler runs of Fed-HeLLo.
    """
    L = _check_int("num_blocks", num_blocks, 1)
    k = _check_int("capacity", capacity, 1, L)
    return (np.arange(k, dtype=np.int64) * L) // k


def _uniform_offsets(n: int, num_blocks: int) -> np.ndarray:
    return (np.arange(n, dtype=np.int64) * num_blocks) // max(n, 1)


def rgd_probabilities(pattern: str, num_blocks: int, tier_capacities: Sequence[int]) -> np.ndarray:
    """RGD-HLA block probabilities, float64 ``[L]`` summing to 1.

    ``p_l = c_l / sum(c)`` with ``c_l`` the number of tiers whose GD set contains block l;
    ``uniform`` gives 1/L. Bottleneck at 6/9/12 of 12: ``[3,3,3,2,2,1,1,1,2,3,3,3] / 27``.
    """
    L = _check_int("num_blocks", num_blocks, 1)
    _check_choice("pattern", pattern, PATTERNS)
    if pattern == "uniform":
        return np.full(L, 1.0 / L)
    if len(tier_capacities) == 0:
        raise ValueError("tier_capacities: expected at least one tier, got none")
    counts = np.zeros(L)
    for k in tier_capacities:
        counts[gd_blocks(pattern, L, k)] += 1
    return counts / counts.sum()


def sample_blocks(probabilities: np.ndarray, capacity: int, rng: np.random.Generator) -> np.ndarray:
    """Draw ``capacity`` distinct blocks from ``probabilities`` without replacement.

    Successive sampling (each draw from the remaining blocks, renormalised). If fewer blocks
    than ``capacity`` have a positive probability, all of them are taken and the rest is drawn
    uniformly from the zero-probability blocks, so the client's capacity is always met.

    Returns:
        sorted int64 ``[capacity]``.
    """
    p = np.asarray(probabilities, dtype=np.float64)
    k = _check_int("capacity", capacity, 0, p.size)
    positive = np.flatnonzero(p > 0)
    if positive.size >= k:
        return np.sort(rng.choice(p.size, size=k, replace=False, p=p / p.sum()))
    zero = np.flatnonzero(p <= 0)
    return np.sort(np.concatenate([positive, rng.choice(zero, size=k - positive.size, replace=False)]))


@dataclass(frozen=True)
class Allocation:
    """What a cohort trains in one round.

    Attributes:
        trainable: bool ``[L, n]``: ``trainable[l, i]`` iff cohort member i trains block l.
        participating: bool ``[n]``: members that take part (Exclusive leaves some out; a member
            that does not take part trains nothing and sends nothing).
        ranks: int64 ``[n]`` per-member LoRA ranks (HetLoRA), else None (the model's rank).
        probabilities: float64 ``[L]``, the distribution the blocks were drawn from this round,
            None for deterministic strategies.
    """

    trainable: np.ndarray
    participating: np.ndarray
    ranks: np.ndarray | None = None
    probabilities: np.ndarray | None = None

    @property
    def num_blocks(self) -> int:
        return int(self.trainable.shape[0])

    @property
    def num_clients(self) -> int:
        return int(self.trainable.shape[1])

    def blocks(self, member: int) -> list[int]:
        """Block ids trained by cohort member ``member`` (its position in the cohort)."""
        return np.flatnonzero(self.trainable[:, member]).tolist()

    def to_dict(self) -> dict:
        """JSON-serialisable summary (blocks per member, participation, ranks, probabilities)."""
        return {
            "blocks": [self.blocks(i) for i in range(self.num_clients)],
            "participating": self.participating.tolist(),
            "ranks": None if self.ranks is None else self.ranks.tolist(),
            "probabilities": None if self.probabilities is None else self.probabilities.tolist(),
        }


def _allocation(num_blocks: int, sets: Sequence[np.ndarray], participating: np.ndarray | None = None,
                ranks: np.ndarray | None = None, probabilities: np.ndarray | None = None) -> Allocation:
    mask = np.zeros((num_blocks, len(sets)), dtype=bool)
    for i, blocks in enumerate(sets):
        mask[blocks, i] = True
    if participating is None:
        participating = np.ones(len(sets), dtype=bool)
    return Allocation(mask, participating, ranks, probabilities)


@dataclass(frozen=True)
class AllocationContext:
    """What every strategy knows about the run.

    Attributes:
        num_blocks: L, the number of transformer blocks that carry LoRA adapters.
        tier_capacities: ``k`` of each capacity tier of the population (e.g. ``(6, 9, 12)``);
            RGD probabilities, Straggler's set and Exclusive's participants depend on them.
        lora_rank: the model's LoRA rank (needed by HetLoRA).
    """

    num_blocks: int
    tier_capacities: tuple[int, ...]
    lora_rank: int | None = None

    def __post_init__(self) -> None:
        L = _check_int("num_blocks", self.num_blocks, 1)
        caps = tuple(_check_int("tier_capacities", k, 1, L) for k in self.tier_capacities)
        if not caps:
            raise ValueError("tier_capacities: expected at least one tier, got none")
        if self.lora_rank is not None:
            _check_int("lora_rank", self.lora_rank, 1)
        object.__setattr__(self, "num_blocks", L)
        object.__setattr__(self, "tier_capacities", caps)


class AllocationStrategy(ABC):
    """Base of all allocation strategies.

    Subclasses set ``name`` (the registry key), implement ``_allocate`` and, if they keep
    state across rounds, ``state_dict``/``load_state_dict``. Their keyword-only constructor
    arguments after ``context`` are their options (what a config's ``strategy.options`` holds).

    Class attributes:
        respects_capacity: every member trains at most ``k_c`` blocks (Full and HetLoRA train
            every block and say False; HetLoRA scales ranks instead).
        uses_fisher: the strategy consumes Fisher scores.
    """

    name: ClassVar[str] = ""
    respects_capacity: ClassVar[bool] = True
    uses_fisher: ClassVar[bool] = False

    def __init__(self, context: AllocationContext) -> None:
        if not isinstance(context, AllocationContext):
            raise TypeError(f"context: expected an AllocationContext, got {type(context).__name__}")
        self.context = context

    @property
    def num_blocks(self) -> int:
        return self.context.num_blocks

    def allocate(self, round_idx: int, cohort: Sequence[int], capacities: Sequence[int],
                 rng: np.random.Generator) -> Allocation:
        """The allocation of one round.

        Args:
            round_idx: 0-based round number.
            cohort: the distinct global ids of this round's clients, ``[n]``.
            capacities: ``k_c`` of each cohort member, ``[n]``, each in 1..L.
            rng: the generator random strategies draw from.

        Returns:
            an ``Allocation`` whose columns follow the order of ``cohort``.
        """
        _check_int("round_idx", round_idx, 0)
        ids = np.asarray(cohort)
        caps = np.asarray(capacities)
        if ids.ndim != 1 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"cohort: expected a non-empty 1-D sequence of int client ids, got {cohort!r}")
        if np.unique(ids).size != ids.size or ids.min() < 0:
            raise ValueError(f"cohort: expected distinct client ids >= 0, got {ids.tolist()}")
        if caps.shape != ids.shape or not np.issubdtype(caps.dtype, np.integer):
            raise ValueError(f"capacities: expected {ids.size} ints (one per cohort member), got {capacities!r}")
        if caps.min() < 1 or caps.max() > self.num_blocks:
            raise ValueError(f"capacities: expected values in 1..{self.num_blocks} (L), got {caps.tolist()}")
        if not isinstance(rng, np.random.Generator):
            raise TypeError(f"rng: expected a numpy.random.Generator, got {type(rng).__name__}")
        return self._allocate(int(round_idx), ids.astype(np.int64), caps.astype(np.int64), rng)

    @abstractmethod
    def _allocate(self, round_idx: int, cohort: np.ndarray, capacities: np.ndarray,
                  rng: np.random.Generator) -> Allocation:
        """``allocate`` after argument checks (int64 arrays)."""

    def observe_fisher(self, round_idx: int, scores: np.ndarray, trained: np.ndarray) -> None:
        """Client-reported Fisher norms of a finished round: float ``[L, n]`` (per local step)
        and the bool ``[L, n]`` mask of what each client trained. Ignored by default."""

    def needs_proxy_scores(self, round_idx: int) -> bool:
        """True when ``allocate(round_idx, ...)`` needs ``observe_proxy_scores`` first."""
        return False

    def observe_proxy_scores(self, round_idx: int, scores: np.ndarray) -> None:
        """Per-block Fisher scores computed by the server on its proxy set, float ``[L]``."""
        raise ValueError(f"scores: strategy {self.name!r} does not use proxy-set Fisher scores")

    @property
    def fisher_scores(self) -> np.ndarray | None:
        """The current per-block Fisher estimate, float64 ``[L]`` (NaN = unknown), or None."""
        return None

    def state_dict(self) -> dict:
        """JSON-serialisable state carried across rounds (empty for stateless strategies)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what ``state_dict`` returned."""
        if state:
            raise ValueError(f"state: strategy {self.name!r} is stateless, got keys {sorted(state)}")


_REGISTRY: dict[str, type[AllocationStrategy]] = {}


def register_strategy(cls: type[AllocationStrategy]) -> type[AllocationStrategy]:
    """Class decorator: make ``cls`` available to ``make_strategy`` under ``cls.name``."""
    if not (isinstance(cls, type) and issubclass(cls, AllocationStrategy)):
        raise TypeError(f"cls: expected an AllocationStrategy subclass, got {cls!r}")
    if not cls.name or cls.name in _REGISTRY:
        raise ValueError(f"cls.name: expected a new non-empty name, got {cls.name!r} "
                         f"(registered: {sorted(_REGISTRY)})")
    _REGISTRY[cls.name] = cls
    return cls


def available_strategies() -> tuple[str, ...]:
    """Registered strategy names, sorted."""
    return tuple(sorted(_REGISTRY))


def _lookup(name: str) -> type[AllocationStrategy]:
    if name not in _REGISTRY:
        raise ValueError(f"name: unknown strategy {name!r}; expected one of {available_strategies()}")
    return _REGISTRY[name]


def strategy_options(name: str) -> dict[str, Any]:
    """The options of strategy ``name`` and their defaults."""
    params = inspect.signature(_lookup(name).__init__).parameters
    return {p.name: p.default for p in params.values() if p.kind is inspect.Parameter.KEYWORD_ONLY}


def make_strategy(name: str, context: AllocationContext,
                  options: Mapping[str, Any] | None = None) -> AllocationStrategy:
    """Build the strategy registered as ``name`` with ``options``.

    Raises:
        ValueError: unknown name, unknown option, or an invalid option value (the message
            starts with the option's name).
    """
    cls = _lookup(name)
    options = dict(options or {})
    known = strategy_options(name)
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(f"{unknown[0]}: unknown option of strategy {name!r}; expected a subset of {sorted(known)}")
    return cls(context, **options)


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
            raise ValueError(f"tier_capacities: exclusive needs a full-capacity tier (k = L = {context.num_blocks}), "
                             f"got {context.tier_capacities}")

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


@register_strategy
class GDStrategy(AllocationStrategy):
    """GD-HLA: each client trains the first ``k_c`` blocks of a geometric ``pattern`` (deterministic).

    Args:
        pattern: ``bottleneck`` (default), ``triangle``, ``inverted_triangle`` or ``uniform``
            (see the module docstring; the last three are our definitions).
    """

    name = "gd"

    def __init__(self, context: AllocationContext, *, pattern: str = "bottleneck") -> None:
        super().__init__(context)
        self.pattern = _check_choice("pattern", pattern, PATTERNS)

    def _allocate(self, round_idx: int, cohort: np.ndarray, capacities: np.ndarray,
                  rng: np.random.Generator) -> Allocation:
        offsets = _uniform_offsets(cohort.size, self.num_blocks)
        return _allocation(self.num_blocks, [gd_blocks(self.pattern, self.num_blocks, int(k), int(o))
                                             for k, o in zip(capacities, offsets)])


@register_strategy
class RGDStrategy(AllocationStrategy):
    """RGD-HLA: each client draws ``k_c`` blocks without replacement from the pattern's probabilities.

    Args:
        pattern: as for GD (default ``bottleneck``).
    """

    name = "rgd"

    def __init__(self, context: AllocationContext, *, pattern: str = "bottleneck") -> None:
        super().__init__(context)
        self.pattern = _check_choice("pattern", pattern, PATTERNS)
        self.probabilities = rgd_probabilities(self.pattern, self.num_blocks, context.tier_capacities)

    def _allocate(self, round_idx: int, cohort: np.ndarray, capacities: np.ndarray,
                  rng: np.random.Generator) -> Allocation:
        p = self.probabilities
        return _allocation(self.num_blocks, [sample_blocks(p, int(k), rng) for k in capacities], probabilities=p)


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
