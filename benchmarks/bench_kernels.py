"""Microbenchmark of the multi-client LoRA linear: our kernels next to what a user would write instead.

For every case (N clients, T rows, d = d_in = d_out, max rank r, a variant, a dtype) it times the
forward, the backward and the forward+backward of one frozen linear layer with N LoRA adapters:

* ``triton``         ``multi_lora_linear(backend="triton")`` with ``grad_sqnorm`` (fused norms);
* ``triton_nonorm``  the same without ``grad_sqnorm``, to show what the fused norms cost;
* ``torch``          ``multi_lora_linear(backend="torch")``: the per-client loop (what PEFT/mLoRA do);
* ``bmm``            a padded gather + ``torch.bmm`` over stacked adapters, autograd for backward;
* ``csrc``           ``multi_lora_linear(backend="cuda"|"cpu")``: the compiled extension, when built;
* ``base``           the frozen ``F.linear`` alone: forward, and a dgrad-only backward (x needs a
                     gradient, the weight is frozen). Every ratio to "base" uses this.

Times are medians in milliseconds of the *whole* layer (base GEMM included). The "LoRA path" time
of an implementation is its time minus the base linear's time for the same phase and inputs.
Each case also records the byte model of the LoRA path (``byte_model.py``) and the GB/s each
implementation achieves against it, the base GEMM / ``addmm_`` rates at the case's shape, and on
CUDA the device time of every kernel of one Triton forward+backward (``torch.profiler``) with its
GB/s against the model and against a device-to-device copy measured in the same run, plus the
host vs device time of a call. ``--routing`` picks scattered, contiguous or Zipf-skewed routing.

Usage (from the repository root, with the package importable, e.g. ``PYTHONPATH=.``)::

    python benchmarks/bench_kernels.py --smoke           # tiny, CPU, seconds (Triton interpreted)
    python benchmarks/bench_kernels.py --quick           # GPU headline case: N=32 T=8k d=4096 r=16 bf16
    python benchmarks/bench_kernels.py --d 1024 --budget-s 540   # part of the full GPU sweep

Writes a JSON file (default ``benchmarks/results/kernels-<device>-<date>.json``; ``--smoke``: a new
temporary folder), rewritten after every case so an interrupted run keeps what it measured, and
prints a table. Exits with status 1 when an implementation disagrees with the torch loop (the
correctness guard run before timing each case).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

import kernel_profile
import report
from _common import finish_run, results_path, run_metadata, write_json
from _common import finite as _finite
from _common import int_list as _int_list
from _common import name_list as _name_list
from byte_model import lora_bytes, r_pad
from timing import Timer, TimingConfig
from fedhello.kernels import LoRAPlan, lora_delta, multi_lora_linear, resolve_backend

IMPL_NAMES = ("triton", "triton_nonorm", "torch", "bmm", "csrc", "delta", "base")
LORA_IMPLS = ("triton", "triton_nonorm", "torch", "bmm", "csrc", "delta")
PHASES = ("fwd", "bwd", "fwd_bwd")
VARIANTS = ("uniform", "mixed", "frozen")
ROUTINGS = ("scattered", "contiguous", "zipf1", "zipf2")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

FULL_SIZES = {"n": (1, 8, 32, 128), "t": (1024, 8192, 32768), "d": (1024, 4096), "r": (8, 16, 64)}
HEADLINE = {"n": 32, "t": 8192, "d": 4096, "r": 16, "variant": "uniform", "dtype": "bf16"}
# Goals of the headline case: direction and threshold of each ratio.
GOALS = {
    "lora_fwd_bwd_speedup_vs_torch_loop": (">=", 3.0),
    "lora_overhead_vs_base_fwd_bwd": ("<=", 0.25),
    "fused_norm_cost_frac_of_bwd": ("<=", 0.05),
}
SCALING = 0.5
GUARD_TOL = 2e-2


# --------------------------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class KernelCase:
    """One benchmark configuration.

    Attributes:
        n: number of clients (adapter slots) N.
        t: rows T of the batch (all routed to some client).
        d: feature size; ``d_in = d_out = d``.
        r: maximum rank r_max of the stacked adapters.
        variant: ``"uniform"`` (every client rank r, all trainable), ``"mixed"`` (ranks cycling
            through r/8, r/4, r/2, r, all trainable) or ``"frozen"`` (rank r, odd clients frozen).
        dtype: ``"bf16"``, ``"fp16"`` or ``"fp32"``.
        routing: how rows are routed to clients (``ROUTINGS``): ``"scattered"`` (uniform
            popularity, rows in random order), ``"contiguous"`` (uniform popularity, each client's
            rows one block, as the batched engine makes them), ``"zipf1"`` / ``"zipf2"`` (client c
            drawn with weight (c+1)^-s, s = 1 or 2, rows scattered).
    """

    n: int
    t: int
    d: int
    r: int
    variant: str = "uniform"
    dtype: str = "bf16"
    routing: str = "scattered"

    def __post_init__(self) -> None:
        for name in ("n", "t", "d", "r"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        if self.variant not in VARIANTS:
            raise ValueError(f"variant: expected one of {VARIANTS}, got {self.variant!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype: expected one of {tuple(DTYPES)}, got {self.dtype!r}")
        if self.routing not in ROUTINGS:
            raise ValueError(f"routing: expected one of {ROUTINGS}, got {self.routing!r}")

    @property
    def name(self) -> str:
        routing = "" if self.routing == "scattered" else f"-{self.routing}"
        return f"n{self.n}-t{self.t}-d{self.d}-r{self.r}-{self.variant}-{self.dtype}{routing}"

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def ranks(self) -> list[int] | None:
        """Per-client ranks, or ``None`` when every client uses r (the API's default)."""
        if self.variant != "mixed":
            return None
        cycle = [max(1, self.r >> shift) for shift in (3, 2, 1, 0)]
        return [cycle[c % len(cycle)] for c in range(self.n)]

    def trainable(self) -> list[bool] | None:
        """Per-client trainable flags, or ``None`` when every client trains."""
        if self.variant != "frozen":
            return None
        return [c % 2 == 0 for c in range(self.n)]

    def redundant_note(self) -> str | None:
        """Why this case would only repeat another one, if it does."""
        if self.n == 1 and self.variant != "uniform":
            return f"variant {self.variant!r} with one client repeats the uniform case"
        return None


def make_client_ids(n: int, t: int, routing: str, generator: torch.Generator) -> torch.Tensor:
    """Routing of ``routing`` (see ``KernelCase``): int64 ``[T]`` with values in ``[0, n)``.

    ``scattered``: every client equally popular, rows in random order; ``contiguous``: the same
    counts in blocks of consecutive rows, client 0 first; ``zipfS``: client c drawn with
    probability proportional to ``(c + 1) ** -S`` (client 0 the most popular), rows in random order.
    """
    if routing not in ROUTINGS:
        raise ValueError(f"routing: expected one of {ROUTINGS}, got {routing!r}")
    if routing.startswith("zipf"):
        weights = torch.arange(1, n + 1, dtype=torch.float64).pow(-float(routing[4:]))
        return torch.multinomial(weights, t, replacement=True, generator=generator)
    ids = torch.randint(0, n, (t,), generator=generator)
    return torch.sort(ids).values if routing == "contiguous" else ids


@dataclass
class PaddedRouting:
    """Index tensors of the padded gather + bmm baseline (built once per step, like the plan).

    Attributes:
        max_rows: L, the largest number of rows of one client (>= 1).
        gather_rows: int64 ``[N * L]``: row of x for each padded slot (padding reads row 0).
        valid_pos: int64 ``[R]``: padded slots that hold a real row (R routed rows).
        valid_rows: int64 ``[R]``: the row of x each of those slots holds.
        rank_mask: ``[N, r_max]`` in the input dtype, 1 up to each client's rank; ``None`` when
            every client uses r_max.
        train_mask: bool ``[N]``; ``None`` when every client trains.
    """

    max_rows: int
    gather_rows: torch.Tensor
    valid_pos: torch.Tensor
    valid_rows: torch.Tensor
    rank_mask: torch.Tensor | None
    train_mask: torch.Tensor | None

    @staticmethod
    def build(plan: LoRAPlan, ranks: torch.Tensor | None, trainable: torch.Tensor | None,
              r_max: int, dtype: torch.dtype) -> "PaddedRouting":
        n, device = plan.num_clients, plan.device
        max_rows = max(1, int(plan.counts.max()))
        first = int(plan.offsets[0])
        pos = torch.arange(first, plan.num_rows, device=device)
        rows = plan.sorted_rows[first:].long()
        client = plan.client_ids[rows]
        slot = client * max_rows + (pos - plan.offsets[client].long())
        gather = torch.zeros(n * max_rows, dtype=torch.int64, device=device)
        gather[slot] = rows
        rank_mask = None
        if ranks is not None:
            rank_mask = (torch.arange(r_max, device=device)[None, :] < ranks[:, None]).to(dtype)
        return PaddedRouting(max_rows, gather, slot, rows, rank_mask, trainable)


def padded_bmm_lora(x2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    lora_a: torch.Tensor, lora_b: torch.Tensor, routing: PaddedRouting,
                    scaling: float) -> torch.Tensor:
    """The multi-LoRA linear as plain torch code: gather each client's rows into a padded
    ``[N, L, d_in]`` block (L = the largest client's row count), two ``bmm`` with the stacked
    adapters, scatter back; autograd does the backward. Mixed ranks cost full r_max work
    (masked), frozen clients full gradient work (masked by ``detach``); the rank intermediate
    is kept in the input dtype, as user code does.

    Shapes: ``x2d [T, d_in]``, ``weight [d_out, d_in]``, ``lora_a [N, r_max, d_in]``,
    ``lora_b [N, d_out, r_max]``; returns ``[T, d_out]``.
    """
    n, _, d_in = lora_a.shape
    a, b = lora_a, lora_b
    if routing.train_mask is not None:
        keep = routing.train_mask[:, None, None]
        a = torch.where(keep, a, a.detach())
        b = torch.where(keep, b, b.detach())
    if routing.rank_mask is not None:
        a = a * routing.rank_mask[:, :, None]
        b = b * routing.rank_mask[:, None, :]
    base = F.linear(x2d, weight, bias)
    xg = x2d.index_select(0, routing.gather_rows).view(n, routing.max_rows, d_in)
    h = torch.bmm(xg, a.transpose(1, 2)) * scaling
    delta = torch.bmm(h, b.transpose(1, 2)).view(n * routing.max_rows, -1)
    return base.index_add(0, routing.valid_rows, delta.index_select(0, routing.valid_pos))


@dataclass
class InputSet:
    """One full set of layer inputs; a case rotates over several so timings are not cache-hot.

    ``x [T, d]`` (requires grad), ``weight [d, d]``, ``bias [d]``, ``lora_a [N, r, d]`` and
    ``lora_b [N, d, r]`` (require grad), ``dy [T, d]`` the incoming gradient, all in the case's
    dtype; ``sqnorm`` float32 ``[N]`` receives the fused squared norms.
    """

    x: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor
    lora_a: torch.Tensor
    lora_b: torch.Tensor
    dy: torch.Tensor
    plan: LoRAPlan
    routing: PaddedRouting
    ranks: torch.Tensor | None
    trainable: torch.Tensor | None
    sqnorm: torch.Tensor
    scaling: float = SCALING


def build_input_set(case: KernelCase, client_ids: torch.Tensor, device: torch.device,
                    seed: int) -> InputSet:
    """Random inputs of ``case`` for the routing ``client_ids`` (int64 ``[T]``) on ``device``.

    Scales keep every term O(1): x ~ N(0, 1), W ~ N(0, 1/d), A ~ N(0, 1/d), B ~ N(0, 1/r), so the
    LoRA term is a visible share of y and a wrong kernel moves the output well past the guard.
    """
    dtype, d, n, r = case.torch_dtype, case.d, case.n, case.r
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape: int, std: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, device=device, generator=gen) * std).to(dtype)

    ranks = case.ranks()
    trainable = case.trainable()
    ranks_t = None if ranks is None else torch.tensor(ranks, dtype=torch.int32, device=device)
    train_t = None if trainable is None else torch.tensor(trainable, device=device)
    plan = LoRAPlan.build(client_ids.to(device), n)
    plan.host_offsets()  # built once per step in real use: keep its one sync out of the timings
    return InputSet(
        x=randn(case.t, d).requires_grad_(),
        weight=randn(d, d, std=d ** -0.5),
        bias=randn(d, std=0.1),
        lora_a=randn(n, r, d, std=d ** -0.5).requires_grad_(),
        lora_b=randn(n, d, r, std=r ** -0.5).requires_grad_(),
        dy=randn(case.t, d),
        plan=plan,
        routing=PaddedRouting.build(plan, ranks_t, train_t, r, dtype),
        ranks=ranks_t,
        trainable=train_t,
        sqnorm=torch.zeros(n, dtype=torch.float32, device=device),
    )


