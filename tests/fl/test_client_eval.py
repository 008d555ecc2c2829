"""Per-client held-out accuracy: class accuracies weighted by each client's own label mix."""

from __future__ import annotations

import numpy as np
import pytest

from fedhello.fl.client_eval import accuracy_spread, class_accuracy, client_accuracies


def test_class_accuracy_and_client_mixes_by_hand():
    labels = np.array([0, 0, 0, 0, 1, 1, 2, 2, 2, 2])
    pred = np.array([0, 0, 0, 1, 1, 0, 2, 2, 0, 0])
    per_class = class_accuracy(pred, labels)
    assert per_class == pytest.approx({0: 0.75, 1: 0.5, 2: 0.5})
    clients = client_accuracies(per_class, [np.array([0, 0, 0]),        # class 0 only
                                            np.array([0, 1, 1, 1]),     # 1/4 class 0, 3/4 class 1
                                            np.array([2, 0, 2, 1]),     # 1/4, 1/4, 1/2
                                            np.array([3, 3])])          # a class the test split lacks
    assert clients[:3] == pytest.approx([0.75, 0.25 * 0.75 + 0.75 * 0.5, 0.25 * 0.75 + 0.25 * 0.5 + 0.5 * 0.5])
    assert clients[3] is None


def test_spread_over_clients():
    values = [0.9, None, 0.5, 0.7, 0.8, 0.6, 0.95, 0.85, 0.75, 0.65, 0.55]
    spread = accuracy_spread(values)
    known = sorted(v for v in values if v is not None)  # 10 values: the 10th percentile is 0.1 of the way
    assert spread["mean"] == pytest.approx(np.mean(known)) and spread["worst"] == 0.5
    assert spread["p10"] == pytest.approx(known[0] + 0.9 * (known[1] - known[0]))
    assert accuracy_spread([None]) == {"mean": None, "worst": None, "p10": None}
