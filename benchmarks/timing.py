"""The one timer of the benchmarks: how a call is timed on a GPU and on a CPU.

Two clocks, chosen by what is timed:

* ``Timer`` / ``time_call``: a kernel-sized call repeated many times. On CUDA one pair of events
  around each call (host gaps inside a call count, since they stall the GPU; nothing is
  synchronised between calls, so launch latency overlaps as in training), on CPU
  ``time.perf_counter`` per call.
* ``wall_time``: one long call that mixes host and device work (a federated round, a process):
  ``time.perf_counter`` with the device synchronised before and after.

Imported as a sibling module (the scripts run with ``benchmarks/`` first on ``sys.path``).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from _common import percentile

__all__ = ["Stats", "Timer", "TimingConfig", "round_stats", "sync", "time_call", "wall_time"]


def sync(device: torch.device) -> None:
    """Wait for the work queued on ``device`` (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def wall_time(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    """``(fn(), seconds)``: wall time of one call, ``device`` synchronised before and after."""
    sync(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
    return result, time.perf_counter() - start


def round_stats(times_s: Sequence[float]) -> dict:
    """Median, 20th/80th percentiles and minimum (s) of ``wall_time``d rounds, and the rounds themselves."""
    s = sorted(times_s)
    return {"median_s": statistics.median(s), "q20_s": percentile(s, 0.2), "q80_s": percentile(s, 0.8),
            "min_s": s[0], "reps": len(s), "times_s": list(times_s)}


@dataclass(frozen=True)
class TimingConfig:
    """How many calls to make: ``warmup`` untimed, then enough timed calls to fill ``target_ms``,
    clamped to ``[min_reps, max_reps]``; optional L2 flush (CUDA) before each timed call."""

    warmup: int = 3
    min_reps: int = 10
    max_reps: int = 100
    target_ms: float = 100.0
    flush_l2: bool = False


@dataclass(frozen=True)
class Stats:
    """Median and 20th/80th percentiles (ms) of ``reps`` timed calls."""

    median_ms: float
    q20_ms: float
    q80_ms: float
    reps: int

    @classmethod
    def of(cls, times_ms: Sequence[float]) -> "Stats":
        s = sorted(times_ms)
        return cls(statistics.median(s), percentile(s, 0.2), percentile(s, 0.8), len(s))


class Timer:
    """Times ``timed(prepare(input))`` per call, rotating through a list of inputs so that nothing
    is timed cache-hot; the untimed ``prepare`` runs before each timed call (e.g. the forward whose
    backward is timed), and what ``timed`` returns is freed after the clock stops."""

    def __init__(self, device: torch.device, config: TimingConfig) -> None:
        self.device = device
        self.config = config
        self._cuda = device.type == "cuda"
        # 256 MiB, more than any current L2; written before each timed call when flushing.
        self._flush = (torch.empty(256 << 20, dtype=torch.int8, device=device)
                       if self._cuda and config.flush_l2 else None)

    def _timed_calls(self, prepare: Callable, timed: Callable, inputs: Sequence, reps: int,
                     start: int) -> list[float]:
        if self._cuda:
            events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                      for _ in range(reps)]
            for i, (begin, end) in enumerate(events):
                state = prepare(inputs[(start + i) % len(inputs)])
                if self._flush is not None:
                    self._flush.zero_()
                begin.record()
                result = timed(state)
                end.record()
                # Freeing outputs is host work that belongs to no phase: keep it off the clock.
                del state, result
            sync(self.device)
            return [begin.elapsed_time(end) for begin, end in events]
        times = []
        for i in range(reps):
            state = prepare(inputs[(start + i) % len(inputs)])
            t0 = time.perf_counter()
            result = timed(state)
            times.append((time.perf_counter() - t0) * 1e3)
            del state, result
        return times

    def measure(self, prepare: Callable, timed: Callable, inputs: Sequence) -> Stats:
        """Median time of ``timed(prepare(input))`` over calls rotating through ``inputs``."""
        cfg = self.config
        for i in range(cfg.warmup):
            timed(prepare(inputs[i % len(inputs)]))
        sync(self.device)
        reps = cfg.min_reps
        if cfg.max_reps > cfg.min_reps:
            probe = statistics.median(self._timed_calls(prepare, timed, inputs, 3, 0))
            reps = int(min(cfg.max_reps, max(cfg.min_reps, cfg.target_ms / max(probe, 1e-3))))
        return Stats.of(self._timed_calls(prepare, timed, inputs, reps, cfg.warmup))


def time_call(fn: Callable[[], object], device: torch.device, warmup: int = 3, reps: int = 20) -> float:
    """Median seconds of ``fn()`` over ``reps`` calls after ``warmup`` untimed ones (``Timer``'s clock)."""
    config = TimingConfig(warmup=warmup, min_reps=reps, max_reps=reps)
    return Timer(device, config).measure(lambda _: None, lambda _: fn(), [None]).median_ms / 1e3
