"""Fisher scores: exact ordered 1-D k-means, probabilities, the server's running estimate."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from fedhello.fl.fisher import FisherTracker, fisher_probabilities, kmeans_1d


def _brute_force_sse(x: np.ndarray, k: int) -> float:
    """Best within-group squared error over every split of the sorted values into k runs."""
    s = np.sort(x)
    best = np.inf
    for cuts in itertools.combinations(range(1, s.size), k - 1):
        parts = np.split(s, cuts)
        best = min(best, sum(((p - p.mean()) ** 2).sum() for p in parts))
    return best


@pytest.mark.parametrize("seed", range(5))
def test_kmeans_1d_is_optimal_and_ordered(seed):
    x = np.random.default_rng(seed).gamma(2.0, size=9)
    groups = kmeans_1d(x, 3)
    assert sorted(set(groups.tolist())) == [0, 1, 2]
    sse = sum(((x[groups == g] - x[groups == g].mean()) ** 2).sum() for g in range(3))
    assert sse == pytest.approx(_brute_force_sse(x, 3), rel=1e-12, abs=1e-12)
    centroids = [x[groups == g].mean() for g in range(3)]
    assert centroids == sorted(centroids)
    order = np.argsort(x)
    assert np.all(np.diff(groups[order]) >= 0)  # a higher score never lands in a lower group


def test_kmeans_1d_with_ties_and_few_levels():
    np.testing.assert_array_equal(kmeans_1d([2.0, 2.0, 2.0], 3), [0, 0, 0])
    np.testing.assert_array_equal(kmeans_1d([5.0, 1.0, 5.0, 1.0], 3), [1, 0, 1, 0])
    np.testing.assert_array_equal(kmeans_1d([1.0, 1.0, 1.0, 9.0], 3), [0, 0, 0, 1])


def test_group_probabilities_hand_computed():
    # Listed in decreasing order so that unordered cluster ids would give the wrong weights.
    scores = [10.0, 9.9, 5.2, 5.0, 1.1, 1.0]
    np.testing.assert_allclose(fisher_probabilities(scores), np.array([3, 3, 2, 2, 1, 1]) / 12, atol=1e-15)
    np.testing.assert_allclose(fisher_probabilities(scores, weights=(1, 4, 16)),
                               np.array([16, 16, 4, 4, 1, 1]) / 42, atol=1e-15)
    np.testing.assert_allclose(fisher_probabilities([1.0, 3.0], "proportional"), [0.25, 0.75])
    np.testing.assert_allclose(fisher_probabilities([0.0, 0.0], "proportional"), [0.5, 0.5])


def test_fisher_probabilities_rejects_bad_input():
    with pytest.raises(ValueError, match="^scores"):
        fisher_probabilities([1.0, np.nan])
    with pytest.raises(ValueError, match="^scores"):
        fisher_probabilities([1.0, -1.0])
    with pytest.raises(ValueError, match="^mode"):
        fisher_probabilities([1.0], "rank")
    with pytest.raises(ValueError, match="^weights"):
        fisher_probabilities([1.0], weights=(1, 0))


def test_tracker_mean_over_reporters_ema_and_untrained_blocks_keep_value():
    tracker = FisherTracker(3, decay=0.5)
    scores = np.array([[2.0, 4.0], [1.0, 100.0], [7.0, 7.0]])
    trained = np.array([[True, True], [True, False], [False, False]])
    round_mean = tracker.update(scores, trained)
    np.testing.assert_allclose(round_mean[:2], [3.0, 1.0])  # 100 is from a client that did not train block 1
    assert np.isnan(round_mean[2])
    np.testing.assert_allclose(tracker.scores[:2], [3.0, 1.0])
    assert np.isnan(tracker.scores[2])
    np.testing.assert_allclose(tracker.filled(), [3.0, 1.0, 3.0])  # unseen blocks count as important

    tracker.update(np.array([[5.0], [0.0], [2.0]]), np.array([[True], [False], [True]]))
    np.testing.assert_allclose(tracker.scores, [0.5 * 3 + 0.5 * 5, 1.0, 2.0])

    state = json.loads(json.dumps(tracker.state_dict()))
    other = FisherTracker(3)
    other.load_state_dict(state)
    np.testing.assert_array_equal(other.scores, tracker.scores)
    assert other.decay == 0.5


def test_tracker_set_and_errors():
    tracker = FisherTracker(2)
    np.testing.assert_array_equal(tracker.filled(), [1.0, 1.0])
    tracker.set([0.5, 2.0])
    np.testing.assert_array_equal(tracker.scores, [0.5, 2.0])
    with pytest.raises(ValueError, match="^scores"):
        tracker.update(np.ones((3, 1)), np.ones((3, 1), dtype=bool))
    with pytest.raises(ValueError, match="^trained"):
        tracker.update(np.ones((2, 1)), np.ones((2, 2), dtype=bool))
    with pytest.raises(ValueError, match="^decay"):
        FisherTracker(2, decay=1.0)
