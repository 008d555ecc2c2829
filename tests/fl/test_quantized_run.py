"""The federated layer over a bitsandbytes base: config fields, batched == sequential, a whole run
with its memory line and checkpoint record, and ``--resume`` with another quantization refused."""

from __future__ import annotations

import copy
import importlib.util
import json

import pytest
import torch
import yaml

pytest.importorskip("bitsandbytes")

from fedhello.config import ConfigError, RunConfig  # noqa: E402
from fedhello.errors import UserError  # noqa: E402
from fedhello.fl.engine import ClientParallelEngine, LocalTrainingConfig, SequentialEngine  # noqa: E402
from fedhello.models.quantize import quantize_backbone  # noqa: E402
from fedhello.nn import inject_multi_lora  # noqa: E402

from tests.fl.test_causal_lm import VOCAB, _lm_tasks  # noqa: E402
from tests.nn.tiny import tiny_causal_lm, tiny_lm_run_config  # noqa: E402

BASE = {"model": {"name": "smollm2", "rank": 4}, "data": {"name": "bbc_headlines", "num_clients": 4},
        "task": "causal_lm", "cohort_size": 2}


def _config(**model) -> RunConfig:
    raw = copy.deepcopy(BASE)
    raw["model"].update(model)
    return RunConfig.from_dict(raw)


@pytest.mark.parametrize("model, field", [
    ({"quantize": "q4"}, "model.quantize"),
    ({"quantize": "nf4", "compute_dtype": "float64"}, "model.compute_dtype"),
    ({"compute_dtype": "bfloat16"}, "model.compute_dtype"),  # a full-precision base has no 4-bit compute dtype
    ({"quantize": "int8", "compute_dtype": "bfloat16"}, "model.compute_dtype"),
])
def test_config_errors_name_the_field(model, field):
    with pytest.raises(ConfigError, match=rf"^{field}: "):
        _config(**model)


def test_valid_quantized_configs():
    assert _config(quantize="nf4", compute_dtype="bfloat16").model.quantize == "nf4"
    assert _config(quantize="int8").model.compute_dtype == "auto"


def test_missing_bitsandbytes_is_reported_before_loading(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(UserError, match=r"^model\.quantize: 'fp4' needs bitsandbytes.*pip install"):
        _config(quantize="fp4").check_sources()


def test_gpt2_conv1d_blocks_are_refused(tmp_path, tiny_lm_files):
    from fedhello.fl.server import FederatedRun
    from tests.nn.tiny import make_model

    with pytest.raises(ValueError, match=r"^model\.quantize: .*Conv1D"):
        quantize_backbone(make_model("gpt2"), "nf4", torch.float32)
    folder = tmp_path / "gpt2"
    make_model("gpt2").save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):  # the tiny LM's tokenizer serves it too
        (folder / name).write_bytes((tiny_lm_files[0] / name).read_bytes())
    raw = tiny_lm_run_config(folder, tiny_lm_files[1], tmp_path / "run", quantize="nf4")
    with pytest.raises(UserError, match=r"^model\.quantize: GPT2LMHeadModel computes its blocks with transformers "
                                        r"Conv1D"):
        FederatedRun(RunConfig.from_dict(raw), progress=False)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_batched_equals_sequential_over_a_quantized_base(kind):
    gen = torch.Generator().manual_seed(0)
    backbone = tiny_causal_lm(VOCAB)
    quantize_backbone(backbone, kind, torch.float32)
    tasks = _lm_tasks(2, [5, 3, 7, 4], gen)
    cfg = LocalTrainingConfig(epochs=1, batch_size=3, optimizer="adamw", lr=1e-2)
    targets = ["q_proj", "v_proj"]
    batched = inject_multi_lora(copy.deepcopy(backbone), targets, num_clients=4, rank=4, alpha=8,
                                head_modules=None, backend="torch", seed=3)
    single = inject_multi_lora(copy.deepcopy(backbone), targets, num_clients=1, rank=4, alpha=8,
                               head_modules=None, backend="torch", seed=3)
    assert {layer.quantization for _, layer in batched.lora_modules} == {kind}
    init = {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in batched.client_state(0).items()}
    got = ClientParallelEngine(batched, cfg).train(init, tasks)
    want = SequentialEngine(single, cfg).train(init, tasks)
    for g, w in zip(got, want):
        assert g.loss == pytest.approx(w.loss, rel=1e-5)
        torch.testing.assert_close(g.fisher, w.fisher, rtol=1e-4, atol=1e-7)
        assert (g.fisher[g.trainable_blocks] > 0).all() and (g.fisher[~g.trainable_blocks] == 0).all()
        for name in w.state:
            torch.testing.assert_close(g.state[name], w.state[name], rtol=1e-4, atol=1e-6)
        assert any(not torch.equal(w.state[n], init[n]) for n in w.state), g.client


