"""Client-level differential privacy (DP-FedAvg) for heterogeneous layer allocation.

One round, server side, with clip norm C and noise multiplier sigma (``RunConfig.privacy``):

1. ``clip_update``: a participant's update is everything it sends for aggregation (the LoRA
   tensors of the blocks it trained and the head tensors), clipped to L2 norm ``<= C`` as *one*
   vector. One client then moves the vector of all per-block sums by at most C, whichever blocks
   it trained.
2. ``noisy_layerwise``: the clipped deltas are summed tensor by tensor; every coordinate of every
   tensor whose block was assigned to somebody this round gets N(0, sigma^2 C^2), whether or not
   a contributor's update arrived; the sum is divided by the number of members the server
   *assigned* to the block (the head: every member). That count comes from the allocation, which
   is public as long as it is computed without private data (GD/RGD, proxy-set Fisher scores, or
   client-side scores released through ``noisy_fisher_means``). Weights are uniform: sample
   counts are private and would break the bound. A block nobody was assigned keeps its value (its
   sum is 0 for every population, nothing to hide).
3. ``noisy_fisher_means``: client-side Fisher scores, a second channel, are clipped per client to
   ``fisher_clip`` (L2 over its score vector), summed, noised with std ``fisher_noise_multiplier *
   fisher_clip`` per block and divided by the assigned count; negative results are clamped to 0
   (post-processing).
4. ``AdaptiveClip`` (Andrew et al., 2021): C follows a target quantile of the update norms,
   ``C <- C * exp(-lr * (b - q))`` with ``b`` the noisy fraction of members within the clip.

``fedhello.fl.accounting`` accounts what a round releases. ``PrivateAggregation`` holds a run's
clip norm, noise source and accountant, and checkpoints them.

``NoiseSource`` draws the noise from a seeded numpy generator (checkpointed: a resumed run is
bit-exact) or, with ``secure_rng``, from the operating system's CSPRNG (not reproducible). Both
draw float64 normals by floating-point transforms; neither defends against the
floating-point side channels of Mironov (2012).

With ``noise_multiplier: 0`` the updates are only clipped: a bound on what one faulty or poisoned
client can do to the model, with no privacy claim (epsilon is infinite).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from fedhello.fl.accounting import ACCOUNTANT, NEIGHBORING_RELATION, SAMPLING, RoundAccountant, RoundMechanism
from fedhello.fl.aggregation import ClientUpdate, _acc_dtype, _contributors

__all__ = ["NoiseSource", "clip_update", "noisy_layerwise", "noisy_fisher_means", "AdaptiveClip",
           "PrivateAggregation", "assigned_counts", "from_config"]


class NoiseSource:
    """Gaussian noise for the server's mechanisms.

    Args:
        seed: seed of the numpy generator (``secure`` False).
        secure: draw from ``os.urandom`` (the OS CSPRNG) instead: not reproducible, no state.
    """

    def __init__(self, seed: int, secure: bool = False) -> None:
        self.secure = bool(secure)
        self._rng = None if self.secure else np.random.default_rng(seed)

    def normal(self, shape: Sequence[int], std: float) -> torch.Tensor:
        """float64 ``shape`` tensor of N(0, std^2) draws (zeros when std is 0, nothing drawn)."""
        count = math.prod(shape)
        if std == 0:
            return torch.zeros(tuple(shape), dtype=torch.float64)
        if self.secure:
            z = _os_normals(count)
        else:
            z = self._rng.standard_normal(count)
        return torch.from_numpy(z * std).reshape(tuple(shape))

    def state_dict(self) -> dict[str, Any] | None:
        """The generator's state (JSON-ready), None for the CSPRNG."""
        return None if self.secure else self._rng.bit_generator.state

    def load_state_dict(self, state: Mapping[str, Any] | None) -> None:
        if self.secure != (state is None):
            raise ValueError(f"state: expected {'no state (secure_rng)' if self.secure else 'a generator state'}, "
                             f"got {state!r}")
        if state is not None:
            self._rng.bit_generator.state = dict(state)


