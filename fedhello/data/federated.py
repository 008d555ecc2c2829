"""The data of a federated run: load, hold out test (and proxy) sets, partition over clients."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

import datasets
import numpy as np

from fedhello.errors import UserError
from fedhello.seeds import purpose_seed

from .lm import load_lm_dataset
from .partition import partition_labels
from .sources import label_names, load_labelled_dataset
from .splits import split_indices

if TYPE_CHECKING:
    from fedhello.config import DataConfig

__all__ = ["FederatedData", "prepare_federated_data", "federated_from_datasets"]


@dataclass(frozen=True)
class FederatedData:
    """Everything a run needs from its data set.

    Attributes:
        train: the clients' pool (test and proxy rows removed).
        test: held out for evaluating the global model.
        proxy: the server's proxy set for proxy-set Fisher scores, or None.
        partitions: one sorted int64 index array into ``train`` per client.
        label_names: class names (label i = ``label_names[i]``).
    """

    train: datasets.Dataset
    test: datasets.Dataset
    proxy: datasets.Dataset | None
    partitions: list[np.ndarray]
    label_names: list[str]

    @property
    def num_clients(self) -> int:
        return len(self.partitions)

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    def client(self, client: int) -> datasets.Dataset:
        """The training rows of one client."""
        if not 0 <= client < self.num_clients:
            raise ValueError(f"client: expected 0..{self.num_clients - 1}, got {client}")
        return self.train.select(self.partitions[client])


def prepare_federated_data(config: "DataConfig", seed: int, causal_lm: bool = False) -> FederatedData:
    """Load ``config``'s data set and split it for a run seeded by ``seed``.

    ``causal_lm``: read text or prompt/response rows (``fedhello.data.lm.load_lm_dataset``);
    the label column, when there is one, only shapes the splits and the partition.

    Sub-seeds for subsampling, splitting and partitioning are derived from ``seed``
    (``fedhello.seeds.purpose_seed``), so changing one step does not reshuffle the others.
    """

    load = dict(text_column=config.text_column, image_column=config.image_column, label_column=config.label_column)
    if causal_lm:
        def read(split: str):
            return load_lm_dataset(config, split)
    else:
        def read(split: str):
            return load_labelled_dataset(config.name, config.path, split=split, **load)
    full = read(config.split)
    if config.max_samples is not None and config.max_samples < len(full):
        rng = np.random.default_rng(purpose_seed(seed, "subsample"))
        full = full.select(np.sort(rng.choice(len(full), size=config.max_samples, replace=False)))
    labels = np.asarray(full["label"])
    test_fraction = 0.0 if config.test_split is not None else config.test_fraction
    train_idx, test_idx, proxy_idx = split_indices(labels, test_fraction, config.proxy_fraction,
                                                   seed=purpose_seed(seed, "split"))
    train = full.select(train_idx)
    if config.test_split is not None:
        test = read(config.test_split)
    else:
        test = full.select(test_idx)
    proxy = full.select(proxy_idx) if config.proxy_fraction > 0 else None
    return FederatedData(train, test, proxy, _partition(labels[train_idx], config, seed), label_names(full))


def federated_from_datasets(train: "datasets.Dataset | Mapping[Any, datasets.Dataset]", test: "datasets.Dataset",
                            config: "DataConfig", seed: int) -> FederatedData:
    """A run's data from ``datasets.Dataset`` objects instead of a source name.

    ``train`` is either one data set, partitioned over ``config.num_clients`` clients by
    ``config.partition`` exactly as ``prepare_federated_data`` partitions its training split,
    or a mapping ``client -> data set`` (a natural partition: client ``i`` is the ``i``-th entry,
    ``config.num_clients`` must equal its length). Columns as the loaders give them: ``text``
    (or ``image``) and a ``ClassLabel`` column ``label``. No proxy set (``proxy_fraction`` 0).
    """
    for name in ("max_samples", "test_split"):  # they act on a source, which objects replace
        if getattr(config, name) is not None:
            raise UserError(f"data.{name}: not used with data set objects (pass the rows to use), got "
                            f"{getattr(config, name)!r}")
    if config.proxy_fraction > 0:
        raise UserError(f"data.proxy_fraction: data set objects bring no proxy set, got {config.proxy_fraction}")
    if isinstance(train, Mapping):
        if len(train) != config.num_clients:
            raise UserError(f"data.num_clients: expected the {len(train)} clients of the train mapping, "
                            f"got {config.num_clients}")
        parts = list(train.values())
        ends = np.cumsum([0] + [len(ds) for ds in parts])
        pool = datasets.concatenate_datasets(parts)
        partitions = [np.arange(a, b, dtype=np.int64) for a, b in zip(ends[:-1], ends[1:])]
        if any(len(part) == 0 for part in partitions):
            raise UserError("train: every client of the mapping needs at least one row")
        return FederatedData(pool, test, None, partitions, label_names(pool))
    return FederatedData(train, test, None, _partition(np.asarray(train["label"]), config, seed), label_names(train))


def _partition(labels: np.ndarray, config: "DataConfig", seed: int) -> list[np.ndarray]:
    """The clients' index arrays into the training rows (``labels``: int ``[n]``), seeded by ``seed``."""
    p = config.partition
    try:
        partitions = partition_labels(labels, config.num_clients, p.kind, alpha=p.alpha,
                                      classes_per_client=p.classes_per_client, min_size=p.min_size,
                                      seed=purpose_seed(seed, "partition"))
    except ValueError as err:  # the partition functions name their arguments; the user knows the config fields
        field, _, rest = str(err).partition(":")
        dotted = {"num_clients": "data.num_clients"}.get(field, f"data.partition.{field}")
        raise UserError(f"{dotted}:{rest}") from None
    empty = [c for c, part in enumerate(partitions) if len(part) == 0]
    if empty:  # caught here, not when the client is first sampled (perhaps many rounds in)
        raise UserError(f"data.partition: {len(empty)} of {config.num_clients} clients get no training sample "
                        f"(first: client {empty[0]}, {p.kind} partition of {len(labels)} samples); use fewer "
                        f"clients, more samples or another partition")
    return partitions
