"""Client-level DP: exact clipping, the noise's distribution, the denominators, private Fisher
scores, adaptive clipping, accounting against dp-accounting called directly, config refusals."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch

from fedhello.config import RunConfig
from fedhello.errors import UserError
from fedhello.fl.aggregation import ClientUpdate
from fedhello.fl.privacy import (AdaptiveClip, NoiseSource, PrivateAggregation, assigned_counts, clip_update,
                                 noisy_fisher_means, noisy_layerwise)

dpa = pytest.importorskip("dp_accounting", reason="the DP accountant (extra 'dp') is not installed")
from fedhello.fl.accounting import RoundMechanism, calibrate_noise_multiplier  # noqa: E402

# Two blocks of LoRA factors of odd sizes and a head (block None).
SHAPES = {"b0.lora_A": (3, 7), "b0.lora_B": (5, 3), "b1.lora_A": (3, 7), "b1.lora_B": (5, 3), "head.w": (4, 5)}
BLOCKS = {"b0.lora_A": 0, "b0.lora_B": 0, "b1.lora_A": 1, "b1.lora_B": 1, "head.w": None}


def _update(gen: torch.Generator, blocks: list[int], scale: float = 1.0, dtype=torch.float32) -> ClientUpdate:
    # Every tensor is present (as an engine may send full states); only the trained ones count.
    delta = {n: (torch.randn(s, generator=gen, dtype=torch.float64) * scale).to(dtype) for n, s in SHAPES.items()}
    return ClientUpdate(delta, 10, blocks)


def _norm(update: ClientUpdate, names) -> float:
    return math.sqrt(sum(float(update.delta[n].double().pow(2).sum()) for n in names))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_clipping_is_exact_over_everything_sent(dtype):
    # Seed 2: scaling by C / norm and rounding to float32 or bfloat16 lands above C (fp64: exactly C).
    gen = torch.Generator().manual_seed(2)
    big = _update(gen, [1], scale=3.0, dtype=dtype)
    sent = ["b1.lora_A", "b1.lora_B", "head.w"]
    clipped, norm = clip_update(big, BLOCKS, 0.7)
    assert norm == pytest.approx(_norm(big, sent), rel=1e-12)
    assert set(clipped.delta) == set(sent)  # the untrained block 0 is neither counted nor kept
    assert _norm(clipped, sent) <= 0.7  # the stored values, whatever their dtype's rounding
    assert _norm(clipped, sent) == pytest.approx(0.7, rel=1e-2 if dtype == torch.bfloat16 else 3e-6)
    for n in sent:  # one scale for the whole vector: the direction is kept
        torch.testing.assert_close(clipped.delta[n].double(), big.delta[n].double() * (0.7 / norm),
                                   rtol=1e-2 if dtype == torch.bfloat16 else 3e-6, atol=0)
    small = _update(gen, [0], scale=1e-3, dtype=dtype)
    kept, _ = clip_update(small, BLOCKS, 0.7)
    for n in ("b0.lora_A", "b0.lora_B", "head.w"):
        assert kept.delta[n] is small.delta[n]  # below C: unchanged, bit for bit


@pytest.mark.parametrize("secure", [False, True], ids=["seeded", "os-csprng"])
def test_noise_on_a_zero_update_has_mean_zero_and_std_sigma_c(secure):
    sigma, clip, draws = 1.3, 0.4, 60
    noise = NoiseSource(seed=11, secure=secure)
    state = {n: torch.zeros(s) for n, s in SHAPES.items()}
    zero = ClientUpdate({n: torch.zeros(s) for n, s in SHAPES.items()}, 1, [0, 1])
    samples = torch.cat([torch.cat([v.flatten().double() for v in noisy_layerwise(
        state, [zero], BLOCKS, {None: 1, 0: 1, 1: 1}, sigma * clip, noise).values()]) for _ in range(draws)])
    n, std = samples.numel(), sigma * clip
    # Sampling error: mean ~ std / sqrt(n); sample std ~ std / sqrt(2 n); 5 of those.
    assert abs(float(samples.mean())) < 5 * std / math.sqrt(n)
    assert abs(float(samples.std()) - std) < 5 * std / math.sqrt(2 * n)


def test_seeded_noise_is_reproducible_from_its_state():
    a = NoiseSource(seed=3)
    a.normal((4,), 1.0)
    state = a.state_dict()
    b = NoiseSource(seed=99)
    b.load_state_dict(state)
    assert torch.equal(a.normal((5, 2), 0.5), b.normal((5, 2), 0.5))
    secure = NoiseSource(seed=3, secure=True)
    assert secure.state_dict() is None
    assert not torch.equal(secure.normal((8,), 1.0), NoiseSource(seed=3, secure=True).normal((8,), 1.0))


def test_denominator_is_the_assigned_count_and_every_assigned_block_is_noised():
    gen = torch.Generator().manual_seed(1)
    g = {n: torch.randn(s, generator=gen) for n, s in SHAPES.items()}
    u1, u2 = _update(gen, [0]), _update(gen, [0])
    # Three members were assigned block 0 (one sent nothing), one block 1 (nobody's update arrived).
    exact = noisy_layerwise(g, [u1, u2], BLOCKS, {None: 4, 0: 3, 1: 1}, 0.0, NoiseSource(0))
    for n in ("b0.lora_A", "b0.lora_B"):
        torch.testing.assert_close(exact[n], g[n] + (u1.delta[n] + u2.delta[n]) / 3)
    torch.testing.assert_close(exact["head.w"], g["head.w"] + (u1.delta["head.w"] + u2.delta["head.w"]) / 4)
    assert torch.equal(exact["b1.lora_A"], g["b1.lora_A"])  # sigma 0: nothing to add
    noisy = noisy_layerwise(g, [u1, u2], BLOCKS, {None: 4, 0: 3, 1: 1}, 0.5, NoiseSource(0))
    assert not torch.equal(noisy["b1.lora_A"], g["b1.lora_A"])  # assigned, no contributor: still noised
    unassigned = noisy_layerwise(g, [u1, u2], BLOCKS, {None: 4, 0: 3, 1: 0}, 0.5, NoiseSource(0))
    assert unassigned["b1.lora_B"] is g["b1.lora_B"]  # nobody assigned: its sum is public (zero)
    with pytest.raises(ValueError, match="^assigned: block 0 has 2 contributors, more than the 1"):
        noisy_layerwise(g, [u1, u2], BLOCKS, {None: 4, 0: 1, 1: 1}, 0.0, NoiseSource(0))


def test_assigned_counts_from_the_members_trainable_mask():
    mask = np.array([[True, False, True], [False, False, True]])
    assert assigned_counts(mask) == {None: 3, 0: 2, 1: 1}


def test_private_fisher_means_clip_each_client_then_average_over_assigned():
    scores = np.array([[3.0, 0.1, 9.0], [4.0, 0.2, 9.0], [0.0, 0.0, 9.0]])
    reported = np.array([[True, True, False], [True, True, False], [False, False, False]])
    means = noisy_fisher_means(scores, reported, np.array([3, 2, 0]), 1.0, 0.0, NoiseSource(0))
    # client 0's vector (3, 4) has norm 5 -> (0.6, 0.8); client 1's is within the clip.
    np.testing.assert_allclose(means[:2], [(0.6 + 0.1) / 3, (0.8 + 0.2) / 2], rtol=1e-12)
    assert math.isnan(means[2])
    noisy = noisy_fisher_means(scores, reported, np.array([3, 2, 1]), 1.0, 100.0, NoiseSource(5))
    assert np.all(noisy >= 0) and np.any(noisy == 0)  # heavy noise, clamped at 0 (post-processing)


def test_adaptive_clip_moves_towards_the_target_quantile():
    rule = AdaptiveClip(target_quantile=0.5, learning_rate=0.2, count_noise_multiplier=0.0)
    assert rule.next_clip(1.0, [0.1, 0.2, 0.3, 0.4], 4, NoiseSource(0)) == pytest.approx(math.exp(-0.2 * 0.5))
    assert rule.next_clip(1.0, [2.0, 3.0], 4, NoiseSource(0)) == pytest.approx(math.exp(0.2 * 0.5))


def _direct_epsilon(n: int, k: int, sigmas: list[float], rounds: int, delta: float) -> float:
    accountant = dpa.rdp.RdpAccountant(neighboring_relation=dpa.NeighboringRelation.REPLACE_ONE)
    event = dpa.SampledWithoutReplacementDpEvent(n, k, dpa.ComposedDpEvent([dpa.GaussianDpEvent(s) for s in sigmas]))
    accountant.compose(dpa.SelfComposedDpEvent(event, rounds))
    return accountant.get_epsilon(delta)


def test_reported_epsilon_is_dp_accounting_called_directly():
    private = PrivateAggregation(RoundMechanism(100, 10, 2.0), 1.0, 1e-5, NoiseSource(0))
    eps = [private.end_round()["epsilon"] for _ in range(5)]
    # Replace-one moves the sum of C-clipped updates by up to 2C: dp-accounting's sigma is 2.0 / 2.
    assert eps == pytest.approx([_direct_epsilon(100, 10, [1.0], r, 1e-5) for r in range(1, 6)], rel=1e-12)
    assert all(a < b for a, b in zip(eps, eps[1:]))  # grows with the rounds
    record = private.end_round()
    assert record["dp_relation"] == "replace-one client" and record["dp_accountant"].startswith("RDP")
    # A paper-scale setting: 100 clients, 10 per round, 50 rounds, delta 1e-5 at dp-accounting sigma 1.0.
    assert RoundMechanism(100, 10, 2.0).epsilon(50, 1e-5) == pytest.approx(9.43, abs=0.005)
    with_fisher = PrivateAggregation(RoundMechanism(100, 10, 2.0, 3.0, 4.0), 1.0, 1e-5, NoiseSource(0))
    assert with_fisher.end_round()["epsilon"] == pytest.approx(_direct_epsilon(100, 10, [1.0, 1.5, 4.0], 1, 1e-5))


def test_epsilon_falls_as_sigma_grows_and_is_infinite_without_noise():
    eps = [RoundMechanism(50, 10, s).epsilon(20, 1e-5) for s in (0.5, 1.0, 2.0, 4.0)]
    assert all(a > b for a, b in zip(eps, eps[1:]))
    assert RoundMechanism(50, 10, 0.0).epsilon(20, 1e-5) == math.inf
    assert PrivateAggregation(RoundMechanism(50, 10, 0.0), 1.0, 1e-5, NoiseSource(0)).end_round()["epsilon"] is None


def test_target_epsilon_calibrates_sigma_or_is_refused():
    sigma = calibrate_noise_multiplier(4.0, 1e-5, 30, 100, 10)
    assert RoundMechanism(100, 10, sigma).epsilon(30, 1e-5) == pytest.approx(4.0, rel=1e-3)
    assert RoundMechanism(100, 10, sigma).epsilon(30, 1e-5) <= 4.0 + 1e-9
    with pytest.raises(UserError, match=r"^privacy\.target_epsilon: 0\.1 is unreachable in 30 rounds") as info:
        calibrate_noise_multiplier(0.1, 1e-5, 30, 100, 10, fisher_noise_multiplier=0.5)  # the Fisher channel alone
    assert "\n" not in str(info.value)


BASE = {
    "seed": 3,
    "model": {"name": "minilm", "rank": 4, "alpha": 8},
    "data": {"name": "bbc_news", "num_clients": 100, "proxy_fraction": 0.05},
    "strategy": {"name": "rgd", "options": {"pattern": "bottleneck"}},
    "aggregation": {"weighting": "uniform"},
    "rounds": 20,
    "cohort_size": 10,
    "privacy": {"noise_multiplier": 1.0, "clip_norm": 0.5},
}


def _with(**changes) -> dict:
    raw = {k: dict(v) if isinstance(v, dict) else v for k, v in BASE.items()}
    for dotted, value in changes.items():
        section, _, key = dotted.partition("__")
        if key:
            raw[section] = {**raw[section], key: value}
            if value is None:
                del raw[section][key]
        else:
            raw[section] = value
    return raw


def test_a_private_config_loads():
    config = RunConfig.from_dict(_with())
    assert config.privacy.noise_multiplier == 1.0 and config.privacy.delta == 1e-5 and not config.privacy.secure_rng
    robust = RunConfig.from_dict(_with(privacy__noise_multiplier=0))  # norm bounding only
    assert robust.privacy.noise_multiplier == 0
    fisher = _with(strategy={"name": "fedhello", "options": {"fisher_source": "client"}},
                   privacy__fisher_clip=1.0, privacy__fisher_noise_multiplier=2.0)
    assert RunConfig.from_dict(fisher).privacy.fisher_clip == 1.0
    adaptive = _with(privacy__adaptive_clip={"target_quantile": 0.6, "count_noise_multiplier": 0.5})
    assert RunConfig.from_dict(adaptive).privacy.adaptive_clip.learning_rate == 0.2


@pytest.mark.parametrize("changes, field", [
    ({"privacy__noise_multiplier": -0.1}, "privacy.noise_multiplier"),
    ({"privacy__clip_norm": 0}, "privacy.clip_norm"),
    ({"privacy__clip_norm": -1}, "privacy.clip_norm"),
    ({"privacy__clip_norm": None}, "privacy.clip_norm"),
    ({"privacy__delta": 0}, "privacy.delta"),
    ({"privacy__delta": 1}, "privacy.delta"),
    ({"privacy__delta": 1.5}, "privacy.delta"),
    ({"privacy__target_epsilon": 3.0}, "privacy.noise_multiplier"),  # both given
    ({"privacy__noise_multiplier": None, "privacy__target_epsilon": 0.01}, "privacy.target_epsilon"),
    ({"privacy__noise_multiplier": None, "privacy__target_epsilon": -1}, "privacy.target_epsilon"),
    ({"aggregation": {"weighting": "samples"}}, "aggregation.weighting"),
    ({"aggregation": {"weighting": "norm"}}, "aggregation.weighting"),
    ({"aggregation": {"weighting": "uniform", "heads": "keep_initial"}}, "aggregation.heads"),
    ({"clients": {"over_selection": 0.3}}, "clients.over_selection"),
    ({"strategy": {"name": "fedhello", "options": {"fisher_source": "client"}}}, "privacy.fisher_noise_multiplier"),
    ({"strategy": {"name": "fedhello", "options": {"fisher_source": "client"}}, "privacy__fisher_clip": 1.0,
      "privacy__fisher_noise_multiplier": 0}, "privacy.fisher_noise_multiplier"),
    ({"strategy": {"name": "fedhello", "options": {"fisher_source": "client"}},
      "privacy__fisher_noise_multiplier": 1.0}, "privacy.fisher_clip"),
    ({"privacy__fisher_noise_multiplier": -1.0, "privacy__fisher_clip": 1.0}, "privacy.fisher_noise_multiplier"),
    ({"privacy__fisher_noise_multiplier": 1.0, "privacy__fisher_clip": 0}, "privacy.fisher_clip"),
    ({"strategy": {"name": "hetlora"}}, "strategy.name"),
    ({"privacy__adaptive_clip": {"target_quantile": 1.0, "count_noise_multiplier": 1}},
     "privacy.adaptive_clip.target_quantile"),
    ({"privacy__adaptive_clip": {}}, "privacy.adaptive_clip.count_noise_multiplier"),
    ({"privacy__adaptive_clip": {"count_noise_multiplier": 0}}, "privacy.adaptive_clip.count_noise_multiplier"),
    ({"privacy__sigma": 1.0}, "privacy.sigma"),
])
def test_bad_privacy_settings_get_one_line_naming_the_field(changes, field):
    with pytest.raises(UserError) as info:
        RunConfig.from_dict(_with(**changes))
    message = str(info.value)
    assert message.startswith(field + ":") and "\n" not in message, message


def test_missing_dp_accounting_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "dp_accounting", None)  # import fails as if not installed
    with pytest.raises(UserError, match=r"^privacy: .*pip install 'fedhello\[dp\]'"):
        RunConfig.from_dict(_with())
    RunConfig.from_dict(_with(privacy__noise_multiplier=0))  # clipping alone needs no accountant
