"""Privacy accounting of a federated run's rounds, with Google's ``dp-accounting`` (extra ``[dp]``).

What one round releases about the cohort (``fedhello.fl.privacy`` adds the noise):

* the noisy sum of the participants' clipped updates, every coordinate of every block with
  Gaussian noise of std ``noise_multiplier * clip_norm``;
* with client-side Fisher scores, the noisy sum of their clipped score vectors, std
  ``fisher_noise_multiplier * fisher_clip``;
* with adaptive clipping, the noisy count of participants whose update was within the clip,
  std ``count_noise_multiplier``.

The cohort is a fixed-size sample without replacement of the ``num_clients`` clients (what
``FederatedRun.plan_round`` draws), so the round is a ``SampledWithoutReplacementDpEvent`` over the
composition of those Gaussians, accounted by ``RdpAccountant`` under the replace-one neighbouring
relation: the only relation the amplification bound for this sampling holds under. Replacing one
client moves a sum of per-client vectors of norm ``<= B`` by up to ``2 B``; dp-accounting's
noise multiplier is the noise's std over that sensitivity, so the update and Fisher sums enter as
``noise_multiplier / 2`` and ``fisher_noise_multiplier / 2``. The count of 0/1 bits moves by at
most 1 and enters as ``count_noise_multiplier``. Clients are the unit of privacy: two
populations that differ in one client's whole data set are neighbours.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from fedhello.errors import UserError

__all__ = ["ACCOUNTANT", "NEIGHBORING_RELATION", "SAMPLING", "RoundMechanism", "RoundAccountant",
           "dp_accounting", "calibrate_noise_multiplier"]

ACCOUNTANT = "RDP (dp-accounting RdpAccountant)"
NEIGHBORING_RELATION = "replace-one client"
SAMPLING = "fixed-size cohort drawn without replacement"

# calibrate_noise_multiplier searches this interval; a target epsilon that needs more noise than
# the top is refused as unreachable (the Fisher or count mechanisms alone may already exceed it).
_CALIBRATION_BRACKET = (1e-3, 1e4)


def dp_accounting() -> Any:
    """The ``dp_accounting`` module; one line naming the extra when it is not installed."""
    try:
        import dp_accounting as module
    except ImportError:
        raise UserError("privacy: needs Google's dp-accounting, which is not installed; install the extra: "
                        "pip install 'fedhello[dp]'") from None
    return module


@dataclass(frozen=True)
class RoundMechanism:
    """The Gaussian mechanisms of one round on a cohort of ``cohort_size`` of ``num_clients``.

    Attributes:
        num_clients: the population N.
        cohort_size: clients sampled per round (without replacement).
        noise_multiplier: update noise std over the clip norm; 0 releases the sum unnoised.
        fisher_noise_multiplier: Fisher-score noise std over ``fisher_clip``, None when no
            client-side score leaves the clients.
        count_noise_multiplier: adaptive clipping's count noise std, None without it.
    """

    num_clients: int
    cohort_size: int
    noise_multiplier: float
    fisher_noise_multiplier: float | None = None
    count_noise_multiplier: float | None = None

    @property
    def private(self) -> bool:
        """Every released sum is noised (otherwise epsilon is infinite)."""
        return all(s is None or s > 0 for s in self._sigmas()) and self.noise_multiplier > 0

    def _sigmas(self) -> tuple[float | None, ...]:
        # Replace-one sensitivity is twice the clip for the two sums, 1 for the count (see the module doc).
        halve = [self.noise_multiplier, self.fisher_noise_multiplier]
        return tuple(None if s is None else s / 2 for s in halve) + (self.count_noise_multiplier,)

    def event(self) -> Any:
        """The round's ``dp_accounting.DpEvent``."""
        dpa = dp_accounting()
        gaussians = [dpa.GaussianDpEvent(s) for s in self._sigmas() if s is not None]
        return dpa.SampledWithoutReplacementDpEvent(self.num_clients, self.cohort_size,
                                                    dpa.ComposedDpEvent(gaussians))

    def epsilon(self, rounds: int, delta: float) -> float:
        """Epsilon at ``delta`` after ``rounds`` rounds (inf when not ``private``, 0 for no round)."""
        accountant = RoundAccountant(self)
        accountant.step(rounds)
        return accountant.epsilon(delta)


class RoundAccountant:
    """Composes ``mechanism`` once per round; ``epsilon(delta)`` of the rounds so far."""

    def __init__(self, mechanism: RoundMechanism) -> None:
        self.mechanism = mechanism
        self.rounds = 0
        self._event = self._accountant = None
        if mechanism.private:  # clipping alone needs no accountant (nor the extra)
            dpa = dp_accounting()
            self._accountant = dpa.rdp.RdpAccountant(neighboring_relation=dpa.NeighboringRelation.REPLACE_ONE)
            self._event = mechanism.event()

    def step(self, rounds: int = 1) -> None:
        """Account ``rounds`` more rounds."""
        if rounds < 0:
            raise ValueError(f"rounds: expected an int >= 0, got {rounds}")
        if self._event is not None and rounds:
            self._accountant.compose(self._event, rounds)
        self.rounds += rounds

    def epsilon(self, delta: float) -> float:
        if not self.rounds:
            return 0.0
        if self._event is None:
            return math.inf
        return float(self._accountant.get_epsilon(delta))


def calibrate_noise_multiplier(target_epsilon: float, delta: float, rounds: int, num_clients: int,
                               cohort_size: int, fisher_noise_multiplier: float | None = None,
                               count_noise_multiplier: float | None = None) -> float:
    """The smallest update noise multiplier whose epsilon after ``rounds`` rounds is at most
    ``target_epsilon`` at ``delta``, the other mechanisms as given.

    Raises:
        UserError: ``privacy.target_epsilon: ...`` when even the bracket's top does not reach it.
    """
    dpa = dp_accounting()

    def event(sigma: float) -> Any:
        round_event = RoundMechanism(num_clients, cohort_size, sigma, fisher_noise_multiplier,
                                     count_noise_multiplier).event()
        return dpa.SelfComposedDpEvent(round_event, rounds)

    low, high = _CALIBRATION_BRACKET
    best = RoundMechanism(num_clients, cohort_size, high, fisher_noise_multiplier,
                          count_noise_multiplier).epsilon(rounds, delta)
    if best > target_epsilon:
        raise UserError(f"privacy.target_epsilon: {target_epsilon} is unreachable in {rounds} rounds of "
                        f"{cohort_size} of {num_clients} clients at delta {delta} (epsilon {best:.4g} even at "
                        f"noise multiplier {high:g}); raise it, or lower rounds or cohort_size")
    return float(dpa.calibrate_dp_mechanism(
        lambda: dpa.rdp.RdpAccountant(neighboring_relation=dpa.NeighboringRelation.REPLACE_ONE), event,
        target_epsilon, delta, dpa.ExplicitBracketInterval(low, high)))
