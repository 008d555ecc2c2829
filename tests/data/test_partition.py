"""Client partitions: coverage, sizes, label skew, pathological classes, argument checks."""

from __future__ import annotations

import datasets
import numpy as np
import pytest

from fedhello.data.partition import (
    dirichlet_partition,
    iid_partition,
    label_counts,
    partition_dataset,
    partition_labels,
    pathological_partition,
)

LABELS = np.repeat(np.arange(5), 400)  # class-sorted, as loaded from class folders


def _check_disjoint_cover(parts: list[np.ndarray], n: int) -> None:
    joined = np.concatenate(parts)
    assert joined.size == n and np.array_equal(np.sort(joined), np.arange(n))
    for p in parts:
        assert p.dtype == np.int64 and np.all(np.diff(p) > 0)


@pytest.mark.parametrize("kind", ["iid", "dirichlet", "pathological"])
def test_partitions_cover_every_sample_once_and_are_seeded(kind):
    parts = partition_labels(LABELS, 20, kind, seed=3)
    assert len(parts) == 20
    _check_disjoint_cover(parts, LABELS.size)
    again = partition_labels(LABELS, 20, kind, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    other = partition_labels(LABELS, 20, kind, seed=4)
    assert any(not np.array_equal(a, b) for a, b in zip(parts, other))


def test_iid_is_balanced_even_on_class_sorted_data():
    parts = iid_partition(LABELS.size + 7, 10, seed=0)
    sizes = [p.size for p in parts]
    assert sum(sizes) == LABELS.size + 7 and max(sizes) - min(sizes) <= 1
    counts = label_counts(LABELS, iid_partition(LABELS.size, 10, seed=0), 5)
    # 200 samples per client, 40 expected per class; contiguous shards would give 200 of one class.
    assert counts.max() < 70 and counts.min() > 15


def _mean_total_variation(alpha: float) -> float:
    values = []
    for seed in range(3):
        counts = label_counts(LABELS, dirichlet_partition(LABELS, 20, alpha, seed=seed, min_size=0), 5)
        counts = counts[counts.sum(axis=1) > 0]  # alpha = 0.1 may leave a client empty
        dist = counts / counts.sum(axis=1, keepdims=True)
        values.append(0.5 * np.abs(dist - 0.2).sum(axis=1).mean())
    return float(np.mean(values))


def test_label_skew_grows_as_alpha_shrinks():
    skews = [_mean_total_variation(a) for a in (100.0, 1.0, 0.1)]
    assert skews[0] < 0.1 < skews[1] < skews[2]
    assert skews[2] > 0.5


def test_dirichlet_min_size():
    parts = dirichlet_partition(LABELS, 20, 0.3, seed=1, min_size=20)
    assert min(p.size for p in parts) >= 20
    with pytest.raises(ValueError, match="^alpha: no Dirichlet"):
        dirichlet_partition(LABELS, 100, 0.01, seed=0, min_size=19)


def test_pathological_exact_classes_dirichlet_sizes_balanced_dealing():
    parts = pathological_partition(LABELS, 20, 2, seed=5)
    counts = label_counts(LABELS, parts, 5)
    assert np.all((counts > 0).sum(axis=1) == 2)
    holders = (counts > 0).sum(axis=0)
    assert holders.max() - holders.min() <= 1  # every class dealt to about as many clients
    shares = counts[counts > 0]
    assert shares.min() >= 1 and shares.max() > 3 * shares.min()  # Dirichlet(1) shares, not equal splits
    _check_disjoint_cover(parts, LABELS.size)


def test_pathological_single_class_and_all_classes():
    parts = pathological_partition(LABELS, 5, 1, seed=0)
    assert np.all((label_counts(LABELS, parts, 5) > 0).sum(axis=1) == 1)
    parts = pathological_partition(LABELS, 3, 5, seed=0)
    assert np.all((label_counts(LABELS, parts, 5) > 0).sum(axis=1) == 5)


def test_partition_dataset_reads_the_label_column():
    ds = datasets.Dataset.from_dict({"text": ["x"] * 40, "y": np.repeat(np.arange(4), 10)})
    parts = partition_dataset(ds, 4, "pathological", label_column="y", classes_per_client=1, seed=0)
    for p in parts:
        assert len(set(np.asarray(ds["y"])[p].tolist())) == 1
    with pytest.raises(ValueError, match="^label_column"):
        partition_dataset(ds, 4, "iid")


def test_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match="^alpha"):
        partition_labels(LABELS, 10, "dirichlet", alpha=0.0)
    with pytest.raises(ValueError, match="^alpha"):
        partition_labels(LABELS, 10, "dirichlet", alpha=-1)
    with pytest.raises(ValueError, match="^num_clients"):
        partition_labels(LABELS[:5], 6, "iid")
    with pytest.raises(ValueError, match="^num_clients"):
        partition_labels(LABELS, 0, "dirichlet")
    with pytest.raises(ValueError, match="^classes_per_client"):
        partition_labels(LABELS, 10, "pathological", classes_per_client=6)
    with pytest.raises(ValueError, match="^classes_per_client"):
        pathological_partition(np.array([0, 0, 1, 1, 1, 1, 1, 1]), 8, 1, seed=0)
    with pytest.raises(ValueError, match="^kind"):
        partition_labels(LABELS, 10, "shards")
    with pytest.raises(ValueError, match="^labels"):
        partition_labels(np.zeros((4, 2), dtype=int), 2, "iid")
