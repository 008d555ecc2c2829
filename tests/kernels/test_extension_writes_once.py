"""The compiled backend writes every row of ``out`` and ``dx`` once, whatever their memory held.

``extension.py`` allocates both with ``torch.empty`` and the kernels write ``bias + LoRA`` (the
bias alone, or zeros, on rows without a LoRA term) and the LoRA share of ``dx`` (zeros there)
without reading them. Here ``torch.empty`` hands out memory filled with a poison value, so a row
that a kernel skips, or an element it adds into instead of writing, changes the result.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fedhello.kernels import LoRAPlan
from fedhello.kernels.checks import ClientParams
from fedhello.kernels.multi_lora import _extension

from .reference64 import reference_fp64

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
EXT = _extension(DEVICE.type)
pytestmark = pytest.mark.skipif(EXT is None, reason=f"csrc extension for {DEVICE.type} is not built")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {("cpu", torch.float32): 1e-5, ("cuda", torch.float32): 5e-3}
HALF_TOL = 2e-2

# Client 0: most rows (several row tiles); 1: rank 0 with rows; 2: frozen; 3: no rows; 4: rank 16.
RANKS = [8, 0, 4, 3, 16]
TRAINABLE = [True, True, False, True, True]
ROW_CLIENTS = [-1, 0, 0, 0, 0, 1, 2, 4]  # drawn uniformly per row: about 1/8 unrouted


def _inputs(dtype: torch.dtype, with_bias: bool, seed: int = 0) -> dict:
    t, n, d_in, d_out, r_max = 150, len(RANKS), 24, 72, max(RANKS)
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * scale).to(dtype)

    ids = torch.tensor(ROW_CLIENTS)[torch.randint(0, len(ROW_CLIENTS), (t,), generator=gen)]
    assert {-1, 0, 1, 2, 4} <= set(ids.tolist()) and 3 not in ids.tolist()
    return dict(
        x=rnd(t, d_in), dy=rnd(t, d_out), bias=rnd(d_out) if with_bias else None,
        lora_a=rnd(n, r_max, d_in, scale=d_in**-0.5), lora_b=rnd(n, d_out, r_max, scale=r_max**-0.5),
        ids=ids, scaling=torch.rand(n, generator=gen) + 0.5, ranks=torch.tensor(RANKS, dtype=torch.int32),
        trainable=torch.tensor(TRAINABLE),
    )


def _run(inp: dict, poison: float, monkeypatch: pytest.MonkeyPatch) -> dict:
    """One lora_forward + lora_backward of the compiled backend with ``torch.empty`` poisoned."""
    empty, empty_like = torch.empty, torch.empty_like

    def poisoned(t: torch.Tensor) -> torch.Tensor:
        return t.fill_(poison) if t.is_floating_point() else t

    dev = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in inp.items()}
    plan = LoRAPlan.build(dev["ids"], len(RANKS))
    params = ClientParams(dev["scaling"], dev["ranks"], dev["trainable"])
    sq = torch.zeros(len(RANKS), device=DEVICE)
    with monkeypatch.context() as m:
        m.setattr(torch, "empty", lambda *a, **k: poisoned(empty(*a, **k)))
        m.setattr(torch, "empty_like", lambda *a, **k: poisoned(empty_like(*a, **k)))
        out, h = EXT.lora_forward(dev["x"], dev["lora_a"], dev["lora_b"], dev["bias"], plan, params)
        dx, d_a, d_b = EXT.lora_backward(dev["dy"], dev["x"], dev["lora_a"], dev["lora_b"], plan, params, h,
                                         True, True, sq)
    return dict(out=out.cpu(), dx=dx.cpu(), d_a=d_a.cpu(), d_b=d_b.cpu(), sq=sq.cpu())


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_every_row_is_written_whatever_the_memory_held(dtype, with_bias, monkeypatch):
    inp = _inputs(dtype, with_bias)
    runs = [_run(inp, poison, monkeypatch) for poison in (float("nan"), 1.0e4)]
    for name in runs[0]:  # bit-identical whatever the buffers held before the call
        assert torch.equal(runs[0][name], runs[1][name]), name
    _check_against_reference(inp, runs[0], dtype, with_bias)


def _check_against_reference(inp: dict, got: dict, dtype: torch.dtype, with_bias: bool) -> None:
    # Rows without a LoRA term (no adapter, or a rank-0 client): exactly the bias (or zeros) and dx = 0.
    plain = (inp["ids"] == -1) | (inp["ids"] == 1)
    want_plain = inp["bias"] if with_bias else torch.zeros(inp["dy"].shape[1], dtype=dtype)
    assert torch.equal(got["out"][plain], want_plain.expand(int(plain.sum()), -1))
    assert torch.equal(got["dx"][plain], torch.zeros_like(got["dx"][plain]))

    # Every row (routed, rank-0, frozen, unrouted) against the fp64 reference of bias + LoRA.
    weight = torch.zeros(inp["dy"].shape[1], inp["x"].shape[1], dtype=dtype)
    ref = reference_fp64(inp["x"], weight, inp["bias"], inp["lora_a"], inp["lora_b"], inp["ids"],
                         inp["scaling"], inp["ranks"], inp["trainable"], inp["dy"])
    tol = TOL.get((DEVICE.type, dtype), HALF_TOL)
    for name, want in (("out", ref.y), ("dx", ref.dx), ("d_a", ref.d_a), ("d_b", ref.d_b)):
        err = float((got[name].double() - want).norm() / want.norm())
        assert err < tol, f"{name}: relative error {err:.3g} >= {tol}"
    assert torch.allclose(got["sq"].double(), ref.sqnorm, rtol=1e-4 if dtype == torch.float32 else 3e-2)


SIMD_LEVELS = ["baseline", "avx2", "avx512"]  # narrowest first


@pytest.mark.skipif(DEVICE.type != "cpu", reason="instruction sets of the CPU backend")
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_every_instruction_set_the_cpu_has_matches_the_reference(dtype, monkeypatch):
    """Each pass (shrink-expand, weight gradients) runs the copy for the level set_simd_level picks."""
    native, inp = EXT.native, _inputs(dtype, with_bias=True)
    best = native.simd_level()
    levels = SIMD_LEVELS[: SIMD_LEVELS.index(best) + 1]
    runs = {}
    try:
        for level in levels:
            native.set_simd_level(level)
            assert native.simd_level() == level
            runs[level] = _run(inp, float("nan"), monkeypatch)
            _check_against_reference(inp, runs[level], dtype, with_bias=True)
    finally:
        native.set_simd_level(best)
    # Another vector width sums in another order, so some bits of every fp32 output differ (a
    # 16-bit rounding can hide that): both passes really switched.
    if len(levels) > 1 and dtype == torch.float32:
        for name in ("out", "dx", "d_a", "d_b"):
            assert not torch.equal(runs["baseline"][name], runs[best][name]), name


def _native_forward_args(inp: dict) -> tuple[list, LoRAPlan]:
    plan = LoRAPlan.build(inp["ids"].to(DEVICE), len(RANKS))
    args = [inp[k].to(DEVICE) for k in ("x", "lora_a", "lora_b")]
    args += [plan.sorted_rows, plan.offsets, inp["scaling"].to(DEVICE), inp["ranks"].to(DEVICE), *EXT._tiles(plan)]
    return args, plan


@pytest.mark.parametrize("bad, error, what", [
    (lambda b: b.double(), TypeError, "bias: expected dtype"),
    (lambda b: b[:-1], ValueError, "bias: expected shape [d_out]"),
])
def test_native_forward_checks_the_bias(bad, error, what):
    inp = _inputs(torch.float32, with_bias=True)
    args, _ = _native_forward_args(inp)
    out = torch.empty(inp["x"].shape[0], inp["dy"].shape[1], device=DEVICE)
    with pytest.raises(error, match=what.replace("[", r"\[").replace("]", r"\]")):
        EXT.native.lora_forward(*args, bad(inp["bias"].to(DEVICE)), out)


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the CPU binding checks plan values on the host")
def test_cpu_forward_rejects_a_plan_that_would_leave_rows_unwritten():
    inp = _inputs(torch.float32, with_bias=False)
    _, plan = _native_forward_args(inp)
    rows = plan.sorted_rows.clone()
    rows[1] = rows[0]  # row rows[1] would be written by no item
    bad = dataclasses.replace(plan, sorted_rows=rows)
    params = ClientParams(inp["scaling"], inp["ranks"], inp["trainable"])
    with pytest.raises(ValueError, match="sorted_rows to be a permutation"):
        EXT.lora_forward(inp["x"], inp["lora_a"], inp["lora_b"], None, bad, params)