# ------------------------------------------------------------------------------------ implementations


@dataclass(frozen=True)
class Impl:
    """A way to compute the layer: ``forward(inputs) -> y [T, d_out]``, differentiable.

    Attributes:
        trains_adapters: the backward differentiates ``x``, ``lora_a`` and ``lora_b`` (else only x).
        computes_sqnorm: the backward also fills ``inputs.sqnorm`` with the per-client norms.
    """

    name: str
    description: str
    forward: Callable[[InputSet], torch.Tensor]
    trains_adapters: bool
    computes_sqnorm: bool

    def grad_inputs(self, s: InputSet) -> list[torch.Tensor]:
        return [s.x, s.lora_a, s.lora_b] if self.trains_adapters else [s.x]


def _api_forward(backend: str, fused_norms: bool) -> Callable[[InputSet], torch.Tensor]:
    def forward(s: InputSet) -> torch.Tensor:
        return multi_lora_linear(s.x, s.weight, s.bias, s.lora_a, s.lora_b, s.plan, s.scaling,
                                 ranks=s.ranks, trainable=s.trainable,
                                 grad_sqnorm=s.sqnorm if fused_norms else None, backend=backend)
    return forward


def _delta_forward(s: InputSet) -> torch.Tensor:
    """The frozen layer as a caller's own module (``F.linear``), ``lora_delta`` added into its output."""
    return lora_delta(s.x, s.lora_a, s.lora_b, s.plan, s.scaling, ranks=s.ranks, trainable=s.trainable,
                      grad_sqnorm=s.sqnorm, out=F.linear(s.x, s.weight, s.bias))


