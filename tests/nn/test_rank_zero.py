"""Rank 0 in the model layer, as in the kernels: a slot with no adapter, scale 0, the base output."""

from __future__ import annotations

import copy

import pytest
import torch

from fedhello.nn import MultiLoRALinear, export_peft, inject_multi_lora

from .tiny import ARCHS, make_batch, make_model, randomize_banks

ALPHA = 8.0


def _layer(ranks) -> MultiLoRALinear:
    torch.manual_seed(0)
    layer = MultiLoRALinear(torch.nn.Linear(16, 8), len(ranks), rank=3, ranks=ranks, alpha=ALPHA, backend="torch")
    with torch.no_grad():
        layer.lora_b.normal_()
    return layer


@pytest.mark.parametrize("mode", ["client", "max"])
def test_rank_zero_slot_computes_the_base_layer_with_scale_zero(mode):
    layer = _layer([0, 2, 3])
    layer.set_rank_scaling(mode)
    other = ALPHA / 2 if mode == "client" else ALPHA / 3
    assert torch.equal(layer.scaling, torch.tensor([0.0, other, ALPHA / 3]))  # not alpha / 0 = inf
    x = torch.randn(6, 16).repeat(2, 1)  # the same rows, routed to slot 0 and to the base model
    ids = torch.tensor([0] * 6 + [-1] * 6)
    layer.train()
    with layer.context.route(ids):
        y = layer(x)
    y.square().sum().backward()
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y[:6], y[6:], rtol=0, atol=0)
    assert not layer.lora_a.grad[0].any() and not layer.lora_b.grad[0].any()
    assert layer.grad_sqnorm[0] == 0


def test_set_ranks_accepts_zero_and_refuses_negative_ranks():
    model = inject_multi_lora(make_model("bert"), ARCHS["bert"].targets, 3, rank=4, alpha=ALPHA, backend="torch")
    model.set_ranks({1: 0})
    assert model.ranks == [4, 0, 4] and model.scale_of(0) == 0.0
    for _, layer in model.lora_modules:
        assert torch.equal(layer.scaling, torch.tensor([ALPHA / 4, 0.0, ALPHA / 4]))
    with pytest.raises(ValueError, match=r"ranks: expected values in \[0, rank=4\] \(rank is r_max\), got -1"):
        model.set_ranks({1: -1})


@pytest.mark.parametrize("mode", ["client", "max"])
def test_rank_zero_survives_state_dict_and_keeps_the_rank_scaling(mode):
    pristine = make_model("bert")
    source = inject_multi_lora(copy.deepcopy(pristine), ARCHS["bert"].targets, 3, rank=4, ranks=[2, 0, 4],
                               alpha=ALPHA, backend="torch")
    randomize_banks(source)
    source.set_rank_scaling(mode)
    model = inject_multi_lora(copy.deepcopy(pristine), ARCHS["bert"].targets, 3, rank=4, alpha=ALPHA,
                              backend="torch")
    model.load_state_dict(source.state_dict())
    assert model.ranks == [2, 0, 4] and model.rank_scaling == mode
    batch, ids = make_batch("bert", 6), torch.tensor([0, 1, 2, 1, 0, 2])
    with torch.no_grad(), source.route(ids):
        want = source(**batch).logits
    with torch.no_grad(), model.route(ids):
        assert torch.equal(model(**batch).logits, want)
    model.set_ranks([2, 0, 4])  # recomputes the scales in the loaded mode: nothing changes
    with torch.no_grad(), model.route(ids):
        assert torch.equal(model(**batch).logits, want)


def test_export_of_a_rank_zero_slot_is_refused_naming_it(tmp_path):
    model = inject_multi_lora(make_model("bert"), ARCHS["bert"].targets, 3, rank=4, ranks=[4, 0, 2], alpha=ALPHA,
                              backend="torch")
    with pytest.raises(ValueError, match="client: slot 1 has rank 0 \\(no adapter\\); a PEFT LoRA checkpoint needs"):
        export_peft(model, 1, tmp_path / "slot1")
    assert not (tmp_path / "slot1").exists()
    assert (export_peft(model, 2, tmp_path / "slot2") / "adapter_config.json").is_file()
