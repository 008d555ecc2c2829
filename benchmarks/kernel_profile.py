"""Device ceilings and per-kernel profiles for ``bench_kernels.py`` and ``gpu_check.sh``.

* ``copy_bandwidth``: a large device-to-device copy, counting bytes read + written: the
  bandwidth a memory-bound kernel can hope for, measured in the same run as the kernels;
* ``gemm_ceilings``: the frozen base layer's GEMMs at a case's shape (``x W^T``, ``dy W`` and
  ``y.addmm_(x, W^T)``, the kernels' accumulate-into-output form) in TFLOP/s;
* ``profile_kernels``: device time of every kernel one call launches (``torch.profiler``), in
  launch order, with achieved GB/s where the byte model names the kernel's bytes;
* ``host_vs_device``: host time to enqueue a call against its device time (launch overhead).

Imported as a sibling module (the scripts run with ``benchmarks/`` first on ``sys.path``).
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from timing import sync, time_call

__all__ = ["assign_model_bytes", "copy_bandwidth", "gemm_ceilings", "host_vs_device", "launch_list",
           "profile_kernels", "triton_kernel_names"]


def copy_bandwidth(device: torch.device, nbytes: int | None = None, reps: int = 20) -> dict:
    """Device-to-device copy of ``nbytes`` (default 1 GiB on CUDA, 64 MiB on CPU).

    Returns ``{"bytes", "median_s", "bytes_per_s"}`` with bytes = read + written (2 * nbytes).
    """
    nbytes = nbytes or ((1 << 30) if device.type == "cuda" else (64 << 20))
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    sec = time_call(lambda: dst.copy_(src), device, warmup=3, reps=reps)
    return {"bytes": 2 * nbytes, "median_s": sec, "bytes_per_s": 2 * nbytes / sec}


def gemm_ceilings(t: int, d_in: int, d_out: int, dtype: torch.dtype, device: torch.device,
                  reps: int = 20) -> dict:
    """The base layer's GEMMs at ``[T, d_in] x [d_in, d_out]`` on random data.

    Returns ``{name: {"median_ms", "tflops"}}`` for ``base_fwd`` (``F.linear(x, W)``),
    ``base_dgrad`` (``dy @ W``) and ``addmm_`` (``y.addmm_(x, W^T)``, beta = 1), plus
    ``base_fwd_dgrad_ms`` (the first two summed: the base cost LoRA overhead is measured against).
    """
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(t, d_in, device=device, generator=gen).to(dtype)
    w = (torch.randn(d_out, d_in, device=device, generator=gen) * d_in ** -0.5).to(dtype)
    dy = torch.randn(t, d_out, device=device, generator=gen).to(dtype)
    y = torch.randn(t, d_out, device=device, generator=gen).to(dtype)
    flops = 2 * t * d_in * d_out
    out = {}
    for name, fn in (("base_fwd", lambda: F.linear(x, w)), ("base_dgrad", lambda: dy @ w),
                     ("addmm_", lambda: y.addmm_(x, w.t()))):
        sec = time_call(fn, device, reps=reps)
        out[name] = {"median_ms": sec * 1e3, "tflops": flops / sec / 1e12}
    out["base_fwd_dgrad_ms"] = out["base_fwd"]["median_ms"] + out["base_dgrad"]["median_ms"]
    return out


def triton_kernel_names() -> set[str]:
    """Names of the ``@triton.jit`` kernels in ``fedhello.kernels.backends.triton_kernels`` (as the
    profiler shows them), empty when Triton is missing."""
    try:
        from fedhello.kernels.backends import triton_kernels
    except ImportError:
        return set()
    names = set()
    for value in vars(triton_kernels).values():
        fn = getattr(value, "fn", None)
        if fn is not None and hasattr(value, "arg_names"):
            names.add(fn.__name__)
    return names


def _device_us(event) -> float:  # noqa: ANN001 (a torch.autograd profiler FunctionEvent)
    """Duration of one device event (a kernel, memset or copy) in microseconds."""
    return float(event.time_range.elapsed_us())


def profile_kernels(fn: Callable[[], object], device: torch.device, reps: int = 5) -> dict:
    """Device kernels of ``fn()`` in launch order, each with its median device time over ``reps``.

    Returns ``{"kernels": [{"name", "median_us"}...], "total_us", "reps"}`` (one call's launch
    list), or ``{"note": ...}`` when not on CUDA or when the calls did not launch the same list.
    """
    if device.type != "cuda":
        return {"note": "kernel profile needs CUDA"}
    from torch.profiler import ProfilerActivity, profile

    fn()
    sync(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        sync(device)
    return launch_list(prof.events(), reps)


def launch_list(events: Sequence, reps: int) -> dict:
    """One call's device events in launch order, each with its median duration over ``reps``
    identical calls (``profile_kernels``' result; ``events`` are profiler ``FunctionEvent``s, the
    CPU ones are ignored)."""
    device = sorted((e for e in events if getattr(e.device_type, "name", "") == "CUDA"),
                    key=lambda e: e.time_range.start)
    if not device or len(device) % reps:
        return {"note": f"{len(device)} kernels over {reps} calls: not the same launch list each call"}
    per_call = len(device) // reps
    kernels = []
    for i in range(per_call):
        runs = [device[i + k * per_call] for k in range(reps)]
        if len({e.name for e in runs}) != 1:
            return {"note": "calls launched different kernel sequences"}
        kernels.append({"name": runs[0].name, "median_us": statistics.median(_device_us(e) for e in runs)})
    return {"kernels": kernels, "total_us": sum(k["median_us"] for k in kernels), "reps": reps}


def assign_model_bytes(kernels: Sequence[dict], lora_names: set[str], model: dict,
                       copy_bytes_per_s: float | None) -> dict:
    """Match the LoRA kernels of one call's launch list to the byte model; compute achieved GB/s.

    ``kernels``: ``profile_kernels(...)["kernels"]``; ``lora_names``: the Triton kernel names;
    ``model``: ``byte_model.lora_bytes(...)`` of the same call. The LoRA kernels, in launch order,
    are paired with the model's kernels in order when the counts agree (``matched``); otherwise
    none is paired. A paired kernel gets ``model`` (the model's kernel name), ``bytes``, ``gbps``
    and ``frac_of_copy``. ``lora_total`` always sums the LoRA kernels' device time and states GB/s
    against the model's total.
    """
    lora = [dict(k) for k in kernels if k["name"] in lora_names]
    others = [dict(k) for k in kernels if k["name"] not in lora_names]
    matched = bool(lora) and len(model["kernels"]) == len(lora)

    def rate(nbytes: int, us: float) -> dict:
        gbps = nbytes / (us * 1e-6) / 1e9
        return {"gbps": gbps, "frac_of_copy": gbps * 1e9 / copy_bytes_per_s if copy_bytes_per_s else None}

    if matched:
        for k, (model_name, mk) in zip(lora, model["kernels"].items()):
            k.update(model=model_name, bytes=mk["total"])
            if k["median_us"] > 0:
                k.update(rate(mk["total"], k["median_us"]))
    lora_us = sum(k["median_us"] for k in lora)
    total: dict = {"device_us": lora_us}
    if lora_us > 0:
        total["vs_model"] = rate(model["phases"]["fwd_bwd"], lora_us)
    return {"matched": matched, "lora_kernels": lora, "other_kernels": others, "lora_total": total}


def host_vs_device(fn: Callable[[], object], device: torch.device, reps: int = 20) -> dict:
    """Host time to enqueue ``reps`` calls against their device time, per call (ms).

    ``host_ms`` stops the host clock right after the last call returns, before synchronising:
    when it is close to ``device_ms`` the call is launch-bound (or syncs with the device).
    """
    if device.type != "cuda":
        return {"note": "host vs device time needs CUDA"}
    for _ in range(3):
        fn()
    sync(device)
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0 = time.perf_counter()
    begin.record()
    for _ in range(reps):
        fn()
    end.record()
    host = (time.perf_counter() - t0) / reps * 1e3
    sync(device)
    device_ms = begin.elapsed_time(end) / reps
    return {"host_ms": host, "device_ms": device_ms, "host_over_device": host / device_ms if device_ms else None}