def _bmm_forward(s: InputSet) -> torch.Tensor:
    return padded_bmm_lora(s.x, s.weight, s.bias, s.lora_a, s.lora_b, s.routing, s.scaling)


def _base_forward(s: InputSet) -> torch.Tensor:
    return F.linear(s.x, s.weight, s.bias)


def make_impls(names: Sequence[str], device: torch.device,
               dtype: torch.dtype) -> tuple[list[Impl], dict[str, str]]:
    """The requested implementations that can run on ``device`` in ``dtype``.

    Returns the runnable ``Impl`` list (in ``IMPL_NAMES`` order) and, for every requested one
    that cannot run, a note saying why.
    """
    unknown = [n for n in names if n not in IMPL_NAMES]
    if unknown:
        raise ValueError(f"impls: expected names from {IMPL_NAMES}, got {unknown}")
    impls: list[Impl] = []
    notes: dict[str, str] = {}
    backends = {"triton": "triton", "triton_nonorm": "triton", "torch": "torch", "csrc": device.type}
    for name in IMPL_NAMES:
        if name not in names:
            continue
        if name in backends:
            try:
                module = resolve_backend(backends[name], device)
            except ValueError as err:
                notes[name] = str(err)
                continue
            if dtype not in module.DTYPES:
                notes[name] = f"backend {backends[name]!r} does not support {dtype}"
                continue
            fused = name != "triton_nonorm"
            what = {"triton": "Triton kernels, fused squared norms",
                    "triton_nonorm": "Triton kernels, grad_sqnorm=None",
                    "torch": "per-client torch loop (PEFT/mLoRA style), with norms",
                    "csrc": f"csrc extension ({device.type}), with norms"}[name]
            impls.append(Impl(name, what, _api_forward(backends[name], fused), True, fused))
        elif name == "delta":
            which = resolve_backend("auto", device, dtype).NAME
            impls.append(Impl(name, f"F.linear, then lora_delta(out=y) ({which} backend), with norms",
                              _delta_forward, True, True))
        elif name == "bmm":
            impls.append(Impl(name, "padded gather + torch.bmm, autograd backward, no norms",
                              _bmm_forward, True, False))
        else:
            impls.append(Impl(name, "frozen F.linear alone; backward = dgrad only", _base_forward,
                              False, False))
    return impls, notes


