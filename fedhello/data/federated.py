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

__all__ = ["FederatedData", "federate", "federate_clients", "prepare_federated_data"]


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
    return federate(read(config.split), config, seed,
                    test=read(config.test_split) if config.test_split is not None else None)


def federate(full: datasets.Dataset, config: "DataConfig", seed: int,
             test: datasets.Dataset | None = None) -> FederatedData:
    """Split an already loaded data set for a run seeded by ``seed``: subsample
    (``config.max_samples``), hold out test and proxy rows, partition the rest over
    ``config.num_clients`` clients (``config.partition``).

    Args:
        full: standardised rows (a ``label`` ``ClassLabel`` column; ``fedhello.data.sources``).
        config: the run's ``data`` section (its source fields are not read).
        test: the test set; None holds out ``config.test_fraction`` of ``full``.
    """
    if config.max_samples is not None and config.max_samples < len(full):
        rng = np.random.default_rng(purpose_seed(seed, "subsample"))
        full = full.select(np.sort(rng.choice(len(full), size=config.max_samples, replace=False)))
    labels = np.asarray(full["label"])
    train_idx, test_idx, proxy_idx = split_indices(labels, 0.0 if test is not None else config.test_fraction,
                                                   config.proxy_fraction, seed=purpose_seed(seed, "split"))
    p = config.partition
    try:
        partitions = partition_labels(labels[train_idx], config.num_clients, p.kind, alpha=p.alpha,
                                      classes_per_client=p.classes_per_client, min_size=p.min_size,
                                      seed=purpose_seed(seed, "partition"))
    except ValueError as err:  # the partition functions name their arguments; the user knows the config fields
        field, _, rest = str(err).partition(":")
        dotted = {"num_clients": "data.num_clients"}.get(field, f"data.partition.{field}")
        raise UserError(f"{dotted}:{rest}") from None
    return _federated(full, train_idx, full.select(test_idx) if test is None else test,
                      proxy_idx if config.proxy_fraction > 0 else None, partitions,
                      f"{p.kind} partition of {len(train_idx)} samples")


def federate_clients(full: datasets.Dataset, owners: np.ndarray, config: "DataConfig", seed: int,
                     test: datasets.Dataset | None = None) -> FederatedData:
    """Split a naturally partitioned data set: row ``i`` of ``full`` belongs to client ``owners[i]``.

    Test and proxy rows are held out of the union as in ``federate`` (stratified by label); each
    client keeps the rest of its own rows. ``config.max_samples`` and ``config.partition`` do not
    apply (the owners are the partition).

    Args:
        full: standardised rows of every client.
        owners: int ``[len(full)]``, client ids ``0..config.num_clients - 1``.
        test: the test set; None holds out ``config.test_fraction`` of ``full``.
    """
    owners = np.asarray(owners)
    if owners.shape != (len(full),):
        raise ValueError(f"owners: expected one client id per row, shape ({len(full)},), got {owners.shape}")
    train_idx, test_idx, proxy_idx = split_indices(np.asarray(full["label"]),
                                                   0.0 if test is not None else config.test_fraction,
                                                   config.proxy_fraction, seed=purpose_seed(seed, "split"))
    train_owners = owners[train_idx]
    partitions = [np.flatnonzero(train_owners == c).astype(np.int64) for c in range(config.num_clients)]
    return _federated(full, train_idx, full.select(test_idx) if test is None else test,
                      proxy_idx if config.proxy_fraction > 0 else None, partitions,
                      f"natural partition of {len(train_idx)} samples")


def _federated(full: datasets.Dataset, train_idx: np.ndarray, test: datasets.Dataset, proxy_idx: np.ndarray | None,
               partitions: list[np.ndarray], described: str) -> FederatedData:
    empty = [c for c, part in enumerate(partitions) if len(part) == 0]
    if empty:  # caught here, not when the client is first sampled (perhaps many rounds in)
        raise UserError(f"data.partition: {len(empty)} of {len(partitions)} clients get no training sample "
                        f"(first: client {empty[0]}, {described}); use fewer clients, more samples or another "
                        f"partition")
    proxy = full.select(proxy_idx) if proxy_idx is not None else None
    return FederatedData(full.select(train_idx), test, proxy, partitions, label_names(full))
