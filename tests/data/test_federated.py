"""A run's data on the real BBC News set: held-out test and proxy sets, client partitions."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from fedhello.config import DataConfig, PartitionConfig
from fedhello.data import federated, load_bbc_news, prepare_federated_data
from fedhello.errors import UserError


def test_prepare_bbc_news_for_a_run():
    config = DataConfig(name="bbc_news", num_clients=10, test_fraction=0.2, proxy_fraction=0.02,
                        partition=PartitionConfig(kind="pathological", classes_per_client=2))
    data = prepare_federated_data(config, seed=0)
    assert (len(data.train), len(data.test), len(data.proxy)) == (1735, 445, 45)  # 0.02 * 2225 = 44.5 rounds up
    assert data.label_names == ["business", "entertainment", "politics", "sports", "tech"]
    assert data.num_clients == 10 and data.num_classes == 5
    assert np.array_equal(np.sort(np.concatenate(data.partitions)), np.arange(len(data.train)))
    train_labels = np.asarray(data.train["label"])
    for i, part in enumerate(data.partitions):
        assert len(set(train_labels[part].tolist())) == 2
        assert data.client(i)["label"] == train_labels[part].tolist()
    # Train, test and proxy split the corpus: as multisets (BBC News has duplicate articles).
    full = load_bbc_news()["text"]
    assert Counter([*data.train["text"], *data.test["text"], *data.proxy["text"]]) == Counter(full)
    again = prepare_federated_data(config, seed=0)
    assert data.test["text"] == again.test["text"]
    assert all(np.array_equal(a, b) for a, b in zip(data.partitions, again.partitions))


def test_subsample_and_test_split():
    config = DataConfig(name="bbc_news", max_samples=500, num_clients=5, test_fraction=0.1)
    data = prepare_federated_data(config, seed=1)
    assert len(data.train) + len(data.test) == 500 and len(data.test) == 50 and data.proxy is None


def test_a_client_without_samples_is_refused_at_setup(monkeypatch):
    real = federated.partition_labels

    def one_empty(*args, **kwargs):
        parts = real(*args, **kwargs)
        return [parts[0][:0], np.concatenate([parts[0], parts[1]]), *parts[2:]]

    monkeypatch.setattr(federated, "partition_labels", one_empty)
    config = DataConfig(name="bbc_news", max_samples=300, num_clients=4, test_fraction=0.2)
    with pytest.raises(UserError, match=r"^data\.partition: 1 of 4 clients get no training sample \(first: client 0"):
        prepare_federated_data(config, seed=0)