# ---------------------------------------------------------------------------------------- timing


def phase_callables(impl: Impl, phase: str) -> tuple[Callable, Callable]:
    """``(prepare, timed)`` for one phase: ``fwd`` times the forward (autograd recording, as in
    training); ``bwd`` runs the forward untimed and times ``autograd.grad``; ``fwd_bwd`` times both.
    Gradients are returned by ``autograd.grad``, never accumulated into ``.grad``; ``timed``
    returns what it computed so the caller can free it after stopping the clock."""

    def grad(y: torch.Tensor, s: InputSet) -> tuple[torch.Tensor, ...]:
        return torch.autograd.grad(y, impl.grad_inputs(s), s.dy)

    if phase == "fwd":
        return (lambda s: s), (lambda s: impl.forward(s))
    if phase == "bwd":
        return (lambda s: (impl.forward(s), s)), (lambda state: grad(*state))
    if phase == "fwd_bwd":
        return (lambda s: s), (lambda s: grad(impl.forward(s), s))
    raise ValueError(f"phase: expected one of {PHASES}, got {phase!r}")


# ------------------------------------------------------------------------------- correctness guard


def _rel_err(value: torch.Tensor, ref: torch.Tensor) -> float:
    ref32 = ref.float()
    denom = ref32.norm().item()
    diff = (value.float() - ref32).norm().item()
    if denom == 0.0:
        return 0.0 if diff == 0.0 else math.inf
    return diff / denom


def _outputs(impl: Impl, s: InputSet) -> dict[str, torch.Tensor]:
    s.sqnorm.zero_()
    y = impl.forward(s)
    dx, d_a, d_b = torch.autograd.grad(y, [s.x, s.lora_a, s.lora_b], s.dy, allow_unused=True)
    out = {"y": y.detach(), "dx": dx}
    if d_a is not None:
        out["dA"], out["dB"] = d_a, d_b
    if impl.computes_sqnorm:
        out["sqnorm"] = s.sqnorm.clone()
    return out


def check_agreement(impls: Sequence[Impl], s: InputSet, tol: float = GUARD_TOL) -> dict[str, dict]:
    """Relative Frobenius error of each LoRA implementation's ``y``, ``dx``, ``dA``, ``dB`` (and
    squared norms) against the torch per-client loop on the same inputs; ``ok`` when all < tol.
    A NaN anywhere fails."""
    checked = [i for i in impls if i.name in LORA_IMPLS and i.name != "torch"]
    if not checked:
        return {}
    reference = Impl("torch", "", _api_forward("torch", True), True, True)
    ref = _outputs(reference, s)
    report = {}
    for impl in checked:
        got = _outputs(impl, s)
        errs = {key: _rel_err(got[key], ref[key]) for key in got if key in ref}
        ok = all(e < tol for e in errs.values())  # NaN compares False: fails
        report[impl.name] = {"rel_err": errs, "ok": ok}
        del got
    s.sqnorm.zero_()
    return report


# ------------------------------------------------------------------------------------ memory budget


def estimate_bytes(case: KernelCase, max_rows: int) -> dict[str, int]:
    """Rough device bytes: ``set`` for one input set, and per implementation the transient peak
    of one forward+backward on top of the sets (outputs, gradients, intermediates), plus
    ``guard`` for the correctness check (two implementations' outputs alive at once)."""
    e = torch.tensor([], dtype=case.torch_dtype).element_size()
    t, d, n, r = case.t, case.d, case.n, case.r
    r_pad = max(16, 1 << (r - 1).bit_length())
    act = t * d * e                      # one [T, d] activation
    adapters = 2 * n * r * d * e
    routing = t * 40 + n * max_rows * 8  # plan, tile lists, padded index
    padded = n * max_rows * d * e        # one [N, L, d] padded block
    outputs = 2 * act + adapters         # y, dx, dA + dB
    transient = {
        "base": 2 * act,
        "triton": outputs + 2 * t * r_pad * 4,
        "torch": outputs + 6 * max_rows * d * 4,
        "bmm": outputs + 4 * padded + 2 * act + 2 * n * max_rows * r * e,
        "csrc": outputs + 2 * t * r_pad * 4 + 6 * max_rows * d * 4,
    }
    transient["triton_nonorm"] = transient["triton"]
    transient["delta"] = transient["csrc"] + act  # any backend, plus the delta buffer
    return {
        "set": 2 * act + d * d * e + d * e + adapters + routing,
        "guard": 2 * outputs + 3 * t * d * 4,
        **transient,
    }


