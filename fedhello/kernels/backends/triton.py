"""Triton backend (``backend="triton"``): the launchers of the fused kernels in ``triton_kernels.py``.

The kernels and the launchers live in two files because they change for different reasons: a
kernel's body is the numerics (and what the static sm_90 gate compiles), a launcher is the host
side of one call: work lists from the plan, buffers, grid sizes, split-K, the tuning table.

Launch grids depend only on shapes and nothing is read back to the host, so a whole call can be
captured by CUDA graphs. CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import functools

import torch
import triton

from .. import tuning
from ..checks import ClientParams
from ..contract import Grads
from ..dropout import keep_threshold
from ..plan import LoRAPlan
from ..runtime import triton_interpreting
# Imported by name, not read off the module: the launchers look the kernels up in this namespace,
# which is where the static sm_90 gate (tools/sm90_record.py) swaps them for launch recorders.
from .triton_kernels import _expand_kernel, _reduce_chunks_kernel, _shrink_kernel, _sum_splits_kernel, _weight_grad_kernel

NAME = "triton"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
FUSED_DROPOUT = True

# Debug aid for tests: when set to a float (e.g. nan), every buffer the launchers allocate
# is filled with it first, so an element a kernel forgets to write shows up in the result.
poison_value: float | None = None


def _alloc(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if poison_value is None:
        return torch.empty(shape, dtype=dtype, device=device)
    return torch.full(shape, poison_value, dtype=dtype, device=device)


def _r_pad(r_max: int) -> int:
    """Rank tile: a power of two >= 16 (``tl.dot`` needs >= 16 on every side)."""
    return max(16, triton.next_power_of_2(max(r_max, 1)))


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _programs_wanted(device: torch.device) -> int:
    """About two waves of programs fill a GPU; the interpreter wants as few as possible."""
    if device.type != "cuda":
        return 1
    return 2 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())


class _Call:
    """Everything the launchers of one call share: settings, dtype flags, dropout arguments."""

    def __init__(self, dtype: torch.dtype, r_max: int, plan: LoRAPlan, params: ClientParams) -> None:
        interp = triton_interpreting()
        self.r_max, self.r_pad = r_max, _r_pad(r_max)
        self.cfg = tuning.lookup(dtype, self.r_pad, interp)
        # fp32 inputs follow torch's tf32 switch, so "tf32 off" means ieee here too.
        tf32 = torch.backends.cuda.matmul.allow_tf32 and not interp
        self.precision = "tf32" if (dtype == torch.float32 and tf32) else "ieee"
        # Dots of an fp32 rank intermediate with a half-precision operand: the half operand is
        # exact in tf32 (<= 10 mantissa bits), so tf32 only drops low bits of the intermediate,
        # far below the output's own rounding.
        self.mix_precision = "ieee" if interp else ("tf32" if dtype != torch.float32 else self.precision)
        self.upcast = interp or dtype == torch.float32
        self.plan, self.params = plan, params
        self.dropout = params.dropout_p > 0.0
        self.threshold = keep_threshold(params.dropout_p)
        self.inv_keep = 1.0 / (1.0 - params.dropout_p)
        self.seeds = params.dropout_seeds if self.dropout else params.ranks  # any int tensor when unused
        self.launch = {"num_warps": self.cfg.num_warps, "num_stages": self.cfg.num_stages}

    def rank_constexprs(self) -> dict:
        return {"R_MAX": self.r_max, "R_PAD": self.r_pad}


def _shrink(call: _Call, x: torch.Tensor, lora_a: torch.Tensor) -> torch.Tensor:
    """``H = drop(X) A_c^T``: fp32 ``[T, R_PAD]`` by sorted position, zero past each rank."""
    plan, cfg = call.plan, call.cfg
    t, k = x.shape
    tiles = plan.tiles(cfg.block_m)
    # Split K when the tiles alone would leave most of the GPU idle (small T).
    k_steps = triton.cdiv(k, cfg.block_k)
    splits = max(1, min(k_steps, _programs_wanted(x.device) // max(tiles.max_tiles, 1)))
    k_per_split = triton.cdiv(k_steps, splits) * cfg.block_k
    splits = triton.cdiv(k, k_per_split) if k else 1
    rows_alloc = max(t, 1)
    out = _alloc((splits, rows_alloc, call.r_pad), torch.float32, x.device)
    _shrink_kernel[(tiles.max_tiles, splits)](
        x, x.stride(0), lora_a, lora_a.stride(0), lora_a.stride(1), out, out.stride(0),
        plan.sorted_rows, plan.offsets, tiles.tile_client, tiles.tile_start, call.params.ranks, call.seeds,
        k, k_per_split, plan.num_clients, call.threshold, call.inv_keep,
        **call.rank_constexprs(), CONTIGUOUS=plan.contiguous, DROPOUT=call.dropout, UPCAST=call.upcast,
        PRECISION=call.precision, BLOCK_M=cfg.block_m, BLOCK_K=cfg.block_k, **call.launch,
    )
    if splits == 1:
        return out[0]
    return _sum_splits(call, out, apply_scale=False)


def _sum_splits(call: _Call, parts: torch.Tensor, apply_scale: bool) -> torch.Tensor:
    """``[S, T, R_PAD]`` fp32 partials -> ``[T, R_PAD]``, times ``s_c`` if ``apply_scale``."""
    plan, cfg = call.plan, call.cfg
    tiles = plan.tiles(cfg.block_m)
    out = _alloc(tuple(parts.shape[1:]), torch.float32, parts.device)
    _sum_splits_kernel[(tiles.max_tiles,)](
        parts, parts.stride(0), out, plan.sorted_rows, plan.offsets, tiles.tile_client, tiles.tile_start,
        call.params.scaling, parts.shape[0], plan.num_clients,
        APPLY_SCALE=apply_scale, R_PAD=call.r_pad, BLOCK_M=cfg.block_m, **call.launch,
    )
    return out


def _expand(call: _Call, p: torch.Tensor, m: torch.Tensor, m_strides: tuple[int, int, int],
            bias: torch.Tensor | None, n_out: int, dtype: torch.dtype, apply_scale: bool,
            dropout: bool) -> torch.Tensor:
    """Write ``Out [T, n_out] = s? * P[pos] @ M_c (+ fp32 bias)`` for every row (bias/zero if unrouted)."""
    plan, cfg = call.plan, call.cfg
    out = _alloc((plan.num_rows, n_out), dtype, p.device)
    tiles = plan.tiles(cfg.block_m, include_unrouted=True)
    _expand_kernel[(tiles.max_tiles, triton.cdiv(n_out, cfg.block_n))](
        p, m, *m_strides, bias if bias is not None else out, out, out.stride(0),
        plan.sorted_rows, plan.offsets, tiles.tile_client, tiles.tile_start,
        call.params.ranks, call.params.scaling, call.seeds,
        n_out, plan.num_clients, call.threshold, call.inv_keep,
        **call.rank_constexprs(), CONTIGUOUS=plan.contiguous, APPLY_SCALE=apply_scale,
        HAS_BIAS=bias is not None, DROPOUT=dropout, MIX_PRECISION=call.mix_precision,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, **call.launch,
    )
    return out


def _weight_grad(call: _Call, q: torch.Tensor, p: torch.Tensor, out: torch.Tensor,
                 out_strides: tuple[int, int, int], norms: bool, *, lora_b: torch.Tensor | None = None,
                 apply_scale: bool, dropout: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Fill ``out`` with every client's gradient ``sum_rows Q^T P``; return (norms [N], G partials).

    With ``lora_b`` (the pass over dY) the kernel also writes ``dY B_c`` per column tile,
    returned as fp32 ``[n_tiles, T, R_PAD]`` partials.
    """
    plan, cfg = call.plan, call.cfg
    n_cols = q.shape[1]
    chunks = plan.tiles(cfg.chunk)
    fuse_g = lora_b is not None
    block_n = cfg.dy_block_n if fuse_g else cfg.block_n
    n_tiles = triton.cdiv(n_cols, block_n)
    device = q.device
    parts = _alloc((chunks.max_tiles, n_cols, call.r_pad), torch.float32, device)
    norm_parts = _alloc((plan.num_clients, n_tiles), torch.float32, device) if norms else parts
    gpart = _alloc((n_tiles, max(plan.num_rows, 1), call.r_pad), torch.float32, device) if fuse_g else parts
    b = lora_b if fuse_g else out
    _weight_grad_kernel[(chunks.max_tiles, n_tiles)](
        q, q.stride(0), p, b, b.stride(0), b.stride(1), gpart, gpart.stride(0) if fuse_g else 0,
        out, *out_strides, parts, norm_parts,
        plan.sorted_rows, plan.offsets, chunks.tile_client, chunks.tile_start, chunks.client_first,
        call.params.ranks, call.params.scaling, call.params.trainable, call.seeds,
        n_cols, cfg.chunk, call.threshold, call.inv_keep,
        **call.rank_constexprs(), CONTIGUOUS=plan.contiguous, FUSE_G=fuse_g, APPLY_SCALE=apply_scale,
        DROPOUT=dropout, NORMS=norms, UPCAST=call.upcast, PRECISION=call.precision,
        MIX_PRECISION=call.mix_precision, BLOCK_M=cfg.block_m, BLOCK_N=block_n, **call.launch,
    )
    _reduce_chunks_kernel[(plan.num_clients, n_tiles)](
        parts, out, *out_strides, norm_parts, chunks.client_first, call.params.trainable, n_cols,
        **call.rank_constexprs(), NORMS=norms, BLOCK_N=block_n, **call.launch,
    )
    return (norm_parts.sum(dim=1) if norms else None), (gpart if fuse_g else None)


