"""The registered custom ops (torch.ops.fedhello.*): torch.compile without graph breaks, torch.func."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from fedhello.kernels import LoRAPlan, lora_delta, multi_lora_linear, triton_available
from fedhello.kernels.checks import check_inputs
from fedhello.kernels.multi_lora import _extension, backend_for, op_arguments, prepare_dropout

from .test_multi_lora import BACKENDS, DEVICE, spy_host_reads

T, N, D, R = 13, 3, 8, 4
IDS = torch.tensor([0, 2, -1, 1, 0, 2, 2, -1, 0, 1, 1, 0, 2])


class TwoLayers(torch.nn.Module):
    """A small model on both ops: multi_lora_linear, then lora_delta added into a user-owned layer."""

    def __init__(self, backend: str) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.backend = backend
        self.l1, self.l2 = torch.nn.Linear(D, D), torch.nn.Linear(D, D)
        for name, shape in (("a1", (N, R, D)), ("b1", (N, D, R)), ("a2", (N, R, D)), ("b2", (N, D, R))):
            setattr(self, name, torch.nn.Parameter(torch.randn(*shape, generator=gen) * 0.5))

    def forward(self, x, plan, ranks, sq, seeds):
        kw = dict(ranks=ranks, grad_sqnorm=sq, backend=self.backend)
        h = multi_lora_linear(x, self.l1.weight, self.l1.bias, self.a1, self.b1, plan, 2.0, **kw,
                              dropout_p=0.1, dropout_seeds=seeds)
        h = torch.relu(h)
        return lora_delta(h, self.a2, self.b2, plan, torch.tensor([0.5, 1.0, 2.0], device=h.device), **kw,
                          out=self.l2(h))


def _run(model, x, plan):
    """Output, parameter gradients and fused norms of one step."""
    sq = torch.zeros(N, device=DEVICE)
    model.zero_grad()
    y = model(x, plan, torch.tensor([4, 2, 0], device=DEVICE), sq, torch.tensor([1, 2, 3], device=DEVICE))
    y.square().sum().backward()
    return [y.detach()] + [p.grad.clone() for p in model.parameters()] + [sq]


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_model_has_no_graph_break_and_matches_eager(backend):
    model = TwoLayers(backend).to(DEVICE)
    x = torch.randn(T, D, device=DEVICE)
    plan = LoRAPlan.build(IDS.to(DEVICE), N)
    eager = _run(model, x, plan)
    counters.clear()
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    got = _run(compiled, x, plan)
    assert dict(counters["graph_break"]) == {}
    assert counters["stats"]["unique_graphs"] == 1
    for g, e in zip(got, eager):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
    assert (got[-1][:2] > 0).all() and got[-1][2] == 0  # rank-0 client: no norm


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_with_dynamic_rows_is_one_graph(backend):
    """The fake implementations take symbolic row counts: batches of 3 sizes, one graph, eager results."""
    model = TwoLayers(backend).to(DEVICE)
    counters.clear()
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager", dynamic=True)
    gen = torch.Generator().manual_seed(4)
    for t in (13, 21, 34):
        plan = LoRAPlan.build(torch.randint(-1, N, (t,), generator=gen).to(DEVICE), N)
        x = torch.randn(t, D, generator=gen).to(DEVICE)
        for g, e in zip(_run(compiled, x, plan), _run(model, x, plan)):
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == 1 and dict(counters["graph_break"]) == {}


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_compiled_multi_lora_linear_layer(backend):
    """fedhello.nn's layer compiles whole (fullgraph) once its route and plan exist."""
    if backend == "cpu" and _extension("cpu") is None:
        pytest.skip("csrc extension for cpu is not built")
    from fedhello.nn.lora_linear import MultiLoRALinear

    layer = MultiLoRALinear(torch.nn.Linear(D, 6), N, R, backend=backend)
    torch.nn.init.normal_(layer.lora_b)
    x = torch.randn(T, D)
    with layer.context.route(IDS, trusted=True, contiguous=False):
        want = layer(x)
        want.sum().backward()
        want_grad, layer.lora_b.grad = layer.lora_b.grad, None
        counters.clear()
        torch._dynamo.reset()
        got = torch.compile(layer, fullgraph=True, backend="aot_eager")(x)
        got.sum().backward()
    assert dict(counters["graph_break"]) == {}
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(layer.lora_b.grad, want_grad)


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
def test_compiled_call_reads_nothing_back_to_the_host(monkeypatch):
    """The host-sync-free contract holds inside a compiled graph (Triton backend, a built plan)."""
    model = TwoLayers("triton").to(DEVICE)
    x = torch.randn(T, D, device=DEVICE)
    plan = LoRAPlan.build(IDS.to(DEVICE), N)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    _run(compiled, x, plan)  # compile first: tracing may read shapes
    reads = spy_host_reads(monkeypatch)
    _run(compiled, x, plan)
    monkeypatch.undo()
    assert reads == []


