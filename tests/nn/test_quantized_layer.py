"""MultiLoRALinear over a frozen bitsandbytes base: the base through bitsandbytes, the LoRA term added.

The reference for a row of client c is ``base(x) + s_c (x A_c[:r_c]^T) B_c[:, :r_c]^T`` with the
same bitsandbytes module as base, written with plain torch ops (so the base path is checked to be
bitsandbytes' own and the LoRA path against an independent formula).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("bitsandbytes")

from fedhello.nn import MultiLoRALinear  # noqa: E402
from fedhello.nn.quantized import prepare_quantized_base, quantization_of, quantize_linear  # noqa: E402

KINDS = ["nf4", "fp4", "int8"]
D_IN, D_OUT, N, R = 72, 40, 3, 4
RANKS = [4, 2, 3]


def _layer(kind: str, backend: str = "torch", bias: bool = True) -> MultiLoRALinear:
    torch.manual_seed(0)
    base = quantize_linear(nn.Linear(D_IN, D_OUT, bias=bias), kind, torch.float32)
    layer = MultiLoRALinear(base, N, R, ranks=RANKS, alpha=8.0, backend=backend)
    with torch.no_grad():
        layer.lora_b.copy_(torch.randn(layer.lora_b.shape) * 0.3)
    base.train()  # as MultiLoRAModel.train() leaves a bitsandbytes base
    return layer


def _reference(layer: MultiLoRALinear, x: torch.Tensor, ids: torch.Tensor, a: torch.Tensor, b: torch.Tensor):
    rows = [layer.base(x[t:t + 1])[0] for t in range(x.shape[0])]  # one row at a time: no batch coupling
    out = []
    for t, c in enumerate(ids.tolist()):
        y = rows[t]
        if c >= 0:
            r = RANKS[c]
            y = y + (8.0 / r) * (x[t] @ a[c, :r].t()) @ b[c, :, :r].t()
        out.append(y)
    return torch.stack(out)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_forward_and_gradients_match_base_plus_lora(kind, backend):
    if backend == "cpu":
        from fedhello.kernels import extension

        if extension.backend("cpu") is None:
            pytest.skip("csrc cpu extension not built")
    layer = _layer(kind, backend)
    assert layer.quantization == kind and (layer.in_features, layer.out_features) == (D_IN, D_OUT)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(11, D_IN, generator=gen, requires_grad=True)
    ids = torch.tensor([0, 1, 2, -1, 2, 0, 1, 1, -1, 2, 0])
    with layer.context.route(ids):
        y = layer(x)
    w = torch.randn(y.shape, generator=gen)
    (y * w).sum().backward()

    x_ref = x.detach().clone().requires_grad_()
    a_ref = layer.lora_a.detach().clone().requires_grad_()
    b_ref = layer.lora_b.detach().clone().requires_grad_()
    y_ref = _reference(layer, x_ref, ids, a_ref, b_ref)
    (y_ref * w).sum().backward()
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.lora_a.grad, a_ref.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.lora_b.grad, b_ref.grad, atol=1e-5, rtol=1e-5)
    expected = torch.stack([a_ref.grad[c].square().sum() + b_ref.grad[c].square().sum() for c in range(N)])
    torch.testing.assert_close(layer.grad_sqnorm, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_no_full_precision_weight_is_kept(kind):
    layer = _layer(kind)
    big = [n for n, t in (*layer.base.named_parameters(), *layer.base.named_buffers())
           if t.is_floating_point() and t.numel() >= D_IN * D_OUT // 2]
    assert big == []
    assert layer.base.weight.dtype == (torch.int8 if kind == "int8" else torch.uint8)


@pytest.mark.parametrize("kind", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_4bit_weight_is_quantized_from_its_compute_dtype_value(kind, dtype):
    """bitsandbytes dequantizes to the dtype it quantized from: a float32 source under a 16-bit
    compute dtype would make each backward build a float32 copy of the layer and cast it. The
    packed weight is the one bitsandbytes makes from the weight loaded in ``dtype``."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    torch.manual_seed(0)
    linear = nn.Linear(D_IN, D_OUT, bias=False)
    layer = quantize_linear(linear, kind, dtype)
    state = layer.weight.quant_state
    assert state.dtype == dtype
    assert F.dequantize_4bit(layer.weight.data, state).dtype == dtype
    expected = bnb.nn.Params4bit(linear.weight.detach().to(dtype), requires_grad=False, blocksize=64,
                                 compress_statistics=True, quant_type=kind).to("cpu")
    assert torch.equal(layer.weight.data, expected.data)
    assert torch.equal(F.dequantize_4bit(layer.weight.data, state),
                       F.dequantize_4bit(expected.data, expected.quant_state))


def test_eval_without_grad_keeps_the_training_layout():
    """bitsandbytes would repack an eval-mode 4-bit layer for a bfloat16 CPU kernel on first use."""
    layer = _layer("nf4")
    layer.eval()
    layer.base.eval()
    x = torch.randn(5, D_IN)
    with torch.no_grad(), layer.context.route(torch.tensor([0, 1, 2, -1, 0])):
        y_eval = layer(x)
    assert not getattr(layer.base.weight.quant_state, "packing_format_for_cpu", False)
    layer.base.train()
    with layer.context.route(torch.tensor([0, 1, 2, -1, 0])):
        y_train = layer(x.requires_grad_())
    torch.testing.assert_close(y_eval, y_train.detach(), atol=0, rtol=0)


