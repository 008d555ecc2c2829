"""Triton backend: fused kernels for the LoRA part of ``multi_lora_linear``.

Three kernels, each launched on a grid whose size depends only on the shapes (never on the
routing), so every launch can be captured by CUDA graphs:

``_shrink_kernel``  ``P[pos, :r_c] = s? * Z[row] @ M_c[:r_c]^T`` for every routed row.
    Forward: ``H = X A_c^T`` (Z = X, M = A). Backward: ``G = s_c dY B_c`` (Z = dY, M = B^T).
    One program owns one (client, row-tile) item of the plan and one rank chunk; it streams
    the big operand ``Z`` once along K and keeps the ``[BLOCK_M, BLOCK_R]`` result in fp32
    registers. ``P`` is stored in fp32, indexed by the row's position in ``plan.sorted_rows``
    so that later kernels read a client's rows as one contiguous run.

``_expand_kernel``  ``Out[row] += s? * P[pos, :r_c] @ M_c[:r_c]``, read-modify-write of the
    base output. Forward: ``y += s_c H B_c^T``. Backward: ``dx += G A_c``. The loop over the
    rank stops at the client's own rank, so a rank-4 client does a quarter of a rank-16
    client's work within the same launch.

``_weight_grad_kernel``  ``dW_c[r, n] = s? * sum_t P[t, r] Q[t, n]`` over all rows t of
    client c: ``dA_c = G_c^T X_c`` and ``dB_c^T = s_c H_c^T dY_c``. One program owns one
    complete ``[BLOCK_R, BLOCK_N]`` output tile of one client and loops over every row of that
    client, so when it finishes it holds the *final* gradient values: it squares and sums
    them in registers and writes one fp32 partial per tile. Summing those partials afterwards
    gives ``||dA_c||^2 + ||dB_c||^2`` exactly as the reference does, with no atomics, so the
    result is deterministic. Frozen clients (``trainable[c] = False``), clients without rows
    and rank chunks past the client's rank skip the row loop and write zeros.

The interpreter (``TRITON_INTERPRET=1``) runs the same kernels on CPU tensors; there every
load is cast to fp32 at once because half-precision loads come back garbled in it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .checks import ClientParams
from .multi_lora import triton_interpreting
from .plan import LoRAPlan

DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Debug aid for tests: when set to a float (e.g. nan), every buffer the launchers allocate
# is filled with it first, so an element a kernel forgets to write shows up in the result.
poison_value: float | None = None


def _alloc(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if poison_value is None:
        return torch.empty(shape, dtype=dtype, device=device)
    return torch.full(shape, poison_value, dtype=dtype, device=device)


@triton.jit
def _shrink_kernel(
    z_ptr, stride_z,
    m_ptr, stride_mc, stride_mr, stride_mk,
    p_ptr, stride_p,
    sorted_rows_ptr, offsets_ptr, tile_client_ptr, tile_start_ptr, ranks_ptr, scaling_ptr,
    K,
    APPLY_SCALE: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    item = tl.program_id(0)
    r0 = tl.program_id(1) * BLOCK_R
    client = tl.load(tile_client_ptr + item)
    if client < 0:  # unused slot of the fixed-size work list
        return
    rank = tl.load(ranks_ptr + client)
    if r0 >= rank:
        return
    pos = tl.load(tile_start_ptr + item) + tl.arange(0, BLOCK_M)
    row_mask = pos < tl.load(offsets_ptr + client + 1)
    rows = tl.load(sorted_rows_ptr + pos, mask=row_mask, other=0).to(tl.int64)
    r = r0 + tl.arange(0, BLOCK_R)
    r_mask = r < rank
    m_base = m_ptr + client.to(tl.int64) * stride_mc

    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_mask = k < K
        z = tl.load(z_ptr + rows[:, None] * stride_z + k[None, :],
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        m = tl.load(m_base + r[None, :] * stride_mr + k[:, None] * stride_mk,
                    mask=k_mask[:, None] & r_mask[None, :], other=0.0)
        if UPCAST:
            z = z.to(tl.float32)
            m = m.to(tl.float32)
        acc = tl.dot(z, m, acc, input_precision=PRECISION)
    if APPLY_SCALE:
        acc *= tl.load(scaling_ptr + client)
    tl.store(p_ptr + pos[:, None].to(tl.int64) * stride_p + r[None, :], acc,
             mask=row_mask[:, None])


@triton.jit
def _expand_kernel(
    p_ptr, stride_p,
    m_ptr, stride_mc, stride_mr, stride_mn,
    out_ptr, stride_out,
    sorted_rows_ptr, offsets_ptr, tile_client_ptr, tile_start_ptr, ranks_ptr, scaling_ptr,
    N_OUT,
    APPLY_SCALE: tl.constexpr, MIX_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):
    item = tl.program_id(0)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    client = tl.load(tile_client_ptr + item)
    if client < 0:
        return
    rank = tl.load(ranks_ptr + client)
    if rank == 0:
        return
    pos = tl.load(tile_start_ptr + item) + tl.arange(0, BLOCK_M)
    row_mask = pos < tl.load(offsets_ptr + client + 1)
    rows = tl.load(sorted_rows_ptr + pos, mask=row_mask, other=0).to(tl.int64)
    n_mask = n < N_OUT
    m_base = m_ptr + client.to(tl.int64) * stride_mc

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, rank, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        r_mask = r < rank
        p = tl.load(p_ptr + pos[:, None].to(tl.int64) * stride_p + r[None, :],
                    mask=row_mask[:, None] & r_mask[None, :], other=0.0)
        m = tl.load(m_base + r[:, None] * stride_mr + n[None, :] * stride_mn,
                    mask=r_mask[:, None] & n_mask[None, :], other=0.0).to(tl.float32)
        acc = tl.dot(p, m, acc, input_precision=MIX_PRECISION)
    if APPLY_SCALE:
        acc *= tl.load(scaling_ptr + client)
    out_ptrs = out_ptr + rows[:, None] * stride_out + n[None, :]
    io_mask = row_mask[:, None] & n_mask[None, :]
    base = tl.load(out_ptrs, mask=io_mask, other=0.0).to(tl.float32)
    tl.store(out_ptrs, (base + acc).to(out_ptr.dtype.element_ty), mask=io_mask)


@triton.jit
def _weight_grad_kernel(
    p_ptr, stride_p,
    q_ptr, stride_q,
    out_ptr, stride_oc, stride_or, stride_on,
    partial_ptr,
    sorted_rows_ptr, offsets_ptr, ranks_ptr, scaling_ptr, trainable_ptr,
    N_OUT, R_MAX,
    APPLY_SCALE: tl.constexpr, MIX_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):
    client = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_n = tl.program_id(2)
    r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < N_OUT
    rank = tl.load(ranks_ptr + client)
    r_mask = r < rank
    start = tl.load(offsets_ptr + client)
    end = tl.load(offsets_ptr + client + 1)
    active = (tl.load(trainable_ptr + client) != 0) & (pid_r * BLOCK_R < rank)

    acc = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
    if active:
        for m0 in range(start, end, BLOCK_M):
            pos = m0 + tl.arange(0, BLOCK_M)
            row_mask = pos < end
            rows = tl.load(sorted_rows_ptr + pos, mask=row_mask, other=0).to(tl.int64)
            p = tl.load(p_ptr + pos[:, None].to(tl.int64) * stride_p + r[None, :],
                        mask=row_mask[:, None] & r_mask[None, :], other=0.0)
            q = tl.load(q_ptr + rows[:, None] * stride_q + n[None, :],
                        mask=row_mask[:, None] & n_mask[None, :], other=0.0).to(tl.float32)
            acc = tl.dot(tl.trans(p), q, acc, input_precision=MIX_PRECISION)
        if APPLY_SCALE:
            acc *= tl.load(scaling_ptr + client)

    # The tile is complete (every row of the client is in it): its square is exact.
    num_n_tiles = tl.num_programs(2)
    tl.store(partial_ptr + (client * tl.num_programs(1) + pid_r) * num_n_tiles + pid_n,
             tl.sum(tl.sum(acc * acc, axis=1), axis=0))
    out_ptrs = out_ptr + client.to(tl.int64) * stride_oc + r[:, None] * stride_or + n[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty),
             mask=(r[:, None] < R_MAX) & n_mask[None, :])


def _rank_block(r_max: int) -> int:
    """Rank chunk: a power of two in [16, 64] (tl.dot needs >= 16 on every side)."""
    return min(64, max(16, triton.next_power_of_2(max(r_max, 1))))


def _config(dtype: torch.dtype) -> dict:
    interp = triton_interpreting()
    # fp32 inputs follow torch's tf32 switch, so "tf32 off" means ieee here too.
    tf32 = torch.backends.cuda.matmul.allow_tf32 and not interp
    precision = "tf32" if (dtype == torch.float32 and tf32) else "ieee"
    return {
        "UPCAST": interp or dtype == torch.float32,
        "PRECISION": precision,
        # Dots of the fp32 rank intermediate with a half-precision operand: the half
        # operand is exact in tf32 (<= 10 mantissa bits), so tf32 only drops low bits of
        # the intermediate, far below the output's own rounding.
        "MIX_PRECISION": "ieee" if interp else ("tf32" if dtype != torch.float32 else precision),
        # The interpreter runs one program at a time: few, large blocks are fastest there.
        "BLOCK_M": 64,
        "BLOCK_K": 128 if interp else 64,
        "BLOCK_N": 128,
    }


def _shrink(z, m, m_strides, plan, params, r_max, apply_scale, cfg):
    """Rank intermediate ``[T, R_PAD]`` (fp32, sorted-position rows) of ``z @ M_c^T``."""
    block_r = _rank_block(r_max)
    r_chunks = triton.cdiv(r_max, block_r)
    tiles = plan.tiles(cfg["BLOCK_M"])
    p = _alloc((max(plan.num_rows, 1), r_chunks * block_r), torch.float32, z.device)
    if r_max == 0:
        return p
    _shrink_kernel[(tiles.max_tiles, r_chunks)](
        z, z.stride(0), m, *m_strides, p, p.stride(0),
        plan.sorted_rows, plan.offsets, tiles.tile_client, tiles.tile_start,
        params.ranks, params.scaling, z.shape[1],
        APPLY_SCALE=apply_scale, UPCAST=cfg["UPCAST"], PRECISION=cfg["PRECISION"],
        BLOCK_M=cfg["BLOCK_M"], BLOCK_R=block_r, BLOCK_K=cfg["BLOCK_K"],
    )
    return p


def _expand(p, m, m_strides, out, plan, params, r_max, apply_scale, cfg):
    """``out[row] += s? * P[pos] @ M_c`` in place; ``out`` is ``[T, n_out]`` contiguous."""
    if r_max == 0:
        return
    tiles = plan.tiles(cfg["BLOCK_M"])
    n_out = out.shape[1]
    _expand_kernel[(tiles.max_tiles, triton.cdiv(n_out, cfg["BLOCK_N"]))](
        p, p.stride(0), m, *m_strides, out, out.stride(0),
        plan.sorted_rows, plan.offsets, tiles.tile_client, tiles.tile_start,
        params.ranks, params.scaling, n_out,
        APPLY_SCALE=apply_scale, MIX_PRECISION=cfg["MIX_PRECISION"],
        BLOCK_M=cfg["BLOCK_M"], BLOCK_R=_rank_block(r_max), BLOCK_N=cfg["BLOCK_N"],
    )


def _weight_grad(p, q, out, out_strides, n_out, plan, params, r_max, apply_scale, cfg):
    """Fill ``out`` with every client's complete gradient; return fp32 ``[N]`` squared norms."""
    n = plan.num_clients
    block_r = _rank_block(r_max)
    grid = (n, triton.cdiv(r_max, block_r), triton.cdiv(n_out, cfg["BLOCK_N"]))
    partial = _alloc((n, grid[1] * grid[2]), torch.float32, q.device)
    if r_max == 0 or n_out == 0:
        out.zero_()
        return torch.zeros(n, dtype=torch.float32, device=q.device)
    _weight_grad_kernel[grid](
        p, p.stride(0), q, q.stride(0), out, *out_strides, partial,
        plan.sorted_rows, plan.offsets, params.ranks, params.scaling, params.trainable,
        n_out, r_max,
        APPLY_SCALE=apply_scale, MIX_PRECISION=cfg["MIX_PRECISION"],
        BLOCK_M=cfg["BLOCK_M"], BLOCK_R=block_r, BLOCK_N=cfg["BLOCK_N"],
    )
    return partial.sum(dim=1)


