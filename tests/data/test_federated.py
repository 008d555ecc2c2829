"""A run's data on the real BBC News set: held-out test and proxy sets, client partitions."""

from __future__ import annotations

from collections import Counter

import numpy as np

from fedhello.config import DataConfig, PartitionConfig
from fedhello.data import load_bbc_news, prepare_federated_data


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