def test_quantized_run_end_to_end_and_resume_with_another_quantization(tmp_path, tiny_lm_files, capsys):
    from fedhello.cli import main as cli_main

    model_dir, data = tiny_lm_files
    out = tmp_path / "run"
    config = tiny_lm_run_config(model_dir, data, out, quantize="nf4")
    path = tmp_path / "lm.yaml"
    path.write_text(yaml.safe_dump(config))
    assert cli_main(["run", str(path), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "memory: frozen base" in printed and "(nf4; quantized layers" in printed and "optimizer state" in printed
    initial = json.loads((out / "initial_eval.json").read_text())
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["test_perplexity"] < initial["perplexity"]
    meta = json.loads((out / "checkpoint.json").read_text())
    assert meta["base"] == {"name": str(model_dir), "quantize": "nf4", "compute_dtype": "auto"}
    from safetensors.torch import load_file

    saved = load_file(str(out / "checkpoint.safetensors"))
    assert saved and all(".lora_a" in k or ".lora_b" in k for k in saved)  # adapters only, no base weight

    config["model"]["quantize"] = "int8"
    path.write_text(yaml.safe_dump(config))
    assert cli_main(["run", str(path), "--no-progress", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "model.quantize: 'nf4' -> 'int8'" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_memory_report_counts_packed_base_banks_and_optimizer(kind):
    from fedhello.models.quantize import memory_report

    backbone = tiny_causal_lm(VOCAB, tie=False)
    linears = sum(m.weight.numel() * 4 for n, m in backbone.named_modules() if ".layers." in n
                  and isinstance(m, torch.nn.Linear))
    quantize_backbone(backbone, kind, torch.float32)
    # What a state_dict of the quantized model writes: packed weights with all their scales and code tables.
    saved = sum(t.numel() * t.element_size() for t in backbone.state_dict().values())
    model = inject_multi_lora(backbone, ["q_proj", "v_proj"], num_clients=3, rank=4, head_modules=None)
    report = memory_report(model, optimizer_slots=2)
    banks = sum(p.numel() * 4 for _, _, p in model.lora_banks())
    assert report.banks == banks and report.optimizer == 2 * banks and report.quantization == kind
    assert 0 < report.quantized < linears / 2
    # The state_dict leaves out the rotary embedding's non-persistent buffer and adds int8's 1-byte
    # weight_format per layer: a few dozen bytes either way.
    assert abs(report.base - saved) < 200
    assert f"({kind}; quantized layers" in report.lines()[0]


def test_doctor_prints_the_memory_of_a_quantized_run(tmp_path, tiny_lm_files, capsys):
    from fedhello.cli import main as cli_main

    model_dir, data = tiny_lm_files
    path = tmp_path / "lm.yaml"
    path.write_text(yaml.safe_dump(tiny_lm_run_config(model_dir, data, tmp_path / "run", quantize="int8")))
    assert cli_main(["doctor", "--config", str(path)]) == 0
    printed = capsys.readouterr().out
    assert "quantized backbones: bitsandbytes 0.50." in printed
    assert "model.quantize int8" in printed and "memory: frozen base" in printed and "(int8; quantized layers" in printed
    assert not (tmp_path / "run").exists()  # the doctor builds the model, it does not start the run


def test_base_quantization_reads_a_built_model_and_refuses_what_cannot_be_served():
    from fedhello.models.quantize import BaseQuantization, base_quantization

    model = tiny_causal_lm(VOCAB)
    assert base_quantization(model) == BaseQuantization("none", None, ())
    layer = model.model.layers[0].self_attn.k_proj
    weight = layer.weight
    layer.weight = torch.nn.Parameter(weight.detach().as_subclass(_Packed), requires_grad=False)
    with pytest.raises(ValueError, match=r"^model: model\.layers\.0\.self_attn\.k_proj\.weight is torch\.float32 "
                                         r"\(_Packed; quantized, but not by bitsandbytes\)"):
        base_quantization(model)
    layer.weight = weight
    names = quantize_backbone(model, "nf4", torch.float32)
    assert base_quantization(model) == BaseQuantization("nf4", torch.float32, tuple(names))
    model.model.layers[1].mlp.up_proj.compute_dtype = torch.bfloat16
    with pytest.raises(ValueError, match=r"^model: its 4-bit layers compute in torch\.float32 "
                                         r"\(model\.layers\.0\.self_attn\.q_proj, \.\.\.\), torch\.bfloat16 "
                                         r"\(model\.layers\.1\.mlp\.up_proj, \.\.\.\); expected one of"):
        base_quantization(model)


class _Packed(torch.Tensor):
    """A stand-in for another library's packed weight (a tensor subclass)."""
