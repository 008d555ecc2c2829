"""Steps of ``gpu_check.sh`` that are not a whole benchmark: each updates one summary JSON.

Subcommands (each rewrites ``--out``, the summary file, so a run cut off keeps its steps):

* ``env``       device, driver-visible versions (python, torch, triton, CUDA), interpreter state;
* ``ceilings``  copy bandwidth and the base layer's GEMM / ``addmm_`` rates at the headline shape;
* ``graph``     CUDA-graph capture of ``multi_lora_linear`` forward + backward (tensor ranks,
                trainable and scaling, a prebuilt plan), replayed and compared with eager runs;
* ``step``      the exit status and duration of one shell step (``timeout`` gives 124);
* ``summary``   the K1-K4 table, routing variants, graph, tests and rounds, from the other files.

Only the standard library, torch, triton and this repository are imported (a lent GPU machine
has no package registry). Run from the repository root with ``PYTHONPATH=.``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from _common import finite, write_json

if TYPE_CHECKING:
    import torch

# Goals of the kernels (op, threshold), and the routing-variant slowdown bound.
GOALS = {
    "K1_lora_fwd_bwd_speedup_vs_torch_loop": (">=", 3.0),
    "K2_lora_overhead_vs_base_fwd_dgrad": ("<=", 0.25),
    "K3_fused_norm_cost_frac_of_bwd": ("<=", 0.05),
    "K4_min_kernel_frac_of_copy": (">=", 0.70),
}
MAX_VARIANT_SLOWDOWN = 1.3
HEADLINE = {"n": 32, "t": 8192, "d": 4096, "r": 16}
SMOKE = {"n": 2, "t": 64, "d": 32, "r": 8}


def _load(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _update(path: Path, key: str, value: object) -> None:
    doc = _load(path)
    doc[key] = finite(value)
    write_json(doc, path)


def _sizes(smoke: bool) -> dict:
    return SMOKE if smoke else HEADLINE


def _device() -> torch.device:
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ------------------------------------------------------------------------------------------- env


def cmd_env(args: argparse.Namespace) -> None:
    import torch

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    from torch.utils import cpp_extension

    env = {"python": platform.python_version(), "torch": torch.__version__, "triton": triton_version,
           "cuda": torch.version.cuda, "device": "cpu",
           "triton_interpret": os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"), "smoke": args.smoke,
           # What the ext_build step needs: nvcc (CUDA_HOME), a host C++ compiler and ninja.
           "toolchain": {"cuda_home": cpp_extension.CUDA_HOME, "cxx": shutil.which(os.environ.get("CXX", "c++")),
                         "ninja": cpp_extension.is_ninja_available()}}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(device=props.name, capability=f"{props.major}.{props.minor}",
                   sm_count=props.multi_processor_count, memory_bytes=props.total_memory)
    print(json.dumps(env))
    _update(args.out, "env", env)


# -------------------------------------------------------------------------------------- ceilings


def cmd_ceilings(args: argparse.Namespace) -> None:
    import torch

    import kernel_profile

    device, sz = _device(), _sizes(args.smoke)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    copy = kernel_profile.copy_bandwidth(device, nbytes=(16 << 20) if args.smoke else None)
    gemm = kernel_profile.gemm_ceilings(sz["t"], sz["d"], sz["d"], dtype, device, reps=5 if args.smoke else 20)
    result = {"copy": copy, "gemm": gemm, "shape": {"t": sz["t"], "d_in": sz["d"], "d_out": sz["d"]},
              "dtype": str(dtype).removeprefix("torch.")}
    print(f"copy {copy['bytes_per_s'] / 1e9:.0f} GB/s; base fwd {gemm['base_fwd']['tflops']:.1f} TFLOP/s, "
          f"dgrad {gemm['base_dgrad']['tflops']:.1f}, addmm_ {gemm['addmm_']['tflops']:.1f}")
    _update(args.out, "ceilings", result)


# ----------------------------------------------------------------------------------------- graph


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    ref = b.double()
    denom = ref.norm().item()
    return (a.double() - ref).norm().item() / denom if denom else float((a.double() - ref).norm().item())


def graph_check(device: torch.device, sz: dict) -> dict:
    """Capture ``multi_lora_linear`` forward + backward in a CUDA graph and replay it.

    Inputs are static tensors (``ranks``/``trainable``/``scaling`` as tensors, as
    ``MultiLoRALinear`` passes them; the plan built before capture). The graph is replayed on
    the captured inputs and again after ``x`` and ``dy`` get new values in place; each replay
    is compared with an eager call on the same inputs (``rel_err`` per output, and whether the
    outputs are bitwise equal).
    """
    import torch

    from fedhello.kernels import LoRAPlan, multi_lora_linear

    if device.type != "cuda":
        return {"status": "skipped", "note": "CUDA graphs need CUDA"}
    n, t, d, r = sz["n"], sz["t"], sz["d"], sz["r"]
    gen = torch.Generator(device=device).manual_seed(0)
    dtype = torch.bfloat16

    def randn(*shape: int, std: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, device=device, generator=gen) * std).to(dtype)

    x = randn(t, d).requires_grad_()
    w, bias, dy = randn(d, d, std=d ** -0.5), randn(d, std=0.1), randn(t, d)
    lora_a = randn(n, r, d, std=d ** -0.5).requires_grad_()
    lora_b = randn(n, d, r, std=r ** -0.5).requires_grad_()
    ids = torch.randint(0, n, (t,), device=device, generator=gen)
    plan = LoRAPlan.build(ids, n)
    ranks = torch.tensor([max(1, r >> (c % 3)) for c in range(n)], dtype=torch.int32, device=device)
    trainable = torch.tensor([c % 4 != 3 for c in range(n)], device=device)
    scaling = torch.full((n,), 0.5, device=device)
    norms = torch.zeros(n, dtype=torch.float32, device=device)

    def step() -> list[torch.Tensor]:
        norms.zero_()
        y = multi_lora_linear(x, w, bias, lora_a, lora_b, plan, scaling, ranks=ranks, trainable=trainable,
                              grad_sqnorm=norms, backend="triton")
        return [y, *torch.autograd.grad(y, [x, lora_a, lora_b], dy), norms]

    def compare(got: list[torch.Tensor], want: list[torch.Tensor]) -> dict:
        names = ("y", "dx", "dA", "dB", "sqnorm")
        return {"rel_err": {k: _rel_err(a, b) for k, a, b in zip(names, got, want)},
                "bitwise_equal": all(torch.equal(a, b) for a, b in zip(got, want))}

    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(2):  # compile, build the plan's cached tile lists, warm the allocator
            step()
    torch.cuda.current_stream(device).wait_stream(side)
    result: dict = {"sizes": sz}
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            captured = step()
    except Exception as err:  # noqa: BLE001 (any capture failure is the finding)
        return {**result, "status": "capture_failed", "error": f"{type(err).__name__}: {err}"[:2000]}
    replays = {}
    try:
        for label in ("same_inputs", "new_inputs"):
            if label == "new_inputs":
                with torch.no_grad():
                    x.copy_(randn(t, d))
                    dy.copy_(randn(t, d))
            graph.replay()
            got = [c.clone() for c in captured]
            eager = [e.detach().clone() for e in step()]
            replays[label] = compare(got, eager)
        torch.cuda.synchronize(device)
    except Exception as err:  # noqa: BLE001
        return {**result, "status": "replay_failed", "error": f"{type(err).__name__}: {err}"[:2000]}
    worst = max(e for rep in replays.values() for e in rep["rel_err"].values())
    ok = worst < 1e-3 and replays["new_inputs"]["rel_err"]["y"] < 1e-3
    return {**result, "status": "ok" if ok else "mismatch", "max_rel_err": worst, "replays": replays}


def cmd_graph(args: argparse.Namespace) -> None:
    result = graph_check(_device(), _sizes(args.smoke))
    print(json.dumps({k: v for k, v in result.items() if k != "replays"}))
    _update(args.out, "graph", result)


# ------------------------------------------------------------------------------------------ step


def cmd_step(args: argparse.Namespace) -> None:
    doc = _load(args.out)
    status = "ok" if args.rc == 0 else ("timeout" if args.rc in (124, 137) else "failed")
    entry = {"rc": args.rc, "seconds": args.seconds, "status": "skipped" if args.skipped else status}
    if args.skipped:
        entry["note"] = args.skipped
    doc.setdefault("steps", {})[args.name] = entry
    write_json(doc, args.out)


# --------------------------------------------------------------------------------------- summary


def _verdict(value: float | None, op: str, goal: float) -> str:
    if value is None:
        return "n/a"
    return "MET" if (value >= goal if op == ">=" else value <= goal) else "NOT MET"


def _pytest_line(path: Path) -> str | None:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return None
    # Only pytest's own closing line ("=== 3 passed, 1 skipped in 9.87s ===" or, with -q, without the
    # rules): a run killed by its timeout has none, and a traceback line must not stand in for it.
    for line in reversed(lines):
        if re.search(r"\b(passed|failed|errors?|deselected|skipped|no tests ran|tests? collected)\b.* in "
                     r"[\d.]+s\b", line):
            return line.strip(" =")
    return "no pytest summary line (killed by its timeout?)" if lines else None


def _lora_ms(case: dict, impl: str = "triton") -> float | None:
    entry = case.get("impls", {}).get(impl, {})
    return entry.get("lora_ms", {}).get("fwd_bwd") if entry.get("status") == "ok" else None


def summarise(doc: dict, kernels: dict, variants: dict, pytest_log: Path, rounds: dict) -> dict:
    """The kernel goals from the headline case (K1-K4), the routing variants against the
    scattered headline, and the status of the graph check, the GPU tests and the rounds."""
    cases = [c for c in kernels.get("cases", []) if c.get("status") == "ok"]
    head = next((c for c in cases if c.get("routing", "scattered") == "scattered"), None)
    k: dict[str, float | None] = dict.fromkeys(GOALS)
    kernel_rows: list[dict] = []
    if head is not None:
        r = head["ratios"]
        k["K1_lora_fwd_bwd_speedup_vs_torch_loop"] = r["lora_speedup_vs_torch_loop"].get("triton", {}).get("fwd_bwd")
        k["K2_lora_overhead_vs_base_fwd_dgrad"] = r["lora_overhead_vs_base"].get("triton", {}).get("fwd_bwd")
        k["K3_fused_norm_cost_frac_of_bwd"] = r.get("fused_norm_cost_frac_of_bwd")
        prof = head.get("profile", {}).get("triton", {})
        kernel_rows = prof.get("lora_kernels", [])
        fracs = [row["frac_of_copy"] for row in kernel_rows if row.get("frac_of_copy") is not None]
        k["K4_min_kernel_frac_of_copy"] = min(fracs) if fracs else None
    goals = {key: {"value": k[key], "op": op, "goal": goal, "verdict": _verdict(k[key], op, goal)}
             for key, (op, goal) in GOALS.items()}
    base_ms = _lora_ms(head) if head else None
    variant_rows = []
    for case in variants.get("cases", []):
        ms = _lora_ms(case) if case.get("status") == "ok" else None
        ratio = ms / base_ms if ms and base_ms and base_ms > 0 else None
        variant_rows.append({"case": case["name"], "triton_lora_fwd_bwd_ms": ms, "vs_headline": ratio,
                             "verdict": _verdict(ratio, "<=", MAX_VARIANT_SLOWDOWN)})
    return {
        "headline_case": head["name"] if head else None,
        "goals": goals,
        "kernels": kernel_rows,
        "host_vs_device": head.get("host_vs_device") if head else None,
        "variants": variant_rows,
        "graph": doc.get("graph", {}).get("status"),
        "pytest": _pytest_line(pytest_log),
        "rounds": "ok" if rounds.get("complete") else ("missing" if not rounds else "incomplete"),
    }


def format_summary(doc: dict, summary: dict) -> str:
    ceil = doc.get("ceilings", {})
    lines = ["=== gpu_check summary ==="]
    env = doc.get("env", {})
    lines.append(f"device {env.get('device')} | torch {env.get('torch')} | triton {env.get('triton')} | "
                 f"TRITON_INTERPRET {env.get('triton_interpret')}")
    if ceil:
        g = ceil["gemm"]
        lines.append(f"ceilings: copy {ceil['copy']['bytes_per_s'] / 1e9:.0f} GB/s; base fwd "
                     f"{g['base_fwd']['median_ms']:.3f} ms ({g['base_fwd']['tflops']:.0f} TFLOP/s), dgrad "
                     f"{g['base_dgrad']['median_ms']:.3f} ms, addmm_ {g['addmm_']['median_ms']:.3f} ms")
    lines.append(f"headline: {summary['headline_case']}")
    for key, goal in summary["goals"].items():
        value = "-" if goal["value"] is None else f"{goal['value']:.3f}"
        lines.append(f"  {key:<40} {value:>8}  goal {goal['op']} {goal['goal']:g}  {goal['verdict']}")
    for row in summary["kernels"]:
        frac = "-" if row.get("frac_of_copy") is None else f"{100 * row['frac_of_copy']:.0f} % of copy"
        lines.append(f"  K4 {row['name'][:40]:<40} {row['median_us']:>8.1f} us  {row.get('model', '-'):<24} {frac}")
    hvd = summary.get("host_vs_device") or {}
    if "host_ms" in hvd:
        lines.append(f"  host {hvd['host_ms']:.3f} ms vs device {hvd['device_ms']:.3f} ms per fwd+bwd call")
    for row in summary["variants"]:
        ms = "-" if row["triton_lora_fwd_bwd_ms"] is None else f"{row['triton_lora_fwd_bwd_ms']:.3f} ms"
        ratio = "-" if row["vs_headline"] is None else f"{row['vs_headline']:.2f}x"
        lines.append(f"  variant {row['case']:<44} LoRA fwd+bwd {ms:>10}  vs headline {ratio:>6}  {row['verdict']}")
    lines.append(f"graph replay: {summary['graph']} | GPU tests: {summary['pytest']} | rounds: {summary['rounds']}")
    for name, step in doc.get("steps", {}).items():
        if step["status"] != "ok":
            note = f": {step['note']}" if step.get("note") else ""
            lines.append(f"step {name}: {step['status']} (rc {step['rc']}, {step['seconds']} s){note}")
    return "\n".join(lines)


def cmd_summary(args: argparse.Namespace) -> None:
    doc = _load(args.out)
    variants = {"cases": [c for path in args.variants for c in _load(path).get("cases", [])]}
    summary = summarise(doc, _load(args.kernels), variants, args.pytest_log, _load(args.rounds))
    doc["summary"] = summary
    write_json(finite(doc), args.out)
    print(format_summary(doc, summary))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("env", "ceilings", "graph", "step", "summary"):
        s = sub.add_parser(name)
        s.add_argument("--out", type=Path, required=True, help="the summary JSON to update")
        s.add_argument("--smoke", action="store_true", help="tiny sizes (CPU, interpreter)")
        if name == "step":
            s.add_argument("--name", required=True)
            s.add_argument("--rc", type=int, required=True)
            s.add_argument("--seconds", type=int, required=True)
            s.add_argument("--skipped", help="why the step did not run")
        if name == "summary":
            for f in ("kernels", "pytest-log", "rounds"):
                s.add_argument(f"--{f}", type=Path, required=True)
            s.add_argument("--variants", type=Path, nargs="+", required=True)
    args = p.parse_args(argv)
    {"env": cmd_env, "ceilings": cmd_ceilings, "graph": cmd_graph, "step": cmd_step,
     "summary": cmd_summary}[args.cmd](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