def available_bytes(device: torch.device) -> int:
    """Memory the benchmark may use: 90% of free CUDA memory, or half of available host RAM."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        return int(torch.cuda.mem_get_info(device)[0] * 0.9)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 // 2
    except OSError:
        pass
    return 8 << 30


# ------------------------------------------------------------------------------------------- ratios


def _ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or num <= 0 or den <= 0:
        return None
    return num / den


def derive(impl_results: dict[str, dict]) -> dict:
    """LoRA-path times (full minus base) per implementation, and the ratios of the JSON.

    ``impl_results[name][phase]["median_ms"]`` are full-layer medians. Ratios that need a
    missing implementation, or a LoRA-path time <= 0 (below timing noise), are ``None``.
    """

    def full(name: str, phase: str) -> float | None:
        res = impl_results.get(name, {})
        return res[phase]["median_ms"] if res.get("status") == "ok" else None

    lora: dict[str, dict[str, float]] = {}
    for name in LORA_IMPLS:
        if full(name, "fwd") is None or full("base", "fwd") is None:
            continue
        lora[name] = {p: full(name, p) - full("base", p) for p in PHASES}
        impl_results[name]["lora_ms"] = lora[name]

    def lora_ms(name: str, phase: str) -> float | None:
        return lora.get(name, {}).get(phase)

    others = [name for name in LORA_IMPLS if name in lora and name != "torch"]
    ratios: dict = {
        "lora_speedup_vs_torch_loop": {
            name: {p: _ratio(lora_ms("torch", p), lora_ms(name, p)) for p in PHASES} for name in others},
        "full_speedup_vs_torch_loop": {
            name: {p: _ratio(full("torch", p), full(name, p)) for p in PHASES} for name in others},
        "lora_speedup_vs_bmm": {
            name: {p: _ratio(lora_ms("bmm", p), lora_ms(name, p)) for p in PHASES}
            for name in others if name != "bmm"},
        "lora_overhead_vs_base": {
            name: {p: _ratio(lora_ms(name, p), full("base", p)) for p in PHASES} for name in lora},
    }
    with_norm, without = full("triton", "bwd"), full("triton_nonorm", "bwd")
    ratios["fused_norm_cost_frac_of_bwd"] = (
        None if with_norm is None or without is None else (with_norm - without) / without)
    lora_without = lora_ms("triton_nonorm", "bwd")
    ratios["fused_norm_cost_frac_of_lora_bwd"] = (
        None if with_norm is None or not lora_without or lora_without <= 0
        else (with_norm - without) / lora_without)
    return ratios


def headline_ratios(case_result: dict) -> dict[str, float | None]:
    """The three goal ratios of the headline case (``GOALS``) from a case's derived ratios."""
    ratios = case_result.get("ratios", {})
    return {
        "lora_fwd_bwd_speedup_vs_torch_loop":
            ratios.get("lora_speedup_vs_torch_loop", {}).get("triton", {}).get("fwd_bwd"),
        "lora_overhead_vs_base_fwd_bwd":
            ratios.get("lora_overhead_vs_base", {}).get("triton", {}).get("fwd_bwd"),
        "fused_norm_cost_frac_of_bwd": ratios.get("fused_norm_cost_frac_of_bwd"),
    }


def case_bytes(case: KernelCase, client_rows: Sequence[int]) -> dict[str, dict]:
    """The byte model of ``case`` (``byte_model.lora_bytes``) per phase and kernel, of
    ``multi_lora_linear`` and of ``lora_delta(out=y)`` (for the ``delta`` implementation);
    ``client_rows`` (rows per client of the routing) sizes the partials, and the block sizes are
    the Triton backend's own (``fedhello.kernels.tuning``) where it has a table."""
    e = torch.tensor([], dtype=case.torch_dtype).element_size()
    blocks: dict[str, int] = {}
    try:
        from fedhello.kernels import tuning
    except ImportError:  # a backend without a tuning table: the model's defaults
        pass
    else:
        interp = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
        cfg = tuning.lookup(case.torch_dtype, r_pad(case.r), interp)
        blocks = {"block_n": cfg.dy_block_n, "chunk_rows": cfg.chunk}
    return {op: lora_bytes(case.t, case.n, case.d, case.d, case.r, e, op=op, client_rows=client_rows, **blocks)
            for op in ("multi_lora_linear", "lora_delta_out")}


def effective_gbps(impl_results: dict[str, dict], model: dict, copy_bytes_per_s: float | None) -> dict:
    """Per LoRA implementation and phase: the model's bytes over the LoRA-path time, in GB/s
    (``gbps``), and as a fraction of the copy bandwidth measured in the same run (``frac_of_copy``).
    ``None`` where the LoRA-path time is not positive."""
    out: dict = {}
    for name, entry in impl_results.items():
        lora = entry.get("lora_ms")
        if not lora:
            continue
        out[name] = {}
        for phase in PHASES:
            ms = lora[phase]
            gbps = model["phases"][phase] / (ms * 1e-3) / 1e9 if ms > 0 else None
            frac = gbps * 1e9 / copy_bytes_per_s if gbps is not None and copy_bytes_per_s else None
            out[name][phase] = {"gbps": gbps, "frac_of_copy": frac}
    return out