def _op_args(backend: str, x, w, b, a, bb, plan):
    params = check_inputs(x, w, b, a, bb, plan, 1.5, [4, 2, 0], None, None)
    impl = backend_for(backend, x)
    keep, params = prepare_dropout(x, plan, params, impl)
    return (x, w, b, a, bb, *op_arguments(plan, params, keep), None, impl.NAME)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    """torch.library.opcheck: schema, fake implementation, autograd registration (and, on the torch
    backend, AOT dispatch: the kernel backends leave parts of ``saved`` unwritten, which its
    eager-versus-traced comparison of every output would flag)."""
    gen = torch.Generator().manual_seed(1)
    x, w, b = torch.randn(T, D, generator=gen), torch.randn(6, D, generator=gen), torch.randn(6, generator=gen)
    a, bb = torch.randn(N, R, D, generator=gen), torch.randn(N, 6, R, generator=gen)
    args = _op_args(backend, *(t.to(DEVICE).requires_grad_() for t in (x, w, b, a, bb)), LoRAPlan.build(IDS.to(DEVICE), N))
    utils = None if backend == "torch" else ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(torch.ops.fedhello.multi_lora_linear.default, args, test_utils=utils or
                          ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic"))
    delta_args = (args[0], *args[3:5], *args[5:])
    torch.library.opcheck(torch.ops.fedhello.lora_delta.default, delta_args, test_utils=utils or
                          ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic"))


def test_registered_op_backward_refuses_create_graph():
    x, a = torch.randn(T, D, requires_grad=True), torch.randn(N, R, D, requires_grad=True)
    plan = LoRAPlan.build(IDS, N)
    args = _op_args("torch", x, torch.randn(6, D), None, a, torch.randn(N, 6, R), plan)
    y = torch.ops.fedhello.multi_lora_linear(*args)[0]
    with pytest.raises(RuntimeError, match="registered op's backward is not differentiable"):
        torch.autograd.grad(y.sum(), a, create_graph=True)


def test_torch_func_grad_on_the_torch_backend():
    """torch.func.grad (and a second, nested one) through both ops on the torch backend equals autograd."""
    gen = torch.Generator().manual_seed(2)
    x, w = torch.randn(T, D, generator=gen, dtype=torch.float64), torch.randn(6, D, generator=gen, dtype=torch.float64)
    a, b = torch.randn(N, R, D, generator=gen, dtype=torch.float64), torch.randn(N, 6, R, generator=gen, dtype=torch.float64)
    plan = LoRAPlan.build(IDS, N)

    def loss(a, b, x):
        y = multi_lora_linear(x, w, None, a, b, plan, 2.0, ranks=[4, 2, 0], backend="torch")
        return lora_delta(y, a[..., :6], b, plan, 0.5, backend="torch", out=y.sin()).square().sum()

    got = torch.func.grad(loss, argnums=(0, 1, 2))(a, b, x)
    leaves = [t.clone().requires_grad_() for t in (a, b, x)]
    want = torch.autograd.grad(loss(*leaves), leaves, create_graph=True)
    for g, e in zip(got, want):
        torch.testing.assert_close(g, e)
    hvp = torch.func.grad(lambda a: torch.func.grad(loss)(a, b, x).square().sum())(a)
    torch.testing.assert_close(hvp, torch.autograd.grad(want[0].square().sum(), leaves[0])[0])


@pytest.mark.parametrize("backend", [p for p in BACKENDS if p.values[0] != "torch"])
def test_torch_func_takes_auto_to_torch_and_refuses_kernel_backends(backend):
    plan = LoRAPlan.build(IDS.to(DEVICE), N)
    x, a, b = torch.randn(T, D, device=DEVICE), torch.randn(N, R, D, device=DEVICE), torch.randn(N, 6, R, device=DEVICE)
    with pytest.raises(ValueError, match="backend: .* cannot run under torch.func transforms; use 'torch' or 'auto'"):
        torch.func.grad(lambda a: lora_delta(x, a, b, plan, 1.0, backend=backend).sum())(a)
    got = torch.func.grad(lambda a: lora_delta(x, a, b, plan, 1.0, backend="auto").square().sum())(a)
    leaf = a.clone().requires_grad_()
    lora_delta(x, leaf, b, plan, 1.0, backend=backend).square().sum().backward()
    torch.testing.assert_close(got, leaf.grad, rtol=1e-4, atol=1e-4)  # torch against a kernel backend, fp32
