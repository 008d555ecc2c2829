"""Capacity tiers: k per tier, tier sizes, seeded random membership, validation."""

from __future__ import annotations

import numpy as np
import pytest

from fedhello.fl.capacity import CapacityTiers, parse_fraction


def test_default_tiers_are_half_three_quarters_full():
    tiers = CapacityTiers()
    assert tiers.capacities(12) == (6, 9, 12)
    assert tiers.capacities(6) == (3, 5, 6)  # 4.5 rounds up
    assert CapacityTiers((0.01,), (1,)).capacities(12) == (1,)  # at least one block


def test_tier_sizes_sum_and_follow_shares():
    assert CapacityTiers().tier_sizes(10).tolist() == [4, 3, 3]
    assert CapacityTiers(shares=(6, 3, 1)).tier_sizes(100).tolist() == [60, 30, 10]
    assert CapacityTiers(shares=(6, 3, 1)).tier_sizes(7).sum() == 7


def test_assignment_is_seeded_random_not_contiguous():
    tiers = CapacityTiers()
    a = tiers.assign(30, 12, seed=1)
    assert np.bincount(a.tier).tolist() == [10, 10, 10]
    assert np.array_equal(a.capacity, np.array([6, 9, 12])[a.tier])
    assert a.tier_capacities == (6, 9, 12) and a.num_clients == 30 and a.num_blocks == 12
    assert np.array_equal(tiers.assign(30, 12, seed=1).tier, a.tier)
    assert not np.array_equal(tiers.assign(30, 12, seed=2).tier, a.tier)
    assert not np.array_equal(a.tier, np.sort(a.tier))  # not ids 0..9 → tier 0, ...
    assert a.of([3, 0]).tolist() == [a.capacity[3], a.capacity[0]]


def test_fraction_strings_and_validation():
    assert parse_fraction("3/4") == 0.75 and parse_fraction(" 0.5 ") == 0.5 and parse_fraction(1) == 1.0
    assert CapacityTiers(("1/2", "3/4", "1"), ("1", "1", "1")).capacities(12) == (6, 9, 12)
    with pytest.raises(ValueError, match="^fractions"):
        CapacityTiers((0.5, 1.5), (1, 1))
    with pytest.raises(ValueError, match="^fractions"):
        CapacityTiers((0.0,), (1,))
    with pytest.raises(ValueError, match="^fractions"):
        CapacityTiers(("half",), (1,))
    with pytest.raises(ValueError, match="^shares"):
        CapacityTiers((0.5, 1.0), (1,))
    with pytest.raises(ValueError, match="^shares"):
        CapacityTiers((0.5, 1.0), (1, 0))
    with pytest.raises(ValueError, match="^num_blocks"):
        CapacityTiers().capacities(0)
