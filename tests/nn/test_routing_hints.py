"""Routing hints of a caller that built its ids itself (``trusted``, ``contiguous``), and the compute dtype."""

from __future__ import annotations

import pytest
import torch

from fedhello.nn import RoutingContext, inject_multi_lora

from .tiny import make_batch, make_model, randomize_banks


def test_hints_reach_the_plan_and_skip_the_range_check():
    ctx = RoutingContext(3)
    x = torch.randn(4, 5, 8)  # [batch, seq, d]
    with ctx.route(torch.tensor([0, 0, 1, 2]), trusted=True, contiguous=True):
        plan = ctx.plan_for(x, "layer")
        assert plan.contiguous and torch.equal(plan.sorted_rows, torch.arange(20, dtype=torch.int32))
        assert plan.counts.tolist() == [10, 5, 5]
    with ctx.route(torch.tensor([2, 0, 1, 0])):  # no hints: the plan tests the order itself
        assert not ctx.plan_for(x, "layer").contiguous
    with pytest.raises(ValueError, match=r"client_ids: expected values in \[-1, 3\)"):
        with ctx.route(torch.tensor([0, 3])):
            pass
    with ctx.route(torch.tensor([0, 3]), trusted=True):  # the caller vouches: nothing is read back
        assert ctx.client_ids.tolist() == [0, 3]
    with pytest.raises(TypeError, match="trusted: expected a bool"):
        with ctx.route(torch.tensor([0]), trusted=1):
            pass
    with pytest.raises(TypeError, match="contiguous: expected None or a bool"):
        with ctx.route(torch.tensor([0]), contiguous="yes"):
            pass


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_trusted_contiguous_routing_gives_the_same_outputs(arch):
    model = inject_multi_lora(make_model(arch), _targets(arch), num_clients=3, rank=4,
                              backend="torch")
    randomize_banks(model)
    batch = make_batch(arch, 6)
    ids = torch.tensor([-1, 0, 0, 1, 2, 2])
    with model.route(ids):
        want = model(**batch).logits
    with model.route(ids, trusted=True, contiguous=True):
        got = model(**batch).logits
    assert torch.equal(got, want)


def _targets(arch: str) -> list[str]:
    return ["query", "value"] if arch == "bert" else ["q_proj", "v_proj"]


def test_compute_dtype_casts_the_backbone_only():
    model = inject_multi_lora(make_model("bert"), ["query", "value"], num_clients=2, rank=4, backend="torch")
    model.set_compute_dtype(torch.bfloat16)
    assert model.compute_dtype == torch.bfloat16
    assert model.backbone.bert.embeddings.word_embeddings.weight.dtype == torch.bfloat16
    for _, layer in model.lora_modules:
        assert layer.base.weight.dtype == torch.bfloat16
        assert layer.lora_a.dtype == layer.lora_b.dtype == layer.scaling.dtype == layer.grad_sqnorm.dtype == torch.float32
    for _, head in model.head_modules:
        assert head.base.weight.dtype == torch.bfloat16 and head.weight.dtype == torch.float32
    batch = make_batch("bert", 4)
    with model.route(torch.tensor([0, 0, 1, 1])):
        logits = model(**batch).logits
    assert logits.dtype == torch.bfloat16
    logits.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for _, _, p in model.lora_banks())
    with pytest.raises(ValueError, match="dtype: expected one of"):
        model.set_compute_dtype(torch.float64)
