"""Fused flash attention, forward and backward, in the FlashAttention-2 manner: grouped-query heads read in the
kernel, padded and packed (varlen) batches, causal and sliding-window masks, softcapping.

Three layers: private `@triton.jit` kernels; launchers that allocate and launch (`attn_fwd`, `attn_bwd`, and
their varlen forms); and the `torch.library` ops with their fake and autograd registrations, behind
`flash_attention` and `flash_attention_varlen`.

Visibility, as FlashAttention defines it. In a sequence of T_Q queries and T_K keys, query i sees key j iff
    i + diag - left <= j <= i + diag + right,        diag = T_K - T_Q (the diagonal aligned to the end),
for `window=(left, right)`, -1 leaving a side unbounded; `causal` sets right = 0. A padded batch also limits
sequence b to the keys [kv_start[b], kv_end[b]). A query that sees no key gives zeros, and zero gradients.
Query head h reads key/value head h // (H // H_KV): grouped-query and multi-query attention copy nothing.

Scores: s = q·k · sm_scale; with `softcap` c, s -> c·tanh(s / c) before the softmax. The kernels work in base 2
(s·log2(e)); the saved statistic is LSE = log2 Σ_j 2^s (float32, +inf for a query that sees nothing) and the
backward recomputes P = 2^(s - LSE). No (T_Q, T_K) tensor is ever stored, and key blocks outside a query
block's window are never visited, so the cost grows with the window, not with T_K.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from kernels import utils
from kernels.utils import cast_to

LOG2E = 1.4426950408889634
_LOG2E = tl.constexpr(LOG2E)  # the same, readable inside kernels


# ============================================================================ Triton kernels
@triton.jit
def _dot(a, b, acc, INTERP_BF16: tl.constexpr, PRECISION: tl.constexpr):
    """acc + a @ b with float32 accumulation.

    INTERP_BF16 is set only for bfloat16 under Triton 3.9's interpreter, whose bf16 `tl.dot` returns garbage:
    the operands are widened exactly to float32 first, which gives the products a bf16 MMA gives.
    """
    if INTERP_BF16:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _load_tile(ptrs, rows, n_rows, cols, n_cols, CHECK_ROWS: tl.constexpr, CHECK_COLS: tl.constexpr):
    """Load a (len(rows), len(cols)) tile, zero outside [0, n_rows) x [0, n_cols); masks only where asked."""
    if CHECK_ROWS and CHECK_COLS:
        tile = tl.load(ptrs, mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols), other=0.0)
    elif CHECK_ROWS:
        tile = tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
    elif CHECK_COLS:
        tile = tl.load(ptrs, mask=cols[None, :] < n_cols, other=0.0)
    else:
        tile = tl.load(ptrs)
    return tile


@triton.jit
def _offset(b, h, t, stride_b, stride_h, stride_t):
    """int64 element offset of (batch b, head h, position t): B·H·T·D may pass 2^31."""
    return b.to(tl.int64) * stride_b + h.to(tl.int64) * stride_h + tl.cast(t, tl.int64) * stride_t


@triton.jit
def _tile_ptrs(base, start, rows, stride_t, cols, stride_d):
    """Pointers to the (len(rows), len(cols)) tile of positions start + rows; the start's product in int64."""
    return base + tl.cast(start, tl.int64) * stride_t + rows[:, None] * stride_t + cols[None, :] * stride_d


@triton.jit
def _sequence(b, CU_Q, CU_K, KV_START, KV_END, T_Q, T_K, VARLEN: tl.constexpr, KV_RANGE: tl.constexpr):
    """(first query row, T_Q, first key row, T_K, kv_lo, kv_hi) of batch entry b: its rows in the packed tensors
    (VARLEN: cumulative lengths CU_Q/CU_K) or in a dense batch, and its visible keys [kv_lo, kv_hi)."""
    if VARLEN:
        q0 = tl.load(CU_Q + b)
        k0 = tl.load(CU_K + b)
        t_q = tl.load(CU_Q + b + 1) - q0
        t_k = tl.load(CU_K + b + 1) - k0
        kv_lo = 0
        kv_hi = t_k
    else:
        q0 = 0
        k0 = 0
        t_q = T_Q
        t_k = T_K
        if KV_RANGE:  # clamped: a range past the keys reads nothing
            kv_lo = tl.maximum(tl.load(KV_START + b), 0)
            kv_hi = tl.minimum(tl.load(KV_END + b), T_K)
        else:
            kv_lo = 0
            kv_hi = T_K
    return q0, t_q, k0, t_k, kv_lo, kv_hi


@triton.jit
def _scores(qk, sm_scale, softcap, SOFTCAP: tl.constexpr):
    """Scores in log2 units from raw dot products, and tanh(s / softcap) for the backward (SOFTCAP only)."""
    if SOFTCAP:
        t = utils.tanh(qk * (sm_scale / softcap))
        s = t * (softcap * _LOG2E)
    else:
        t = qk
        s = qk * (sm_scale * _LOG2E)  # exp(x) = exp2(x·log2(e)): fold log2(e) into the score scale
    return s, t


@triton.jit
def _key_range(first, last, diag, kv_lo, kv_hi, left, right, BOUNDED_LEFT: tl.constexpr,
               BOUNDED_RIGHT: tl.constexpr):
    """For query rows first..last: the keys some row sees, [lo, hi), and those every row sees, [in_lo, in_hi)."""
    lo = kv_lo
    in_lo = kv_lo
    hi = kv_hi
    in_hi = kv_hi
    if BOUNDED_LEFT:
        lo = tl.maximum(lo, first + diag - left)
        in_lo = tl.maximum(in_lo, last + diag - left)
    if BOUNDED_RIGHT:
        hi = tl.minimum(hi, last + diag + right + 1)
        in_hi = tl.minimum(in_hi, first + diag + right + 1)
    return lo, in_lo, in_hi, hi


@triton.jit
def _query_range(first, last, diag, t_q, left, right, BOUNDED_LEFT: tl.constexpr, BOUNDED_RIGHT: tl.constexpr):
    """For key columns first..last: the queries that see some of them, [lo, hi), and those that see them all,
    [in_lo, in_hi) (query i sees key j iff j - diag - right <= i <= j - diag + left)."""
    lo = 0
    in_lo = 0
    hi = t_q
    in_hi = t_q
    if BOUNDED_RIGHT:
        lo = tl.maximum(lo, first - diag - right)
        in_lo = tl.maximum(in_lo, last - diag - right)
    if BOUNDED_LEFT:
        hi = tl.minimum(hi, last - diag + left + 1)
        in_hi = tl.minimum(in_hi, first - diag + left + 1)
    return lo, in_lo, in_hi, hi


@triton.jit
def _blocks(lo, in_lo, in_hi, hi, BLOCK: tl.constexpr):
    """Split the positions [lo, hi) that some row of a tile needs into three runs of whole BLOCKs from lo:
    [lo, full_lo) and [full_hi, hi) need the mask; [full_lo, full_hi), inside [in_lo, in_hi) (what every row
    needs), does not. Nothing outside [lo, hi) is visited."""
    hi = tl.maximum(hi, lo)
    full_lo = tl.minimum(lo + tl.cdiv(tl.maximum(in_lo - lo, 0), BLOCK) * BLOCK, hi)
    full_hi = full_lo + tl.maximum(in_hi - full_lo, 0) // BLOCK * BLOCK
    return full_lo, full_hi, hi


