"""Fused LoRA dropout: the counter-based mask, equal on every backend and for every batching."""

from __future__ import annotations

import math

import pytest
import torch

from fedhello.kernels import LoRAPlan, multi_lora_linear
from fedhello.kernels.dropout import keep_mask, row_keep

from .reference64 import reference_fp64
from .test_multi_lora import BACKENDS, DEVICE, _rel_err

P = 0.3


def _inputs(seed: int, t=90, n=4, d_in=48, d_out=40, r=8):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(-1, n, (t,), generator=gen)
    return dict(
        x=torch.randn(t, d_in, generator=gen), weight=torch.randn(d_out, d_in, generator=gen) * d_in**-0.5,
        bias=torch.randn(d_out, generator=gen), lora_a=torch.randn(n, r, d_in, generator=gen) * d_in**-0.5,
        lora_b=torch.randn(n, d_out, r, generator=gen) * r**-0.5, ids=ids,
        ranks=torch.tensor([8, 3, 5, 8][:n], dtype=torch.int32), scaling=torch.rand(n, generator=gen) + 0.5,
        seeds=torch.randint(0, 2**62, (n,), generator=gen), dy=torch.randn(t, d_out, generator=gen),
    )


def _run(inp, backend, ids=None, rows=None):
    """Forward + backward on (a subset of) the rows; returns y, dx, dA, dB, norms."""
    rows = torch.arange(inp["x"].shape[0]) if rows is None else rows
    ids = inp["ids"][rows] if ids is None else ids
    n = inp["lora_a"].shape[0]
    x = inp["x"][rows].clone().to(DEVICE).requires_grad_()
    a = inp["lora_a"].clone().to(DEVICE).requires_grad_()
    b = inp["lora_b"].clone().to(DEVICE).requires_grad_()
    sq = torch.zeros(n, device=DEVICE)
    y = multi_lora_linear(x, inp["weight"].to(DEVICE), inp["bias"].to(DEVICE), a, b, LoRAPlan.build(ids.to(DEVICE), n),
                          inp["scaling"].to(DEVICE), ranks=inp["ranks"].to(DEVICE), grad_sqnorm=sq,
                          backend=backend, dropout_p=P, dropout_seeds=inp["seeds"].to(DEVICE))
    y.backward(inp["dy"][rows].to(DEVICE))
    return y, x.grad, a.grad, b.grad, sq


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_matches_fp64_reference_with_the_documented_mask(backend):
    inp = _inputs(seed=int(torch.randint(0, 2**31 - 1, (1,))))
    y, dx, d_a, d_b, sq = _run(inp, backend)
    keep = row_keep(LoRAPlan.build(inp["ids"], 4), inp["seeds"], P, inp["x"].shape[1])
    ref = reference_fp64(inp["x"], inp["weight"], inp["bias"], inp["lora_a"], inp["lora_b"], inp["ids"],
                         inp["scaling"], inp["ranks"], torch.ones(4, dtype=torch.bool), inp["dy"],
                         dropout_scale=keep / (1 - P))
    for name, got, want in (("y", y, ref.y), ("dx", dx, ref.dx), ("dA", d_a, ref.d_a), ("dB", d_b, ref.d_b)):
        assert _rel_err(got, want) < 5e-3, name
    assert torch.allclose(sq.double().cpu(), ref.sqnorm, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_batched_equals_each_client_alone(backend):
    inp = _inputs(seed=11)
    batched = _run(inp, backend)
    for c in range(4):
        rows = (inp["ids"] == c).nonzero().flatten()
        # Alone: the same client in the same slot, only its rows, in the same order.
        alone = _run(inp, backend, rows=rows)
        assert torch.allclose(batched[0][rows], alone[0], rtol=1e-5, atol=1e-5)
        assert torch.allclose(batched[1][rows], alone[1], rtol=1e-5, atol=1e-5)
        assert torch.allclose(batched[2][c], alone[2][c], rtol=1e-4, atol=1e-6)
        assert torch.allclose(batched[3][c], alone[3][c], rtol=1e-4, atol=1e-6)


def test_triton_mask_bits_equal_torch_and_keep_rate():
    """dx of a zero base weight and a constant G A exposes the kernel's mask bit for bit."""
    pytest.importorskip("triton")
    t, n, d = 160, 2, 96
    ids = torch.tensor([0] * 100 + [1] * 60)
    seeds = torch.tensor([12345, 2**40 + 7])
    plan = LoRAPlan.build(ids.to(DEVICE), n)
    x = torch.zeros(t, d, device=DEVICE, requires_grad=True)
    a = torch.ones(n, 16, d, device=DEVICE)
    b = torch.ones(n, 8, 16, device=DEVICE)
    y = multi_lora_linear(x, torch.zeros(8, d, device=DEVICE), None, a, b, plan, 1.0, backend="triton",
                          dropout_p=P, dropout_seeds=seeds.to(DEVICE))
    y.backward(torch.ones(t, 8, device=DEVICE))
    kernel_keep = x.grad.cpu() != 0
    assert torch.equal(kernel_keep, row_keep(plan, seeds, P, d).cpu())
    # Keep rate of the documented hash over many entries: within 4 standard errors of 1 - p.
    j = torch.arange(4000)[:, None]
    k = torch.arange(256)[None, :]
    rate = keep_mask(torch.tensor(99), j, k, P).double().mean().item()
    assert abs(rate - (1 - P)) < 4 * math.sqrt(P * (1 - P) / j.numel() / k.numel())
    kept = x.grad.cpu()[kernel_keep]
    assert torch.allclose(kept, torch.full_like(kept, 16 * 8 / (1 - P)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_leaves_the_base_path_alone(backend):
    """With B = 0 the layer is its base: dropout may change neither y nor dx."""
    inp = _inputs(seed=3)
    inp["lora_b"] = torch.zeros_like(inp["lora_b"])
    y, dx, *_ = _run(inp, backend)
    x = inp["x"].double()
    want_y = x @ inp["weight"].double().t() + inp["bias"].double()
    assert _rel_err(y, want_y) < 1e-5
    assert _rel_err(dx, inp["dy"].double() @ inp["weight"].double()) < 1e-5


@pytest.mark.parametrize("kwargs, err, match", [
    ({"dropout_p": 1.0, "dropout_seeds": [1, 2]}, ValueError, r"dropout_p: expected a probability in \[0, 1\)"),
    ({"dropout_p": True}, TypeError, "dropout_p: expected a float"),
    ({"dropout_p": 0.1}, ValueError, "dropout_seeds: expected int64"),
    ({"dropout_p": 0.1, "dropout_seeds": [1]}, ValueError, r"dropout_seeds: expected shape \[N\]"),
    ({"dropout_p": 0.1, "dropout_seeds": torch.ones(2)}, TypeError, "dropout_seeds: expected an integer dtype"),
])
def test_bad_dropout_arguments(kwargs, err, match):
    plan = LoRAPlan.build(torch.tensor([0, 1, 1]), 2)
    with pytest.raises(err, match=match):
        multi_lora_linear(torch.randn(3, 4), torch.randn(5, 4), None, torch.randn(2, 2, 4), torch.randn(2, 5, 2),
                          plan, 1.0, backend="torch", **kwargs)
