"""Byte model of the multi-client LoRA path: device-memory bytes each kernel must move.

Every LoRA kernel is memory-bound (about 1 GFLOP against tens of MB at the headline size), so
bytes over the copy bandwidth is its time floor. ``lora_bytes`` counts, per kernel and per
phase, the compulsory traffic of one forward + backward of ``multi_lora_linear``:

* every big operand (``X``, ``dY``, ``y``, ``dx``: ``[T, d]``) counted once per pass that
  touches it; small operands (adapters, the fp32 rank intermediates ``[T, R_PAD]``) counted once
  per kernel (re-reads of them by other programs hit L2);
* ``R_PAD`` = the padded rank, a power of two >= 16 (``tl.dot`` needs 16 on each side);
* the frozen base GEMMs (``x W^T``, ``dy W``) are not LoRA traffic; they accumulate into ``y``/``dx`` with ``addmm_`` (beta = 1), whose read of C is hidden inside a
  compute-bound GEMM, so it is not counted either;
* index arrays (``sorted_rows`` int32, tile lists) are counted where a kernel reads them.

The kernels (``fedhello.kernels.backends.triton_kernels``): F1 shrink reads X, writes H; F2
expand *writes* ``y = bias + s H B^T`` once,
then cuBLAS adds the base product into it. B1 reads dY once per (row chunk, d_out tile of
``block_n`` columns) and writes fp32 G partials ``[d_out / block_n, T, R_PAD]`` plus ``dB``
(final, or fp32 partials per row chunk of ``chunk_rows`` rows for clients with more than one
chunk), and B1r turns the dB partials of multi-chunk clients into their dB (with the squared
norms); B2 reduces the G partials to ``G [T, R_PAD]``; B3 writes ``dx = G A`` once (then the base
``dx.addmm_``); B4 ``dA = G^T X`` in one pass over X per (row chunk, d_in tile), final or
partials, and B4r reduces those. The kernels are listed in the order the Triton backend launches
them, so a profile's launch list pairs with them one to one.

Ops (``op=``): ``"multi_lora_linear"`` (the above); ``"lora_delta"``, the LoRA
term alone: F2 writes ``delta = s H B^T`` without a bias, the backward is the same; ``"lora_delta_out"``,
``lora_delta(..., out=y)`` on a base layer the caller runs: also F3, the in-place ``y += delta``
(reads y and delta, writes y), and B5, autograd adding the LoRA share of dx to the base layer's
dx (reads both, writes dx): the two passes a fused ``multi_lora_linear`` avoids.

Usage: ``lora_bytes(8192, 32, 4096, 4096, 16, 2)["phases"]["fwd_bwd"]`` -> bytes; run this file
for the headline table (``python benchmarks/byte_model.py [--json]``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Sequence

__all__ = ["OPS", "base_flops", "floors", "lora_bytes", "r_pad", "uniform_rows"]

OPS = ("multi_lora_linear", "lora_delta", "lora_delta_out")
FP32 = 4
INDEX = 4  # int32 row indices / tile entries
# Measured ceilings used for the README's floors (KINDS.md of the device tool: copy counted as
# bytes read + written; bf16 GEMM through torch on random data).
REFERENCE_DEVICES = {
    "H100": {"copy_bytes_per_s": 3.0e12, "gemm_flops_per_s": 750e12},
    "H200": {"copy_bytes_per_s": 4.3e12, "gemm_flops_per_s": 788e12},
}


def r_pad(r: int) -> int:
    """Padded rank of the rank intermediates: the next power of two, at least 16."""
    return max(16, 1 << max(0, r - 1).bit_length())


def uniform_rows(t: int, n: int) -> list[int]:
    """``t`` rows spread over ``n`` clients as evenly as possible."""
    return [t // n + (1 if c < t % n else 0) for c in range(n)]


def _kernel(phase: str, what: str, read: float, write: float) -> dict:
    return {"phase": phase, "what": what, "read": int(read), "write": int(write), "total": int(read + write)}


def _chunk_partials(rows: Sequence[int], chunk_rows: int) -> int:
    """Row chunks of the clients that need more than one (their gradients go through partials)."""
    return sum(math.ceil(c / chunk_rows) for c in rows if c > chunk_rows)


def _kernels(t: int, n: int, d_in: int, d_out: int, r: int, e: int, block_n: int, chunk_rows: int,
        rows: Sequence[int]) -> dict[str, dict]:
    rp = r_pad(r)
    x, y = t * d_in * e, t * d_out * e
    a, b = n * r * d_in * e, n * d_out * r * e
    inter = t * rp * FP32
    idx = t * INDEX
    multi = [c for c in rows if c > chunk_rows]
    # fp32 partial gradients of the multi-chunk clients: one [R_PAD, d] tile per chunk.
    chunks = _chunk_partials(rows, chunk_rows)
    part_b, part_a = chunks * d_out * rp * FP32, chunks * d_in * rp * FP32
    # Their final gradients are written by B1r / B4r, the others' directly by B1 / B4.
    final_share = (n - len(multi)) / n if n else 0.0
    b_direct, a_direct = b * final_share, a * final_share
    g_tiles = math.ceil(d_out / block_n)
    g_partials = g_tiles * t * rp * FP32
    norms_b, norms_a = n * g_tiles * FP32, n * math.ceil(d_in / block_n) * FP32
    return {
        "F1_shrink": _kernel("fwd", "H = X A^T (reads X once)", x + a + idx, inter),
        "F2_expand": _kernel("fwd", "y = bias + s H B^T, written once (base added by addmm_)",
                             inter + b + d_out * e + idx, y),
        "B1_dy_pass": _kernel("bwd", f"one pass over dY: G partials [{g_tiles}, T, {rp}] fp32 and dB",
                              y + b + inter + idx, g_partials + b_direct + part_b),
        "B1r_reduce_dB": _kernel("bwd", "dB of multi-chunk clients from their partials; norms",
                                 part_b, (b - b_direct) + norms_b),
        "B2_g_reduce": _kernel("bwd", "G = s * sum of the G partials", g_partials + idx, inter),
        "B3_expand": _kernel("bwd", "dx = G A, written once (base added by addmm_)", inter + a + idx, x),
        "B4_x_pass": _kernel("bwd", "dA = G^T X, one pass over X", x + inter + idx, a_direct + part_a),
        "B4r_reduce_dA": _kernel("bwd", "dA of multi-chunk clients from their partials; norms",
                                 part_a, (a - a_direct) + norms_a),
    }


def _delta(kernels: dict[str, dict], t: int, d_in: int, d_out: int, e: int, into_out: bool) -> dict[str, dict]:
    """The kernels of ``lora_delta``: F2 without the bias; with ``into_out`` the two add passes."""
    f2 = kernels["F2_expand"]
    kernels = {**kernels, "F2_expand": _kernel("fwd", "delta = s H B^T, written once", f2["read"] - d_out * e,
                                               f2["write"])}
    if into_out:
        x, y = t * d_in * e, t * d_out * e
        kernels["F3_add_into_out"] = _kernel("fwd", "y += delta in place (lora_delta(out=y))", 2 * y, y)
        kernels["B5_dx_accumulate"] = _kernel("bwd", "autograd adds the LoRA dx to the base layer's dx", 2 * x, x)
    return kernels


def lora_bytes(t: int, n: int, d_in: int, d_out: int, r: int, dtype_bytes: int, *,
               block_n: int = 128, chunk_rows: int = 512,
               client_rows: Sequence[int] | None = None, op: str = "multi_lora_linear") -> dict:
    """Bytes the LoRA path of one forward + backward of ``op`` moves.

    Args:
        t, n, d_in, d_out, r: rows T, clients N, feature sizes, max rank r_max.
        dtype_bytes: bytes per element of x/weights (2 for bf16/fp16, 4 for fp32).
        block_n: d_out columns per B1 program (sets the number of G partials).
        chunk_rows: rows per weight-gradient row chunk; clients with more rows go through
            fp32 partials reduced by B1r / B4r.
        client_rows: rows per client (default: T spread evenly), for the partials.
        op: ``"multi_lora_linear"``, ``"lora_delta"`` or ``"lora_delta_out"`` (module docstring).

    Returns:
        ``{"op", "params", "kernels": {name: {"phase", "what", "read", "write", "total"}},
        "phases": {"fwd", "bwd", "fwd_bwd"}}``, all in bytes.
    """
    for name, value in (("t", t), ("n", n), ("d_in", d_in), ("d_out", d_out), ("r", r),
                        ("dtype_bytes", dtype_bytes), ("block_n", block_n), ("chunk_rows", chunk_rows)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected a positive int, got {value!r}")
    if op not in OPS:
        raise ValueError(f"op: expected one of {OPS}, got {op!r}")
    rows = list(client_rows) if client_rows is not None else uniform_rows(t, n)
    if len(rows) != n or any(c < 0 for c in rows) or sum(rows) > t:
        raise ValueError(f"client_rows: expected {n} non-negative counts summing to <= T={t}, got {rows}")
    kernels = _kernels(t, n, d_in, d_out, r, dtype_bytes, block_n, chunk_rows, rows)
    if op != "multi_lora_linear":
        kernels = _delta(kernels, t, d_in, d_out, dtype_bytes, into_out=op == "lora_delta_out")
    fwd = sum(k["total"] for k in kernels.values() if k["phase"] == "fwd")
    bwd = sum(k["total"] for k in kernels.values() if k["phase"] == "bwd")
    return {
        "op": op,
        "params": {"t": t, "n": n, "d_in": d_in, "d_out": d_out, "r": r, "r_pad": r_pad(r),
                   "dtype_bytes": dtype_bytes, "block_n": block_n, "chunk_rows": chunk_rows},
        "kernels": kernels,
        "phases": {"fwd": fwd, "bwd": bwd, "fwd_bwd": fwd + bwd},
    }


def base_flops(t: int, d_in: int, d_out: int) -> dict[str, int]:
    """FLOPs of the frozen base layer: forward ``x W^T`` and dgrad ``dy W`` (2 T d_in d_out each)."""
    one = 2 * t * d_in * d_out
    return {"fwd": one, "dgrad": one, "fwd_dgrad": 2 * one}


def floors(model: dict, copy_bytes_per_s: float, gemm_flops_per_s: float) -> dict[str, float]:
    """Time floors (seconds) of the LoRA path at ``copy_bytes_per_s`` and of the base fwd + dgrad
    at ``gemm_flops_per_s``, and the LoRA floor as a fraction of the base."""
    p = model["params"]
    lora = model["phases"]["fwd_bwd"] / copy_bytes_per_s
    base = base_flops(p["t"], p["d_in"], p["d_out"])["fwd_dgrad"] / gemm_flops_per_s
    return {"lora_s": lora, "base_fwd_dgrad_s": base, "lora_frac_of_base": lora / base}


def headline_table(t: int = 8192, n: int = 32, d: int = 4096, r: int = 16, dtype_bytes: int = 2,
                   block_n: int = 128) -> str:
    """Markdown table of the kernels at one size, with the floors on the reference devices."""
    model = lora_bytes(t, n, d, d, r, dtype_bytes, block_n=block_n)
    lines = ["| kernel | phase | read MB | write MB | total MB |", "|---|---|---|---|---|"]
    for name, k in model["kernels"].items():
        lines.append(f"| {name}: {k['what']} | {k['phase']} | {k['read'] / 1e6:.1f} | "
                     f"{k['write'] / 1e6:.1f} | {k['total'] / 1e6:.1f} |")
    ph = model["phases"]
    lines.append(f"| **total** (fwd {ph['fwd'] / 1e6:.1f} + bwd {ph['bwd'] / 1e6:.1f}) | "
                 f"fwd+bwd | | | **{ph['fwd_bwd'] / 1e6:.1f}** |")
    lines += ["", "| device | LoRA floor us | base fwd+dgrad us | LoRA floor / base |", "|---|---|---|---|"]
    for dev, c in REFERENCE_DEVICES.items():
        f = floors(model, c["copy_bytes_per_s"], c["gemm_flops_per_s"])
        lines.append(f"| {dev} ({c['copy_bytes_per_s'] / 1e12:.1f} TB/s, {c['gemm_flops_per_s'] / 1e12:.0f} TFLOP/s) | "
                     f"{f['lora_s'] * 1e6:.0f} | {f['base_fwd_dgrad_s'] * 1e6:.0f} | {100 * f['lora_frac_of_base']:.1f} % |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Byte model of the LoRA path (headline case by default).")
    p.add_argument("--t", type=int, default=8192)
    p.add_argument("--n", type=int, default=32)
    p.add_argument("--d", type=int, default=4096)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--dtype-bytes", type=int, default=2)
    p.add_argument("--block-n", type=int, default=128)
    p.add_argument("--json", action="store_true", help="print the model as JSON instead")
    args = p.parse_args(argv)
    if args.json:
        print(json.dumps(lora_bytes(args.t, args.n, args.d, args.d, args.r, args.dtype_bytes, block_n=args.block_n),
                         indent=1))
    else:
        print(headline_table(args.t, args.n, args.d, args.r, args.dtype_bytes, args.block_n))
    return 0


if __name__ == "__main__":
    sys.exit(main())