def lora_forward(
    x2d: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    plan: LoRAPlan,
    params: ClientParams,
    out: torch.Tensor,
) -> torch.Tensor:
    """Add ``s_c (x A_c^T) B_c^T`` into ``out [T, d_out]`` in place.

    Returns the fp32 rank intermediate ``H [T, R_PAD]`` (rows by sorted position), which the
    backward reuses for ``dB``.
    """
    cfg = _config(x2d.dtype)
    n, r_max, _ = lora_a.shape
    a_strides = (lora_a.stride(0), lora_a.stride(1), lora_a.stride(2))
    h = _shrink(x2d, lora_a, a_strides, plan, params, r_max, False, cfg)
    # B_c seen as M_c[r, n] = B[c, n, r].
    b_strides = (lora_b.stride(0), lora_b.stride(2), lora_b.stride(1))
    _expand(h, lora_b, b_strides, out, plan, params, r_max, True, cfg)
    return h


def lora_backward(
    dy2d: torch.Tensor,
    x2d: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    plan: LoRAPlan,
    params: ClientParams,
    saved: torch.Tensor,
    dx: torch.Tensor | None,
    weight_grads: bool,
    grad_sqnorm: torch.Tensor | None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """LoRA backward: ``dx += G A_c`` in place, and ``(dA, dB)`` with fused squared norms.

    ``G = s_c dY B_c`` is formed once (fp32) and serves both ``dx`` and ``dA``; ``H`` comes
    from the forward (``saved``).
    """
    if dx is None and not weight_grads:
        return None, None
    cfg = _config(dy2d.dtype)
    n, r_max, d_in = lora_a.shape
    d_out = lora_b.shape[1]
    # B_c^T seen as M_c[r, k] = B[c, k, r].
    bt_strides = (lora_b.stride(0), lora_b.stride(2), lora_b.stride(1))
    g = _shrink(dy2d, lora_b, bt_strides, plan, params, r_max, True, cfg)
    if dx is not None:
        a_strides = (lora_a.stride(0), lora_a.stride(1), lora_a.stride(2))
        _expand(g, lora_a, a_strides, dx, plan, params, r_max, False, cfg)
    if not weight_grads:
        return None, None
    d_a = _alloc(tuple(lora_a.shape), lora_a.dtype, lora_a.device)
    d_b = _alloc(tuple(lora_b.shape), lora_b.dtype, lora_b.device)
    norm_a = _weight_grad(g, x2d, d_a, (d_a.stride(0), d_a.stride(1), d_a.stride(2)), d_in,
                          plan, params, r_max, False, cfg)
    norm_b = _weight_grad(saved, dy2d, d_b, (d_b.stride(0), d_b.stride(2), d_b.stride(1)), d_out,
                          plan, params, r_max, True, cfg)
    if grad_sqnorm is not None:
        grad_sqnorm += norm_a + norm_b
    return d_a, d_b