def _os_normals(count: int) -> np.ndarray:
    """float64 ``[count]`` standard normals from OS random bytes (Box-Muller on 53-bit uniforms)."""
    pairs = (count + 1) // 2
    bits = np.frombuffer(os.urandom(16 * pairs), dtype=np.uint64) >> np.uint64(11)
    u = (bits.astype(np.float64) + 1.0) * 2.0 ** -53  # in (0, 1]: log(u) is finite
    u1, u2 = u[:pairs], u[pairs:]
    radius = np.sqrt(-2.0 * np.log(u1))
    return np.concatenate([radius * np.cos(2 * np.pi * u2), radius * np.sin(2 * np.pi * u2)])[:count]


def _sent_names(update: ClientUpdate, tensor_blocks: Mapping[str, int | None]) -> list[str]:
    """The tensors ``update`` contributes to aggregation: its trained blocks' and the head's."""
    return [n for n, b in tensor_blocks.items() if (b is None or b in update.trained_blocks) and n in update.delta]


def clip_update(update: ClientUpdate, tensor_blocks: Mapping[str, int | None],
                clip_norm: float) -> tuple[ClientUpdate, float]:
    """``update`` with everything it sends scaled to L2 norm ``<= clip_norm`` as one vector.

    Args:
        update: one client's update; only its trained blocks' tensors and the head tensors are
            kept (what the layer-wise aggregation reads).
        tensor_blocks: ``name -> block`` (None for head tensors).
        clip_norm: C > 0.

    Returns:
        the clipped update (an update within C is returned unchanged, same tensors) and its
        norm before clipping (fp64).
    """
    names = _sent_names(update, tensor_blocks)
    sent = {n: update.delta[n] for n in names}
    norm = _l2(sent)
    kept, scale = sent, clip_norm / norm if norm > clip_norm else 1.0
    while _l2(kept) > clip_norm:
        # Rounding to a float32/bf16 delta can land a hair above C; shrink until the stored
        # values are within it (the bound is what the accounting relies on).
        kept = {n: (t.double() * scale).to(t.dtype) for n, t in sent.items()}
        scale *= 1 - 2.0 ** -20
    return ClientUpdate(kept, update.num_samples, update.trained_blocks, update.rank), norm


def _l2(tensors: Mapping[str, torch.Tensor]) -> float:
    """The L2 norm of ``tensors`` as one vector, in fp64."""
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in tensors.values()))


def noisy_layerwise(global_state: Mapping[str, torch.Tensor], clipped: Sequence[ClientUpdate],
                    tensor_blocks: Mapping[str, int | None], assigned: Mapping[int | None, int],
                    noise_std: float, noise: NoiseSource) -> dict[str, torch.Tensor]:
    """``g + (sum_c d_c + N(0, noise_std^2)) / assigned[block]`` for every tensor.

    Args:
        global_state: ``name -> tensor`` before the round.
        clipped: the participants' clipped updates (``clip_update``), any order.
        tensor_blocks: ``name -> block`` (None for head tensors).
        assigned: ``block -> members the server assigned to it this round`` (key None: the head,
            every member); a missing block counts 0.
        noise_std: sigma * C.
        noise: the run's ``NoiseSource``; draws follow the order of ``global_state``.

    Returns:
        the new global state; tensors of blocks nobody was assigned are the same objects.
    """
    new: dict[str, torch.Tensor] = {}
    for name, g in global_state.items():
        count = assigned.get(tensor_blocks[name], 0)
        chosen = _contributors(name, tensor_blocks[name], clipped)
        if count == 0:
            if chosen:
                raise ValueError(f"assigned: block {tensor_blocks[name]} has contributors but no assigned member")
            new[name] = g
            continue
        if len(chosen) > count:
            raise ValueError(f"assigned: block {tensor_blocks[name]} has {len(chosen)} contributors, more than "
                             f"the {count} members assigned to it")
        acc = noise.normal(g.shape, noise_std).to(device=g.device, dtype=_acc_dtype(g))
        for i in chosen:
            d = clipped[i].delta[name]
            if d.shape != g.shape:
                raise ValueError(f"clipped[{i}].delta: {name!r} has shape {tuple(d.shape)}, expected {tuple(g.shape)}")
            acc.add_(d.to(device=g.device, dtype=acc.dtype))
        new[name] = (g.to(acc.dtype) + acc / count).to(g.dtype)
    return new


