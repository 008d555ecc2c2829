"""Time candidate Triton launch settings on a GPU and print a replacement for ``tuning._GPU``.

For each (dtype family, padded rank) entry of ``fedhello/kernels/tuning.py`` this times a LoRA
forward + backward of ``multi_lora_linear`` (headline shape by default: N=32, T=8192, d=4096) under
today's entry and a seeded sample of candidate ``KernelConfig``s, and keeps the fastest. Each
candidate compiles its own kernels (seconds), so the sweep stops sampling when ``--budget-s`` is
spent and rewrites ``--out`` after every candidate: a sweep cut short still leaves every timing it
took. Needs CUDA (the interpreter's timings mean nothing); uses only torch + triton, so it runs on
the lent GPU machines:

    PYTHONPATH=. python benchmarks/sweep_kernel_configs.py --ranks 16 --dtypes bf16 --budget-s 200 \
        --out $OUT/sweep.json

``dy_block_n`` sets the G-partials trade-off of the pass over ``dY`` (``benchmarks/README.md``, byte
model): wider tiles move fewer bytes but leave fewer programs to fill the GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import random
import sys
import time
from typing import Callable

import torch

from fedhello.kernels import LoRAPlan, multi_lora_linear, tuning
from timing import time_call  # a sibling module: the script runs with benchmarks/ on sys.path

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# One tuple of values per KernelConfig field (a test checks the names match the dataclass).
CANDIDATES = {
    "block_m": (32, 64, 128),
    "block_k": (64, 128),
    "block_n": (64, 128, 256),
    "dy_block_n": (128, 256, 512, 1024),
    "chunk": (256, 512, 1024),
    "num_warps": (4, 8),
    "num_stages": (2, 3, 4),
}

TimeFn = Callable[[torch.dtype, int, tuning.KernelConfig], float]


def candidate_grid() -> list[tuning.KernelConfig]:
    """Every combination of ``CANDIDATES`` as a ``KernelConfig``."""
    return [tuning.KernelConfig(**dict(zip(CANDIDATES, values))) for values in itertools.product(*CANDIDATES.values())]


def table_key(dtype: torch.dtype, r_pad: int) -> tuple[str, int]:
    """The ``tuning._GPU`` key of inputs of ``dtype`` at padded rank ``r_pad``."""
    return ("float" if dtype == torch.float32 else "half", r_pad)


def table_line(key: tuple[str, int], cfg: tuning.KernelConfig, ms: float) -> str:
    """One line of ``tuning._GPU`` (positional fields, as that table writes them)."""
    fields = ", ".join(str(v) for v in dataclasses.astuple(cfg))
    return f'    ("{key[0]}", {key[1]}): KernelConfig({fields}),  # {ms:.3f} ms'


def make_cuda_timer(n: int, t: int, d: int, reps: int) -> TimeFn:
    """``time_fn(dtype, r_pad, cfg)``: median ms of one LoRA fwd + bwd on CUDA with ``cfg`` in the table."""
    dev = torch.device("cuda")

    def time_fn(dtype: torch.dtype, r: int, cfg: tuning.KernelConfig) -> float:
        gen = torch.Generator(device=dev).manual_seed(0)
        x = torch.randn(t, d, device=dev, dtype=dtype, generator=gen).requires_grad_()
        w = torch.randn(d, d, device=dev, dtype=dtype, generator=gen) * d**-0.5
        a = (torch.randn(n, r, d, device=dev, dtype=dtype, generator=gen) * d**-0.5).requires_grad_()
        b = (torch.randn(n, d, r, device=dev, dtype=dtype, generator=gen) * r**-0.5).requires_grad_()
        plan = LoRAPlan.build(torch.arange(t, device=dev) * n // t, n)
        sq = torch.zeros(n, device=dev)
        dy = torch.randn(t, d, device=dev, dtype=dtype, generator=gen)
        key = table_key(dtype, r)
        saved, tuning._GPU[key] = tuning._GPU[key], cfg
        try:  # the two warm-up calls compile this config's kernels
            return 1e3 * time_call(
                lambda: multi_lora_linear(x, w, None, a, b, plan, 2.0, grad_sqnorm=sq, backend="triton").backward(dy),
                dev, warmup=2, reps=reps)
        finally:
            tuning._GPU[key] = saved

    return time_fn


def sweep(entries: list[tuple[str, int]], time_fn: TimeFn, *, limit: int, budget_s: float,
          out: str | None = None, clock: Callable[[], float] = time.monotonic) -> dict:
    """Time today's entry and up to ``limit`` sampled candidates for each ``(dtype name, r_pad)``.

    Sampling stops for good once ``budget_s`` seconds (by ``clock``) have passed; today's entry
    of an entry not yet reached is still timed, so every entry has a baseline. Returns
    ``{"dtype,r": {"best_ms", "config", "default_ms", "tried", "failed", "timings": [...]}}``
    (``best_ms``/``config`` absent when nothing ran), written to ``out`` after every candidate.
    """
    grid = candidate_grid()
    deadline = clock() + budget_s
    results: dict = {}
    for name, r in entries:
        dtype = DTYPES[name]
        key = table_key(dtype, r)
        default = tuning._GPU[key]
        entry = results[f"{key[0]},{r}"] = {"default": dataclasses.asdict(default), "tried": 0, "failed": 0,
                                            "timings": []}
        sample = random.Random(0).sample(grid, min(limit, len(grid)))
        for i, cfg in enumerate([default, *sample]):
            if i > 0 and clock() >= deadline:
                entry["stopped"] = "budget spent"
                break
            try:
                ms = time_fn(dtype, r, cfg)
            except Exception as err:  # a config Triton cannot compile (shared memory, registers)
                entry["failed"] += 1
                print(f"{name} r={r} {cfg}: {type(err).__name__}: {str(err)[:200]}", file=sys.stderr)
                continue
            entry["tried"] += 1
            entry["timings"].append({"ms": ms, "config": dataclasses.asdict(cfg)})
            if i == 0:
                entry["default_ms"] = ms
            if "best_ms" not in entry or ms < entry["best_ms"]:
                entry.update(best_ms=ms, config=dataclasses.asdict(cfg))
            if out:
                with open(out, "w") as fh:
                    json.dump(results, fh, indent=2)
        if "best_ms" in entry:
            print(table_line(key, tuning.KernelConfig(**entry["config"]), entry["best_ms"]), flush=True)
        else:
            print(f'    ("{key[0]}", {r}): no candidate ran', flush=True)
    if out:
        with open(out, "w") as fh:
            json.dump(results, fh, indent=2)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", default="bf16", help="comma list of bf16, fp16, fp32")
    parser.add_argument("--ranks", default="16", help="comma list of padded ranks (16, 32, 64, 128)")
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--t", type=int, default=8192)
    parser.add_argument("--d", type=int, default=4096)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--limit", type=int, default=48, help="at most this many candidates per entry")
    parser.add_argument("--budget-s", type=float, default=240.0,
                        help="stop sampling candidates after this many seconds (default 240)")
    parser.add_argument("--out", help="write the results as JSON here (rewritten after every candidate)")
    args = parser.parse_args(argv)
    entries = []
    for name, r in itertools.product(args.dtypes.split(","), args.ranks.split(",")):
        if name not in DTYPES:
            parser.error(f"--dtypes: expected names from {sorted(DTYPES)}, got {name!r}")
        if not r.isdigit() or table_key(DTYPES[name], int(r)) not in tuning._GPU:
            parser.error(f"--ranks: expected padded ranks 16, 32, 64 or 128, got {r!r}")
        entries.append((name, int(r)))
    if not torch.cuda.is_available():
        print("sweep_kernel_configs: needs a CUDA GPU (timings in the Triton interpreter mean nothing)",
              file=sys.stderr)
        return 2
    sweep(entries, make_cuda_timer(args.n, args.t, args.d, args.reps), limit=args.limit,
          budget_s=args.budget_s, out=args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