def saved_shape(rows: int, r_max: int) -> tuple[int, ...]:
    """Shape of ``H``, the float32 intermediate ``lora_forward`` returns (see ``_shrink``)."""
    return (max(rows, 1), _r_pad(r_max))


def lora_forward(x2d: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, bias: torch.Tensor | None,
                 plan: LoRAPlan, params: ClientParams) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``contract.Backend.lora_forward`` as a shrink and an expand that writes every row of ``Out`` once;
    ``saved`` is ``H``, fp32 ``[T, R_PAD]`` by sorted position, which the backward reuses for ``dB``."""
    n, r_max, _ = lora_a.shape
    call = _Call(x2d.dtype, r_max, plan, params)
    h = _shrink(call, x2d, lora_a)
    # The bias is added in fp32; read as fp32 it is a 4-byte load per thread, where a half-precision
    # bias in the accumulator's layout would be one scalar 2-byte load per thread.
    bias32 = bias.to(torch.float32).contiguous() if bias is not None else None  # the kernel reads it unit-stride
    # B_c seen as M_c[r, n] = B[c, n, r].
    out = _expand(call, h, lora_b, (lora_b.stride(0), lora_b.stride(2), lora_b.stride(1)), bias32,
                  lora_b.shape[1], x2d.dtype, apply_scale=True, dropout=False)
    return out, h


def lora_backward(dy2d: torch.Tensor, x2d: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, plan: LoRAPlan,
                  params: ClientParams, saved: torch.Tensor | None, need_dx: bool, weight_grads: bool,
                  grad_sqnorm: torch.Tensor | None) -> Grads:
    """``contract.Backend.lora_backward`` with fused squared norms: one pass over dY forms ``G = s_c
    dY B_c`` and ``dB`` (from ``H``, the forward's ``saved``), then ``dx`` (every row written) and ``dA``."""
    if not (need_dx or weight_grads):
        return None, None, None
    n, r_max, d_in = lora_a.shape
    d_out = lora_b.shape[1]
    call = _Call(dy2d.dtype, r_max, plan, params)
    norms = grad_sqnorm is not None
    d_b = _alloc(tuple(lora_b.shape), lora_b.dtype, lora_b.device)
    # dB[c, n, r]: one pass over dY gives dB and this column tile's share of G = dY B_c. When
    # no weight gradient is wanted the same pass still forms G (frozen flags off via trainable).
    params_b = params if weight_grads else _frozen(params)
    call_b = call if weight_grads else _Call(dy2d.dtype, r_max, plan, params_b)
    norm_b, gpart = _weight_grad(call_b, dy2d, saved, d_b, (d_b.stride(0), d_b.stride(1), d_b.stride(2)),
                                 norms and weight_grads, lora_b=lora_b, apply_scale=True, dropout=False)
    g = _sum_splits(call, gpart, apply_scale=True)
    dx = None
    if need_dx:
        # A_c seen as M_c[r, k] = A[c, r, k].
        dx = _expand(call, g, lora_a, (lora_a.stride(0), lora_a.stride(1), lora_a.stride(2)), None, d_in,
                     dy2d.dtype, apply_scale=False, dropout=call.dropout)
    if not weight_grads:
        return dx, None, None
    d_a = _alloc(tuple(lora_a.shape), lora_a.dtype, lora_a.device)
    norm_a, _ = _weight_grad(call, x2d, g, d_a, (d_a.stride(0), d_a.stride(2), d_a.stride(1)), norms,
                             apply_scale=False, dropout=call.dropout)
    if grad_sqnorm is not None:
        grad_sqnorm += norm_a + norm_b
    return dx, d_a, d_b


def _frozen(params: ClientParams) -> ClientParams:
    """The same settings with every client frozen (no weight-gradient work)."""
    return ClientParams(params.scaling, params.ranks, torch.zeros_like(params.trainable),
                        params.dropout_p, params.dropout_seeds)
