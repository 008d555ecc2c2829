"""lora_delta on every backend: the LoRA term alone, or added into a base output the caller made."""

from __future__ import annotations

import pytest
import torch

from fedhello.kernels import LoRAPlan, lora_delta, multi_lora_linear

from .reference64 import reference_fp64
from .test_multi_lora import BACKENDS, DEVICE, HALF_TOL, TOL, _rel_err

P = 0.25


def _inputs(seed: int, dtype=torch.float32, t=67, n=5, d_in=37, d_out=29, r=8, lead=None):
    """Odd sizes, a rank-0 client, heterogeneous ranks, unrouted rows and a client without rows."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(-1, n, (t,), generator=gen)
    ids = torch.where(ids == 3, torch.full_like(ids, 1), ids)  # client 3 owns no row

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(dtype).to(DEVICE)

    shape = (*lead, d_in) if lead else (t, d_in)
    return dict(
        x=rnd(*shape), lora_a=rnd(n, r, d_in, scale=d_in**-0.5), lora_b=rnd(n, d_out, r, scale=r**-0.5),
        weight=rnd(d_out, d_in, scale=d_in**-0.5), bias=rnd(d_out), ids=ids,
        ranks=torch.tensor([8, 0, 3, 5, 1][:n], dtype=torch.int32),
        trainable=torch.tensor([True, True, False, True, True][:n]),
        scaling=torch.rand(n, generator=gen) + 0.5, seeds=torch.randint(0, 2**62, (n,), generator=gen),
        dy=rnd(*shape[:-1], d_out),
    )


def _leaves(inp, *names):
    return [inp[k].detach().clone().requires_grad_() for k in names]


def _kwargs(inp, backend, sq=None, dropout=False):
    n = inp["lora_a"].shape[0]
    kw = dict(ranks=inp["ranks"].to(DEVICE), trainable=inp["trainable"].to(DEVICE), grad_sqnorm=sq, backend=backend)
    if dropout:
        kw.update(dropout_p=P, dropout_seeds=inp["seeds"].to(DEVICE))
    return (LoRAPlan.build(inp["ids"].to(DEVICE), n), inp["scaling"].to(DEVICE)), kw


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("lead", [None, (1, 67)], ids=["2d", "3d"])
def test_delta_matches_fp64_reference(backend, dtype, lead):
    inp = _inputs(int(torch.randint(0, 2**31 - 1, (1,))), dtype, lead=lead)
    n = inp["lora_a"].shape[0]
    x, a, b = _leaves(inp, "x", "lora_a", "lora_b")
    sq = torch.zeros(n, device=DEVICE)
    (plan, scaling), kw = _kwargs(inp, backend, sq)
    delta = lora_delta(x, a, b, plan, scaling, **kw)
    delta.backward(inp["dy"])
    # The reference with a zero base weight and no bias is the LoRA term alone.
    ref = reference_fp64(inp["x"], torch.zeros_like(inp["weight"]), None, inp["lora_a"], inp["lora_b"], inp["ids"],
                         inp["scaling"], inp["ranks"], inp["trainable"], inp["dy"])
    tol = TOL.get((backend, dtype), HALF_TOL)
    assert delta.dtype == dtype and delta.shape == inp["dy"].shape
    for name, got, want in (("delta", delta, ref.y), ("dx", x.grad, ref.dx), ("dA", a.grad, ref.d_a),
                            ("dB", b.grad, ref.d_b)):
        assert _rel_err(got, want) < tol, name
    unrouted = (inp["ids"] < 0).to(DEVICE)
    assert (delta.reshape(-1, delta.shape[-1])[unrouted] == 0).all()
    assert torch.allclose(sq.double().cpu(), ref.sqnorm, rtol=1e-3 if dtype == torch.float32 else 3e-2)
    frozen = ~inp["trainable"].to(DEVICE)
    assert (a.grad[frozen] == 0).all() and (b.grad[frozen] == 0).all() and (sq[frozen.cpu()] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dropout", [False, True], ids=["plain", "dropout"])
def test_delta_is_the_lora_part_of_multi_lora_linear(backend, dropout):
    """With a zero base weight, multi_lora_linear is its LoRA part: lora_delta gives the same bits,
    the same gradients and the same fused norms (dropout: the same counter-based masks)."""
    inp = _inputs(5)
    n = inp["lora_a"].shape[0]
    runs = []
    for fused in (True, False):
        x, a, b = _leaves(inp, "x", "lora_a", "lora_b")
        sq = torch.zeros(n, device=DEVICE)
        (plan, scaling), kw = _kwargs(inp, backend, sq, dropout)
        if fused:
            y = multi_lora_linear(x, torch.zeros_like(inp["weight"]), None, a, b, plan, scaling, **kw)
        else:
            y = lora_delta(x, a, b, plan, scaling, **kw)
        y.backward(inp["dy"])
        runs.append((y, x.grad, a.grad, b.grad, sq))
    for got, want in zip(*runs):
        assert torch.equal(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_adds_into_a_base_output_and_gradients_flow_through_it(backend):
    """``out=base(x)`` equals ``base(x) + delta`` in value and in the gradients of x, the adapters
    and the base layer's own parameters (autograd flows through the in-place add)."""
    inp = _inputs(9, lead=(67,))
    results = []
    for into in (True, False):
        x, a, b, w, bias = _leaves(inp, "x", "lora_a", "lora_b", "weight", "bias")
        (plan, scaling), kw = _kwargs(inp, backend, dropout=True)
        base = torch.nn.functional.linear(x.tanh(), w, bias)  # a user-owned base layer, not a leaf
        if into:
            y = lora_delta(x, a, b, plan, scaling, **kw, out=base)
            assert y is base
        else:
            y = base + lora_delta(x, a, b, plan, scaling, **kw)
        y.backward(inp["dy"])
        results.append((y, x.grad, a.grad, b.grad, w.grad, bias.grad))
    for got, want in zip(*results):
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_adapters_under_half_activations(backend):
    """fp32 master adapters with bf16 activations: accepted as they are, gradients in fp32."""
    inp = _inputs(13, torch.bfloat16)
    x = inp["x"].clone().requires_grad_()
    a, b = (inp[k].float().requires_grad_() for k in ("lora_a", "lora_b"))
    w = inp["weight"]
    (plan, scaling), kw = _kwargs(inp, backend)
    y = multi_lora_linear(x, w, None, a, b, plan, scaling, **kw)
    delta = lora_delta(x, a, b, plan, scaling, **kw)
    (y.float() * inp["dy"].float()).sum().backward()
    ref = reference_fp64(inp["x"], w, None, a, b, inp["ids"], inp["scaling"], inp["ranks"], inp["trainable"], inp["dy"])
    assert y.dtype == delta.dtype == torch.bfloat16 and a.grad.dtype == b.grad.dtype == torch.float32
    for name, got, want in (("y", y, ref.y), ("dA", a.grad, ref.d_a), ("dB", b.grad, ref.d_b)):
        assert _rel_err(got, want) < HALF_TOL, name
    assert _rel_err(delta, ref.y - inp["x"].double().cpu() @ w.double().cpu().t()) < HALF_TOL


