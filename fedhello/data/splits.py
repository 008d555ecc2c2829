"""Seeded held-out splits: a global test set and an optional server-side proxy set.

The test set is held out for evaluating the global model; the proxy set (for proxy-set Fisher
scores) is removed from the clients' data. Splits are stratified by label by default, with
exact totals: ``round(fraction * n)`` samples, spread over classes by largest remainders.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import datasets
import numpy as np

__all__ = ["DataSplits", "split_indices", "split_dataset"]


@dataclass(frozen=True)
class DataSplits:
    """Train (for the clients), test (global evaluation) and proxy (server) parts of a data set.

    Attributes:
        train, test: the parts; ``test`` has no rows when the test fraction is 0.
        proxy: the proxy part, None when the proxy fraction is 0.
    """

    train: datasets.Dataset
    test: datasets.Dataset
    proxy: datasets.Dataset | None


def _quotas(class_sizes: np.ndarray, total: int) -> np.ndarray:
    """Split ``total`` over classes proportionally to ``class_sizes`` (largest remainders)."""
    exact = class_sizes / class_sizes.sum() * total
    quota = np.minimum(np.floor(exact).astype(np.int64), class_sizes)
    order = np.argsort(-(exact - quota), kind="stable")
    for c in order:
        if quota.sum() >= total:
            break
        if quota[c] < class_sizes[c]:
            quota[c] += 1
    return quota


def split_indices(labels: Sequence[int] | np.ndarray, test_fraction: float, proxy_fraction: float = 0.0,
                  seed: int = 0, stratify: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Seeded train/test/proxy index split.

    Args:
        labels: int class ids ``[n]``.
        test_fraction: share of all samples held out for testing, in [0, 1).
        proxy_fraction: share of all samples for the proxy set, in [0, 1).
        seed: seeds the shuffle.
        stratify: keep the class proportions in every part.

    Returns:
        sorted int64 ``(train, test, proxy)`` indices; together a partition of ``range(n)``.
    """
    y = np.asarray(labels)
    if y.ndim != 1 or y.size == 0:
        raise ValueError(f"labels: expected a non-empty 1-D sequence, got shape {y.shape}")
    for name, value in (("test_fraction", test_fraction), ("proxy_fraction", proxy_fraction)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
            raise ValueError(f"{name}: expected a number in [0, 1), got {value!r}")
    if test_fraction + proxy_fraction >= 1:
        raise ValueError(f"test_fraction: test_fraction + proxy_fraction must be < 1 (something must be left to "
                         f"train on), got {test_fraction} + {proxy_fraction}")
    n = y.size
    n_test = int(np.floor(test_fraction * n + 0.5))
    n_proxy = int(np.floor(proxy_fraction * n + 0.5))
    if n_test + n_proxy >= n:
        raise ValueError(f"test_fraction: {n_test} test + {n_proxy} proxy samples leave nothing of {n} to train on")
    rng = np.random.default_rng(seed)
    if not stratify:
        order = rng.permutation(n)
        test, proxy, train = np.split(order, [n_test, n_test + n_proxy])
    else:
        classes, inverse = np.unique(y, return_inverse=True)
        members = [rng.permutation(np.flatnonzero(inverse == c)) for c in range(classes.size)]
        sizes = np.array([m.size for m in members])
        q_test = _quotas(sizes, n_test)
        q_proxy = _quotas(sizes - q_test, n_proxy)
        test = np.concatenate([m[:t] for m, t in zip(members, q_test)])
        proxy = np.concatenate([m[t:t + p] for m, t, p in zip(members, q_test, q_proxy)])
        train = np.concatenate([m[t + p:] for m, t, p in zip(members, q_test, q_proxy)])
    return tuple(np.sort(part).astype(np.int64) for part in (train, test, proxy))


def split_dataset(dataset: datasets.Dataset, test_fraction: float, *, proxy_fraction: float = 0.0, seed: int = 0,
                  stratify: bool = True, label_column: str = "label") -> DataSplits:
    """``split_indices`` applied to a data set's ``label_column``."""
    if label_column not in dataset.column_names:
        raise ValueError(f"label_column: {label_column!r} is not a column of the data set {dataset.column_names}")
    train, test, proxy = split_indices(np.asarray(dataset[label_column]), test_fraction, proxy_fraction, seed,
                                       stratify)
    return DataSplits(dataset.select(train), dataset.select(test),
                      dataset.select(proxy) if proxy_fraction > 0 else None)