def noisy_fisher_means(scores: np.ndarray, reported: np.ndarray, assigned: np.ndarray, fisher_clip: float,
                       noise_std: float, noise: NoiseSource) -> np.ndarray:
    """Per-block means of clipped client Fisher scores with Gaussian noise on their sums.

    Args:
        scores: float ``[L, n]``, each client's score per block (only ``reported`` entries count).
        reported: bool ``[L, n]``, the blocks each client trained and reported.
        assigned: int ``[L]``, members the server assigned to each block this round.
        fisher_clip: the L2 bound of one client's score vector.
        noise_std: ``fisher_noise_multiplier * fisher_clip``.
        noise: the run's ``NoiseSource`` (draws ``[L]`` normals).

    Returns:
        float64 ``[L]``: ``max(0, (sum_c clip(s_c) + N(0, noise_std^2)) / assigned)``, NaN where
        nobody was assigned.
    """
    s = np.where(np.asarray(reported, dtype=bool), np.asarray(scores, dtype=np.float64), 0.0)
    norms = np.sqrt((s ** 2).sum(axis=0))
    s = s * np.minimum(1.0, fisher_clip / np.maximum(norms, np.finfo(np.float64).tiny))
    total = s.sum(axis=1) + noise.normal((s.shape[0],), noise_std).numpy()
    count = np.asarray(assigned, dtype=np.int64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, np.maximum(total / np.maximum(count, 1), 0.0), np.nan)


@dataclass
class AdaptiveClip:
    """Quantile-tracking clip norm (Andrew et al., 2021, geometric update).

    Attributes:
        target_quantile: q, the share of updates meant to fall within the clip, in (0, 1).
        learning_rate: eta > 0 of ``C <- C * exp(-eta * (b - q))``.
        count_noise_multiplier: std of the noise on the count of members within the clip.
    """

    target_quantile: float
    learning_rate: float
    count_noise_multiplier: float

    def next_clip(self, clip_norm: float, norms: Sequence[float], members: int, noise: NoiseSource) -> float:
        """The clip norm of the next round from this round's pre-clip ``norms`` of ``members``
        assigned members (a member whose update did not arrive counts as outside the clip)."""
        within = sum(1.0 for n in norms if n <= clip_norm)
        b = (within + float(noise.normal((1,), self.count_noise_multiplier))) / max(members, 1)
        return clip_norm * math.exp(-self.learning_rate * (b - self.target_quantile))


