"""A forward + backward of ``multi_lora_linear`` captured in a CUDA graph replays to the eager result.

Capture fails on any host read or routing-dependent launch, so this is also the GPU-side proof
that a call with a built plan and tensor ``ranks``/``trainable``/``scaling`` never syncs.
"""

from __future__ import annotations

import pytest
import torch

from fedhello.kernels import LoRAPlan, multi_lora_linear, triton_available

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device"),
    pytest.mark.skipif(not triton_available(), reason="triton is not installed"),
]


@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
def test_forward_backward_replays_in_a_cuda_graph(dropout_p):
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    t, n, d_in, d_out, r = 512, 8, 256, 192, 16
    dtype = torch.bfloat16
    x = torch.randn(t, d_in, device=dev, dtype=dtype, generator=gen).requires_grad_()
    w = torch.randn(d_out, d_in, device=dev, dtype=dtype, generator=gen) * d_in**-0.5
    bias = torch.randn(d_out, device=dev, dtype=dtype, generator=gen)
    a = (torch.randn(n, r, d_in, device=dev, dtype=dtype, generator=gen) * d_in**-0.5).requires_grad_()
    b = (torch.randn(n, d_out, r, device=dev, dtype=dtype, generator=gen) * r**-0.5).requires_grad_()
    ids = torch.randint(-1, n, (t,), device=dev, generator=gen)
    plan = LoRAPlan.build(ids, n)
    ranks = torch.tensor([16, 8, 4, 16, 1, 16, 2, 16], device=dev, dtype=torch.int32)
    trainable = torch.arange(n, device=dev) % 3 != 1
    scaling = torch.rand(n, device=dev, generator=gen) + 0.5
    seeds = torch.arange(n, device=dev, dtype=torch.int64) * 7919
    sq = torch.zeros(n, device=dev)
    dy = torch.randn(t, d_out, device=dev, dtype=dtype, generator=gen)
    out = {}

    def step():
        sq.zero_()
        y = multi_lora_linear(x, w, bias, a, b, plan, scaling, ranks=ranks, trainable=trainable,
                              grad_sqnorm=sq, backend="triton", dropout_p=dropout_p,
                              dropout_seeds=seeds if dropout_p else None)
        y.backward(dy)
        out["y"] = y

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up compiles the kernels and fills the plan's caches
        for _ in range(2):
            x.grad = a.grad = b.grad = None
            step()
    torch.cuda.current_stream().wait_stream(side)
    eager = [out["y"].clone(), x.grad.clone(), a.grad.clone(), b.grad.clone(), sq.clone()]

    x.grad = a.grad = b.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for _ in range(2):
        graph.replay()
    torch.cuda.synchronize()
    replayed = [out["y"], x.grad, a.grad, b.grad, sq]
    for name, got, want in zip(("y", "dx", "dA", "dB", "norms"), replayed, eager):
        assert torch.equal(got, want), name
