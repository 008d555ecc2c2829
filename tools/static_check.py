"""Static sm_90 gate: compile every Triton kernel the public API launches for Hopper, on a CPU.

No GPU is needed. The gate

1. **records** the launches: every ``@triton.jit`` kernel the Triton launchers (``fedhello.kernels.backends.triton``) call is
   swapped for a recorder whose ``kernel[grid](...)`` captures the arguments instead of launching,
   and ``multi_lora_linear(..., backend="triton")`` runs forward + backward on CPU tensors at the
   headline specialisation (N=32, T=8192, d_in=d_out=4096, r=16). Nothing the kernels would
   compute is needed, so the dense base GEMMs are skipped too (they would take minutes on a CPU);
2. **compiles** each distinct launch with Triton's own compiler for an explicit target,
   ``GPUTarget("cuda", 90, 32)``, deriving the signature and the divisibility-16 specialisation
   from the recorded arguments exactly as Triton's launcher does (``_pack_args`` of its
   ``JITFunction``: the same code path, so the same specialisation as a launch on a GPU);
3. **reads** the result: registers, spill bytes and stack frame from Triton's bundled ``ptxas -v``,
   shared memory from the kernel's metadata, the matrix instruction from the PTX (``wgmma`` or
   ``mma.sync`` and its shape) and from the SASS (``HGMMA``/``HMMA``), and the width of every
   global load in the PTX (``ld.global`` by type and vector length, ``cp.async`` sizes).

Patched for the duration of the recording only, and restored afterwards: the kernels of
``backends.triton`` (the recorders); ``multi_lora.resolve_backend`` (backend ``"triton"`` refuses CPU
tensors unless the interpreter is on, and under the interpreter the kernels are not
``JITFunction`` objects, so the gate must run *without* ``TRITON_INTERPRET`` and route
``"triton"`` to ``backends.triton`` by hand); ``backends.triton._programs_wanted`` / ``_sm_count`` (grids
sized for a GPU of ``HOPPER_SMS`` multiprocessors instead of the interpreter's one); and a
``TorchDispatchMode`` that answers large dense matrix products with uninitialised tensors of the
right shape. These are private names of the package: when one is gone (renamed, moved) the gate
stops with ``PatchTargetMissing`` naming it, rather than recording launches sized for another GPU.

Step 1 lives in ``tools/sm90_record.py``, steps 2 and 3 in ``tools/sm90_analyse.py``; this module
runs the scenarios and checks the results. A development tool, not part of the installed package. CLI, from the repository root (prints the
table; re-executes itself without ``TRITON_INTERPRET`` and with a fresh Triton cache directory, so
nothing is reused between runs)::

    python -m tools.static_check [--dtype bf16] [--json PATH]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from tools.sm90_analyse import HALF_DTYPES, CompiledLaunch, KernelReport, check_reports, compile_launch, report_compiled
from tools.sm90_analyse import launch_key, sm90_target
from tools.sm90_record import DTYPES, HEADLINE, HOPPER_SMS, Launch, record_public_api

__all__ = ["GateResult", "SCENARIOS", "Scenario", "format_table", "run_gate"]


@dataclass(frozen=True)
class Scenario:
    """One public-API call whose launches the gate records (always the headline sizes)."""

    name: str
    contiguous: bool = False
    grad_sqnorm: bool = True
    dropout: bool = False
    fp32_adapters: bool = False  # float32 master adapters under the half-precision activations


SCENARIOS = (
    Scenario("scattered"),
    Scenario("contiguous-nonorm", contiguous=True, grad_sqnorm=False),
    Scenario("dropout", dropout=True),
    Scenario("fp32-adapters", fp32_adapters=True),
)


def _record_scenario(dtype: str, scenario: Scenario) -> list[Launch]:
    """The scenario's launches (the dropout one with ``dropout_p=0.1`` and int64 ``[N]`` seeds)."""
    extra = None
    if scenario.dropout:
        extra = {"dropout_p": 0.1, "dropout_seeds": torch.arange(HEADLINE["n"], dtype=torch.int64) + 1}
    return record_public_api(dtype, grad_sqnorm=scenario.grad_sqnorm, contiguous=scenario.contiguous,
                             extra=extra, adapter_dtype=torch.float32 if scenario.fp32_adapters else None)


@dataclass
class GateResult:
    """``reports`` (one per compiled specialisation) and ``failures`` (empty when the gate passes)."""

    reports: list[KernelReport]
    failures: list[str]


