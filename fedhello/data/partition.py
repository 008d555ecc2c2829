"""Split a labelled data set over federated clients.

Three kinds of partition, each returning one sorted int64 index array per client (indices into
the data set that was partitioned):

* ``"iid"``: a seeded shuffle cut into ``num_clients`` near-equal shards
  (``flwr_datasets.partitioner.IidPartitioner`` on a shuffled copy: the stock partitioner
  cuts contiguous shards, which on a class-sorted data set would be anything but IID);
* ``"dirichlet"``: label skew, the share of each class given to each client drawn from
  Dirichlet(alpha) (``flwr_datasets.partitioner.DirichletPartitioner``); alpha = 0.5 is the
  usual non-IID setting, 0.1 an extreme one;
* ``"pathological"``: each client holds exactly ``classes_per_client`` classes; classes are
  dealt from a stream of seeded permutations (so every class is held by about as many clients)
  and each class is split over its holders with Dirichlet(``size_concentration``) sizes, at
  least one sample each — the scheme of the Fed-HeLLo paper's code. flwr-datasets'
  ``PathologicalPartitioner`` splits every class into equal parts and can leave classes unused,
  so this one is written here.

The partitioners only ever see a two-column table (label, row index), never the data itself,
so partitioning a large image set costs no copy of its pixels.
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Sequence

import numpy as np

from fedhello.names import PARTITION_KINDS

__all__ = [
    "PARTITION_KINDS",
    "iid_partition",
    "dirichlet_partition",
    "pathological_partition",
    "partition_labels",
    "partition_dataset",
    "label_counts",
]

_ROW = "row"
_LABEL = "label"


def _as_labels(labels: Sequence[int] | np.ndarray) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise ValueError(f"labels: expected a 1-D sequence of class ids, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"labels: expected integer class ids, got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


def _check_positive(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name}: expected a finite number > 0, got {value!r}")
    return float(value)


def _check_num_clients(num_clients: int, num_samples: int) -> None:
    if isinstance(num_clients, bool) or not isinstance(num_clients, (int, np.integer)):
        raise TypeError(f"num_clients: expected an int, got {type(num_clients).__name__}")
    if not 1 <= num_clients <= num_samples:
        raise ValueError(f"num_clients: expected 1 <= num_clients <= {num_samples} (the number of samples), "
                         f"got {num_clients}")


def _rows_of(partitioner, num_clients: int) -> list[np.ndarray]:
    return [np.sort(np.asarray(partitioner.load_partition(i)[_ROW], dtype=np.int64)) for i in range(num_clients)]


def iid_partition(num_samples: int, num_clients: int, seed: int = 0) -> list[np.ndarray]:
    """Shuffle ``range(num_samples)`` with ``seed`` and cut it into near-equal shards.

    Returns:
        ``num_clients`` sorted int64 index arrays; sizes differ by at most one.
    """
    if isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer)) or num_samples < 1:
        raise ValueError(f"num_samples: expected an int >= 1, got {num_samples!r}")
    _check_num_clients(num_clients, num_samples)
    import datasets  # only when partitioning: the engine's package must import without it (GPU machines)

    table = datasets.Dataset.from_dict({_ROW: np.arange(num_samples, dtype=np.int64)}).shuffle(seed=seed)
    from flwr_datasets.partitioner import IidPartitioner  # heavy import (~3 s): only when partitioning

    partitioner = IidPartitioner(num_partitions=int(num_clients))
    partitioner.dataset = table
    return _rows_of(partitioner, num_clients)


def dirichlet_partition(labels: Sequence[int] | np.ndarray, num_clients: int, alpha: float,
                        seed: int = 0, min_size: int = 1) -> list[np.ndarray]:
    """Label-skewed partition: class k's samples are split over clients by Dirichlet(alpha).

    Args:
        labels: int class id of every sample, ``[n]``.
        num_clients: number of clients (1..n).
        alpha: Dirichlet concentration (> 0); smaller means more skew.
        seed: seeds the draw.
        min_size: every client gets at least this many samples; the draw is repeated (at most
            10 times, as flwr-datasets does) until it holds.

    Returns:
        ``num_clients`` sorted int64 index arrays that together hold every sample once.
    """
    y = _as_labels(labels)
    _check_num_clients(num_clients, y.size)
    alpha = _check_positive("alpha", alpha)
    if isinstance(min_size, bool) or not isinstance(min_size, (int, np.integer)) or min_size < 0:
        raise ValueError(f"min_size: expected an int >= 0, got {min_size!r}")
    if min_size * num_clients > y.size:
        raise ValueError(f"min_size: {num_clients} clients x {min_size} samples exceed the {y.size} samples")
    import datasets  # only when partitioning

    table = datasets.Dataset.from_dict({_LABEL: y, _ROW: np.arange(y.size, dtype=np.int64)})
    from flwr_datasets.partitioner import DirichletPartitioner  # heavy import: only when partitioning

    partitioner = DirichletPartitioner(num_partitions=int(num_clients), partition_by=_LABEL, alpha=alpha,
                                       min_partition_size=int(min_size), self_balancing=False, shuffle=True,
                                       seed=seed)
    partitioner.dataset = table
    with warnings.catch_warnings():
        # flwr-datasets warns on every redraw; a final failure is reported below instead.
        warnings.simplefilter("ignore", UserWarning)
        try:
            return _rows_of(partitioner, num_clients)
        except ValueError as err:
            raise ValueError(f"alpha: no Dirichlet({alpha}) draw gave each of {num_clients} clients at least "
                             f"min_size={min_size} of the {y.size} samples in 10 attempts; raise alpha, lower "
                             f"min_size or use fewer clients ({err})") from err


def _deal_classes(num_classes: int, per_client: int, num_clients: int, rng: np.random.Generator) -> list[list[int]]:
    """Deal ``per_client`` distinct classes to each client from a stream of permutations."""
    stream: list[int] = []
    dealt = []
    for _ in range(num_clients):
        chosen: list[int] = []
        pos = 0
        while len(chosen) < per_client:
            if pos >= len(stream):
                stream.extend(rng.permutation(num_classes).tolist())
            if stream[pos] in chosen:
                pos += 1  # a repeat at a permutation boundary stays in the stream for the next client
            else:
                chosen.append(stream.pop(pos))
        dealt.append(sorted(chosen))
    return dealt


def pathological_partition(labels: Sequence[int] | np.ndarray, num_clients: int, classes_per_client: int,
                           seed: int = 0, size_concentration: float = 1.0) -> list[np.ndarray]:
    """Each client holds exactly ``classes_per_client`` classes with Dirichlet-sized shares.

    Args:
        labels: int class id of every sample, ``[n]``; the classes are the distinct values.
        num_clients: number of clients (1..n).
        classes_per_client: classes per client (1..number of classes).
        seed: seeds the dealing of classes and the share sizes.
        size_concentration: Dirichlet concentration of the share sizes inside a class
            (1.0 as in the paper's code; large values give near-equal shares).

    Returns:
        ``num_clients`` sorted int64 index arrays. Every sample of a class held by some client
        is assigned exactly once; classes dealt to nobody (possible only when
        ``num_clients * classes_per_client`` < number of classes) are left out.

    Raises:
        ValueError: a class has fewer samples than clients holding it.
    """
    y = _as_labels(labels)
    _check_num_clients(num_clients, y.size)
    classes = np.unique(y)
    if isinstance(classes_per_client, bool) or not isinstance(classes_per_client, (int, np.integer)) \
            or not 1 <= classes_per_client <= classes.size:
        raise ValueError(f"classes_per_client: expected an int in 1..{classes.size} (the number of classes), "
                         f"got {classes_per_client!r}")
    size_concentration = _check_positive("size_concentration", size_concentration)
    rng = np.random.default_rng(seed)
    dealt = _deal_classes(classes.size, int(classes_per_client), int(num_clients), rng)
    holders: list[list[int]] = [[] for _ in classes]
    for client, held in enumerate(dealt):
        for c in held:
            holders[c].append(client)
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for c, owners in enumerate(holders):
        if not owners:
            continue
        rows = rng.permutation(np.flatnonzero(y == classes[c]))
        if rows.size < len(owners):
            raise ValueError(f"classes_per_client: class {classes[c]} has {rows.size} samples but is dealt to "
                             f"{len(owners)} clients; use fewer clients or classes per client")
        # One sample each first, so that every client really holds each of its classes.
        extra = rng.multinomial(rows.size - len(owners), rng.dirichlet(np.full(len(owners), size_concentration)))
        bounds = np.cumsum(1 + extra)[:-1]
        for owner, share in zip(owners, np.split(rows, bounds)):
            parts[owner].append(share)
    return [np.sort(np.concatenate(p)).astype(np.int64) for p in parts]


def partition_labels(labels: Sequence[int] | np.ndarray, num_clients: int, kind: str = "iid", *,
                     alpha: float = 0.5, classes_per_client: int = 2, min_size: int = 1,
                     seed: int = 0) -> list[np.ndarray]:
    """Partition samples by their labels with the partition ``kind`` (see module docstring).

    ``alpha`` and ``min_size`` are used by ``"dirichlet"``, ``classes_per_client`` by
    ``"pathological"``; ``"iid"`` uses only the number of labels.
    """
    if kind == "iid":
        return iid_partition(len(_as_labels(labels)), num_clients, seed)
    if kind == "dirichlet":
        return dirichlet_partition(labels, num_clients, alpha, seed, min_size)
    if kind == "pathological":
        return pathological_partition(labels, num_clients, classes_per_client, seed)
    raise ValueError(f"kind: expected one of {PARTITION_KINDS}, got {kind!r}")


def partition_dataset(dataset: datasets.Dataset, num_clients: int, kind: str = "iid", *,
                      label_column: str = "label", **options) -> list[np.ndarray]:
    """``partition_labels`` on the ``label_column`` of a ``datasets.Dataset``."""
    if label_column not in dataset.column_names:
        raise ValueError(f"label_column: {label_column!r} is not a column of the data set {dataset.column_names}")
    return partition_labels(np.asarray(dataset[label_column]), num_clients, kind, **options)


def label_counts(labels: Sequence[int] | np.ndarray, parts: Sequence[np.ndarray], num_classes: int) -> np.ndarray:
    """Samples of each class held by each client: int64 ``[num_clients, num_classes]``."""
    y = _as_labels(labels)
    return np.stack([np.bincount(y[np.asarray(p, dtype=np.int64)], minlength=num_classes) for p in parts])