def test_full_precision_base_is_not_quantized():
    layer = MultiLoRALinear(nn.Linear(8, 8), 2, 2)
    assert layer.quantization is None and quantization_of(layer.base) is None


def test_float64_is_refused():
    layer = _layer("nf4")
    with layer.context.route(torch.tensor([0])), pytest.raises(TypeError, match=r"^x: .*nf4 base.*got float64"):
        layer(torch.randn(1, D_IN, dtype=torch.float64))


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_create_graph_is_refused(kind):
    layer = _layer(kind)
    x = torch.randn(3, D_IN, requires_grad=True)
    with layer.context.route(torch.tensor([0, 1, 2])):
        y = layer(x)
    with pytest.raises(RuntimeError, match=rf"^create_graph: .*{kind} \(bitsandbytes\) base"):
        torch.autograd.grad(y.square().sum(), x, create_graph=True)


def test_backend_that_cannot_serve_the_base_is_refused():
    layer = _layer("nf4", backend="cuda")
    with layer.context.route(torch.tensor([0])), pytest.raises(ValueError, match=r"^backend: 'cuda' needs cuda"):
        layer(torch.randn(1, D_IN))


def test_int8_outlier_threshold_is_refused():
    import bitsandbytes as bnb

    base = bnb.nn.Linear8bitLt(D_IN, D_OUT, has_fp16_weights=False, threshold=6.0)
    with pytest.raises(ValueError, match=r"^base: Linear8bitLt with outlier threshold 6.0"):
        prepare_quantized_base(base)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_bfloat16_activations_track_float32(kind):
    """A bfloat16 backbone over a quantized base (4-bit layers multiplying in bfloat16): the banks
    stay float32 masters, the output and gradients follow float32 to bfloat16 precision."""
    layer = _layer(kind)
    if kind != "int8":
        layer.base.compute_dtype = torch.bfloat16
    x = torch.randn(6, D_IN, generator=torch.Generator().manual_seed(3))
    ids = torch.tensor([0, 1, 2, -1, 1, 0])
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        layer.lora_a.grad = layer.lora_b.grad = None
        xi = x.to(dtype).detach().requires_grad_()
        with layer.context.route(ids):
            y = layer(xi)
        assert y.dtype == dtype
        y.float().square().sum().backward()
        out[dtype] = (y.float(), xi.grad.float(), layer.lora_b.grad.clone())
        assert layer.lora_b.grad.dtype == torch.float32
    for got, want in zip(out[torch.bfloat16], out[torch.float32]):
        got, want = got.detach(), want.detach()
        assert float((got - want).norm() / want.norm()) < 2e-2


def test_every_bitsandbytes_layer_of_the_base_is_prepared_not_only_the_targets():
    """A model quantized elsewhere (transformers' BitsAndBytesConfig) never went through
    quantize_linear: inject_multi_lora prepares its non-target layers too, so an evaluation without
    gradients does not repack them for bitsandbytes' bfloat16 inference kernel, and refuses an int8
    layer with an outlier threshold wherever it sits."""
    from fedhello.models.quantize import quantize_backbone
    from fedhello.nn import inject_multi_lora
    from tests.nn.tiny import tiny_causal_lm

    model = tiny_causal_lm(64)
    quantize_backbone(model, "nf4", torch.float32)
    for module in model.modules():
        if quantization_of(module) is not None:
            module.support_avx512bf16_for_cpu = True  # bitsandbytes' default, as transformers leaves it
    multi = inject_multi_lora(model, ["q_proj", "v_proj"], num_clients=2, rank=2, head_modules=None)
    k_proj = model.model.layers[0].self_attn.k_proj  # not a target
    assert quantization_of(k_proj) == "nf4" and not k_proj.support_avx512bf16_for_cpu
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    with torch.no_grad(), multi.route(torch.tensor([0, 1])):
        multi.eval()
        multi(input_ids=ids)
    multi.train()
    with multi.route(torch.tensor([0, 1])):
        multi(input_ids=ids).logits.sum().backward()

    model = tiny_causal_lm(64)
    quantize_backbone(model, "int8", torch.float32)
    model.model.layers[1].mlp.down_proj.state.threshold = 6.0
    with pytest.raises(ValueError, match=r"^model: model\.layers\.1\.mlp\.down_proj: Linear8bitLt with outlier "
                                         r"threshold 6\.0"):
        inject_multi_lora(model, ["q_proj", "v_proj"], num_clients=2, rank=2, head_modules=None)


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_bfloat16_keeps_no_cast_copy_of_the_banks_for_backward(backend):
    """Over a quantized base the float32 master banks go to the LoRA op as they are: no bfloat16
    copy of them is saved for the backward (it would hold half of every slot's adapter bytes
    through the step)."""
    layer = _layer("nf4", backend)
    layer.base.compute_dtype = torch.bfloat16
    x = torch.randn(6, D_IN, dtype=torch.bfloat16, requires_grad=True)
    saved = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    with layer.context.route(torch.tensor([0, 1, 2, -1, 1, 0])), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    banks = {tuple(layer.lora_a.shape), tuple(layer.lora_b.shape)}
    assert not [t for t in saved if tuple(t.shape) in banks and t.dtype == torch.bfloat16]
    y.float().sum().backward()
    assert layer.lora_a.grad.dtype == layer.lora_b.grad.dtype == torch.float32
