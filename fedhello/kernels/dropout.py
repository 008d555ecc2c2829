"""Counter-based LoRA dropout masks, identical on every backend.

LoRA dropout drops entries of the adapter's *input* (never the base path). So that a client's
rows get the same mask whether it trains alone or inside a batch, the mask bit of an entry is
a pure function of three integers, with no random state:

* ``seed``: the client's 32-bit seed for this call (``dropout_seeds[c] mod 2^32``);
* ``j``: the row's index among the client's rows in this call (0 for its first row, in the
  order of ``plan.sorted_rows``, which keeps the batch order of a client's rows);
* ``k``: the column (feature) index.

``keep(seed, j, k) = mix(mix(j * 0x9E3779B1 ^ seed) ^ (k * 0x85EBCA77)) >= floor(p * 2^32)``

in uint32 arithmetic (wrapping multiplies, logical shifts), where ``mix`` is the 32-bit
finaliser ``x ^= x >> 16; x *= 0x7FEB352D; x ^= x >> 15; x *= 0x846CA68B; x ^= x >> 16``.
Kept entries are scaled by ``1 / (1 - p)`` (inverted dropout). The Triton kernels evaluate the
same formula in registers; this module is its torch statement, used by the loop backends and
the tests. ``torch`` has no wrapping uint32 multiply on every device, so values live in int64
and each product is split into 16-bit halves so that no intermediate overflows.
"""

from __future__ import annotations

import torch

__all__ = ["MASK32", "ROW_MULT", "COL_MULT", "keep_mask", "keep_threshold", "mix32", "row_keep", "next_call_seeds"]

MASK32 = 0xFFFFFFFF
ROW_MULT = 0x9E3779B1
COL_MULT = 0x85EBCA77
_MIX_1 = 0x7FEB352D
_MIX_2 = 0x846CA68B


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``(x * c) mod 2^32`` for int64 ``x`` in ``[0, 2^32)`` and a constant ``c < 2^32``."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & MASK32


def mix32(x: torch.Tensor) -> torch.Tensor:
    """The 32-bit finaliser of the module docstring on int64 values in ``[0, 2^32)``."""
    x = x ^ (x >> 16)
    x = _mul32(x, _MIX_1)
    x = x ^ (x >> 15)
    x = _mul32(x, _MIX_2)
    return x ^ (x >> 16)


def keep_threshold(p: float) -> int:
    """``floor(p * 2^32)``: an entry is kept when its hash is at least this."""
    return int(p * 4294967296.0)


def keep_mask(seed: torch.Tensor, j: torch.Tensor, k: torch.Tensor, p: float) -> torch.Tensor:
    """Bool keep mask, broadcasting ``seed``/``j`` over rows and ``k`` over columns.

    Args:
        seed: int64 ``[rows, 1]`` (or scalar) per-row client seeds, any int64 value (taken mod 2^32).
        j: int64 ``[rows, 1]`` client-local row indices (>= 0).
        k: int64 ``[1, cols]`` column indices (>= 0).
        p: drop probability in ``[0, 1)``.
    """
    h = mix32(_mul32(j & MASK32, ROW_MULT) ^ (seed & MASK32))
    h = mix32(h ^ _mul32(k & MASK32, COL_MULT))
    return h >= keep_threshold(p)


def row_keep(plan, seeds: torch.Tensor, p: float, cols: int) -> torch.Tensor:
    """Bool keep mask ``[T, cols]`` of every row of a call, in row order.

    ``plan`` is the call's ``LoRAPlan``, ``seeds`` int64 ``[N]``. Rows routed to ``-1`` (no
    adapter) get an arbitrary mask: they never reach an adapter.
    """
    t = plan.num_rows
    device = plan.device
    pos = torch.arange(t, device=device, dtype=torch.int64)
    rows = plan.sorted_rows.to(torch.int64)
    client = plan.client_ids[rows].clamp(min=0)
    j = pos - plan.offsets.to(torch.int64)[client]
    keep = keep_mask(seeds.to(device, torch.int64)[client][:, None], j[:, None],
                     torch.arange(cols, device=device, dtype=torch.int64)[None, :], p)
    out = torch.empty_like(keep)
    out[rows] = keep
    return out


def next_call_seeds(base: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
    """Per-client seeds of one call from base seeds and per-client call counters (int64 ``[N]``)."""
    return mix32((base & MASK32) ^ mix32(draws & MASK32))