def measure_extras(impls: Sequence[Impl], s: InputSet, case: KernelCase, models: dict[str, dict],
                   opts: "RunOptions") -> dict:
    """The base GEMM / ``addmm_`` ceilings at the case's shape and, on CUDA, for the Triton
    implementations: the per-kernel profile of one forward+backward (achieved GB/s per kernel
    against the byte model and the run's copy bandwidth) and host vs device time per call."""
    device = opts.device
    out: dict = {"ceilings": kernel_profile.gemm_ceilings(case.t, case.d, case.d, case.torch_dtype, device,
                                                          reps=5 if device.type == "cpu" else 20)}
    if device.type != "cuda":
        return out
    lora_names = kernel_profile.triton_kernel_names()
    for impl in impls:
        if impl.name not in ("triton", "triton_nonorm"):
            continue
        prepare, timed = phase_callables(impl, "fwd_bwd")
        call = lambda: timed(prepare(s))  # noqa: E731
        prof = kernel_profile.profile_kernels(call, device)
        if "kernels" in prof:
            prof.update(kernel_profile.assign_model_bytes(prof["kernels"], lora_names, models["multi_lora_linear"],
                                                          opts.copy_bytes_per_s))
        out.setdefault("profile", {})[impl.name] = prof
        if impl.name == "triton":
            out["host_vs_device"] = kernel_profile.host_vs_device(call, device)
    return out


# ------------------------------------------------------------------------------------------- runner


@dataclass
class RunOptions:
    """Settings shared by every case of a run."""

    device: torch.device
    impls: tuple[str, ...]
    timing: TimingConfig
    rotate: int
    seed: int = 0
    guard_tol: float = GUARD_TOL
    copy_bytes_per_s: float | None = None  # measured once per run (kernel_profile.copy_bandwidth)
    profile: bool = True  # per-case base-GEMM ceilings, and on CUDA kernel profiles / launch overhead


def _case_seed(case: KernelCase, seed: int) -> int:
    return (seed * 1_000_003 + sum(ord(ch) * 31 ** i for i, ch in enumerate(case.name))) % (2 ** 31)


def _time_impls(impls: Sequence[Impl], sets: Sequence[InputSet], guard: dict, opts: RunOptions) -> dict:
    """Medians of every phase for each implementation that passed the guard."""
    timer = Timer(opts.device, opts.timing)
    results: dict[str, dict] = {}
    for impl in impls:
        if impl.name in guard and not guard[impl.name]["ok"]:
            results[impl.name] = {
                "status": "mismatch", "note": f"disagrees with the torch loop (tol {opts.guard_tol})"}
            continue
        entry: dict = {"status": "ok", "description": impl.description,
                       "computes_sqnorm": impl.computes_sqnorm}
        try:
            for phase in PHASES:
                entry[phase] = asdict(timer.measure(*phase_callables(impl, phase), sets))
        except torch.cuda.OutOfMemoryError:
            entry = {"status": "skipped", "note": "out of memory while timing"}
        results[impl.name] = entry
    return results


