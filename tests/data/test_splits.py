"""Held-out splits: exact sizes, stratification, disjointness, seeding, argument checks."""

from __future__ import annotations

import datasets
import numpy as np
import pytest

from fedhello.data import split_dataset, split_indices

LABELS = np.repeat(np.arange(4), [500, 300, 150, 50])


def test_stratified_split_sizes_and_proportions():
    train, test, proxy = split_indices(LABELS, 0.2, 0.05, seed=1)
    assert (train.size, test.size, proxy.size) == (750, 200, 50)
    assert np.array_equal(np.sort(np.concatenate([train, test, proxy])), np.arange(1000))
    assert np.bincount(LABELS[test]).tolist() == [100, 60, 30, 10]
    assert np.bincount(LABELS[proxy]).tolist() == [25, 15, 8, 2]  # 7.5 and 2.5 by largest remainders
    again = split_indices(LABELS, 0.2, 0.05, seed=1)
    assert all(np.array_equal(a, b) for a, b in zip((train, test, proxy), again))
    assert not np.array_equal(test, split_indices(LABELS, 0.2, 0.05, seed=2)[1])


def test_unstratified_split_and_dataset_wrapper():
    train, test, proxy = split_indices(LABELS, 0.1, stratify=False, seed=0)
    assert (train.size, test.size, proxy.size) == (900, 100, 0)
    ds = datasets.Dataset.from_dict({"x": np.arange(1000), "label": LABELS})
    parts = split_dataset(ds, 0.25, proxy_fraction=0.1, seed=4)
    assert (len(parts.train), len(parts.test), len(parts.proxy)) == (650, 250, 100)
    assert not set(parts.train["x"]) & set(parts.test["x"])
    assert split_dataset(ds, 0.25).proxy is None


@pytest.mark.parametrize("kwargs, name", [
    ({"test_fraction": 1.0}, "test_fraction"),
    ({"test_fraction": -0.1}, "test_fraction"),
    ({"test_fraction": 0.6, "proxy_fraction": 0.4}, "test_fraction"),
    ({"test_fraction": 0.2, "proxy_fraction": 1.5}, "proxy_fraction"),
])
def test_bad_fractions(kwargs, name):
    with pytest.raises(ValueError, match=f"^{name}"):
        split_indices(LABELS, **kwargs)
