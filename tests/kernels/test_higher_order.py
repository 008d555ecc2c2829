"""Higher-order gradients of the torch backend: gradgradcheck in float64 over every input.

The torch backend's backward is a composition of differentiable torch ops on the saved inputs,
so a backward under ``create_graph=True`` (a gradient penalty, a Hessian-vector product) records
its dependence on x, the base weight and bias, and both adapters, also through non-contiguous
views and dropout. The kernel backends refuse (``test_multi_lora.test_second_order_gradients``).
"""

from __future__ import annotations

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

from fedhello.kernels import LoRAPlan, lora_delta, multi_lora_linear

T, N, D_IN, D_OUT, R = 11, 3, 5, 4, 3
IDS = torch.tensor([0, 2, -1, 1, 0, 2, 2, -1, 0, 1, 0])


def _leaves(seed: int) -> dict:
    """Fresh float64 leaves, the big ones stored transposed so that the ops see non-contiguous views."""
    gen = torch.Generator().manual_seed(seed)

    def leaf(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).requires_grad_()

    return dict(xt=leaf(D_IN, T), w=leaf(D_OUT, D_IN), bias=leaf(D_OUT), at=leaf(N, D_IN, R), b=leaf(N, D_OUT, R))


def _settings(dropout: bool) -> dict:
    kw = dict(ranks=[3, 1, 2], backend="torch")
    if dropout:
        kw.update(dropout_p=0.3, dropout_seeds=[5, 6, 7])
    return kw


@pytest.mark.parametrize("dropout", [False, True], ids=["plain", "dropout"])
def test_multi_lora_linear_gradgradcheck(dropout):
    plan = LoRAPlan.build(IDS, N)
    scaling = torch.tensor([0.5, 2.0, 1.5])

    def fn(xt, w, bias, at, b):
        x, a = xt.t(), at.transpose(1, 2)  # non-contiguous x and lora_a
        assert not (x.is_contiguous() or a.is_contiguous())
        return multi_lora_linear(x, w, bias, a, b, plan, scaling, **_settings(dropout))

    inputs = tuple(_leaves(int(torch.randint(0, 2**31 - 1, (1,)))).values())
    assert gradcheck(fn, inputs)
    assert gradgradcheck(fn, inputs)


@pytest.mark.parametrize("into", [False, True], ids=["delta", "out"])
def test_lora_delta_gradgradcheck(into):
    plan = LoRAPlan.build(IDS, N)

    def fn(xt, w, bias, at, b):
        x, a = xt.t(), at.transpose(1, 2)
        if into:
            return lora_delta(x, a, b, plan, 1.5, **_settings(True), out=torch.nn.functional.linear(x.sin(), w, bias))
        return lora_delta(x, a, b, plan, 1.5, **_settings(True)) * (bias.sum() + w.sum())

    inputs = tuple(_leaves(int(torch.randint(0, 2**31 - 1, (1,)))).values())
    assert gradcheck(fn, inputs)
    assert gradgradcheck(fn, inputs)


def test_penalty_on_the_adapter_gradient_reaches_x():
    """d/dx of ||dL/dB||^2 (a penalty on a weight gradient), against the same penalty through a
    dense per-row formula: this derivative was all zeros while the backward saved detached copies."""
    leaves = _leaves(4)
    x, a, b = leaves["xt"].t(), leaves["at"].transpose(1, 2), leaves["b"]
    dy = torch.randn(T, D_OUT, dtype=torch.float64)
    plan = LoRAPlan.build(IDS, N)
    y = multi_lora_linear(x, leaves["w"], None, a, b, plan, 2.0, backend="torch")
    (g_b,) = torch.autograd.grad((y * dy).sum(), b, create_graph=True)
    got = torch.autograd.grad(g_b.square().sum(), leaves["xt"])[0]

    c, routed = IDS.clamp(min=0), (IDS >= 0).to(torch.float64)[:, None]
    dense = torch.einsum("tr,tor->to", torch.einsum("td,trd->tr", x, a[c]), b[c]) * 2.0 * routed
    (g_b2,) = torch.autograd.grad((dense * dy).sum(), b, create_graph=True)
    want = torch.autograd.grad(g_b2.square().sum(), leaves["xt"])[0]
    assert want.abs().max() > 0
    torch.testing.assert_close(got, want)
