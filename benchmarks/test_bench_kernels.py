"""pytest-benchmark entry point for a few cases of ``bench_kernels.py`` (same case-construction code).

Run from the repository root (not collected by the plain ``pytest`` run, whose testpaths is tests/)::

    pytest benchmarks/test_bench_kernels.py                       # CUDA: the headline case
    pytest benchmarks/test_bench_kernels.py --benchmark-json out.json

On a CUDA machine it times the headline case (N=32, T=8k, d=4096, r=16, bf16) and its mixed-rank
and half-frozen variants; on CPU a tiny fp32 case, with the Triton kernels in the interpreter.
Each callable synchronises the device, so pytest-benchmark's host clock measures the GPU work.
"""

from __future__ import annotations

import itertools
import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    # Triton honours TRITON_INTERPRET only if it is set before triton is first imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # One intra-op thread: on a busy machine idle OpenMP workers get descheduled and every
    # small op then waits milliseconds at its barrier, which would swamp the measurement.
    torch.set_num_threads(1)

import bench_kernels as bk  # noqa: E402  (needs the environment above)

DEVICE = torch.device("cuda" if CUDA else "cpu")
if CUDA:
    CASES = [bk.KernelCase(32, 8192, 4096, 16, variant, "bf16") for variant in bk.VARIANTS]
    ROTATE = 4
else:
    CASES = [bk.KernelCase(4, 192, 64, 8, "uniform", "fp32")]
    ROTATE = 2
IMPLS = ("triton", "triton_nonorm", "torch", "bmm", "csrc", "delta", "base")


@pytest.fixture(scope="module", params=CASES, ids=lambda c: c.name)
def case_sets(request) -> tuple[bk.KernelCase, list[bk.InputSet]]:
    case = request.param
    gen = torch.Generator().manual_seed(0)
    sets = [bk.build_input_set(case, bk.make_client_ids(case.n, case.t, case.routing, gen), DEVICE, i)
            for i in range(ROTATE)]
    return case, sets


@pytest.mark.parametrize("phase", bk.PHASES)
@pytest.mark.parametrize("impl_name", IMPLS)
def test_layer(benchmark, case_sets, impl_name: str, phase: str) -> None:
    case, sets = case_sets
    impls, notes = bk.make_impls([impl_name], DEVICE, case.torch_dtype)
    if not impls:
        pytest.skip(notes[impl_name])
    impl = impls[0]
    if impl.name in bk.LORA_IMPLS and impl.name != "torch":
        report = bk.check_agreement([impl], sets[0])[impl.name]
        assert report["ok"], f"{impl.name} disagrees with the torch loop: {report['rel_err']}"
    prepare, timed = bk.phase_callables(impl, phase)
    rotation = itertools.cycle(sets)

    def sync() -> None:
        if CUDA:
            torch.cuda.synchronize(DEVICE)

    def setup():
        state = prepare(next(rotation))
        sync()  # the untimed forward of a "bwd" measurement must finish before the clock starts
        return (state,), {}

    def run(state) -> None:
        timed(state)
        sync()

    benchmark.extra_info.update(case=case.name, impl=impl.name, phase=phase)
    benchmark.pedantic(run, setup=setup, rounds=50 if CUDA else 5, warmup_rounds=3 if CUDA else 1)
