"""The allocation interface every strategy implements, and the registry that builds strategies by name.

Every method is one ``AllocationStrategy`` subclass registered under a name, built with
``make_strategy(name, context, options)``. Each round the server calls

* ``allocate(round_idx, cohort, capacities, rng)`` → ``Allocation``: the bool ``[L, n]``
  trainable mask of the cohort (plus who participates, and per-client LoRA ranks for HetLoRA);
* after local training, ``observe_fisher(round_idx, scores, trained)`` with the clients'
  per-block squared gradient norms (ignored by strategies that do not use them);
* in proxy-set Fisher mode, before ``allocate``: if ``needs_proxy_scores(round_idx)``, compute
  the per-block proxy-set scores and pass them to ``observe_proxy_scores``.

Every strategy also takes the option ``released_freeze`` (default False): a reproduction of the
paper's released code, whose clients freeze some allotted blocks by a name match and still send
them back (``fedhello.fl.released``); ``Allocation.frozen`` then marks those blocks.

Strategies draw only from the ``numpy.random.Generator`` they are given (the caller owns and
checkpoints it), and keep everything else in ``state_dict()`` (plain JSON types), so a resumed
run allocates exactly like an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import inspect
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, Sequence

import numpy as np

from fedhello.fl.released import released_frozen_blocks

__all__ = [
    "Allocation",
    "AllocationContext",
    "AllocationStrategy",
    "register_strategy",
    "available_strategies",
    "strategy_options",
    "make_strategy",
]


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
        frozen: bool ``[L, n]`` within ``trainable``, or None: allotted blocks that a member does
            not train but still sends back, an exact-zero delta that counts in the average
            (option ``released_freeze``); the member trains ``trainable & ~frozen``.
    """

    trainable: np.ndarray
    participating: np.ndarray
    ranks: np.ndarray | None = None
    probabilities: np.ndarray | None = None
    frozen: np.ndarray | None = None

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
        """JSON-serialisable summary (blocks per member, participation, ranks, probabilities, and
        with the option ``released_freeze`` the frozen blocks per member)."""
        summary = {
            "blocks": [self.blocks(i) for i in range(self.num_clients)],
            "participating": self.participating.tolist(),
            "ranks": None if self.ranks is None else self.ranks.tolist(),
            "probabilities": None if self.probabilities is None else self.probabilities.tolist(),
        }
        if self.frozen is not None:
            summary["frozen"] = [np.flatnonzero(self.frozen[:, i]).tolist() for i in range(self.num_clients)]
        return summary


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
    # Set by ``make_strategy`` from the common option of the same name.
    released_freeze: bool = False

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
        allocation = self._allocate(int(round_idx), ids.astype(np.int64), caps.astype(np.int64), rng)
        if not self.released_freeze:
            return allocation
        return dataclasses.replace(allocation, frozen=released_frozen_blocks(allocation.trainable))

    @abstractmethod
    def _allocate(self, round_idx: int, cohort: np.ndarray, capacities: np.ndarray,
                  rng: np.random.Generator) -> Allocation:
        """``allocate`` after argument checks (int64 arrays)."""

    def check_population(self, capacities: np.ndarray) -> None:
        """Raise ``ValueError`` (message starting ``population:``) when no round could train anyone
        with this population's capacities ``k_c`` (int ``[num_clients]``). Every strategy can by default."""

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


# Options every strategy takes, with their defaults (handled here, not by the subclasses).
COMMON_OPTIONS: dict[str, Any] = {"released_freeze": False}


def strategy_options(name: str) -> dict[str, Any]:
    """The options of strategy ``name`` and their defaults (``COMMON_OPTIONS`` included)."""
    params = inspect.signature(_lookup(name).__init__).parameters
    own = {p.name: p.default for p in params.values() if p.kind is inspect.Parameter.KEYWORD_ONLY}
    return {**own, **COMMON_OPTIONS}


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
    released_freeze = options.pop("released_freeze", False)
    if not isinstance(released_freeze, bool):
        raise ValueError(f"released_freeze: expected true or false, got {released_freeze!r}")
    strategy = cls(context, **options)
    strategy.released_freeze = released_freeze
    return strategy
