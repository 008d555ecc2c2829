"""The ``@triton.jit`` kernels of the Triton backend (their launchers are in ``triton.py``).

Every LoRA kernel is memory-bound (about 1 GFLOP against 70-140 MB at the headline size), so
the design counts bytes: each big activation (X, dY, y, dx) is touched by exactly one LoRA
kernel, once (``benchmarks/byte_model.py`` counts them). Launch grids depend only on shapes,
never on the routing, and nothing is read back to the host, so a whole call can be captured by
CUDA graphs.

Forward (``y = bias + s_c H B_c^T``, then cuBLAS adds ``x W^T`` into ``y``):

``_shrink_kernel``  ``H[pos] = drop(X[row]) A_c^T`` for every (client, row-tile) item, fp32,
    ``[T, R_PAD]`` by position in ``plan.sorted_rows``. Columns past the client's rank are
    written as zeros, so later kernels need no rank mask. With few tiles (small T) the
    reduction over ``d_in`` is split across programs into fp32 partials that
    ``_sum_splits_kernel`` adds in a fixed order.
``_expand_kernel``  ``Out[row] = s_c P[pos] M_c (+ bias)``, *writing* every row of the
    output once, rows without adapter included (bias or zero): the base GEMM then accumulates
    into it (``addmm_`` with beta = 1), whose read of ``Out`` hides inside a compute-bound GEMM.
    The forward writes ``y``; the backward writes ``dx``'s LoRA part (``G A_c``, masked by dropout).

Backward:

``_weight_grad_kernel``  one program per (row chunk of one client, column tile) sums
    ``dW[n, r] = sum_rows Q[row, n] P[pos, r]`` over the chunk's rows: ``dB_c = s_c dY^T H``
    (Q = dY) and ``dA_c^T = drop(X)^T G`` (Q = X). In the pass over dY it also forms this column
    tile's share of ``G = dY B_c`` (fp32 partials per column tile), so dY is read once for both
    ``G`` and ``dB``. A client whose rows fit one chunk gets its final gradient tile right there,
    squared and summed in registers for the fused norm; a client with more chunks writes fp32
    partials, so a client holding most of the batch is spread over many programs instead of one.
``_reduce_chunks_kernel``  for clients with several chunks (and frozen or empty clients): adds
    the partials in chunk order, writes the final gradient (zeros for frozen/empty clients) and
    squares the *final* sums. Norms are therefore exact (``||dA_c||^2 + ||dB_c||^2`` of the
    complete gradient) and bit-identical run to run: no atomics anywhere.
``_sum_splits_kernel``  ``G[pos] = s_c * sum_s Gpart[s, pos]`` (and the shrink's split-K sum).

LoRA dropout lives in the kernels: the mask bit of (client c, its j-th row, column k) is the
counter-based hash of ``dropout.py``; the shrink and ``dA`` zero dropped entries of X and scale
their fp32 result by ``1 / (1 - p)``, the ``dx`` expand masks its output the same way.

Adapters may be float32 under float16/bfloat16 activations (fp32 master banks): the kernels load
them as stored and convert the tile in registers, so no cast copy is made per call.

Loads: adapter tiles are bounded by the constexprs ``R_PAD``/``R_MAX``, never by the run-time
rank, so the loads along a contiguous dimension stay vectorised; the rank tail is zeroed with
``tl.where``. The interpreter (``TRITON_INTERPRET=1``) runs the same kernels on CPU tensors; there
every load is cast to fp32 at once because half-precision loads come back garbled in it.
"""

import triton
import triton.language as tl

# ----------------------------------------------------------------------------------- helpers
@triton.jit
def _mix32(x):
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    return x ^ (x >> 16)


@triton.jit
def _keep(seed, j, k, threshold):
    """Dropout keep bits ``[len(j), len(k)]`` (see ``dropout.py``); all operands uint32."""
    h = _mix32((j * 0x9E3779B1)[:, None] ^ seed)
    h = _mix32(h ^ (k * 0x85EBCA77)[None, :])
    return h >= threshold


@triton.jit
def _item_rows(tile_client_ptr, tile_start_ptr, offsets_ptr, sorted_rows_ptr, item, NUM_CLIENTS,
               BLOCK_M: tl.constexpr, CONTIGUOUS: tl.constexpr):
    """Client, positions, row mask and row indices of one (client, row-tile) item.

    Item client ``NUM_CLIENTS`` stands for the rows routed to -1 (positions ``0 .. offsets[0]``).
    """
    client = tl.load(tile_client_ptr + item)
    end = tl.load(offsets_ptr + tl.where(client == NUM_CLIENTS, 0, client + 1))
    pos = tl.load(tile_start_ptr + item) + tl.arange(0, BLOCK_M)
    row_mask = pos < end
    if CONTIGUOUS:
        rows = pos.to(tl.int64)
    else:
        rows = tl.load(sorted_rows_ptr + pos, mask=row_mask, other=0).to(tl.int64)
    return client, pos, row_mask, rows