def run_gate(dtypes: Sequence[str] = ("bf16", "fp16", "fp32"),
             scenarios: Sequence[Scenario] = SCENARIOS) -> GateResult:
    """Record, compile for sm_90 and check every kernel of every scenario and dtype.

    The first scenario runs for every dtype; the others (other routing, no norms, dropout:
    other constexpr paths) for the first half-precision dtype only, since the two half types
    share their code paths and CI time is short. fp32 kernels are reported, not gated.
    """
    from triton.compiler import make_backend

    target = sm90_target()
    backend = make_backend(target)
    reports: list[KernelReport] = []
    first_half = next((d for d in dtypes if d in HALF_DTYPES), None)
    for dtype in dtypes:
        launches: list[tuple[str, Launch]] = []
        for scenario in (scenarios if dtype == first_half else scenarios[:1]):
            launches += [(scenario.name, launch) for launch in _record_scenario(dtype, scenario)]
        distinct: dict[str, tuple[CompiledLaunch, list[str]]] = {}
        for scenario_name, launch in launches:
            key = launch_key(launch, backend)
            if key not in distinct:
                distinct[key] = (compile_launch(launch, target), [])
            use = f"{scenario_name}/{launch.phase}"
            if use not in distinct[key][1]:
                distinct[key][1].append(use)
        reports += [report_compiled(c, dtype, uses) for c, uses in distinct.values()]
    return GateResult(reports, check_reports(reports))


def format_table(reports: Sequence[KernelReport]) -> str:
    """The gate's table: one line per compiled specialisation."""
    head = (f"{'dtype':<5} {'kernel':<24} {'warps/stg':>9} {'regs':>5} {'spill':>7} {'smem KiB':>8}  "
            f"{'MMA':<44} {'global loads (PTX, static count)':<40} {'gate':<4}  used by")
    lines = [f"sm_90 static gate (Triton compile for GPUTarget('cuda', 90, 32)); headline "
             f"N={HEADLINE['n']} T={HEADLINE['t']} d_in={HEADLINE['d_in']} d_out={HEADLINE['d_out']} "
             f"r={HEADLINE['r']}", head, "-" * len(head)]
    for rep in reports:
        spill = f"{rep.spill_stores}/{rep.spill_loads}"
        gate = "FAIL" if rep.failures else "ok"
        lines.append(f"{rep.dtype:<5} {rep.kernel:<24} {f'{rep.num_warps}/{rep.num_stages}':>9} "
                     f"{rep.registers if rep.registers is not None else '?':>5} {spill:>7} "
                     f"{rep.shared_bytes / 1024:>8.1f}  {rep.mma:<44} {rep.loads:<40} {gate:<4}  "
                     f"{', '.join(rep.uses)}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ CLI


def _worker(args: argparse.Namespace) -> int:
    import triton

    result = run_gate(args.dtype)
    reports, failures = result.reports, result.failures
    print(format_table(reports))
    print(f"grids sized as on a GPU with {HOPPER_SMS} SMs (backends.triton._programs_wanted)")
    if failures:
        print("\nGATE FAILED:\n  " + "\n  ".join(failures))
    else:
        print("\ngate passed: every kernel compiled; half precision: no spills, no scalar 2-byte loads")
    if args.json is not None:
        doc = {"triton": triton.__version__, "target": {"backend": "cuda", "arch": 90, "warp_size": 32},
               "headline": HEADLINE, "dtypes": list(args.dtype),
               "sm_count_emulated": HOPPER_SMS,
               "scenarios": [dataclasses.asdict(s) for s in SCENARIOS],
               "passed": not failures, "failures": failures,
               "kernels": [{**dataclasses.asdict(r), "mma_summary": r.mma} for r in reports]}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=1) + "\n")
    return 1 if failures else 0


def _dtype_list(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in DTYPES]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"expected names from {tuple(DTYPES)}, got {text!r}")
    return names


def main(argv: Sequence[str] | None = None) -> int:
    """Run the gate in a child process without ``TRITON_INTERPRET`` and with an empty Triton cache
    directory (removed afterwards), so every kernel is compiled afresh; exit status 1 on failure."""
    p = argparse.ArgumentParser(description="Compile every Triton kernel of the public API for sm_90 "
                                            "and report registers, spills, shared memory, MMA and loads.")
    p.add_argument("--dtype", type=_dtype_list, default=["bf16", "fp16", "fp32"],
                   help="comma-separated subset of bf16,fp16,fp32 (default all three)")
    p.add_argument("--json", type=Path, help="also write the reports to this JSON file")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return _worker(args)
    cache = tempfile.mkdtemp(prefix="fedhello-sm90-cache-")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = cache
    cmd = [sys.executable, "-m", "tools.static_check", "--worker", "--dtype", ",".join(args.dtype)]
    if args.json is not None:
        cmd += ["--json", str(args.json.resolve())]
    try:
        # From the repository root, where ``tools`` is importable as a package.
        return subprocess.run(cmd, env=env, cwd=Path(__file__).resolve().parents[1]).returncode
    finally:
        shutil.rmtree(cache, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