@triton.jit
def _attn_fwd_inner(
    acc, l_i, m_i,  # (BLOCK_M, BLOCK_D), (BLOCK_M,), (BLOCK_M,) float32 running output, sum and max
    q,  # (BLOCK_M, BLOCK_D) query tile
    K, V, stride_kt, stride_kd, stride_vt, stride_vd,  # this (batch, kv head)'s first key / value row
    start, end,  # key range [start, end), whole BLOCK_Ns from start
    row_lo, row_hi,  # (BLOCK_M,) each row's visible keys [lo, hi), applied under MASK
    kv_hi,  # keys from here on are not read (zero-filled) under MASK
    sm_scale, softcap,
    MASK: tl.constexpr,  # False: every key of the range is visible to every row (and in bounds)
    SOFTCAP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    INTERP_BF16: tl.constexpr, PRECISION: tl.constexpr,
):
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    K_ptrs = _tile_ptrs(K, start, offs_n, stride_kt, offs_d, stride_kd)
    V_ptrs = _tile_ptrs(V, start, offs_n, stride_vt, offs_d, stride_vd)
    for start_n in range(start, end, BLOCK_N):
        kv = start_n + offs_n  # (BLOCK_N,) key positions
        k = _load_tile(K_ptrs, kv, kv_hi, offs_d, HEAD_DIM, MASK, HEAD_DIM != BLOCK_D)  # (BLOCK_N, BLOCK_D)
        qk = _dot(q, tl.trans(k), tl.zeros((q.shape[0], BLOCK_N), tl.float32), INTERP_BF16, PRECISION)
        s, _ = _scores(qk, sm_scale, softcap, SOFTCAP)  # (BLOCK_M, BLOCK_N), log2 units
        if MASK:
            s = tl.where((kv[None, :] >= row_lo[:, None]) & (kv[None, :] < row_hi[:, None]), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_ref = m_new
        if MASK:  # a row that has seen no key yet keeps m = -inf; its exponents are taken against 0
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_ref[:, None])  # (BLOCK_M, BLOCK_N)
        alpha = tl.math.exp2(m_i - m_ref)  # (BLOCK_M,) rescales what was summed under the old max
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_tile(V_ptrs, kv, kv_hi, offs_d, HEAD_DIM, MASK, HEAD_DIM != BLOCK_D)  # (BLOCK_N, BLOCK_D)
        acc = _dot(cast_to(p, v.dtype, INTERP_BF16), v, acc * alpha[:, None], INTERP_BF16, PRECISION)
        m_i = m_new
        K_ptrs += BLOCK_N * stride_kt  # pointer steps: no int32 product of position and stride can overflow
        V_ptrs += BLOCK_N * stride_vt
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_kernel(
    Q,  # (B, H, T_Q, D) queries, any strides; VARLEN: (total_q, H, D) packed rows
    K,  # (B, H_KV, T_K, D) keys; VARLEN: (total_k, H_KV, D)
    V,  # as K: values
    OUT,  # as Q: out
    LSE,  # (B, H, T_Q) float32 out (VARLEN: (H, total_q)): log2-sum-exp of each query's scores
    CU_Q, CU_K,  # VARLEN: (B + 1,) int32 first row of each sequence, then the total
    KV_START, KV_END,  # KV_RANGE: (B,) int32 each sequence's visible keys [start, end)
    stride_qb, stride_qh, stride_qt, stride_qd,  # VARLEN: stride_*b = 0, t counts packed rows
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_ob, stride_oh, stride_ot, stride_od,
    stride_lb, stride_lh,
    H, GROUP, T_Q, T_K,  # GROUP = H // H_KV query heads per key/value head; VARLEN: T_Q/T_K the longest
    sm_scale, softcap, left, right,  # window (left, right), used where BOUNDED_*
    TQ_BUCKET, TK_BUCKET,  # autotuning key only, unused by the kernel
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BOUNDED_LEFT: tl.constexpr, BOUNDED_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr,
    VARLEN: tl.constexpr, KV_RANGE: tl.constexpr, INTERP_BF16: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
    off_b, off_h = pid_bh // H, pid_bh % H
    q0, t_q, k0, t_k, kv_lo, kv_hi = _sequence(off_b, CU_Q, CU_K, KV_START, KV_END, T_Q, T_K, VARLEN, KV_RANGE)
    start_m = pid_m * BLOCK_M
    if VARLEN:
        if start_m >= t_q:  # the grid covers the longest sequence
            return
    diag = t_k - t_q
    Q += _offset(off_b, off_h, q0 + start_m, stride_qb, stride_qh, stride_qt)
    OUT += _offset(off_b, off_h, q0 + start_m, stride_ob, stride_oh, stride_ot)
    K += _offset(off_b, off_h // GROUP, k0, stride_kb, stride_kh, stride_kt)
    V += _offset(off_b, off_h // GROUP, k0, stride_vb, stride_vh, stride_vt)
    LSE += _offset(off_b, off_h, q0, stride_lb, stride_lh, 1)

    rows = tl.arange(0, BLOCK_M)
    offs_m = start_m + rows
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_tile(_tile_ptrs(Q, 0, rows, stride_qt, offs_d, stride_qd), offs_m, t_q, offs_d, HEAD_DIM,
                   True, HEAD_DIM != BLOCK_D)  # (BLOCK_M, BLOCK_D)
    row_lo, _, _, row_hi = _key_range(offs_m, offs_m, diag, kv_lo, kv_hi, left, right, BOUNDED_LEFT, BOUNDED_RIGHT)
    row_lo += tl.zeros_like(offs_m)
    row_hi += tl.zeros_like(offs_m)
    lo, in_lo, in_hi, hi = _key_range(start_m, tl.minimum(start_m + BLOCK_M, t_q) - 1, diag, kv_lo, kv_hi,
                                      left, right, BOUNDED_LEFT, BOUNDED_RIGHT)
    full_lo, full_hi, hi = _blocks(lo, in_lo, in_hi, hi, BLOCK_N)

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    # Three runs of key blocks: masked below the full ones (windows, left padding), unmasked, masked above.
    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, q, K, V, stride_kt, stride_kd, stride_vt, stride_vd, start=lo, end=full_lo,
        row_lo=row_lo, row_hi=row_hi, kv_hi=kv_hi, sm_scale=sm_scale, softcap=softcap, MASK=True,
        SOFTCAP=SOFTCAP, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D, BLOCK_N=BLOCK_N, INTERP_BF16=INTERP_BF16,
        PRECISION=PRECISION)
    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, q, K, V, stride_kt, stride_kd, stride_vt, stride_vd, start=full_lo, end=full_hi,
        row_lo=row_lo, row_hi=row_hi, kv_hi=kv_hi, sm_scale=sm_scale, softcap=softcap, MASK=False,
        SOFTCAP=SOFTCAP, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D, BLOCK_N=BLOCK_N, INTERP_BF16=INTERP_BF16,
        PRECISION=PRECISION)
    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, q, K, V, stride_kt, stride_kd, stride_vt, stride_vd, start=full_hi, end=hi,
        row_lo=row_lo, row_hi=row_hi, kv_hi=kv_hi, sm_scale=sm_scale, softcap=softcap, MASK=True,
        SOFTCAP=SOFTCAP, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D, BLOCK_N=BLOCK_N, INTERP_BF16=INTERP_BF16,
        PRECISION=PRECISION)

    seen = l_i > 0.0  # a row that saw no key: output 0 and LSE = +inf, so the backward's P is 0
    acc = acc / tl.where(seen, l_i, 1.0)[:, None]
    row_ok = offs_m < t_q
    tl.store(LSE + offs_m, tl.where(seen, m_i + tl.math.log2(tl.where(seen, l_i, 1.0)), float("inf")), mask=row_ok)
    tl.store(_tile_ptrs(OUT, 0, rows, stride_ot, offs_d, stride_od), cast_to(acc, OUT.dtype.element_ty, INTERP_BF16),
             mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM))


@triton.jit
def _attn_bwd_preprocess_kernel(
    OUT,  # (B, H, T, D) forward output (VARLEN: B = 1, T = total rows)
    DO,  # (B, H, T, D) its gradient
    DELTA,  # (B, H, T) float32 out (VARLEN: (H, total)): rowsum(dO * O)
    stride_ob, stride_oh, stride_ot, stride_od,
    stride_dob, stride_doh, stride_dot, stride_dod,
    stride_lb, stride_lh,
    H, T,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
    off_b, off_h = pid_bh // H, pid_bh % H
    rows = tl.arange(0, BLOCK_M)
    offs_m = pid_m * BLOCK_M + rows
    offs_d = tl.arange(0, BLOCK_D)
    o_ptrs = _tile_ptrs(OUT + _offset(off_b, off_h, 0, stride_ob, stride_oh, stride_ot), pid_m * BLOCK_M, rows,
                        stride_ot, offs_d, stride_od)
    do_ptrs = _tile_ptrs(DO + _offset(off_b, off_h, 0, stride_dob, stride_doh, stride_dot), pid_m * BLOCK_M, rows,
                         stride_dot, offs_d, stride_dod)
    o = _load_tile(o_ptrs, offs_m, T, offs_d, HEAD_DIM, True, True)
    do = _load_tile(do_ptrs, offs_m, T, offs_d, HEAD_DIM, True, True)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)  # (BLOCK_M,)
    tl.store(DELTA + _offset(off_b, off_h, 0, stride_lb, stride_lh, 1) + offs_m, delta, mask=offs_m < T)


