"""PEFT checkpoints: export from a slot, load with peft, import back."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from safetensors.torch import load_file

from fedhello.nn import export_peft, import_peft, inject_multi_lora

from .tiny import ARCHS, make_batch, make_model, randomize_banks

N, RANK, ALPHA = 3, 4, 8.0
IDS = torch.tensor([2, 0, 1, 1, 2, 0])


def _setup(arch: str, ranks=None):
    pristine = make_model(arch)
    model = inject_multi_lora(copy.deepcopy(pristine), ARCHS[arch].targets, N, rank=RANK, ranks=ranks,
                              alpha=ALPHA, backend="torch")
    randomize_banks(model)
    return pristine, model


def _load_with_peft(pristine, path):
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PeftModel.from_pretrained(copy.deepcopy(pristine), str(path)).eval()


@pytest.mark.parametrize("ranks", [None, [4, 2, 3]], ids=["uniform", "hetlora"])
def test_exported_checkpoint_reproduces_the_client_with_peft(text_arch, ranks, tmp_path):
    pristine, model = _setup(text_arch, ranks)
    batch = make_batch(text_arch, len(IDS))
    with torch.no_grad(), model.route(IDS):
        logits = model(**batch).logits
    client = 1
    folder = export_peft(model, client, tmp_path / "client1")

    config = json.loads((folder / "adapter_config.json").read_text())
    rank = (ranks or [RANK] * N)[client]
    assert config["peft_type"] == "LORA" and config["r"] == rank and config["lora_alpha"] == ALPHA
    assert config["modules_to_save"] == [ARCHS[text_arch].head]
    assert config["fan_in_fan_out"] == (text_arch == "gpt2")
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    first = model.lora_modules[0][0]
    assert tensors[f"base_model.model.{first}.lora_A.weight"].shape[0] == rank

    rows = (IDS == client).nonzero().flatten()
    reference = _load_with_peft(pristine, folder)
    with torch.no_grad():
        expected = reference(**{k: v[rows] for k, v in batch.items()}).logits
    torch.testing.assert_close(logits[rows], expected, rtol=1e-5, atol=1e-5)

    # Importing into another slot gives the same tensors (within the client's rank) and rank.
    import_peft(model, 0, folder)
    assert model.ranks[0] == rank
    original, imported = model.client_state(client), model.client_state(0)
    for key, value in original.items():
        if key.endswith(".lora_a"):
            assert torch.equal(imported[key][:rank], value[:rank]) and not imported[key][rank:].any()
        elif key.endswith(".lora_b"):
            assert torch.equal(imported[key][:, :rank], value[:, :rank]) and not imported[key][:, rank:].any()
        else:
            assert torch.equal(imported[key], value)


def test_export_of_a_global_state_at_full_rank(tmp_path):
    pristine, model = _setup("bert", ranks=[2, 2, 2])
    global_state = model.client_state(2)
    folder = export_peft(model, None, tmp_path / "global", state=global_state)
    assert json.loads((folder / "adapter_config.json").read_text())["r"] == RANK
    import_peft(model, 0, folder)
    assert model.ranks[0] == RANK
    assert all(torch.equal(model.client_state(0)[k], v) for k, v in global_state.items())


def test_import_of_a_peft_trained_adapter_with_another_alpha(tmp_path):
    """A checkpoint written by peft itself, with its own alpha: our slot must reproduce peft's logits."""
    from peft import LoraConfig, get_peft_model

    pristine = make_model("llama")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(copy.deepcopy(pristine), LoraConfig(
            r=2, lora_alpha=32, target_modules=ARCHS["llama"].targets, modules_to_save=["score"]))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    peft_model.save_pretrained(str(tmp_path))
    batch = make_batch("llama", 4)
    with torch.no_grad():
        expected = peft_model.eval()(**batch).logits

    model = inject_multi_lora(copy.deepcopy(pristine), ARCHS["llama"].targets, N, rank=RANK, alpha=ALPHA,
                              backend="torch")
    import_peft(model, 2, tmp_path)
    with torch.no_grad(), model.route(torch.full((4,), 2)):
        got = model(**batch).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_import_rejects_another_architecture(tmp_path):
    _, gpt2 = _setup("gpt2")
    export_peft(gpt2, 0, tmp_path)
    _, bert = _setup("bert")
    with pytest.raises(ValueError, match="path: adapter for module 'transformer.h.0.attn.c_attn' does not exist"):
        import_peft(bert, 0, tmp_path)


