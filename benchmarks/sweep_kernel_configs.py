"""Time candidate Triton launch settings on a GPU and print a replacement for ``tuning._GPU``.

For each (dtype family, padded rank) entry of ``fedhello/kernels/tuning.py`` this times a LoRA
forward + backward of ``multi_lora_linear`` (headline shape by default: N=32, T=8192, d=4096) under
every candidate ``KernelConfig`` and keeps the fastest. Needs CUDA (the interpreter's timings mean
nothing); uses only torch + triton, so it runs on the lent GPU machines:

    PYTHONPATH=. python benchmarks/sweep_kernel_configs.py --ranks 16,32 --dtypes bf16 --out $OUT/sweep.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import sys

import torch

from fedhello.kernels import LoRAPlan, multi_lora_linear, tuning

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
CANDIDATES = {
    "block_m": (32, 64, 128),
    "block_k": (64, 128),
    "block_n": (64, 128, 256),
    "chunk": (256, 512, 1024),
    "num_warps": (4, 8),
    "num_stages": (2, 3, 4),
}


def _time_call(dtype: torch.dtype, r: int, n: int, t: int, d: int, reps: int) -> float:
    """Median milliseconds of one LoRA forward + backward (base weight frozen, fixed inputs)."""
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(t, d, device=dev, dtype=dtype, generator=gen).requires_grad_()
    w = torch.randn(d, d, device=dev, dtype=dtype, generator=gen) * d**-0.5
    a = (torch.randn(n, r, d, device=dev, dtype=dtype, generator=gen) * d**-0.5).requires_grad_()
    b = (torch.randn(n, d, r, device=dev, dtype=dtype, generator=gen) * r**-0.5).requires_grad_()
    plan = LoRAPlan.build(torch.arange(t, device=dev) * n // t, n)
    sq = torch.zeros(n, device=dev)
    dy = torch.randn(t, d, device=dev, dtype=dtype, generator=gen)
    times = []
    for i in range(reps + 2):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        multi_lora_linear(x, w, None, a, b, plan, 2.0, grad_sqnorm=sq, backend="triton").backward(dy)
        end.record()
        torch.cuda.synchronize()
        if i >= 2:  # the first calls compile
            times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", default="bf16", help="comma list of bf16, fp16, fp32")
    parser.add_argument("--ranks", default="16", help="comma list of padded ranks (16, 32, 64, 128)")
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--t", type=int, default=8192)
    parser.add_argument("--d", type=int, default=4096)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--limit", type=int, default=48, help="at most this many candidates per entry")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("sweep_kernel_configs: needs a CUDA GPU (timings in the Triton interpreter mean nothing)",
              file=sys.stderr)
        return 2
    results = {}
    for name, r in itertools.product(args.dtypes.split(","), (int(v) for v in args.ranks.split(","))):
        dtype = DTYPES[name]
        key = ("float" if dtype == torch.float32 else "half", r)
        default = tuning._GPU[key]
        timed = []
        grid = [tuning.KernelConfig(**dict(zip(CANDIDATES, v))) for v in itertools.product(*CANDIDATES.values())]
        # A seeded sample of the grid, always with today's entry, keeps the sweep within minutes.
        for cfg in [default, *random.Random(0).sample(grid, min(args.limit, len(grid)))]:
            tuning._GPU[key] = cfg
            try:
                timed.append((_time_call(dtype, r, args.n, args.t, args.d, args.reps), cfg))
            except Exception as err:  # a config Triton cannot compile (shared memory, registers)
                print(f"{name} r={r} {cfg}: {type(err).__name__}", file=sys.stderr)
        tuning._GPU[key] = default
        best_ms, best = min(timed, key=lambda item: item[0])
        results[f"{key[0]},{r}"] = {"best_ms": best_ms, "config": best.__dict__, "tried": len(timed)}
        print(f'    ("{key[0]}", {r}): KernelConfig({best.block_m}, {best.block_k}, {best.block_n}, '
              f"{best.chunk}, {best.num_warps}, {best.num_stages}),  # {best_ms:.3f} ms")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(results, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