@triton.jit
def _attn_bwd_dkdv_inner(
    dk, dv,  # (BLOCK_N, BLOCK_D) float32 accumulators
    k, v,  # (BLOCK_N, BLOCK_D) this program's key/value tile
    Q, DO, stride_qh, stride_qt, stride_qd, stride_doh, stride_dot, stride_dod,  # the group's first query head
    LSE, DELTA, stride_lh,  # its float32 statistics, one per query row
    GROUP,  # query heads reading this key/value head, walked one after the other
    start, end,  # query range [start, end), whole BLOCK_Ms from start
    col_lo, col_hi,  # (BLOCK_N,) the queries that see each key [lo, hi), applied under MASK
    t_q,  # queries from here on are not read under MASK
    sm_scale, softcap,
    MASK: tl.constexpr,  # False: every query of the range sees every key of the tile (and is in bounds)
    SOFTCAP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    INTERP_BF16: tl.constexpr, PRECISION: tl.constexpr,
):
    rows = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_tile = rows[:, None] * stride_qt + offs_d[None, :] * stride_qd
    do_tile = rows[:, None] * stride_dot + offs_d[None, :] * stride_dod
    # One loop over (head, query block), heads outer: a loop over heads around this one spills registers.
    g = 0
    start_m = start
    for _ in range(0, GROUP * tl.cdiv(end - start, BLOCK_M)):
        offs_m = start_m + rows
        g64, m64 = tl.cast(g, tl.int64), tl.cast(start_m, tl.int64)
        q = _load_tile(Q + (g64 * stride_qh + m64 * stride_qt) + q_tile, offs_m, t_q, offs_d, HEAD_DIM, MASK,
                       HEAD_DIM != BLOCK_D)  # (BLOCK_M, BLOCK_D)
        do = _load_tile(DO + (g64 * stride_doh + m64 * stride_dot) + do_tile, offs_m, t_q, offs_d, HEAD_DIM, MASK,
                        HEAD_DIM != BLOCK_D)
        stats = g64 * stride_lh + offs_m
        if MASK:  # rows past t_q get LSE = +inf, hence P = 0
            lse = tl.load(LSE + stats, mask=offs_m < t_q, other=float("inf"))  # (BLOCK_M,)
            delta = tl.load(DELTA + stats, mask=offs_m < t_q, other=0.0)
        else:
            lse = tl.load(LSE + stats)
            delta = tl.load(DELTA + stats)
        qk_t = _dot(k, tl.trans(q), tl.zeros((k.shape[0], BLOCK_M), tl.float32), INTERP_BF16, PRECISION)
        s_t, t_t = _scores(qk_t, sm_scale, softcap, SOFTCAP)
        p_t = tl.math.exp2(s_t - lse[None, :])  # (BLOCK_N, BLOCK_M) = P^T
        if MASK:
            p_t = tl.where((offs_m[None, :] >= col_lo[:, None]) & (offs_m[None, :] < col_hi[:, None]), p_t, 0.0)
        dv = _dot(cast_to(p_t, do.dtype, INTERP_BF16), do, dv, INTERP_BF16, PRECISION)  # dV += P^T dO
        dp_t = _dot(v, tl.trans(do), tl.zeros((k.shape[0], BLOCK_M), tl.float32), INTERP_BF16, PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])  # (BLOCK_N, BLOCK_M) = dS^T, for the capped scores
        if SOFTCAP:
            ds_t = ds_t * (1.0 - t_t * t_t)  # d(c·tanh(x/c))/dx
        dk = _dot(cast_to(ds_t, q.dtype, INTERP_BF16), q, dk, INTERP_BF16, PRECISION)  # dK += dS^T Q, scaled later
        start_m += BLOCK_M
        next_head = start_m >= end
        g = tl.where(next_head, g + 1, g)
        start_m = tl.where(next_head, start, start_m)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V,  # forward inputs, as in _attn_fwd_kernel
    DO,  # as Q: output gradient
    LSE, DELTA,  # (B, H, T_Q) float32 (VARLEN: (H, total_q))
    DK, DV,  # as K: out
    CU_Q, CU_K, KV_START, KV_END,  # as in _attn_fwd_kernel
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_dob, stride_doh, stride_dot, stride_dod,
    stride_dkb, stride_dkh, stride_dkt, stride_dkd,
    stride_dvb, stride_dvh, stride_dvt, stride_dvd,
    stride_lb, stride_lh,
    H, GROUP, T_Q, T_K,
    sm_scale, softcap, left, right,
    TQ_BUCKET, TK_BUCKET,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BOUNDED_LEFT: tl.constexpr, BOUNDED_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr,
    VARLEN: tl.constexpr, KV_RANGE: tl.constexpr, INTERP_BF16: tl.constexpr, PRECISION: tl.constexpr,
):
    """One program per (key block, batch, key/value head): the GROUP query heads that read this head are
    summed here, in registers, with no atomics."""
    pid_n, pid_bh = tl.program_id(0), tl.program_id(1)
    h_kv = H // GROUP
    off_b, off_hk = pid_bh // h_kv, pid_bh % h_kv
    q0, t_q, k0, t_k, kv_lo, kv_hi = _sequence(off_b, CU_Q, CU_K, KV_START, KV_END, T_Q, T_K, VARLEN, KV_RANGE)
    start_n = pid_n * BLOCK_N
    if VARLEN:
        if start_n >= t_k:
            return
    diag = t_k - t_q
    cols = tl.arange(0, BLOCK_N)
    offs_n = start_n + cols
    offs_d = tl.arange(0, BLOCK_D)
    K += _offset(off_b, off_hk, k0, stride_kb, stride_kh, stride_kt)
    V += _offset(off_b, off_hk, k0, stride_vb, stride_vh, stride_vt)
    k = _load_tile(_tile_ptrs(K, start_n, cols, stride_kt, offs_d, stride_kd), offs_n, t_k, offs_d, HEAD_DIM,
                   True, HEAD_DIM != BLOCK_D)  # (BLOCK_N, BLOCK_D)
    v = _load_tile(_tile_ptrs(V, start_n, cols, stride_vt, offs_d, stride_vd), offs_n, t_k, offs_d, HEAD_DIM,
                   True, HEAD_DIM != BLOCK_D)

    col_lo, _, _, col_hi = _query_range(offs_n, offs_n, diag, t_q, left, right, BOUNDED_LEFT, BOUNDED_RIGHT)
    col_lo += tl.zeros_like(offs_n)
    col_hi = tl.where((offs_n >= kv_lo) & (offs_n < kv_hi), col_hi, col_lo)  # keys outside the range: no query
    first = tl.maximum(start_n, kv_lo)  # the block's visible keys: first..last
    last = tl.minimum(start_n + BLOCK_N, kv_hi) - 1
    lo, in_lo, in_hi, hi = _query_range(first, last, diag, t_q, left, right, BOUNDED_LEFT, BOUNDED_RIGHT)
    in_hi = tl.where((start_n >= kv_lo) & (start_n + BLOCK_N <= kv_hi), in_hi, in_lo)  # a partial block: masks
    hi = tl.where(first <= last, hi, lo)
    full_lo, full_hi, hi = _blocks(lo, in_lo, in_hi, hi, BLOCK_M)

    dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    off_h = off_hk * GROUP  # the group's first query head
    Q += _offset(off_b, off_h, q0, stride_qb, stride_qh, stride_qt)
    DO += _offset(off_b, off_h, q0, stride_dob, stride_doh, stride_dot)
    LSE += _offset(off_b, off_h, q0, stride_lb, stride_lh, 1)
    DELTA += _offset(off_b, off_h, q0, stride_lb, stride_lh, 1)
    dk, dv = _attn_bwd_dkdv_inner(
        dk, dv, k, v, Q, DO, stride_qh, stride_qt, stride_qd, stride_doh, stride_dot, stride_dod, LSE, DELTA,
        stride_lh, GROUP, start=lo, end=full_lo, col_lo=col_lo, col_hi=col_hi, t_q=t_q, sm_scale=sm_scale,
        softcap=softcap, MASK=True, SOFTCAP=SOFTCAP, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D, BLOCK_M=BLOCK_M,
        INTERP_BF16=INTERP_BF16, PRECISION=PRECISION)
    dk, dv = _attn_bwd_dkdv_inner(
        dk, dv, k, v, Q, DO, stride_qh, stride_qt, stride_qd, stride_doh, stride_dot, stride_dod, LSE, DELTA,
        stride_lh, GROUP, start=full_lo, end=full_hi, col_lo=col_lo, col_hi=col_hi, t_q=t_q, sm_scale=sm_scale,
        softcap=softcap, MASK=False, SOFTCAP=SOFTCAP, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D, BLOCK_M=BLOCK_M,
        INTERP_BF16=INTERP_BF16, PRECISION=PRECISION)
    dk, dv = _attn_bwd_dkdv_inner(
        dk, dv, k, v, Q, DO, stride_qh, stride_qt, stride_qd, stride_doh, stride_dot, stride_dod, LSE, DELTA,
        stride_lh, GROUP, start=full_hi, end=hi, col_lo=col_lo, col_hi=col_hi, t_q=t_q, sm_scale=sm_scale,
        softcap=softcap, MASK=True, SOFTCAP=SOFTCAP, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D, BLOCK_M=BLOCK_M,
        INTERP_BF16=INTERP_BF16, PRECISION=PRECISION)

    mask = (offs_n[:, None] < t_k) & (offs_d[None, :] < HEAD_DIM)
    DK += _offset(off_b, off_hk, k0, stride_dkb, stride_dkh, stride_dkt)
    DV += _offset(off_b, off_hk, k0, stride_dvb, stride_dvh, stride_dvt)
    tl.store(_tile_ptrs(DK, start_n, cols, stride_dkt, offs_d, stride_dkd),
             cast_to(dk * sm_scale, DK.dtype.element_ty, INTERP_BF16), mask=mask)
    tl.store(_tile_ptrs(DV, start_n, cols, stride_dvt, offs_d, stride_dvd),
             cast_to(dv, DV.dtype.element_ty, INTERP_BF16), mask=mask)


