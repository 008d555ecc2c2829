"""fedhello.nn.norms: frozen RMSNorms recompute their float32 upcast in the backward.

Checked against the same module's own forward: bit-identical outputs and input gradients, half the
saved bytes under 16-bit inputs, the module's own forward under float32, no grad, or an input that
needs none; deepcopy rebinds; inject_multi_lora installs it and a whole bfloat16 Llama's LoRA
gradients stay bit-identical.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")

from transformers.models.llama.modeling_llama import LlamaRMSNorm  # noqa: E402

from fedhello.nn import inject_multi_lora  # noqa: E402
from fedhello.nn.norms import recompute_frozen_rmsnorms  # noqa: E402

WIDTH = 24


def _norm(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    norm = LlamaRMSNorm(WIDTH, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.3 * torch.randn(WIDTH))
    return norm.requires_grad_(False)


def _saved_bytes(fn, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``fn(x)`` and the bytes of every tensor its autograd graph saved (parameters excluded)."""
    saved = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        if not isinstance(t, nn.Parameter):
            saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(x)
    return out, sum(saved)


def _grad(fn, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.detach().clone().requires_grad_()
    y = fn(x)
    (dx,) = torch.autograd.grad(y, x, g)
    return y, dx


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_norm_is_bit_identical_and_keeps_half_the_bytes(dtype):
    plain, lean = _norm(), _norm()
    assert recompute_frozen_rmsnorms(lean) == [""]
    x = (3 * torch.randn(5, 7, WIDTH)).to(dtype)
    g = torch.randn(5, 7, WIDTH).to(dtype)
    y0, dx0 = _grad(plain, x, g)
    y1, dx1 = _grad(lean, x, g)
    assert torch.equal(y0, y1) and torch.equal(dx0, dx1)
    _, plain_bytes = _saved_bytes(plain, x.clone().requires_grad_())
    _, lean_bytes = _saved_bytes(lean, x.clone().requires_grad_())
    values = x.numel()
    # The plain graph keeps the float32 upcast (4 bytes a value) plus one float32 per row.
    assert plain_bytes >= 4 * values
    # Recomputed: the 16-bit input only (the checkpoint's inner graph is dropped after the forward).
    assert lean_bytes == 2 * values


@pytest.mark.parametrize("case", ["float32", "no_grad", "input_needs_no_grad"])
def test_own_forward_where_nothing_is_saved_by_recomputing(case):
    lean = _norm()
    recompute_frozen_rmsnorms(lean)
    plain = _norm()
    x = torch.randn(4, WIDTH, dtype=torch.float32 if case == "float32" else torch.bfloat16)
    if case != "input_needs_no_grad":
        x.requires_grad_()
    with torch.set_grad_enabled(case != "no_grad"):
        y1, b1 = _saved_bytes(lean, x)
        y0, b0 = _saved_bytes(plain, x)
    assert torch.equal(y0, y1) and b0 == b1


def test_torch_func_grad_through_the_norm_equals_autograd():
    lean = _norm()
    recompute_frozen_rmsnorms(lean)
    x = torch.randn(4, WIDTH).to(torch.bfloat16)
    g = torch.randn(4, WIDTH).to(torch.bfloat16)
    got = torch.func.grad(lambda t: (lean(t) * g).float().sum())(x)
    _, expected = _grad(_norm(), x, g)
    assert torch.equal(got, expected)


def test_trainable_norms_and_other_modules_are_left_alone():
    model = nn.Sequential(_norm(), nn.LayerNorm(WIDTH), _norm().requires_grad_(True))
    assert recompute_frozen_rmsnorms(model) == ["0"]
    assert "forward" not in vars(model[1]) and "forward" not in vars(model[2])
    assert recompute_frozen_rmsnorms(model) == []  # already handled: not wrapped twice


def test_deepcopy_rebinds_to_the_copy():
    lean = _norm()
    recompute_frozen_rmsnorms(lean)
    twin = copy.deepcopy(lean)
    with torch.no_grad():
        twin.weight.mul_(2)
    x = torch.randn(3, WIDTH, dtype=torch.bfloat16, requires_grad=True)
    torch.testing.assert_close(twin(x).float(), 2 * lean(x).float(), rtol=1e-2, atol=1e-2)
    assert twin.forward.args[0] is twin and lean.forward.args[0] is lean
    assert twin.state_dict().keys() == lean.state_dict().keys() == {"weight"}


def _tiny_llama(dtype: torch.dtype) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    return LlamaForCausalLM(config).to(dtype)


def test_inject_installs_it_and_a_bfloat16_llama_keeps_bit_identical_gradients():
    lean = inject_multi_lora(_tiny_llama(torch.bfloat16), ["q_proj", "v_proj"], num_clients=3, rank=4,
                             head_modules=None)
    plain = copy.deepcopy(lean)
    norms = [m for m in plain.modules() if isinstance(m, LlamaRMSNorm)]
    assert len(norms) == 5 and all("forward" in vars(m) for m in norms)  # 2 per block + the final norm
    for m in norms:
        del m.forward  # back to the module's own forward
    ids = torch.randint(1, 64, (3, 9))
    grads = []
    for model in (lean, plain):
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("lora_b"):
                    p.copy_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
        with model.route(torch.tensor([0, 1, 2])):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 8
    for name in grads[0]:
        assert torch.equal(grads[0][name], grads[1][name]), name
