"""CPU benchmark: the csrc extension backend ("cpu") against the per-client torch loop ("torch").

Two timings per case, each the median of ``--repeats`` runs:

* ``lora``: the LoRA part only (``lora_forward`` + ``lora_backward`` with dx, dA, dB and the
  fused squared norms), which is what the backends implement;
* ``layer``: a whole ``multi_lora_linear`` forward + backward, base GEMMs included.

Usage::

    python benchmarks/bench_extension_cpu.py            # N in {8, 32}, T=2048, d in {256, 512}, r=16
    python benchmarks/bench_extension_cpu.py --smoke    # one tiny case, seconds
"""

from __future__ import annotations

import argparse
from typing import Callable

import torch

from fedhello.kernels import LoRAPlan, multi_lora_linear
from fedhello.kernels.backends import torch as torch_backend
from fedhello.kernels.checks import check_inputs
from fedhello.kernels.extension import backend, load_error
from timing import time_call  # a sibling module: the script runs with benchmarks/ on sys.path


def _median_ms(fn: Callable[[], object], repeats: int) -> float:
    return 1e3 * time_call(fn, torch.device("cpu"), reps=repeats)


def _case(t: int, n: int, d: int, r: int, dtype: torch.dtype, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * scale).to(dtype)

    ids = torch.randint(-1, n, (t,), generator=gen)
    ranks = torch.randint(1, r + 1, (n,), generator=gen).to(torch.int32)
    ranks[0] = r
    return dict(
        x=rnd(t, d), weight=rnd(d, d, scale=d**-0.5), bias=rnd(d),
        lora_a=rnd(n, r, d, scale=d**-0.5), lora_b=rnd(n, d, r, scale=r**-0.5), dy=rnd(t, d),
        plan=LoRAPlan.build(ids, n), scaling=torch.rand(n, generator=gen) + 0.5, ranks=ranks,
        trainable=torch.arange(n) % 4 != 3,  # a quarter of the clients frozen
    )


def _lora_only(impl, c: dict) -> Callable[[], object]:
    params = check_inputs(c["x"], c["weight"], c["bias"], c["lora_a"], c["lora_b"], c["plan"], c["scaling"],
                          c["ranks"], c["trainable"], None)
    sq = torch.zeros(c["lora_a"].shape[0])

    def run() -> None:
        _, saved = impl.lora_forward(c["x"], c["lora_a"], c["lora_b"], c["bias"], c["plan"], params)
        impl.lora_backward(c["dy"], c["x"], c["lora_a"], c["lora_b"], c["plan"], params, saved, True, True, sq)

    return run


def _layer(name: str, c: dict) -> Callable[[], object]:
    x = c["x"].clone().requires_grad_()
    a = c["lora_a"].clone().requires_grad_()
    b = c["lora_b"].clone().requires_grad_()
    sq = torch.zeros(a.shape[0])

    def run() -> None:
        y = multi_lora_linear(x, c["weight"], c["bias"], a, b, c["plan"], c["scaling"], ranks=c["ranks"],
                              trainable=c["trainable"], grad_sqnorm=sq, backend=name)
        y.backward(c["dy"])
        x.grad = a.grad = b.grad = None

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="one tiny case")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    parser.add_argument("--simd", choices=("avx512", "avx2", "baseline"), help="narrower instruction set")
    args = parser.parse_args()

    ext = backend("cpu")
    if ext is None:
        raise SystemExit(f"the cpu extension is not built ({load_error('cpu')}); run pip install -e . first")
    if args.simd:
        ext.native.set_simd_level(args.simd)
    dtype = getattr(torch, args.dtype)
    cases = [(64, 8, 32, 4)] if args.smoke else [(2048, n, d, 16) for n in (8, 32) for d in (256, 512)]
    repeats = 3 if args.smoke else args.repeats
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, simd {ext.native.simd_level()}, {args.dtype}")
    print(f"{'T':>5} {'N':>3} {'d':>4} {'r':>3} | {'lora torch':>10} {'lora cpu':>9} {'speedup':>7} | "
          f"{'layer torch':>11} {'layer cpu':>9} {'speedup':>7}   (ms, median of {repeats})")
    for t, n, d, r in cases:
        c = _case(t, n, d, r, dtype)
        lora_t = _median_ms(_lora_only(torch_backend, c), repeats)
        lora_c = _median_ms(_lora_only(ext, c), repeats)
        layer_t = _median_ms(_layer("torch", c), repeats)
        layer_c = _median_ms(_layer("cpu", c), repeats)
        print(f"{t:>5} {n:>3} {d:>4} {r:>3} | {lora_t:>10.3f} {lora_c:>9.3f} {lora_t / lora_c:>6.2f}x | "
              f"{layer_t:>11.3f} {layer_c:>9.3f} {layer_t / layer_c:>6.2f}x")


if __name__ == "__main__":
    main()