@triton.jit
def _attn_bwd_dq_inner(
    dq,  # (BLOCK_M, BLOCK_D) float32 accumulator
    q, do,  # (BLOCK_M, BLOCK_D) this program's query and output-gradient tiles
    lse, delta,  # (BLOCK_M,) float32
    K, V, stride_kt, stride_kd, stride_vt, stride_vd,  # this (batch, kv head)'s first key / value row
    start, end,  # key range [start, end), whole BLOCK_Ns from start
    row_lo, row_hi, kv_hi,  # as in _attn_fwd_inner
    sm_scale, softcap,
    MASK: tl.constexpr,
    SOFTCAP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    INTERP_BF16: tl.constexpr, PRECISION: tl.constexpr,
):
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    K_ptrs = _tile_ptrs(K, start, offs_n, stride_kt, offs_d, stride_kd)
    V_ptrs = _tile_ptrs(V, start, offs_n, stride_vt, offs_d, stride_vd)
    for start_n in range(start, end, BLOCK_N):
        kv = start_n + offs_n
        k = _load_tile(K_ptrs, kv, kv_hi, offs_d, HEAD_DIM, MASK, HEAD_DIM != BLOCK_D)  # (BLOCK_N, BLOCK_D)
        v = _load_tile(V_ptrs, kv, kv_hi, offs_d, HEAD_DIM, MASK, HEAD_DIM != BLOCK_D)
        qk = _dot(q, tl.trans(k), tl.zeros((q.shape[0], BLOCK_N), tl.float32), INTERP_BF16, PRECISION)
        s, t = _scores(qk, sm_scale, softcap, SOFTCAP)
        p = tl.math.exp2(s - lse[:, None])  # (BLOCK_M, BLOCK_N)
        if MASK:
            p = tl.where((kv[None, :] >= row_lo[:, None]) & (kv[None, :] < row_hi[:, None]), p, 0.0)
        dp = _dot(do, tl.trans(v), tl.zeros((q.shape[0], BLOCK_N), tl.float32), INTERP_BF16, PRECISION)
        ds = p * (dp - delta[:, None])  # (BLOCK_M, BLOCK_N)
        if SOFTCAP:
            ds = ds * (1.0 - t * t)
        dq = _dot(cast_to(ds, k.dtype, INTERP_BF16), k, dq, INTERP_BF16, PRECISION)  # dQ += dS K (scaled at the end)
        K_ptrs += BLOCK_N * stride_kt
        V_ptrs += BLOCK_N * stride_vt
    return dq


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V,  # forward inputs, as in _attn_fwd_kernel
    DO,  # as Q: output gradient
    LSE, DELTA,  # (B, H, T_Q) float32 (VARLEN: (H, total_q))
    DQ,  # as Q: out
    CU_Q, CU_K, KV_START, KV_END,  # as in _attn_fwd_kernel
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_dob, stride_doh, stride_dot, stride_dod,
    stride_dqb, stride_dqh, stride_dqt, stride_dqd,
    stride_lb, stride_lh,
    H, GROUP, T_Q, T_K,
    sm_scale, softcap, left, right,
    TQ_BUCKET, TK_BUCKET,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BOUNDED_LEFT: tl.constexpr, BOUNDED_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr,
    VARLEN: tl.constexpr, KV_RANGE: tl.constexpr, INTERP_BF16: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
    off_b, off_h = pid_bh // H, pid_bh % H
    q0, t_q, k0, t_k, kv_lo, kv_hi = _sequence(off_b, CU_Q, CU_K, KV_START, KV_END, T_Q, T_K, VARLEN, KV_RANGE)
    start_m = pid_m * BLOCK_M
    if VARLEN:
        if start_m >= t_q:
            return
    diag = t_k - t_q
    rows = tl.arange(0, BLOCK_M)
    offs_m = start_m + rows
    offs_d = tl.arange(0, BLOCK_D)
    Q += _offset(off_b, off_h, q0 + start_m, stride_qb, stride_qh, stride_qt)
    DO += _offset(off_b, off_h, q0 + start_m, stride_dob, stride_doh, stride_dot)
    K += _offset(off_b, off_h // GROUP, k0, stride_kb, stride_kh, stride_kt)
    V += _offset(off_b, off_h // GROUP, k0, stride_vb, stride_vh, stride_vt)
    q = _load_tile(_tile_ptrs(Q, 0, rows, stride_qt, offs_d, stride_qd), offs_m, t_q, offs_d, HEAD_DIM,
                   True, HEAD_DIM != BLOCK_D)  # (BLOCK_M, BLOCK_D)
    do = _load_tile(_tile_ptrs(DO, 0, rows, stride_dot, offs_d, stride_dod), offs_m, t_q, offs_d, HEAD_DIM,
                    True, HEAD_DIM != BLOCK_D)
    row_ok = offs_m < t_q
    stats = _offset(off_b, off_h, q0, stride_lb, stride_lh, 1) + offs_m
    lse = tl.load(LSE + stats, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + stats, mask=row_ok, other=0.0)
    row_lo, _, _, row_hi = _key_range(offs_m, offs_m, diag, kv_lo, kv_hi, left, right, BOUNDED_LEFT, BOUNDED_RIGHT)
    row_lo += tl.zeros_like(offs_m)
    row_hi += tl.zeros_like(offs_m)
    lo, in_lo, in_hi, hi = _key_range(start_m, tl.minimum(start_m + BLOCK_M, t_q) - 1, diag, kv_lo, kv_hi,
                                      left, right, BOUNDED_LEFT, BOUNDED_RIGHT)
    full_lo, full_hi, hi = _blocks(lo, in_lo, in_hi, hi, BLOCK_N)

    dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    dq = _attn_bwd_dq_inner(
        dq, q, do, lse, delta, K, V, stride_kt, stride_kd, stride_vt, stride_vd, start=lo, end=full_lo,
        row_lo=row_lo, row_hi=row_hi, kv_hi=kv_hi, sm_scale=sm_scale, softcap=softcap, MASK=True, SOFTCAP=SOFTCAP,
        HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D, BLOCK_N=BLOCK_N, INTERP_BF16=INTERP_BF16, PRECISION=PRECISION)
    dq = _attn_bwd_dq_inner(
        dq, q, do, lse, delta, K, V, stride_kt, stride_kd, stride_vt, stride_vd, start=full_lo, end=full_hi,
        row_lo=row_lo, row_hi=row_hi, kv_hi=kv_hi, sm_scale=sm_scale, softcap=softcap, MASK=False,
        SOFTCAP=SOFTCAP, HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D, BLOCK_N=BLOCK_N, INTERP_BF16=INTERP_BF16,
        PRECISION=PRECISION)
    dq = _attn_bwd_dq_inner(
        dq, q, do, lse, delta, K, V, stride_kt, stride_kd, stride_vt, stride_vd, start=full_hi, end=hi,
        row_lo=row_lo, row_hi=row_hi, kv_hi=kv_hi, sm_scale=sm_scale, softcap=softcap, MASK=True, SOFTCAP=SOFTCAP,
        HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D, BLOCK_N=BLOCK_N, INTERP_BF16=INTERP_BF16, PRECISION=PRECISION)

    DQ += _offset(off_b, off_h, q0 + start_m, stride_dqb, stride_dqh, stride_dqt)
    tl.store(_tile_ptrs(DQ, 0, rows, stride_dqt, offs_d, stride_dqd), cast_to(dq * sm_scale, DQ.dtype.element_ty,
             INTERP_BF16), mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM))


# ============================================================================ launchers
def _config(block_m: int, block_n: int, num_warps: int, num_stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=num_warps, num_stages=num_stages)


# Autotuning candidates, (BLOCK_M, BLOCK_N, num_warps, num_stages), per kernel, GPU generation (8: Ampere/Ada,
# 9: Hopper), math ("f16": fp16/bf16 on tensor cores; "tf32": float32 on tensor cores, where PyTorch allows
# TF32; "f32": float32 with exact FMA products) and head tile (BLOCK_D up to 64, or 128). Tile shapes after the
# Triton tutorial and FlashAttention-2: tall query tiles for the forward and dQ passes, wide key tiles for dK/dV,
# and a 16-row tile for one query against a KV cache. Every entry was chosen by building it for sm_80/sm_90 at
# head sizes 59, 64, 80 and 128, with every mask feature on (`python -m kernels.compile_report`): no register
# spills, shared memory within the chip. Bigger tiles spilled at head size 128 (with softcap's tanh, dK/dV's
# 32x128 tile spills on sm_90); float32's FMA products hold whole head-size rows in registers, hence its small
# tiles.
CONFIGS: dict[tuple[str, int, str, int], list[tuple[int, int, int, int]]] = {
    ("fwd", 9, "f16", 64): [(128, 128, 8, 3), (128, 64, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3), (16, 64, 4, 2)],
    ("fwd", 9, "f16", 128): [(128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 3), (16, 64, 4, 2)],
    ("fwd", 8, "f16", 64): [(128, 64, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3), (16, 64, 4, 2)],
    ("fwd", 8, "f16", 128): [(128, 32, 8, 3), (64, 64, 8, 3), (64, 32, 4, 3), (16, 64, 4, 2)],
    ("dkdv", 9, "f16", 64): [(64, 128, 8, 3), (32, 128, 8, 3), (32, 64, 4, 3), (16, 64, 4, 2)],
    ("dkdv", 9, "f16", 128): [(32, 64, 8, 3), (16, 64, 4, 2)],
    ("dkdv", 8, "f16", 64): [(32, 128, 8, 3), (32, 64, 4, 3), (16, 64, 4, 2)],
    ("dkdv", 8, "f16", 128): [(32, 64, 8, 3), (16, 64, 4, 2)],
    ("dq", 9, "f16", 64): [(128, 64, 8, 3), (128, 32, 4, 3), (64, 32, 4, 3), (16, 32, 4, 2)],
    ("dq", 9, "f16", 128): [(128, 64, 8, 3), (128, 32, 8, 3), (64, 32, 4, 3), (16, 32, 4, 2)],
    ("dq", 8, "f16", 64): [(128, 64, 8, 3), (128, 32, 8, 3), (64, 32, 4, 3), (16, 32, 4, 2)],
    ("dq", 8, "f16", 128): [(128, 32, 8, 3), (64, 64, 8, 3), (64, 32, 4, 3), (16, 32, 4, 2)],
    ("fwd", 9, "tf32", 64): [(128, 32, 8, 2), (64, 64, 8, 2), (64, 32, 8, 2), (16, 32, 4, 2)],
    ("fwd", 9, "tf32", 128): [(64, 32, 8, 2), (64, 16, 4, 2), (32, 32, 4, 2), (16, 32, 4, 2)],
    ("fwd", 8, "tf32", 64): [(128, 32, 8, 2), (64, 64, 8, 2), (64, 32, 4, 2), (16, 32, 4, 2)],
    ("fwd", 8, "tf32", 128): [(64, 32, 8, 2), (32, 32, 4, 2), (16, 32, 4, 2)],
    ("dkdv", 9, "tf32", 64): [(32, 64, 8, 2), (16, 64, 4, 2), (16, 32, 4, 2)],
    ("dkdv", 9, "tf32", 128): [(32, 32, 8, 2), (16, 32, 4, 2)],
    ("dkdv", 8, "tf32", 64): [(32, 64, 8, 2), (32, 32, 4, 2), (16, 32, 4, 2)],
    ("dkdv", 8, "tf32", 128): [(16, 64, 8, 2), (32, 32, 8, 2), (16, 32, 4, 2)],
    ("dq", 9, "tf32", 64): [(128, 32, 8, 2), (64, 32, 8, 2), (32, 32, 4, 2), (16, 32, 4, 2)],
    ("dq", 9, "tf32", 128): [(64, 16, 8, 2), (32, 32, 8, 2), (16, 32, 4, 2)],
    ("dq", 8, "tf32", 64): [(128, 32, 8, 2), (64, 32, 8, 2), (32, 32, 4, 2), (16, 32, 4, 2)],
    ("dq", 8, "tf32", 128): [(64, 32, 8, 2), (32, 32, 8, 2), (16, 32, 4, 2)],
    ("fwd", 9, "f32", 64): [(64, 32, 8, 2), (32, 32, 4, 2), (16, 32, 4, 2)],
    ("fwd", 9, "f32", 128): [(32, 16, 8, 2), (16, 32, 8, 2), (16, 16, 4, 2)],
    ("fwd", 8, "f32", 64): [(64, 32, 8, 2), (32, 32, 4, 2), (16, 32, 4, 2)],
    ("fwd", 8, "f32", 128): [(32, 16, 8, 2), (32, 16, 4, 2), (16, 16, 8, 2)],
    ("dkdv", 9, "f32", 64): [(32, 32, 8, 1), (16, 32, 8, 2), (16, 16, 8, 2)],
    ("dkdv", 9, "f32", 128): [(16, 32, 8, 2), (16, 16, 8, 2), (16, 16, 4, 1)],
    ("dkdv", 8, "f32", 64): [(64, 32, 8, 2), (16, 16, 8, 2)],
    ("dkdv", 8, "f32", 128): [(32, 16, 4, 1), (16, 16, 8, 2)],
    ("dq", 9, "f32", 64): [(64, 32, 8, 2), (32, 32, 8, 2), (16, 32, 8, 2)],
    ("dq", 9, "f32", 128): [(32, 16, 8, 2), (16, 32, 8, 2), (16, 32, 4, 2)],
    ("dq", 8, "f32", 64): [(64, 32, 8, 2), (32, 32, 8, 1), (16, 32, 4, 2)],
    ("dq", 8, "f32", 128): [(32, 32, 8, 1), (32, 16, 8, 2), (16, 16, 8, 2)],
}
# Candidates that Triton before 3.9 builds with spills (measured on 3.6: its ptxas; 3.7 and 3.8 not measured), with
# some mask feature or an unaligned head size; 3.9 builds them clean. Passing `maxnreg` (as the norms do) does not
# help here: it makes 3.9 spill in other float32 candidates and 3.6 in as many. A few more candidates spill a few
# bytes on 3.6 in one case each (kernels.compile_report lists them); they stay, for the autotuner to time, since
# another candidate of theirs builds clean.
SPILL_BEFORE_3_9: dict[tuple[str, int, str, int], set[tuple[int, int, int, int]]] = {
    ("dkdv", 8, "f16", 64): {(32, 128, 8, 3), (32, 64, 4, 3)},
    ("dkdv", 9, "f16", 64): {(64, 128, 8, 3), (32, 64, 4, 3)},
    ("dkdv", 8, "tf32", 64): {(32, 64, 8, 2)},
    ("dkdv", 8, "f32", 64): {(64, 32, 8, 2)},
    ("dkdv", 9, "f32", 64): {(32, 32, 8, 1)},
    ("dkdv", 8, "f32", 128): {(32, 16, 4, 1)},
    ("dq", 9, "f32", 64): {(32, 32, 8, 2)},
    ("dq", 9, "f32", 128): {(32, 16, 8, 2)},
}
# The interpreter cannot autotune: one fixed (BLOCK_M, BLOCK_N) per kernel; tests may change it.
INTERPRETER_BLOCKS: dict[str, tuple[int, int]] = {"fwd": (32, 32), "dkdv": (32, 32), "dq": (32, 32)}
PREPROCESS_BLOCK_M = 64
PREPROCESS_WARPS = 4  # with an explicit register cap: left implicit, Triton 3.6 spills 8 B at D=80


def allows_tf32() -> bool:
    """Whether PyTorch lets float32 matmuls on CUDA use TF32 (`torch.backends.cuda.matmul.fp32_precision` or, on
    older PyTorch, `allow_tf32`; `torch.set_float32_matmul_precision("high")` sets both)."""
    matmul = torch.backends.cuda.matmul
    try:
        precision = matmul.fp32_precision  # PyTorch >= 2.9; reading the legacy flag after setting this one raises
    except AttributeError:
        return bool(matmul.allow_tf32)
    if precision == "none":  # inherit the global setting
        precision = torch.backends.fp32_precision
    return precision == "tf32"


def precision_for(dtype: torch.dtype, on_gpu: bool = True) -> str:
    """`tl.dot` input precision: "ieee" (exact products) for float32 unless PyTorch allows TF32 on a GPU."""
    if dtype != torch.float32:
        return "tf32"  # unused: 16-bit operands multiply exactly on tensor cores
    return "tf32" if on_gpu and allows_tf32() else "ieee"


def config_class(capability: int, dtype: torch.dtype, head_dim: int, precision: str = "ieee") -> tuple[int, str, int]:
    """(GPU generation, math, head tile class) indexing CONFIGS, as in the comment above."""
    math_kind = "f16" if dtype != torch.float32 else "tf32" if precision == "tf32" else "f32"
    return 9 if capability >= 90 else 8, math_kind, 64 if utils.head_block(head_dim) <= 64 else 128


def configs_for(kind: str, capability: int, dtype: torch.dtype, head_dim: int,
                precision: str = "ieee") -> list[triton.Config]:
    """Autotuning candidates of kernel `kind` ("fwd", "dkdv", "dq") for a GPU of compute capability `capability`
    (80, 90, ...), inputs of `dtype` and head size `head_dim`, and float32 `precision` ("ieee" or "tf32")."""
    key = (kind, *config_class(capability, dtype, head_dim, precision))
    spill = SPILL_BEFORE_3_9.get(key, ()) if utils.triton_version() < (3, 9) else ()
    return [_config(*c) for c in CONFIGS[key] if c not in spill]


def configs_for_shape(kind: str, capability: int, dtype: torch.dtype, head_dim: int, t_q: int, t_k: int,
                      precision: str = "ieee") -> list[triton.Config]:
    """`configs_for`, less tiles much longer than the sequences they cover (one query against a KV cache
    keeps the 16-row query tiles); the smallest tile if none is left."""
    configs = configs_for(kind, capability, dtype, head_dim, precision)
    cap_m, cap_n = (max(16, utils.next_power_of_2(t)) for t in (t_q, t_k))
    short = [c for c in configs if c.kwargs["BLOCK_M"] <= cap_m and c.kwargs["BLOCK_N"] <= cap_n]
    return short or [min(configs, key=lambda c: (c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"], c.num_warps))]


def _prune(kind: str, capability: int, configs: list[triton.Config], nargs: dict, **kwargs) -> list[triton.Config]:
    args = {**nargs, **kwargs}
    return configs_for_shape(kind, capability, args["Q"].dtype, args["HEAD_DIM"], args["T_Q"], args["T_K"],
                             args["PRECISION"])


_KERNELS = {"fwd": _attn_fwd_kernel, "dkdv": _attn_bwd_dkdv_kernel, "dq": _attn_bwd_dq_kernel}
_AUTOTUNE_KEY = ["HEAD_DIM", "BOUNDED_LEFT", "BOUNDED_RIGHT", "SOFTCAP", "VARLEN", "KV_RANGE", "PRECISION",
                 "TQ_BUCKET", "TK_BUCKET"]  # tensor dtypes are added by Triton


@functools.cache
def _autotuned(kind: str, capability: int) -> triton.runtime.Autotuner:
    # Built on first use, never at import: autotuning asks for the active driver.
    generation = config_class(capability, torch.float16, 64)[0]
    every = sorted({c for key, cs in CONFIGS.items() if key[:2] == (kind, generation) for c in cs})
    return triton.autotune(
        configs=[_config(*c) for c in every],  # `_prune` picks those of the call's dtype, head size, precision
        key=_AUTOTUNE_KEY,
        prune_configs_by={"early_config_prune": functools.partial(_prune, kind, capability)},
    )(_KERNELS[kind])


def _launch(kind: str, x: torch.Tensor, grid_for, args: dict) -> None:
    """Launch kernel `kind` with the fixed interpreter blocks, or autotuned on `x`'s GPU."""
    if utils.interpreting():
        block_m, block_n = INTERPRETER_BLOCKS[kind]
        meta = {"BLOCK_M": block_m, "BLOCK_N": block_n}
        _KERNELS[kind][grid_for(meta)](**args, **meta)
    else:
        with utils.device_guard(x):
            _autotuned(kind, utils.cuda_capability(x))[grid_for](**args, **utils.LAUNCH_OPTIONS)


def _strides(prefix: str, x: torch.Tensor) -> dict[str, int]:
    """Strides over (batch, head, position, head dim); packed (total, H, D) rows have no batch stride."""
    strides = x.stride() if x.dim() == 4 else (0, x.stride(1), x.stride(0), x.stride(2))
    return {f"stride_{prefix}{axis}": s for axis, s in zip("bhtd", strides, strict=True)}


def _stat_strides(stat: torch.Tensor) -> dict[str, int]:
    """(B, H, T) statistics, or (H, total) for packed rows."""
    strides = stat.stride() if stat.dim() == 3 else (0, *stat.stride())
    return {"stride_lb": strides[0], "stride_lh": strides[1]}


def _pad16(n: int) -> int:
    return -(-n // 16) * 16


def _strides_aligned(x: torch.Tensor) -> bool:
    return all(s == 1 or s % 16 == 0 for s in x.stride())


def _is_aligned(x: torch.Tensor) -> bool:
    """Whether Triton specialises x's pointer and strides as divisible by 16 (16-byte aligned data, every stride
    but 1 a multiple of 16), as every build in `compile_report` assumes."""
    return x.data_ptr() % 16 == 0 and _strides_aligned(x)


def _alloc(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An empty dense tensor of `shape` with its last dimension padded to a multiple of 16 (the padding zeroed),
    so that every stride is a multiple of 16."""
    *lead, n = shape
    out = utils.empty(*lead, _pad16(n), dtype=dtype, device=device)
    if n % 16:
        out[..., n:].zero_()
    return out


def _aligned(x: torch.Tensor | None) -> torch.Tensor | None:
    """x, or an aligned copy of it. Without the alignment Triton specialises on, loads are not vectorised and every
    element needs its own address: those builds spill registers at every tile size (`compile_report` measured up
    to 2992 bytes), so inputs at an odd offset or with odd strides (head size 59) are copied, which costs one pass
    over them, instead."""
    if x is None or _is_aligned(x):
        return x
    if x.dim() == 1:
        return x.clone()
    return _alloc(tuple(x.shape), x.dtype, x.device)[..., :x.shape[-1]].copy_(x)


def _new_grad(x: torch.Tensor) -> torch.Tensor:
    """An empty dense tensor for x's gradient, aligned: x's layout where that is aligned, else rows padded to 16
    elements (the caller slices the padding off)."""
    out = utils.empty_like(x)  # a new allocation: its pointer is aligned (and fake tensors have none to read)
    return out if out.shape[-1] % 16 == 0 and _strides_aligned(out) else _alloc(tuple(x.shape), x.dtype, x.device)


def _window_args(causal: bool, window: tuple[int, int]) -> dict:
    """Kernel arguments of the mask: `causal` caps the window's right side at 0, as in FlashAttention."""
    left, right = window
    bounded_right = causal or right >= 0
    return dict(left=max(left, 0), right=0 if causal else max(right, 0), BOUNDED_LEFT=left >= 0,
                BOUNDED_RIGHT=bounded_right)


@functools.cache
def _no_index(device: torch.device) -> torch.Tensor:
    """A stand-in for index arguments a kernel is specialised not to read."""
    return torch.zeros(1, dtype=torch.int32, device=device)


def _common(q: torch.Tensor, k: torch.Tensor, causal: bool, sm_scale: float, window: tuple[int, int],
            softcap: float, t_q: int, t_k: int, cu: tuple | None, kv_range: tuple | None) -> dict:
    """Arguments every attention kernel takes, given the inputs and (packed rows) cumulative lengths `cu` or
    (dense batch) key ranges `kv_range`."""
    none = _no_index(q.device)
    cu_q, cu_k = (_aligned(x) for x in cu) if cu is not None else (none, none)
    # The kernel reads KV_START[b] at offset b: a strided or expanded (stride 0) range tensor is made dense first.
    kv_start, kv_end = (_aligned(x.contiguous()) for x in kv_range) if kv_range is not None else (none, none)
    heads, kv_heads = q.shape[1], k.shape[1]  # (B, H, T, D) or packed (total, H, D)
    d = q.shape[-1]
    return dict(
        CU_Q=cu_q, CU_K=cu_k, KV_START=kv_start, KV_END=kv_end, H=heads, GROUP=heads // kv_heads, T_Q=t_q, T_K=t_k,
        sm_scale=sm_scale, softcap=softcap, **_window_args(causal, window),
        # Autotune once per power-of-two length, not once per length (a growing KV cache changes T_K every step).
        TQ_BUCKET=max(t_q - 1, 0).bit_length(), TK_BUCKET=max(t_k - 1, 0).bit_length(),
        HEAD_DIM=d, BLOCK_D=utils.head_block(d), SOFTCAP=softcap > 0, VARLEN=cu is not None,
        KV_RANGE=kv_range is not None, INTERP_BF16=utils.interpreting() and q.dtype == torch.bfloat16,
        PRECISION=precision_for(q.dtype, on_gpu=q.is_cuda and not utils.interpreting()),
    )


def _new_output(q: torch.Tensor) -> torch.Tensor:
    """For queries q (B, H, T_Q, D): (B, H, T_Q, D16) in (B, T_Q, H, D16) memory, so the usual
    `transpose(1, 2).reshape(B, T, C)` after attention is free; packed (total, H, D16) rows. D16 is D rounded up
    to a multiple of 16 (the kernels write the first D; custom ops must return dense tensors, so the callers
    slice)."""
    if q.dim() == 3:
        return _alloc(tuple(q.shape), q.dtype, q.device)
    b, h, t, d = q.shape
    return _alloc((b, t, h, d), q.dtype, q.device).transpose(1, 2)


def _new_stats(q: torch.Tensor) -> torch.Tensor:
    """float32 per query row: (B, H, T_Q16), or (H, total_q16) for packed rows (rounded up to 16 rows)."""
    shape = (q.shape[1], q.shape[0]) if q.dim() == 3 else tuple(q.shape[:3])
    return _alloc(shape, torch.float32, q.device)


def _fwd(q, k, v, common: dict, n_seqs: int) -> tuple[torch.Tensor, torch.Tensor]:
    o, lse = _new_output(q), _new_stats(q)
    if q.numel() == 0:
        return o, lse
    q, k, v = _aligned(q), _aligned(k), _aligned(v)
    args = dict(Q=q, K=k, V=v, OUT=o, LSE=lse, **_strides("q", q), **_strides("k", k), **_strides("v", v),
                **_strides("o", o), **_stat_strides(lse), **common)
    _launch("fwd", q, lambda meta: (triton.cdiv(common["T_Q"], meta["BLOCK_M"]), n_seqs * common["H"]), args)
    return o, lse


def _bwd(do, q, k, v, o, lse, common: dict, n_seqs: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dk, dv = _new_grad(q), _new_grad(k), _new_grad(v)
    if q.numel() == 0 or k.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()  # no query saw any key (or there is nothing to differentiate)
    do, q, k, v, o, lse = (_aligned(x) for x in (do, q, k, v, o, lse))
    delta = _new_stats(q)
    rows = q if q.dim() == 4 else q.unsqueeze(0).transpose(1, 2)  # packed rows as one (1, H, total, D) batch
    orows, dorows = (x if x.dim() == 4 else x.unsqueeze(0).transpose(1, 2) for x in (o, do))
    with utils.device_guard(q):
        _attn_bwd_preprocess_kernel[(triton.cdiv(rows.shape[2], PREPROCESS_BLOCK_M), rows.shape[0] * rows.shape[1])](
            orows, dorows, delta, *orows.stride(), *dorows.stride(), **_stat_strides(delta), H=rows.shape[1],
            T=rows.shape[2], HEAD_DIM=q.shape[-1], BLOCK_D=utils.head_block(q.shape[-1]),
            BLOCK_M=PREPROCESS_BLOCK_M, num_warps=PREPROCESS_WARPS, maxnreg=utils.register_cap(PREPROCESS_WARPS),
            **utils.LAUNCH_OPTIONS)
    args = dict(Q=q, K=k, V=v, DO=do, LSE=lse, DELTA=delta, **_strides("q", q), **_strides("k", k),
                **_strides("v", v), **_strides("do", do), **_stat_strides(lse), **common)
    heads, kv_heads = common["H"], common["H"] // common["GROUP"]
    _launch("dkdv", q, lambda meta: (triton.cdiv(common["T_K"], meta["BLOCK_N"]), n_seqs * kv_heads),
            dict(args, DK=dk, DV=dv, **_strides("dk", dk), **_strides("dv", dv)))
    _launch("dq", q, lambda meta: (triton.cdiv(common["T_Q"], meta["BLOCK_M"]), n_seqs * heads),
            dict(args, DQ=dq, **_strides("dq", dq)))
    return dq, dk, dv


def attn_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_start: torch.Tensor | None,
             kv_end: torch.Tensor | None, causal: bool, sm_scale: float, window: tuple[int, int] = (-1, -1),
             softcap: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel. q (B, H, T_Q, D), k/v (B, H_KV, T_K, D), optional (B,) int32 key ranges
    -> out (B, H, T_Q, D16), LSE (B, H, T_Q16) float32 (D and T_Q rounded up to multiples of 16: `_new_output`)."""
    kv_range = None if kv_start is None else (kv_start, kv_end)
    common = _common(q, k, causal, sm_scale, window, softcap, q.shape[2], k.shape[2], None, kv_range)
    return _fwd(q, k, v, common, q.shape[0])


def attn_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
             kv_start: torch.Tensor | None, kv_end: torch.Tensor | None, causal: bool, sm_scale: float,
             window: tuple[int, int] = (-1, -1),
             softcap: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward kernels (rowsum(dO·O), then dK/dV over key tiles, then dQ over query tiles)."""
    kv_range = None if kv_start is None else (kv_start, kv_end)
    common = _common(q, k, causal, sm_scale, window, softcap, q.shape[2], k.shape[2], None, kv_range)
    return _bwd(do, q, k, v, o, lse, common, q.shape[0])


def attn_varlen_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
                    max_q: int, max_k: int, causal: bool, sm_scale: float, window: tuple[int, int] = (-1, -1),
                    softcap: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward kernel on packed rows: q (total_q, H, D), k/v (total_k, H_KV, D) -> out (total_q, H, D16),
    LSE (H, total_q16) float32."""
    common = _common(q, k, causal, sm_scale, window, softcap, max_q, max_k, (cu_q, cu_k), None)
    return _fwd(q, k, v, common, cu_q.shape[0] - 1)


def attn_varlen_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                    lse: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor, max_q: int, max_k: int, causal: bool,
                    sm_scale: float, window: tuple[int, int] = (-1, -1),
                    softcap: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    common = _common(q, k, causal, sm_scale, window, softcap, max_q, max_k, (cu_q, cu_k), None)
    return _bwd(do, q, k, v, o, lse, common, cu_q.shape[0] - 1)


# ============================================================================ PyTorch reference
def visible(t_q: int, t_k: int, causal: bool, window: tuple[int, int] = (-1, -1), device=None) -> torch.Tensor:
    """(T_Q, T_K) bool, True where query i sees key j (the module docstring's definition, without key ranges)."""
    left, right = window
    if causal:
        right = 0
    offset = torch.arange(t_k, device=device)[None, :] - torch.arange(t_q, device=device)[:, None] - (t_k - t_q)
    seen = torch.ones(t_q, t_k, dtype=torch.bool, device=device)
    if left >= 0:
        seen &= offset >= -left
    if right >= 0:
        seen &= offset <= right
    return seen


def _reference_scores(q, k, kv_start, kv_end, causal, sm_scale, window, softcap):
    """(B, H, T_Q, T_K) float32 scores in log2 units, -inf where hidden, and tanh(s/softcap) (or None)."""
    k = k.float().repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    s = torch.einsum("bhtd,bhsd->bhts", q.float(), k) * sm_scale
    t = None
    if softcap > 0:
        t = torch.tanh(s / softcap)
        s = t * softcap
    seen = visible(q.shape[2], k.shape[2], causal, window, q.device)[None, None]
    if kv_start is not None:
        j = torch.arange(k.shape[2], device=q.device)
        seen = seen & ((j >= kv_start[:, None]) & (j < kv_end[:, None]))[:, None, None, :]
    return (s * LOG2E).masked_fill(~seen, float("-inf")), t


def _lse(s: torch.Tensor) -> torch.Tensor:
    m = s.amax(-1, keepdim=True).nan_to_num(neginf=0.0)  # rows that see nothing: LSE = log2(0) = -inf, then +inf
    lse = m + torch.log2(torch.exp2(s - m).sum(-1, keepdim=True))
    return lse.masked_fill(lse == float("-inf"), float("inf"))


def _group_sum(x: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """(B, H, T, D) -> (B, H_KV, T, D), summing each group of query heads."""
    b, h, t, d = x.shape
    return x.view(b, kv_heads, h // kv_heads, t, d).sum(2)


def reference_fwd(q, k, v, kv_start, kv_end, causal, sm_scale, window=(-1, -1),
                  softcap=0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """What `attn_fwd` computes, in plain float32 PyTorch (materialises the scores: a reference, not a kernel)."""
    s, _ = _reference_scores(q, k, kv_start, kv_end, causal, sm_scale, window, softcap)  # (B, H, T_Q, T_K)
    lse = _lse(s)  # (B, H, T_Q, 1)
    vv = v.float().repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    o, stats = _new_output(q), _new_stats(q)
    o[..., :q.shape[-1]] = torch.exp2(s - lse) @ vv
    stats[..., :q.shape[2]] = lse.squeeze(-1)
    return o, stats


def reference_bwd(do, q, k, v, o, lse, kv_start, kv_end, causal, sm_scale, window=(-1, -1),
                  softcap=0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What `attn_bwd` computes, in plain float32 PyTorch."""
    s, t = _reference_scores(q, k, kv_start, kv_end, causal, sm_scale, window, softcap)
    p = torch.exp2(s - lse[..., :q.shape[2], None])  # (B, H, T_Q, T_K)
    group = q.shape[1] // k.shape[1]
    kk, vv = (x.float().repeat_interleave(group, dim=1) for x in (k, v))
    d = q.shape[-1]
    do32 = do[..., :d].float()
    delta = (do32 * o[..., :d].float()).sum(-1, keepdim=True)  # (B, H, T_Q, 1)
    ds = p * (do32 @ vv.transpose(-1, -2) - delta)  # (B, H, T_Q, T_K)
    if t is not None:
        ds = ds * (1 - t * t)
    grads = (ds @ kk * sm_scale, _group_sum(ds.transpose(-1, -2) @ q.float() * sm_scale, k.shape[1]),
             _group_sum(p.transpose(-1, -2) @ do32, k.shape[1]))
    outs = (_new_grad(q), _new_grad(k), _new_grad(v))
    for out, g in zip(outs, grads, strict=True):
        out[..., :d] = g
    return outs


def _sequences(cu: torch.Tensor) -> list[tuple[int, int]]:
    bounds = cu.tolist()
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def _as_batch(x: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    return x[lo:hi].transpose(0, 1).unsqueeze(0)  # packed rows of one sequence -> (1, H, T, D)


def reference_varlen_fwd(q, k, v, cu_q, cu_k, max_q, max_k, causal, sm_scale, window=(-1, -1), softcap=0.0):
    """What `attn_varlen_fwd` computes: the dense reference on each sequence."""
    o, lse = _new_output(q), _new_stats(q)
    for (q0, q1), (k0, k1) in zip(_sequences(cu_q), _sequences(cu_k), strict=True):
        o_b, lse_b = reference_fwd(_as_batch(q, q0, q1), _as_batch(k, k0, k1), _as_batch(v, k0, k1), None, None,
                                   causal, sm_scale, window, softcap)
        o[q0:q1] = o_b[0].transpose(0, 1)
        lse[:, q0:q1] = lse_b[0, :, :q1 - q0]
    return o, lse


def reference_varlen_bwd(do, q, k, v, o, lse, cu_q, cu_k, max_q, max_k, causal, sm_scale, window=(-1, -1),
                         softcap=0.0):
    """What `attn_varlen_bwd` computes."""
    dq, dk, dv = _new_grad(q), _new_grad(k), _new_grad(v)
    for (q0, q1), (k0, k1) in zip(_sequences(cu_q), _sequences(cu_k), strict=True):
        d = q.shape[-1]
        grads = reference_bwd(_as_batch(do[..., :d], q0, q1), _as_batch(q, q0, q1), _as_batch(k, k0, k1),
                              _as_batch(v, k0, k1), _as_batch(o[..., :d], q0, q1), lse[None, :, q0:q1], None, None,
                              causal, sm_scale, window, softcap)
        for out, g, (lo, hi) in zip((dq, dk, dv), grads, ((q0, q1), (k0, k1), (k0, k1)), strict=True):
            out[lo:hi, :, :d] = g[0, ..., :d].transpose(0, 1)
    return dq, dk, dv


# ============================================================================ torch.library ops
# Windows travel as two ints and softcap as a float (0: none), so the schemas stay plain.
@torch.library.custom_op("kernels::flash_attn_fwd", mutates_args=())
def _flash_attn_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_start: torch.Tensor | None,
                    kv_end: torch.Tensor | None, causal: bool, sm_scale: float, window_left: int, window_right: int,
                    softcap: float) -> tuple[torch.Tensor, torch.Tensor]:
    path = utils.dispatch_path(q)
    utils.record("flash_attn_fwd", path)
    return (reference_fwd if path == "reference" else attn_fwd)(q, k, v, kv_start, kv_end, causal, sm_scale,
                                                                (window_left, window_right), softcap)


@_flash_attn_fwd.register_fake
def _(q, k, v, kv_start, kv_end, causal, sm_scale, window_left, window_right, softcap):
    return _new_output(q), _new_stats(q)


@torch.library.custom_op("kernels::flash_attn_bwd", mutates_args=())
def _flash_attn_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                    lse: torch.Tensor, kv_start: torch.Tensor | None, kv_end: torch.Tensor | None, causal: bool,
                    sm_scale: float, window_left: int, window_right: int,
                    softcap: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    path = utils.dispatch_path(q)
    utils.record("flash_attn_bwd", path)
    return (reference_bwd if path == "reference" else attn_bwd)(do, q, k, v, o, lse, kv_start, kv_end, causal,
                                                                sm_scale, (window_left, window_right), softcap)


@_flash_attn_bwd.register_fake
def _(do, q, k, v, o, lse, kv_start, kv_end, causal, sm_scale, window_left, window_right, softcap):
    return _new_grad(q), _new_grad(k), _new_grad(v)


def _unpad(q: torch.Tensor, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The ops' outputs without the padding of rows to 16 elements (views; the padding exists where D % 16)."""
    d = q.shape[-1]
    return tuple(x if x.shape[-1] == d else x[..., :d] for x in xs)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, kv_start, kv_end, *ctx.options = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, kv_start, kv_end)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, do: torch.Tensor, _dlse: torch.Tensor):
    q, k, v, o, lse, kv_start, kv_end = ctx.saved_tensors
    dq, dk, dv = _unpad(q, *_flash_attn_bwd(do, q, k, v, o, lse, kv_start, kv_end, *ctx.options))
    return dq, dk, dv, None, None, None, None, None, None, None


_flash_attn_fwd.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("kernels::flash_attn_varlen_fwd", mutates_args=())
def _flash_attn_varlen_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                           cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, causal: bool,
                           sm_scale: float, window_left: int, window_right: int,
                           softcap: float) -> tuple[torch.Tensor, torch.Tensor]:
    path = utils.dispatch_path(q)
    utils.record("flash_attn_varlen_fwd", path)
    return (reference_varlen_fwd if path == "reference" else attn_varlen_fwd)(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, sm_scale,
        (window_left, window_right), softcap)


@_flash_attn_varlen_fwd.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, sm_scale, window_left, window_right,
      softcap):
    return _new_output(q), _new_stats(q)


@torch.library.custom_op("kernels::flash_attn_varlen_bwd", mutates_args=())
def _flash_attn_varlen_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                           lse: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
                           max_seqlen_q: int, max_seqlen_k: int, causal: bool, sm_scale: float, window_left: int,
                           window_right: int, softcap: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    path = utils.dispatch_path(q)
    utils.record("flash_attn_varlen_bwd", path)
    return (reference_varlen_bwd if path == "reference" else attn_varlen_bwd)(
        do, q, k, v, o, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, sm_scale,
        (window_left, window_right), softcap)


@_flash_attn_varlen_bwd.register_fake
def _(do, q, k, v, o, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, sm_scale, window_left,
      window_right, softcap):
    return _new_grad(q), _new_grad(k), _new_grad(v)


def _setup_varlen_context(ctx, inputs, output) -> None:
    q, k, v, cu_q, cu_k, *ctx.options = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, cu_q, cu_k)
    ctx.mark_non_differentiable(lse)


def _varlen_backward(ctx, do: torch.Tensor, _dlse: torch.Tensor):
    q, k, v, o, lse, cu_q, cu_k = ctx.saved_tensors
    dq, dk, dv = _unpad(q, *_flash_attn_varlen_bwd(do, q, k, v, o, lse, cu_q, cu_k, *ctx.options))
    return dq, dk, dv, None, None, None, None, None, None, None, None, None


_flash_attn_varlen_fwd.register_autograd(_varlen_backward, setup_context=_setup_varlen_context)


# ============================================================================ public API
MAX_HEAD_DIM = 128


def _check_options(d: int, sm_scale: float | None, window, softcap: float) -> tuple[float, tuple[int, int], float]:
    if not 1 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"head size D={d} is not supported: the kernels take 1 <= D <= {MAX_HEAD_DIM}")
    try:
        left, right = (int(w) for w in window)
    except (TypeError, ValueError):
        raise TypeError(f"window must be a pair of ints (left, right), got {window!r}") from None
    if left < -1 or right < -1:
        raise ValueError(f"window sides must be >= 0, or -1 for unbounded; got {window!r}")
    softcap = float(softcap)
    if not (softcap >= 0 and math.isfinite(softcap)):
        raise ValueError(f"softcap must be a finite number >= 0 (0: no capping), got {softcap}")
    scale = 1.0 / math.sqrt(d) if sm_scale is None else float(sm_scale)
    return scale, (left, right), softcap


def _check_heads(q_heads: int, kv_heads: int) -> None:
    if kv_heads == 0 or q_heads % kv_heads:
        raise ValueError(f"query heads H={q_heads} must be a multiple of key/value heads H_KV={kv_heads}")


def _check_index(name: str, x: object, length: int, device: torch.device) -> None:
    if not isinstance(x, torch.Tensor) or x.dtype != torch.int32 or x.shape != (length,):
        what = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"{name} must be an int32 tensor of shape ({length},), got {what}")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device} but q is on {device}")


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
                    sm_scale: float | None = None, window: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                    kv_start: torch.Tensor | None = None, kv_end: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax attention of (B, H, T_Q, D) queries over (B, H_KV, T_K, D) keys and values -> (B, H, T_Q, D).

    As `F.scaled_dot_product_attention`, with FlashAttention's masks: the causal diagonal is aligned to the end
    (query i sees key j iff j <= i + T_K - T_Q), so one new query against a KV cache sees every key, and with
    T_Q > T_K the first T_Q - T_K queries see none (their output and gradients are 0). `window=(left, right)`
    further limits query i to keys i + T_K - T_Q - left ... i + T_K - T_Q + right (-1: unbounded side), as
    FlashAttention's `window_size`; `softcap` c > 0 caps each score s (after `sm_scale`) as c·tanh(s/c).
    H must be a multiple of H_KV: query head h reads key/value head h // (H // H_KV) (grouped-query and
    multi-query attention), nothing copied. `kv_start`/`kv_end`, (B,) int32, limit sequence b to the keys
    [kv_start[b], kv_end[b]) (a padded batch, left or right).

    Inputs may have any strides; float16, bfloat16 or float32 (float32 multiplies in TF32 on a GPU where PyTorch
    allows TF32 matmuls, `torch.backends.cuda.matmul.fp32_precision = "tf32"` or
    `torch.set_float32_matmul_precision("high")`; exactly otherwise); D up to 128; `sm_scale` defaults to
    1/sqrt(D). Differentiable in q, k and v.
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        utils.check_float_tensor(name, x, ndim=4)
    utils.check_same(("q", "k", "v"), (q, k, v))
    b, h, _, d = q.shape
    if k.shape != v.shape or k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"expected q (B, H, T_Q, D) and k, v (B, H_KV, T_K, D); got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    _check_heads(h, k.shape[1])
    scale, (left, right), softcap = _check_options(d, sm_scale, window, softcap)
    if (kv_start is None) != (kv_end is None):
        raise ValueError("give both kv_start and kv_end, or neither")
    if kv_start is not None:
        _check_index("kv_start", kv_start, b, q.device)
        _check_index("kv_end", kv_end, b, q.device)
    return _unpad(q, _flash_attn_fwd(q, k, v, kv_start, kv_end, bool(causal), scale, left, right, softcap)[0])[0]


def flash_attention_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                           cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, causal: bool = True, *,
                           sm_scale: float | None = None, window: tuple[int, int] = (-1, -1),
                           softcap: float = 0.0) -> torch.Tensor:
    """`flash_attention` on packed sequences, as FlashAttention-2's `flash_attn_varlen_func`.

    q (total_q, H, D), k and v (total_k, H_KV, D): sequence b is the rows cu_seqlens_q[b]:cu_seqlens_q[b + 1] of
    q and cu_seqlens_k[b]:cu_seqlens_k[b + 1] of k and v (int32 tensors of shape (B + 1,), from 0 to the totals);
    no query sees keys of another sequence. `max_seqlen_q`/`max_seqlen_k` are the longest lengths (Python ints).
    Masks (each sequence's own T_Q and T_K), windows, softcap and grouped heads as in `flash_attention`.
    Returns (total_q, H, D); differentiable in q, k and v.
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        utils.check_float_tensor(name, x, ndim=3)
    utils.check_same(("q", "k", "v"), (q, k, v))
    if k.shape != v.shape or k.shape[2] != q.shape[2]:
        raise ValueError(f"expected q (total_q, H, D) and k, v (total_k, H_KV, D); got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    _check_heads(q.shape[1], k.shape[1])
    scale, (left, right), softcap = _check_options(q.shape[2], sm_scale, window, softcap)
    n = cu_seqlens_q.shape[0] if isinstance(cu_seqlens_q, torch.Tensor) and cu_seqlens_q.dim() == 1 else 0
    if n < 1:
        raise ValueError("cu_seqlens_q must be a 1-D int32 tensor of B + 1 sequence starts")
    _check_index("cu_seqlens_q", cu_seqlens_q, n, q.device)
    _check_index("cu_seqlens_k", cu_seqlens_k, n, q.device)
    max_q, max_k = int(max_seqlen_q), int(max_seqlen_k)
    if not torch.compiler.is_compiling():  # one small host copy; the kernels trust these bounds
        _check_lengths(cu_seqlens_q, cu_seqlens_k, q.shape[0], k.shape[0], max_q, max_k)
    out = _flash_attn_varlen_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_q, max_k, bool(causal), scale, left, right,
                                 softcap)[0]
    return _unpad(q, out)[0]


def _check_lengths(cu_q: torch.Tensor, cu_k: torch.Tensor, total_q: int, total_k: int, max_q: int,
                   max_k: int) -> None:
    for name, cu, total, longest in (("q", cu_q, total_q, max_q), ("k", cu_k, total_k, max_k)):
        bounds = cu.tolist()
        lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        if bounds[0] != 0 or bounds[-1] != total or min(lengths, default=0) < 0:
            raise ValueError(f"cu_seqlens_{name} must rise from 0 to the {total} rows of {name}, got {bounds}")
        if max(lengths, default=0) > longest:
            raise ValueError(f"max_seqlen_{name}={longest} is shorter than a sequence of {max(lengths)} rows")
