"""Client dropout and over-selection: which sampled clients return their update in a round.

Real federations lose clients mid-round (a phone leaves Wi-Fi, a slow device misses the
deadline). A sampled participant fails to return with its probability (``clients.dropout``:
one for all, or one per capacity tier), independently each round. With over-selection the server
samples more clients than it needs and aggregates the first ``cohort_size`` participants that
return, in a random order of arrival; the rest are late and discarded.

The draws of round ``t`` come from their own generator seeded by ``(seed, t)``: they neither
shift the cohort and allocation draws (so a run with dropout 0 is the run without this module)
nor need any state in the checkpoint (a resumed run draws the same failures).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["RoundReturns", "cohort_draw_size", "draw_returns"]


@dataclass(frozen=True)
class RoundReturns:
    """Which participants of one round count.

    Attributes:
        kept: cohort positions of the participants whose updates are aggregated, ascending.
        dropped: client ids that never returned, ascending.
        late: client ids that returned after ``cohort_size`` others had (over-selection), ascending.
    """

    kept: list[int]
    dropped: list[int]
    late: list[int]


def cohort_draw_size(cohort_size: int, over_selection: float, num_clients: int) -> int:
    """Clients sampled per round: ``ceil(cohort_size * (1 + over_selection))``, at most the population."""
    # round() first: 10 * (1 + 0.1) is 11.000000000000002 in floating point.
    return min(num_clients, math.ceil(round(cohort_size * (1 + over_selection), 9)))


def draw_returns(members: list[int], cohort: np.ndarray, tier: np.ndarray, dropout: float | list[float],
                 cohort_size: int, rng: np.random.Generator) -> RoundReturns:
    """Draw which of a round's participants return.

    Args:
        members: cohort positions of the participants (the clients given work), ascending.
        cohort: int ``[n]``, the sampled client ids.
        tier: int ``[n]``, each cohort client's capacity tier.
        dropout: a probability for every client, or one per tier.
        cohort_size: how many returned participants are aggregated at most (the first to arrive).
        rng: this round's generator (``fedhello.seeds.purpose_seed(seed, f"dropout/{round}")``).
    """
    rates = np.asarray(dropout if isinstance(dropout, list) else [dropout] * (int(tier.max(initial=0)) + 1))
    fails = rng.random(len(members)) < rates[tier[members]] if members else np.zeros(0, dtype=bool)
    returned = [m for m, failed in zip(members, fails) if not failed]
    arrival = rng.permutation(len(returned))
    on_time = sorted(returned[i] for i in arrival[:cohort_size])
    late = sorted(returned[i] for i in arrival[cohort_size:])
    return RoundReturns(on_time, sorted(int(cohort[m]) for m, failed in zip(members, fails) if failed),
                        sorted(int(cohort[m]) for m in late))