def test_float32_adapters_need_half_activations():
    inp = _inputs(1, torch.float64)
    (plan, scaling), kw = _kwargs(inp, "torch")
    with pytest.raises(TypeError, match="lora_a: expected dtype torch.float64"):
        lora_delta(inp["x"], inp["lora_a"].float(), inp["lora_b"].float(), plan, scaling, **kw)
    half = _inputs(1, torch.float16)
    with pytest.raises(TypeError, match="lora_b: expected dtype torch.float32 .the dtype of lora_a"):
        lora_delta(half["x"], half["lora_a"].float(), half["lora_b"], plan, scaling, **kw)


@pytest.mark.parametrize("out,error,match", [
    (torch.zeros(67, 28), ValueError, r"out: expected shape \[..., d_out\] = \(67, 29\)"),
    (torch.zeros(67, 29, dtype=torch.float64), TypeError, "out: expected dtype torch.float32"),
    ([[0.0]], TypeError, "out: expected None or a torch.Tensor"),
    (torch.zeros(67, 29, device="meta"), ValueError, "out: expected a tensor on"),
])
def test_bad_out_is_refused(out, error, match):
    inp = _inputs(2)
    (plan, scaling), kw = _kwargs(inp, "torch")
    with pytest.raises(error, match=match):
        lora_delta(inp["x"], inp["lora_a"], inp["lora_b"], plan, scaling, **kw, out=out)


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_slices_of_a_fused_qkv_output(backend):
    """Per-slice adapters on a fused projection: ``out=`` a column slice (a strided view) of the
    fused output adds each slice's delta in place, with the gradients of the out-of-place concat."""
    inp = _inputs(21, d_out=29)
    d, n = 29, inp["lora_a"].shape[0]
    gen = torch.Generator().manual_seed(3)
    w_qkv = (torch.randn(3 * d, inp["x"].shape[-1], generator=gen) * 0.2).to(DEVICE)
    slices = [(torch.randn(n, 8, inp["x"].shape[-1], generator=gen) * 0.2).to(DEVICE) for _ in range(3)]
    results = []
    for into in (True, False):
        x, w = inp["x"].clone().requires_grad_(), w_qkv.clone().requires_grad_()
        a_s = [a.clone().requires_grad_() for a in slices]
        (plan, scaling), kw = _kwargs(inp, backend, dropout=True)
        qkv = torch.nn.functional.linear(x, w)
        if into:
            for i, a in enumerate(a_s):
                view = qkv[:, i * d:(i + 1) * d]
                assert not view.is_contiguous()
                lora_delta(x, a, inp["lora_b"], plan, scaling, **kw, out=view)
            y = qkv
        else:
            y = qkv + torch.cat([lora_delta(x, a, inp["lora_b"], plan, scaling, **kw) for a in a_s], dim=-1)
        y.square().sum().backward()
        results.append((y, x.grad, w.grad, *(a.grad for a in a_s)))
    for got, want in zip(*results):
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)