def test_import_rejects_other_targets_of_the_same_architecture(tmp_path):
    pristine, model = _setup("bert")
    export_peft(model, 0, tmp_path)
    with_key = inject_multi_lora(copy.deepcopy(pristine), ["query", "value", "key"], N, rank=RANK,
                                   backend="torch")
    missing = "bert.encoder.layer.0.attention.self.key"
    with pytest.raises(ValueError, match=f"path: checkpoint has no lora_A/lora_B for '{missing}'"):
        import_peft(with_key, 0, tmp_path)


def test_import_rejects_rank_above_r_max(tmp_path):
    pristine, _ = _setup("bert")
    big = inject_multi_lora(copy.deepcopy(pristine), ["query", "value"], N, rank=8, backend="torch")
    export_peft(big, 0, tmp_path)
    small = inject_multi_lora(copy.deepcopy(pristine), ["query", "value"], N, rank=RANK, backend="torch")
    with pytest.raises(ValueError, match="path: checkpoint rank r=8 exceeds the bank's r_max=4"):
        import_peft(small, 0, tmp_path)


def test_import_rejects_non_lora_and_missing_checkpoints(tmp_path):
    _, model = _setup("bert")
    with pytest.raises(ValueError, match="path: expected a PEFT checkpoint folder"):
        import_peft(model, 0, tmp_path / "missing")
    export_peft(model, 0, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps(config | {"peft_type": "IA3"}))
    with pytest.raises(ValueError, match="path: expected a LoRA checkpoint"):
        import_peft(model, 0, tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps(config | {"use_dora": True}))
    with pytest.raises(ValueError, match="path: use_dora=True"):
        import_peft(model, 0, tmp_path)


def test_export_uses_the_scale_the_slot_computes_with_and_names_the_task(tmp_path):
    """A HetLoRA-scaled model (fixed alpha / r_max) saved with state_dict and loaded into a fresh one:
    the rank scaling is read back off the loaded scales, the export follows them and carries a task
    type, so AutoPeftModelForCausalLM loads it and matches the slot."""
    from peft import AutoPeftModelForCausalLM

    from .tiny import tiny_causal_lm

    pristine = tiny_causal_lm(64)
    batch = {"input_ids": torch.randint(3, 64, (4, 6), generator=torch.Generator().manual_seed(0))}
    source = inject_multi_lora(copy.deepcopy(pristine), ["q_proj", "v_proj"], 3, rank=4, alpha=8.0,
                               backend="torch", head_modules=None)
    randomize_banks(source)
    source.set_ranks([4, 2, 3])
    source.set_rank_scaling("max")
    model = inject_multi_lora(copy.deepcopy(pristine), ["q_proj", "v_proj"], 3, rank=4, alpha=8.0,
                              backend="torch", head_modules=None)
    model.load_state_dict(source.state_dict())
    assert model.rank_scaling == "max"  # read back off the loaded scales
    with torch.no_grad(), model.route(torch.tensor([1, 1, 1, 1])):
        ours = model(**batch).logits
    model.set_ranks([4, 2, 3])  # recomputes the scales: in the loaded mode, so nothing changes
    with torch.no_grad(), model.route(torch.tensor([1, 1, 1, 1])):
        assert torch.equal(model(**batch).logits, ours)
    folder = export_peft(model, 1, tmp_path / "client1")
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM" and config["r"] == 2 and config["lora_alpha"] == pytest.approx(4.0)
    pristine.save_pretrained(str(tmp_path / "base"))
    config["base_model_name_or_path"] = str(tmp_path / "base")
    (folder / "adapter_config.json").write_text(json.dumps(config))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = AutoPeftModelForCausalLM.from_pretrained(str(folder)).eval()
    with torch.no_grad():
        theirs = peft_model(**batch).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)


def test_save_pretrained_of_the_multi_client_model_points_to_export_peft(tmp_path):
    model = inject_multi_lora(make_model("bert"), ["query", "value"], 2, rank=2, backend="torch")
    with pytest.raises(RuntimeError, match="save_pretrained: .*export_peft"):
        model.save_pretrained(str(tmp_path))
    with pytest.raises(RuntimeError, match="export_peft"):
        model.push_to_hub("someone/model")