class PrivateAggregation:
    """A run's private aggregation: clip, noise, the clip's adaptation and the accountant.

    Args:
        mechanism: the round's mechanisms (population, cohort and noise multipliers).
        clip_norm: C of the first round.
        delta: the delta epsilon is reported at.
        noise: the run's noise source.
        fisher_clip: the bound of one client's Fisher score vector (client-side scores only).
        adaptive: adaptive clipping, or None for a fixed C.
    """

    def __init__(self, mechanism: RoundMechanism, clip_norm: float, delta: float, noise: NoiseSource,
                 fisher_clip: float | None = None, adaptive: AdaptiveClip | None = None) -> None:
        self.mechanism = mechanism
        self.clip_norm = float(clip_norm)
        self.delta = float(delta)
        self.noise = noise
        self.fisher_clip = fisher_clip
        self.adaptive = adaptive
        self.accountant = RoundAccountant(mechanism)
        self._round_clip = self.clip_norm  # the C the last aggregated round used (adaptive clipping moves it)

    def aggregate(self, global_state: Mapping[str, torch.Tensor], updates: Sequence[ClientUpdate],
                  tensor_blocks: Mapping[str, int | None], assigned: Mapping[int | None, int]) -> dict[str, torch.Tensor]:
        """The round's noisy layer-wise average (``noisy_layerwise`` of the clipped updates); with
        adaptive clipping, the next round's C. ``assigned`` as for ``noisy_layerwise``."""
        if any(u.rank is not None for u in updates):
            raise ValueError("updates: rank-heterogeneous updates (HetLoRA) have no private aggregation")
        self._round_clip = self.clip_norm
        pairs = [clip_update(u, tensor_blocks, self.clip_norm) for u in updates]
        new = noisy_layerwise(global_state, [p[0] for p in pairs], tensor_blocks, assigned,
                              self.mechanism.noise_multiplier * self.clip_norm, self.noise)
        if self.adaptive is not None:
            self.clip_norm = self.adaptive.next_clip(self.clip_norm, [p[1] for p in pairs],
                                                     assigned.get(None, 0), self.noise)
        return new

    def fisher_means(self, scores: np.ndarray, reported: np.ndarray, assigned: np.ndarray) -> np.ndarray:
        """``noisy_fisher_means`` with this run's ``fisher_clip`` and noise."""
        if self.fisher_clip is None or self.mechanism.fisher_noise_multiplier is None:
            raise ValueError("fisher_clip: client-side Fisher scores need privacy.fisher_clip and "
                             "privacy.fisher_noise_multiplier")
        return noisy_fisher_means(scores, reported, assigned, self.fisher_clip,
                                  self.mechanism.fisher_noise_multiplier * self.fisher_clip, self.noise)

    def end_round(self) -> dict[str, Any]:
        """Account one more round; the fields of its metrics record."""
        self.accountant.step()
        epsilon = self.accountant.epsilon(self.delta)
        return {"epsilon": None if math.isinf(epsilon) else epsilon, "delta": self.delta,
                "noise_multiplier": self.mechanism.noise_multiplier, "clip_norm": self._round_clip,
                "dp_accountant": ACCOUNTANT, "dp_relation": NEIGHBORING_RELATION, "dp_sampling": SAMPLING}

    def state_dict(self) -> dict[str, Any]:
        return {"rounds": self.accountant.rounds, "clip_norm": self.clip_norm, "noise": self.noise.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.noise.load_state_dict(state["noise"])
        self.clip_norm = self._round_clip = float(state["clip_norm"])
        self.accountant = RoundAccountant(self.mechanism)
        self.accountant.step(int(state["rounds"]))


def assigned_counts(trainable: np.ndarray) -> dict[int | None, int]:
    """``block -> members assigned to it`` from the bool ``[L, m]`` trainable mask of a round's
    members (the allocation), and ``None -> m`` for the head every member trains."""
    t = np.asarray(trainable, dtype=bool)
    return {None: int(t.shape[1]), **{b: int(c) for b, c in enumerate(t.sum(axis=1))}}


def from_config(privacy: Any, num_clients: int, cohort_size: int, rounds: int, seed: int,
                client_fisher: bool) -> PrivateAggregation:
    """The ``PrivateAggregation`` of a validated ``PrivacyConfig`` (``target_epsilon`` calibrated
    to ``rounds`` rounds of ``cohort_size`` of ``num_clients``); ``client_fisher``: the strategy
    allocates from client-side Fisher scores, which are then released through the mechanism."""
    from fedhello.fl.accounting import calibrate_noise_multiplier

    a = privacy.adaptive_clip
    fisher_sigma = privacy.fisher_noise_multiplier if client_fisher else None
    count_sigma = None if a is None else a.count_noise_multiplier
    sigma = privacy.noise_multiplier
    if sigma is None:
        sigma = calibrate_noise_multiplier(privacy.target_epsilon, privacy.delta, rounds, num_clients, cohort_size,
                                           fisher_sigma, count_sigma)
    mechanism = RoundMechanism(num_clients, cohort_size, sigma, fisher_sigma, count_sigma)
    adaptive = None if a is None else AdaptiveClip(a.target_quantile, a.learning_rate, a.count_noise_multiplier)
    return PrivateAggregation(mechanism, privacy.clip_norm, privacy.delta, NoiseSource(seed, privacy.secure_rng),
                              privacy.fisher_clip if client_fisher else None, adaptive)