@triton.jit
def _store_final_tile(acc, client, pid_n, n, n_mask, r, out_ptr, stride_oc, stride_on, stride_or,
                      norm_ptr, R_MAX: tl.constexpr, R_PAD: tl.constexpr, NORMS: tl.constexpr):
    """Write one client's final ``[BLOCK_N, R_PAD]`` gradient tile and, with ``NORMS``, its squared
    sum into the norm partials ``[N, column tiles]`` (one owner per slot: deterministic)."""
    if NORMS:
        tl.store(norm_ptr + client * tl.num_programs(1) + pid_n, tl.sum(tl.sum(acc * acc, axis=1), axis=0))
    o_mask = n_mask[:, None]
    if R_PAD != R_MAX:
        o_mask = o_mask & (r < R_MAX)[None, :]
    tl.store(out_ptr + client.to(tl.int64) * stride_oc + n[:, None] * stride_on + r[None, :] * stride_or,
             acc.to(out_ptr.dtype.element_ty), mask=o_mask)


# ----------------------------------------------------------------------------------- kernels
@triton.jit
def _shrink_kernel(
    x_ptr, stride_x,
    a_ptr, stride_ac, stride_ar,
    h_ptr, split_stride,
    sorted_rows_ptr, offsets_ptr, tile_client_ptr, tile_start_ptr, ranks_ptr, seeds_ptr,
    K, K_PER_SPLIT, NUM_CLIENTS, threshold, inv_keep,
    R_MAX: tl.constexpr, R_PAD: tl.constexpr,
    CONTIGUOUS: tl.constexpr, DROPOUT: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    item = tl.program_id(0)
    split = tl.program_id(1)
    client, pos, row_mask, rows = _item_rows(tile_client_ptr, tile_start_ptr, offsets_ptr, sorted_rows_ptr,
                                             item, NUM_CLIENTS, BLOCK_M, CONTIGUOUS)
    if client < 0:  # unused slot of the fixed-size work list
        return
    rank = tl.load(ranks_ptr + client)
    r = tl.arange(0, R_PAD)
    a_base = a_ptr + client.to(tl.int64) * stride_ac
    if DROPOUT:
        seed = tl.load(seeds_ptr + client).to(tl.uint32)
        j = (pos - tl.load(offsets_ptr + client)).to(tl.uint32)
    k_lo = split * K_PER_SPLIT
    k_hi = tl.minimum(k_lo + K_PER_SPLIT, K)
    acc = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        # Masks only on the row dimension and on K (divisible by 16 in every real model, which
        # Triton specialises on), so both loads stay vectorised along their contiguous axis.
        x = tl.load(x_ptr + rows[:, None] * stride_x + k[None, :],
                    mask=row_mask[:, None] & (k < K)[None, :], other=0.0)
        a_mask = (k < K)[:, None]
        if R_PAD != R_MAX:
            a_mask = a_mask & (r < R_MAX)[None, :]
        a = tl.load(a_base + r[None, :] * stride_ar + k[:, None], mask=a_mask, other=0.0)
        a = tl.where((r < rank)[None, :], a, 0.0)
        if DROPOUT:
            x = tl.where(_keep(seed, j, k.to(tl.uint32), threshold), x, 0.0)
        if UPCAST:
            x = x.to(tl.float32)
            a = a.to(tl.float32)
        else:  # float32 master adapters under half activations: converted in registers, no copy
            a = a.to(x.dtype)
        acc = tl.dot(x, a, acc, input_precision=PRECISION)
    if DROPOUT:
        acc *= inv_keep
    # 64-bit: split_stride (= T * R_PAD) times the split index passes 2^31 at large T.
    tl.store(h_ptr + split.to(tl.int64) * split_stride + pos[:, None].to(tl.int64) * R_PAD + r[None, :], acc,
             mask=row_mask[:, None])


@triton.jit
def _sum_splits_kernel(
    part_ptr, split_stride, out_ptr,
    sorted_rows_ptr, offsets_ptr, tile_client_ptr, tile_start_ptr, scaling_ptr,
    SPLITS, NUM_CLIENTS,
    APPLY_SCALE: tl.constexpr, R_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
):
    item = tl.program_id(0)
    client, pos, row_mask, rows = _item_rows(tile_client_ptr, tile_start_ptr, offsets_ptr, sorted_rows_ptr,
                                             item, NUM_CLIENTS, BLOCK_M, True)
    if client < 0:
        return
    r = tl.arange(0, R_PAD)
    offs = pos[:, None].to(tl.int64) * R_PAD + r[None, :]
    acc = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    # The pointers step one split at a time: s * split_stride in 32 bits would wrap at large T.
    parts = part_ptr + offs
    for s in range(0, SPLITS):  # fixed order: deterministic
        acc += tl.load(parts, mask=row_mask[:, None], other=0.0)
        parts += split_stride
    if APPLY_SCALE:
        acc *= tl.load(scaling_ptr + client)
    tl.store(out_ptr + offs, acc, mask=row_mask[:, None])


@triton.jit
def _expand_kernel(
    p_ptr,
    m_ptr, stride_mc, stride_mr, stride_mn,
    bias_ptr,
    out_ptr, stride_out,
    sorted_rows_ptr, offsets_ptr, tile_client_ptr, tile_start_ptr, ranks_ptr, scaling_ptr, seeds_ptr,
    N_OUT, NUM_CLIENTS, threshold, inv_keep,
    R_MAX: tl.constexpr, R_PAD: tl.constexpr,
    CONTIGUOUS: tl.constexpr, APPLY_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr,
    MIX_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    item = tl.program_id(0)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    client, pos, row_mask, rows = _item_rows(tile_client_ptr, tile_start_ptr, offsets_ptr, sorted_rows_ptr,
                                             item, NUM_CLIENTS, BLOCK_M, CONTIGUOUS)
    if client < 0:
        return
    n_mask = n < N_OUT
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if client < NUM_CLIENTS:  # a routed tile (else: rows without adapter, bias or zero only)
        rank = tl.load(ranks_ptr + client)
        r = tl.arange(0, R_PAD)
        p = tl.load(p_ptr + pos[:, None].to(tl.int64) * R_PAD + r[None, :], mask=row_mask[:, None], other=0.0)
        m_mask = n_mask[None, :]
        if R_PAD != R_MAX:
            m_mask = m_mask & (r < R_MAX)[:, None]
        m = tl.load(m_ptr + client.to(tl.int64) * stride_mc + r[:, None] * stride_mr + n[None, :] * stride_mn,
                    mask=m_mask, other=0.0)
        # P is zero past the rank; zeroing M's tail too keeps ignored entries (even inf/nan) out.
        m = tl.where((r < rank)[:, None], m.to(tl.float32), 0.0)
        acc = tl.dot(p, m, acc, input_precision=MIX_PRECISION)
        if APPLY_SCALE:
            acc *= tl.load(scaling_ptr + client)
        if DROPOUT:
            seed = tl.load(seeds_ptr + client).to(tl.uint32)
            j = (pos - tl.load(offsets_ptr + client)).to(tl.uint32)
            acc = tl.where(_keep(seed, j, n.to(tl.uint32), threshold), acc * inv_keep, 0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + n, mask=n_mask, other=0.0)[None, :]
    tl.store(out_ptr + rows[:, None] * stride_out + n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=row_mask[:, None] & n_mask[None, :])


@triton.jit
def _weight_grad_kernel(
    q_ptr, stride_q,
    p_ptr,
    b_ptr, stride_bc, stride_bn,
    gpart_ptr, gpart_stride,
    out_ptr, stride_oc, stride_on, stride_or,
    part_ptr, norm_ptr,
    sorted_rows_ptr, offsets_ptr, tile_client_ptr, tile_start_ptr, client_first_ptr,
    ranks_ptr, scaling_ptr, trainable_ptr, seeds_ptr,
    N_OUT, CHUNK, threshold, inv_keep,
    R_MAX: tl.constexpr, R_PAD: tl.constexpr,
    CONTIGUOUS: tl.constexpr, FUSE_G: tl.constexpr, APPLY_SCALE: tl.constexpr, DROPOUT: tl.constexpr,
    NORMS: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, MIX_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    item = tl.program_id(0)
    pid_n = tl.program_id(1)
    client = tl.load(tile_client_ptr + item)
    if client < 0:
        return
    chunk_start = tl.load(tile_start_ptr + item)
    chunk_end = tl.minimum(chunk_start + CHUNK, tl.load(offsets_ptr + client + 1))
    rank = tl.load(ranks_ptr + client)
    train = tl.load(trainable_ptr + client) != 0
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < N_OUT
    r = tl.arange(0, R_PAD)
    if FUSE_G:
        # This column tile of B_c, [BLOCK_N, R_PAD] (contiguous along r: vector loads).
        b_mask = n_mask[:, None]
        if R_PAD != R_MAX:
            b_mask = b_mask & (r < R_MAX)[None, :]
        b = tl.load(b_ptr + client.to(tl.int64) * stride_bc + n[:, None] * stride_bn + r[None, :],
                    mask=b_mask, other=0.0)
        b = tl.where((r < rank)[None, :], b, 0.0)
        if UPCAST:
            b = b.to(tl.float32)
    if DROPOUT:
        seed = tl.load(seeds_ptr + client).to(tl.uint32)
        first_pos = tl.load(offsets_ptr + client)
    acc = tl.zeros((BLOCK_N, R_PAD), dtype=tl.float32)
    for m0 in range(chunk_start, chunk_end, BLOCK_M):
        pos = m0 + tl.arange(0, BLOCK_M)
        row_mask = pos < chunk_end
        if CONTIGUOUS:
            rows = pos.to(tl.int64)
        else:
            rows = tl.load(sorted_rows_ptr + pos, mask=row_mask, other=0).to(tl.int64)
        # The big load first; the small P tile and the dots follow.
        q = tl.load(q_ptr + rows[:, None] * stride_q + n[None, :],
                    mask=row_mask[:, None] & n_mask[None, :], other=0.0)
        if FUSE_G:
            qg = q.to(tl.float32) if UPCAST else q
            g = tl.dot(qg, b.to(qg.dtype), input_precision=PRECISION)
            tl.store(gpart_ptr + pid_n.to(tl.int64) * gpart_stride + pos[:, None].to(tl.int64) * R_PAD + r[None, :], g,
                     mask=row_mask[:, None])
        if train:
            if DROPOUT:
                q = tl.where(_keep(seed, (pos - first_pos).to(tl.uint32), n.to(tl.uint32), threshold), q, 0.0)
            p = tl.load(p_ptr + pos[:, None].to(tl.int64) * R_PAD + r[None, :], mask=row_mask[:, None], other=0.0)
            acc = tl.dot(tl.trans(q.to(tl.float32)), p, acc, input_precision=MIX_PRECISION)
    if train:
        if APPLY_SCALE:
            acc *= tl.load(scaling_ptr + client)
        if DROPOUT:
            acc *= inv_keep
        num_chunks = tl.load(client_first_ptr + client + 1) - tl.load(client_first_ptr + client)
        if num_chunks == 1:
            # The tile is complete (it covers every row of the client): its square is exact.
            _store_final_tile(acc, client, pid_n, n, n_mask, r, out_ptr, stride_oc, stride_on, stride_or,
                              norm_ptr, R_MAX, R_PAD, NORMS)
        else:
            tl.store(part_ptr + (item.to(tl.int64) * N_OUT + n[:, None]) * R_PAD + r[None, :], acc,
                     mask=n_mask[:, None])


@triton.jit
def _reduce_chunks_kernel(
    part_ptr,
    out_ptr, stride_oc, stride_on, stride_or,
    norm_ptr, client_first_ptr, trainable_ptr,
    N_OUT,
    R_MAX: tl.constexpr, R_PAD: tl.constexpr, NORMS: tl.constexpr, BLOCK_N: tl.constexpr,
):
    client = tl.program_id(0)
    pid_n = tl.program_id(1)
    first = tl.load(client_first_ptr + client)
    last = tl.load(client_first_ptr + client + 1)
    train = tl.load(trainable_ptr + client) != 0
    if train & (last - first == 1):  # finished by its only chunk
        return
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < N_OUT
    r = tl.arange(0, R_PAD)
    acc = tl.zeros((BLOCK_N, R_PAD), dtype=tl.float32)
    if train:
        for i in range(first, last):  # chunk order: deterministic
            chunk = first.to(tl.int64) + (i - first)  # 64-bit offsets (the loop index is 32-bit)
            acc += tl.load(part_ptr + (chunk * N_OUT + n[:, None]) * R_PAD + r[None, :],
                           mask=n_mask[:, None], other=0.0)
    _store_final_tile(acc, client, pid_n, n, n_mask, r, out_ptr, stride_oc, stride_on, stride_or,
                      norm_ptr, R_MAX, R_PAD, NORMS)