def run_case(case: KernelCase, opts: RunOptions) -> dict:
    """Guard, then time every implementation and phase of one case; returns its JSON record."""
    record: dict = {"name": case.name, **asdict(case), "d_in": case.d, "d_out": case.d,
                    "rank_values": case.ranks() or [case.r] * case.n,
                    "frozen_clients": (case.trainable() or [True] * case.n).count(False),
                    "impls": {}}
    note = case.redundant_note()
    if note:
        return {**record, "status": "skipped", "note": note}
    device = opts.device
    seed = _case_seed(case, opts.seed)
    impls, skipped = make_impls(opts.impls, device, case.torch_dtype)
    for name, why in skipped.items():
        record["impls"][name] = {"status": "skipped", "note": why}

    # Routings first (cheap, on the host): the padded baseline's size depends on the largest client.
    cpu_gen = torch.Generator().manual_seed(seed)
    routings = [make_client_ids(case.n, case.t, case.routing, cpu_gen) for _ in range(opts.rotate)]
    max_rows = max(int(torch.bincount(ids, minlength=case.n).max()) for ids in routings)
    need = estimate_bytes(case, max_rows)
    budget = available_bytes(device)
    fits = [i for i in impls if need["set"] + need[i.name] <= budget]
    for impl in impls:
        if impl not in fits:
            record["impls"][impl.name] = {
                "status": "skipped",
                "note": f"estimated {(need['set'] + need[impl.name]) / 2**30:.1f} GiB > "
                        f"{budget / 2**30:.1f} GiB available"}
    if not fits:
        return {**record, "status": "skipped", "note": "no implementation fits in memory"}
    peak = max(need[i.name] for i in fits) + need["guard"]
    rotate = max(1, min(opts.rotate, (budget - peak) // need["set"]))
    record.update(rotate_sets=rotate, max_client_rows=max_rows,
                  est_bytes={"per_set": need["set"], "peak_transient": peak})
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        sets = [build_input_set(case, routings[i], device, seed + i) for i in range(rotate)]
        record["guard"] = check_agreement(fits, sets[0], opts.guard_tol)
        record["impls"].update(_time_impls(fits, sets, record["guard"], opts))
        record["bytes_model"] = case_bytes(case, torch.bincount(routings[0], minlength=case.n).tolist())
        if opts.profile:
            try:
                record.update(measure_extras(fits, sets[0], case, record["bytes_model"], opts))
            except Exception as err:  # noqa: BLE001 - the profiler (CUPTI) may fail where timing works
                record["extras_error"] = f"{type(err).__name__}: {str(err)[:300]}"
    except torch.cuda.OutOfMemoryError:
        return {**record, "status": "skipped", "note": "out of memory building inputs or checking"}
    finally:
        sets = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if device.type == "cuda":
        record["peak_mem_bytes"] = torch.cuda.max_memory_allocated(device)
    record["ratios"] = derive(record["impls"])
    fused = {name: entry for name, entry in record["impls"].items() if name != "delta"}
    record["ratios"]["effective_gbps_model"] = {
        **effective_gbps(fused, record["bytes_model"]["multi_lora_linear"], opts.copy_bytes_per_s),
        **effective_gbps({"delta": record["impls"].get("delta", {})}, record["bytes_model"]["lora_delta_out"],
                         opts.copy_bytes_per_s)}
    record["status"] = "ok"
    return record


# --------------------------------------------------------------------------------------- metadata


def metadata(device: torch.device, argv: Sequence[str], opts: RunOptions) -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    meta = {
        **run_metadata(device, argv),
        "triton": triton_version,
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"),
        "timing": {
            "method": "cuda events per call" if device.type == "cuda" else "time.perf_counter per call",
            **asdict(opts.timing),
            "rotate_sets": opts.rotate,
            "statistic": "median (q20/q80 alongside)",
        },
        "scaling": SCALING,
        "guard_tol": opts.guard_tol,
        "definitions": {
            "median_ms": "median time of the whole layer (base GEMM + LoRA) for the phase",
            "fwd": "forward with autograd recording",
            "bwd": "backward only (autograd.grad of x, lora_a, lora_b; base: x only), forward untimed",
            "fwd_bwd": "forward + backward",
            "lora_ms": "median_ms - base median_ms of the same phase: the LoRA path time",
            "lora_speedup_vs_torch_loop": "lora_ms(torch) / lora_ms(impl)",
            "full_speedup_vs_torch_loop": "median_ms(torch) / median_ms(impl)",
            "lora_speedup_vs_bmm": "lora_ms(bmm) / lora_ms(impl)",
            "lora_overhead_vs_base": "lora_ms(impl) / median_ms(base)",
            "fused_norm_cost_frac_of_bwd":
                "(bwd(triton) - bwd(triton_nonorm)) / bwd(triton_nonorm), whole-layer backward",
            "fused_norm_cost_frac_of_lora_bwd":
                "(bwd(triton) - bwd(triton_nonorm)) / lora_ms(triton_nonorm).bwd",
        },
        "goals": {k: {"op": op, "value": v} for k, (op, v) in GOALS.items()},
    }
    return meta


# ---------------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Time the multi-client LoRA linear (fwd, bwd, fwd+bwd) across implementations.")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--smoke", action="store_true",
                      help="tiny sizes that run on CPU in seconds (Triton through its interpreter)")
    mode.add_argument("--quick", action="store_true",
                      help="only the headline GPU case: N=32 T=8k d=4096 r=16 bf16, uniform")
    p.add_argument("--n", type=_int_list, help="clients, e.g. 8,32 (default 1,8,32,128)")
    p.add_argument("--t", type=_int_list, help="rows, e.g. 1k,8k (default 1k,8k,32k; 1k = 1024)")
    p.add_argument("--d", type=_int_list, help="d_in = d_out (default 1024,4096)")
    p.add_argument("--r", type=_int_list, help="max rank (default 8,16,64)")
    p.add_argument("--variants", type=_name_list(VARIANTS),
                   help="uniform, mixed (ranks r/8..r), frozen (half the clients); default all")
    p.add_argument("--routing", type=_name_list(ROUTINGS), default=["scattered"],
                   help="scattered (default), contiguous (each client one block of rows), zipf1, "
                        "zipf2 (client c drawn with weight (c+1)^-s); comma-separated")
    p.add_argument("--dtype", choices=tuple(DTYPES), help="default bf16 on CUDA, fp32 on CPU")
    p.add_argument("--impls", type=_name_list(IMPL_NAMES), default=list(IMPL_NAMES),
                   help=f"subset of {','.join(IMPL_NAMES)} (default all)")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument("--out", type=Path,
                   help="JSON path (default benchmarks/results/kernels-<device>-<date>.json;"
                        " --smoke: a new temporary folder)")
    p.add_argument("--rotate", type=int, help="input sets rotated between calls (default 4 CUDA, 2 CPU)")
    p.add_argument("--flush-l2", action="store_true", help="write 256 MiB before each timed call (CUDA)")
    p.add_argument("--warmup", type=int, help="untimed calls per measurement")
    p.add_argument("--min-reps", type=int, help="fewest timed calls per measurement")
    p.add_argument("--max-reps", type=int, help="most timed calls per measurement")
    p.add_argument("--target-ms", type=float, help="aim for this much timed work per measurement")
    p.add_argument("--budget-s", type=float,
                   help="start no new case after this many seconds (the rest is recorded as skipped)")
    p.add_argument("--threads", type=int,
                   help="CPU intra-op threads (default: torch's; --smoke uses 1, which stays steady "
                        "on a shared machine where idle OpenMP workers get descheduled)")
    p.add_argument("--no-profile", action="store_true",
                   help="skip the copy-bandwidth and base-GEMM ceilings and (CUDA) the kernel profiles")
    p.add_argument("--seed", type=int, default=0)
    return p


def cases_from_args(args: argparse.Namespace, dtype: str) -> list[KernelCase]:
    if args.smoke:
        sizes = {"n": [4], "t": [192], "d": [64], "r": [8]}
        variants = list(VARIANTS)
    elif args.quick:
        sizes = {k: [HEADLINE[k]] for k in ("n", "t", "d", "r")}
        variants = [HEADLINE["variant"]]
    else:
        sizes = {k: list(v) for k, v in FULL_SIZES.items()}
        variants = list(VARIANTS)
    for key in sizes:
        if getattr(args, key) is not None:
            sizes[key] = getattr(args, key)
    variants = args.variants or variants
    return [KernelCase(n, t, d, r, v, dtype, routing)
            for d in sizes["d"] for t in sizes["t"] for n in sizes["n"] for r in sizes["r"]
            for v in variants for routing in args.routing]


def _enable_interpreter_for_smoke(smoke: bool) -> None:
    """Without CUDA, ``--smoke`` runs the Triton kernels in the interpreter, which triton only
    honours when ``TRITON_INTERPRET`` is set before it is first imported."""
    if smoke and not torch.cuda.is_available() and "triton" not in sys.modules:
        os.environ.setdefault("TRITON_INTERPRET", "1")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    _enable_interpreter_for_smoke(args.smoke)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available")
    dtype = args.dtype or ("bf16" if device.type == "cuda" and not args.smoke else "fp32")
    cuda = device.type == "cuda"
    threads = args.threads or (1 if args.smoke else None)
    if threads is not None:
        if threads < 1:
            raise SystemExit(f"--threads: expected >= 1, got {threads}")
        torch.set_num_threads(threads)
    defaults = (TimingConfig(warmup=1, min_reps=3, max_reps=3) if args.smoke else
                TimingConfig(min_reps=50, max_reps=500, target_ms=1000.0) if args.quick else
                TimingConfig() if cuda else TimingConfig(warmup=2, min_reps=5, max_reps=30, target_ms=500.0))
    overrides = {key: getattr(args, key) for key in ("warmup", "min_reps", "max_reps", "target_ms")
                 if getattr(args, key) is not None}
    timing = replace(defaults, **overrides, flush_l2=args.flush_l2)
    timing = replace(timing, max_reps=max(timing.max_reps, timing.min_reps))
    if timing.min_reps < 1 or timing.warmup < 0 or timing.target_ms <= 0:
        raise SystemExit("--min-reps must be >= 1, --warmup >= 0 and --target-ms > 0")
    if args.rotate is not None and args.rotate < 1:
        raise SystemExit(f"--rotate: expected >= 1, got {args.rotate}")
    rotate = args.rotate or (4 if cuda else 2)
    # The copy bandwidth every per-kernel GB/s is compared with: measured once, in this run.
    copy = kernel_profile.copy_bandwidth(device) if not args.no_profile else None
    opts = RunOptions(device, tuple(args.impls), timing, rotate, args.seed,
                      copy_bytes_per_s=copy["bytes_per_s"] if copy else None, profile=not args.no_profile)
    cases = cases_from_args(args, dtype)

    meta = metadata(device, argv, opts)
    meta["copy_bandwidth"] = copy
    out = args.out or results_path("kernels", meta["device_slug"], args.smoke)
    grid = {key: sorted({getattr(c, key) for c in cases}) for key in ("n", "t", "d", "r", "variant")}
    doc = {"schema": 1, "meta": meta, "grid": {**grid, "dtype": dtype, "routing": list(args.routing)},
           "complete": False, "cases": []}
    print(f"{meta['device']} | torch {meta['torch']} | triton {meta['triton']} | "
          f"{len(cases)} case(s) | {dtype} | impls {','.join(args.impls)} | -> {out}", flush=True)
    start = time.monotonic()
    for i, case in enumerate(cases, 1):
        if args.budget_s is not None and time.monotonic() - start > args.budget_s:
            record = {"name": case.name, **asdict(case), "status": "skipped",
                      "note": f"time budget of {args.budget_s:g} s spent"}
        else:
            record = run_case(case, opts)
        doc["cases"].append(_finite(record))
        write_json(doc, out)
        guard_bad = [k for k, v in record.get("guard", {}).items() if not v["ok"]]
        print(f"[{i}/{len(cases)}] {case.name}: {record.get('status')}"
              + (f" ({record['note']})" if record.get("note") else "")
              + (f" GUARD FAILED: {','.join(guard_bad)}" if guard_bad else ""), flush=True)

    headline = next((r for r in doc["cases"] if r.get("status") == "ok"
                     and r["routing"] == "scattered" and all(r[k] == v for k, v in HEADLINE.items())), None)
    if headline is not None:
        doc["headline"] = {"case": headline["name"], **headline_ratios(headline)}
    return finish_run(doc, out, start, report.kernels_report)


if __name__ == "__main__":
    sys.exit(main())
