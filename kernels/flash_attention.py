"""Fused flash attention, forward and backward, in the FlashAttention-2 manner.

Three layers: private `@triton.jit` kernels; launchers that allocate and launch (`attn_fwd`, `attn_bwd`);
and the `torch.library` ops with their fake and autograd registrations, behind `flash_attention`.

Shapes: B batch, H heads, T_Q query and T_K key positions, D head size (1..128, padded to BLOCK_D).
With `causal=True` query i sees key j iff j <= i + T_K - T_Q: the diagonal is aligned to the end, so one
new query against a KV cache sees every key. Scores live in base 2: s = q·k · sm_scale · log2(e), and the
saved statistic is LSE = log2 Σ_j 2^s (float32, (B, H, T_Q)); the backward recomputes P = 2^(s - LSE).
No (T_Q, T_K) tensor is ever stored.
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
def _attn_fwd_inner(
    acc, l_i, m_i,  # (BLOCK_M, BLOCK_D), (BLOCK_M,), (BLOCK_M,) float32 running output, sum and max
    q,  # (BLOCK_M, BLOCK_D) query tile
    K_ptrs, V_ptrs,  # (BLOCK_N, BLOCK_D) pointers to the key/value tile at position `start`
    stride_kt, stride_vt,
    start, end,  # key range [start, end), start a multiple of BLOCK_N
    offs_m, offs_n, offs_d,
    T_K, diag, qk_scale,
    MASK: tl.constexpr,  # False: every (query, key) pair in range is visible and in bounds
    CAUSAL: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    INTERP_BF16: tl.constexpr, PRECISION: tl.constexpr,
):
    for start_n in range(start, end, BLOCK_N):
        kv = start_n + offs_n  # (BLOCK_N,) key positions
        k = _load_tile(K_ptrs, kv, T_K, offs_d, HEAD_DIM, MASK, HEAD_DIM != BLOCK_D)  # (BLOCK_N, BLOCK_D)
        s = _dot(q, tl.trans(k), tl.zeros((BLOCK_M, BLOCK_N), tl.float32), INTERP_BF16, PRECISION)
        s = s * qk_scale  # (BLOCK_M, BLOCK_N), log2 units
        if MASK:
            visible = kv[None, :] < T_K
            if CAUSAL:
                visible = visible & (kv[None, :] <= offs_m[:, None] + diag)
            s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: key 0 is visible to every row and comes first
        p = tl.math.exp2(s - m_new[:, None])  # (BLOCK_M, BLOCK_N)
        alpha = tl.math.exp2(m_i - m_new)  # (BLOCK_M,) rescales what was summed under the old max
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_tile(V_ptrs, kv, T_K, offs_d, HEAD_DIM, MASK, HEAD_DIM != BLOCK_D)  # (BLOCK_N, BLOCK_D)
        acc = _dot(cast_to(p, v.dtype, INTERP_BF16), v, acc * alpha[:, None], INTERP_BF16, PRECISION)
        m_i = m_new
        K_ptrs += BLOCK_N * stride_kt  # pointer steps: no int32 product of position and stride can overflow
        V_ptrs += BLOCK_N * stride_vt
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_kernel(
    Q,  # (B, H, T_Q, D) queries, any strides
    K,  # (B, H, T_K, D) keys
    V,  # (B, H, T_K, D) values
    OUT,  # (B, H, T_Q, D) out
    LSE,  # (B, H, T_Q) float32 out, contiguous: log2-sum-exp of each query's scores
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_ob, stride_oh, stride_ot, stride_od,
    H, T_Q, T_K,
    sm_scale,
    TQ_BUCKET, TK_BUCKET,  # log2 buckets of T_Q/T_K: the autotuning key, unused by the kernel
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, INTERP_BF16: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
    off_b, off_h = pid_bh // H, pid_bh % H
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    # int64 base offsets: B·H·T·D may pass 2^31.
    Q += off_b.to(tl.int64) * stride_qb + off_h.to(tl.int64) * stride_qh + start_m.to(tl.int64) * stride_qt
    K += off_b.to(tl.int64) * stride_kb + off_h.to(tl.int64) * stride_kh
    V += off_b.to(tl.int64) * stride_vb + off_h.to(tl.int64) * stride_vh
    OUT += off_b.to(tl.int64) * stride_ob + off_h.to(tl.int64) * stride_oh + start_m.to(tl.int64) * stride_ot
    K_ptrs = K + offs_n[:, None] * stride_kt + offs_d[None, :] * stride_kd
    V_ptrs = V + offs_n[:, None] * stride_vt + offs_d[None, :] * stride_vd

    q = _load_tile(Q + tl.arange(0, BLOCK_M)[:, None] * stride_qt + offs_d[None, :] * stride_qd,
                   offs_m, T_Q, offs_d, HEAD_DIM, True, HEAD_DIM != BLOCK_D)  # (BLOCK_M, BLOCK_D)
    qk_scale = sm_scale * 1.44269504  # exp(x) = exp2(x·log2(e)): fold log2(e) into the score scale
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)

    diag = T_K - T_Q  # causal: query i sees key j iff j <= i + diag
    if CAUSAL:
        # Keys below `n_full` are visible to every row of the block; keys at or past `hi` to none of them.
        n_full = (start_m + diag + 1) // BLOCK_N * BLOCK_N
        hi = tl.minimum(T_K, start_m + BLOCK_M + diag)
    else:
        n_full = T_K // BLOCK_N * BLOCK_N
        hi = T_K
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, K_ptrs, V_ptrs, stride_kt, stride_vt, 0, n_full,
                                    offs_m, offs_n, offs_d, T_K, diag, qk_scale,
                                    False, CAUSAL, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, INTERP_BF16, PRECISION)
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, K_ptrs + tl.cast(n_full, tl.int64) * stride_kt,
                                    V_ptrs + tl.cast(n_full, tl.int64) * stride_vt, stride_kt, stride_vt, n_full, hi,
                                    offs_m, offs_n, offs_d, T_K, diag, qk_scale,
                                    True, CAUSAL, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, INTERP_BF16, PRECISION)

    acc = acc / l_i[:, None]
    row_ok = offs_m < T_Q
    tl.store(LSE + pid_bh.to(tl.int64) * T_Q + offs_m, m_i + tl.math.log2(l_i), mask=row_ok)
    o_ptrs = OUT + tl.arange(0, BLOCK_M)[:, None] * stride_ot + offs_d[None, :] * stride_od
    tl.store(o_ptrs, cast_to(acc, OUT.dtype.element_ty, INTERP_BF16),
             mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM))


@triton.jit
def _attn_bwd_preprocess_kernel(
    OUT,  # (B, H, T_Q, D) forward output
    DO,  # (B, H, T_Q, D) its gradient
    DELTA,  # (B, H, T_Q) float32 out, contiguous: rowsum(dO * O)
    stride_ob, stride_oh, stride_ot, stride_od,
    stride_dob, stride_doh, stride_dot, stride_dod,
    H, T_Q,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
    off_b, off_h = pid_bh // H, pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < T_Q) & (offs_d[None, :] < HEAD_DIM)
    o = tl.load(OUT + off_b.to(tl.int64) * stride_ob + off_h.to(tl.int64) * stride_oh
                + offs_m[:, None].to(tl.int64) * stride_ot + offs_d[None, :] * stride_od, mask=mask, other=0.0)
    do = tl.load(DO + off_b.to(tl.int64) * stride_dob + off_h.to(tl.int64) * stride_doh
                 + offs_m[:, None].to(tl.int64) * stride_dot + offs_d[None, :] * stride_dod, mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)  # (BLOCK_M,)
    tl.store(DELTA + pid_bh.to(tl.int64) * T_Q + offs_m, delta, mask=offs_m < T_Q)


@triton.jit
def _attn_bwd_dkdv_inner(
    dk, dv,  # (BLOCK_N, BLOCK_D) float32 accumulators
    k, v,  # (BLOCK_N, BLOCK_D) this program's key/value tile
    Q_ptrs, DO_ptrs,  # (BLOCK_M, BLOCK_D) pointers to the query / output-gradient tile at position `start`
    LSE, DELTA,  # (T_Q,) float32 rows of this (b, h)
    stride_qt, stride_dot,
    start, end,  # query range [start, end), start a multiple of BLOCK_M
    offs_n, offs_d,
    T_Q, diag, qk_scale,
    MASK: tl.constexpr,  # apply the causal mask (diagonal blocks)
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    INTERP_BF16: tl.constexpr, PRECISION: tl.constexpr,
):
    for start_m in range(start, end, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q = _load_tile(Q_ptrs, offs_m, T_Q, offs_d, HEAD_DIM, True, HEAD_DIM != BLOCK_D)  # (BLOCK_M, BLOCK_D)
        do = _load_tile(DO_ptrs, offs_m, T_Q, offs_d, HEAD_DIM, True, HEAD_DIM != BLOCK_D)
        # Rows past T_Q get LSE = +inf, hence P = 0: they add nothing without a score mask.
        lse = tl.load(LSE + offs_m, mask=offs_m < T_Q, other=float("inf"))  # (BLOCK_M,)
        delta = tl.load(DELTA + offs_m, mask=offs_m < T_Q, other=0.0)
        s_t = _dot(k, tl.trans(q), tl.zeros((BLOCK_N, BLOCK_M), tl.float32), INTERP_BF16, PRECISION)
        p_t = tl.math.exp2(s_t * qk_scale - lse[None, :])  # (BLOCK_N, BLOCK_M) = P^T
        if MASK:
            p_t = tl.where(offs_n[:, None] <= offs_m[None, :] + diag, p_t, 0.0)
        dv = _dot(cast_to(p_t, do.dtype, INTERP_BF16), do, dv, INTERP_BF16, PRECISION)  # dV += P^T dO
        dp_t = _dot(v, tl.trans(do), tl.zeros((BLOCK_N, BLOCK_M), tl.float32), INTERP_BF16, PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])  # (BLOCK_N, BLOCK_M) = dS^T
        dk = _dot(cast_to(ds_t, q.dtype, INTERP_BF16), q, dk, INTERP_BF16, PRECISION)  # dK += dS^T Q, scaled later
        Q_ptrs += BLOCK_M * stride_qt
        DO_ptrs += BLOCK_M * stride_dot
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V,  # (B, H, T_Q, D), (B, H, T_K, D), (B, H, T_K, D) forward inputs, any strides
    DO,  # (B, H, T_Q, D) output gradient
    LSE, DELTA,  # (B, H, T_Q) float32, contiguous
    DK, DV,  # (B, H, T_K, D) out
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_dob, stride_doh, stride_dot, stride_dod,
    stride_dkb, stride_dkh, stride_dkt, stride_dkd,
    stride_dvb, stride_dvh, stride_dvt, stride_dvd,
    H, T_Q, T_K,
    sm_scale,
    TQ_BUCKET, TK_BUCKET,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, INTERP_BF16: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_n, pid_bh = tl.program_id(0), tl.program_id(1)
    off_b, off_h = pid_bh // H, pid_bh % H
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    K += off_b.to(tl.int64) * stride_kb + off_h.to(tl.int64) * stride_kh + start_n.to(tl.int64) * stride_kt
    V += off_b.to(tl.int64) * stride_vb + off_h.to(tl.int64) * stride_vh + start_n.to(tl.int64) * stride_vt
    Q += off_b.to(tl.int64) * stride_qb + off_h.to(tl.int64) * stride_qh
    DO += off_b.to(tl.int64) * stride_dob + off_h.to(tl.int64) * stride_doh
    LSE += pid_bh.to(tl.int64) * T_Q
    DELTA += pid_bh.to(tl.int64) * T_Q
    rows = tl.arange(0, BLOCK_N)
    k = _load_tile(K + rows[:, None] * stride_kt + offs_d[None, :] * stride_kd, offs_n, T_K, offs_d, HEAD_DIM,
                   True, HEAD_DIM != BLOCK_D)  # (BLOCK_N, BLOCK_D)
    v = _load_tile(V + rows[:, None] * stride_vt + offs_d[None, :] * stride_vd, offs_n, T_K, offs_d, HEAD_DIM,
                   True, HEAD_DIM != BLOCK_D)
    Q_ptrs = Q + tl.arange(0, BLOCK_M)[:, None] * stride_qt + offs_d[None, :] * stride_qd
    DO_ptrs = DO + tl.arange(0, BLOCK_M)[:, None] * stride_dot + offs_d[None, :] * stride_dod
    qk_scale = sm_scale * 1.44269504
    dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)

    m_end = tl.cdiv(T_Q, BLOCK_M) * BLOCK_M
    diag = T_K - T_Q
    if CAUSAL:
        # Queries before `lo` see none of these keys (never visited); from `m_full` on they see all of them.
        lo = tl.maximum(start_n - diag, 0) // BLOCK_M * BLOCK_M
        m_full = tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - diag, 0), BLOCK_M) * BLOCK_M
        m_full = tl.minimum(tl.maximum(m_full, lo), m_end)
        dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, Q_ptrs + tl.cast(lo, tl.int64) * stride_qt,
                                      DO_ptrs + tl.cast(lo, tl.int64) * stride_dot, LSE, DELTA, stride_qt, stride_dot,
                                      lo, m_full,
                                      offs_n, offs_d, T_Q, diag, qk_scale,
                                      True, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, INTERP_BF16, PRECISION)
    else:
        m_full = 0
    dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, Q_ptrs + tl.cast(m_full, tl.int64) * stride_qt,
                                  DO_ptrs + tl.cast(m_full, tl.int64) * stride_dot, LSE, DELTA, stride_qt, stride_dot,
                                  m_full, m_end,
                                  offs_n, offs_d, T_Q, diag, qk_scale,
                                  False, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, INTERP_BF16, PRECISION)

    mask = (offs_n[:, None] < T_K) & (offs_d[None, :] < HEAD_DIM)
    DK += off_b.to(tl.int64) * stride_dkb + off_h.to(tl.int64) * stride_dkh + start_n.to(tl.int64) * stride_dkt
    DV += off_b.to(tl.int64) * stride_dvb + off_h.to(tl.int64) * stride_dvh + start_n.to(tl.int64) * stride_dvt
    tl.store(DK + rows[:, None] * stride_dkt + offs_d[None, :] * stride_dkd,
             cast_to(dk * sm_scale, DK.dtype.element_ty, INTERP_BF16), mask=mask)
    tl.store(DV + rows[:, None] * stride_dvt + offs_d[None, :] * stride_dvd,
             cast_to(dv, DV.dtype.element_ty, INTERP_BF16), mask=mask)


@triton.jit
def _attn_bwd_dq_inner(
    dq,  # (BLOCK_M, BLOCK_D) float32 accumulator
    q, do,  # (BLOCK_M, BLOCK_D) this program's query and output-gradient tiles
    lse, delta,  # (BLOCK_M,) float32
    K_ptrs, V_ptrs,  # (BLOCK_N, BLOCK_D) pointers to the key/value tile at position `start`
    stride_kt, stride_vt,
    start, end,  # key range [start, end), start a multiple of BLOCK_N
    offs_m, offs_n, offs_d,
    T_K, diag, qk_scale,
    MASK: tl.constexpr, CAUSAL: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    INTERP_BF16: tl.constexpr, PRECISION: tl.constexpr,
):
    for start_n in range(start, end, BLOCK_N):
        kv = start_n + offs_n
        k = _load_tile(K_ptrs, kv, T_K, offs_d, HEAD_DIM, MASK, HEAD_DIM != BLOCK_D)  # (BLOCK_N, BLOCK_D)
        v = _load_tile(V_ptrs, kv, T_K, offs_d, HEAD_DIM, MASK, HEAD_DIM != BLOCK_D)
        s = _dot(q, tl.trans(k), tl.zeros((BLOCK_M, BLOCK_N), tl.float32), INTERP_BF16, PRECISION)
        p = tl.math.exp2(s * qk_scale - lse[:, None])  # (BLOCK_M, BLOCK_N)
        if MASK:
            visible = kv[None, :] < T_K
            if CAUSAL:
                visible = visible & (kv[None, :] <= offs_m[:, None] + diag)
            p = tl.where(visible, p, 0.0)
        dp = _dot(do, tl.trans(v), tl.zeros((BLOCK_M, BLOCK_N), tl.float32), INTERP_BF16, PRECISION)
        ds = p * (dp - delta[:, None])  # (BLOCK_M, BLOCK_N)
        dq = _dot(cast_to(ds, k.dtype, INTERP_BF16), k, dq, INTERP_BF16, PRECISION)  # dQ += dS K (scaled at the end)
        K_ptrs += BLOCK_N * stride_kt
        V_ptrs += BLOCK_N * stride_vt
    return dq


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V,  # (B, H, T_Q, D), (B, H, T_K, D), (B, H, T_K, D) forward inputs, any strides
    DO,  # (B, H, T_Q, D) output gradient
    LSE, DELTA,  # (B, H, T_Q) float32, contiguous
    DQ,  # (B, H, T_Q, D) out
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_dob, stride_doh, stride_dot, stride_dod,
    stride_dqb, stride_dqh, stride_dqt, stride_dqd,
    H, T_Q, T_K,
    sm_scale,
    TQ_BUCKET, TK_BUCKET,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, INTERP_BF16: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
    off_b, off_h = pid_bh // H, pid_bh % H
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    rows = tl.arange(0, BLOCK_M)
    Q += off_b.to(tl.int64) * stride_qb + off_h.to(tl.int64) * stride_qh + start_m.to(tl.int64) * stride_qt
    DO += off_b.to(tl.int64) * stride_dob + off_h.to(tl.int64) * stride_doh + start_m.to(tl.int64) * stride_dot
    K += off_b.to(tl.int64) * stride_kb + off_h.to(tl.int64) * stride_kh
    V += off_b.to(tl.int64) * stride_vb + off_h.to(tl.int64) * stride_vh
    q = _load_tile(Q + rows[:, None] * stride_qt + offs_d[None, :] * stride_qd, offs_m, T_Q, offs_d, HEAD_DIM,
                   True, HEAD_DIM != BLOCK_D)  # (BLOCK_M, BLOCK_D)
    do = _load_tile(DO + rows[:, None] * stride_dot + offs_d[None, :] * stride_dod, offs_m, T_Q, offs_d, HEAD_DIM,
                    True, HEAD_DIM != BLOCK_D)
    row_ok = offs_m < T_Q
    lse = tl.load(LSE + pid_bh.to(tl.int64) * T_Q + offs_m, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + pid_bh.to(tl.int64) * T_Q + offs_m, mask=row_ok, other=0.0)
    K_ptrs = K + offs_n[:, None] * stride_kt + offs_d[None, :] * stride_kd
    V_ptrs = V + offs_n[:, None] * stride_vt + offs_d[None, :] * stride_vd
    qk_scale = sm_scale * 1.44269504
    dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)

    diag = T_K - T_Q
    if CAUSAL:
        n_full = (start_m + diag + 1) // BLOCK_N * BLOCK_N
        hi = tl.minimum(T_K, start_m + BLOCK_M + diag)
    else:
        n_full = T_K // BLOCK_N * BLOCK_N
        hi = T_K
    dq = _attn_bwd_dq_inner(dq, q, do, lse, delta, K_ptrs, V_ptrs, stride_kt, stride_vt, 0, n_full,
                            offs_m, offs_n, offs_d, T_K, diag, qk_scale,
                            False, CAUSAL, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, INTERP_BF16, PRECISION)
    dq = _attn_bwd_dq_inner(dq, q, do, lse, delta, K_ptrs + tl.cast(n_full, tl.int64) * stride_kt,
                            V_ptrs + tl.cast(n_full, tl.int64) * stride_vt, stride_kt, stride_vt, n_full, hi,
                            offs_m, offs_n, offs_d, T_K, diag, qk_scale,
                            True, CAUSAL, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, INTERP_BF16, PRECISION)

    DQ += off_b.to(tl.int64) * stride_dqb + off_h.to(tl.int64) * stride_dqh + start_m.to(tl.int64) * stride_dqt
    tl.store(DQ + rows[:, None] * stride_dqt + offs_d[None, :] * stride_dqd,
             cast_to(dq * sm_scale, DQ.dtype.element_ty, INTERP_BF16),
             mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM))


# ============================================================================ launchers
def _config(block_m: int, block_n: int, num_warps: int, num_stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=num_warps, num_stages=num_stages)


# Autotuning candidates, (BLOCK_M, BLOCK_N, num_warps, num_stages), per kernel, GPU generation (8: Ampere/Ada,
# 9: Hopper), element size (2: fp16/bf16 on tensor cores; 4: fp32, exact FMA products) and head tile (BLOCK_D
# up to 64, or 128). Tile shapes after the Triton tutorial and FlashAttention-2: tall query tiles for the
# forward and dQ passes, wide key tiles for dK/dV, and a 16-row tile for one query against a KV cache. Every
# entry was chosen by building it for sm_80/sm_90 at head sizes 64, 80 and 128 (`python -m
# kernels.compile_report`): no register spills, shared memory within the chip. Bigger tiles spilled at head
# size 128; float32's FMA products hold whole head-size rows in registers, hence its small tiles.
CONFIGS: dict[tuple[str, int, int, int], list[tuple[int, int, int, int]]] = {
    ("fwd", 9, 2, 64): [(128, 128, 8, 3), (128, 64, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3), (16, 64, 4, 2)],
    ("fwd", 9, 2, 128): [(128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 3), (16, 64, 4, 2)],
    ("fwd", 8, 2, 64): [(128, 64, 8, 3), (128, 64, 4, 3), (128, 32, 4, 3), (64, 64, 4, 3), (16, 64, 4, 2)],
    ("fwd", 8, 2, 128): [(128, 32, 8, 3), (64, 64, 8, 3), (64, 32, 4, 3), (16, 64, 4, 2)],
    ("dkdv", 9, 2, 64): [(64, 128, 8, 3), (32, 128, 8, 3), (32, 64, 4, 3), (16, 64, 4, 2)],
    ("dkdv", 9, 2, 128): [(32, 128, 8, 3), (32, 64, 8, 3), (16, 64, 4, 2)],
    ("dkdv", 8, 2, 64): [(32, 128, 8, 3), (64, 64, 8, 3), (32, 64, 4, 3), (16, 64, 4, 2)],
    ("dkdv", 8, 2, 128): [(64, 64, 8, 3), (32, 64, 8, 3), (16, 64, 4, 2)],
    ("dq", 9, 2, 64): [(128, 64, 8, 3), (128, 32, 4, 3), (64, 32, 4, 3), (16, 32, 4, 2)],
    ("dq", 9, 2, 128): [(128, 64, 8, 3), (128, 32, 8, 3), (64, 32, 4, 3), (16, 32, 4, 2)],
    ("dq", 8, 2, 64): [(128, 64, 8, 3), (128, 32, 8, 3), (64, 32, 4, 3), (16, 32, 4, 2)],
    ("dq", 8, 2, 128): [(128, 32, 8, 3), (64, 64, 8, 3), (64, 32, 4, 3), (16, 32, 4, 2)],
    ("fwd", 9, 4, 64): [(64, 32, 8, 2), (32, 32, 4, 2), (16, 32, 4, 2)],
    ("fwd", 9, 4, 128): [(32, 16, 8, 2), (16, 32, 8, 2), (16, 16, 4, 2)],
    ("fwd", 8, 4, 64): [(64, 32, 8, 2), (32, 32, 4, 2), (16, 32, 4, 2)],
    ("fwd", 8, 4, 128): [(32, 16, 8, 2), (16, 32, 8, 2), (16, 16, 8, 2)],
    ("dkdv", 9, 4, 64): [(32, 32, 8, 2), (16, 32, 4, 2), (16, 16, 4, 2)],
    ("dkdv", 9, 4, 128): [(16, 32, 8, 2), (16, 16, 8, 2), (16, 16, 4, 2)],
    ("dkdv", 8, 4, 64): [(64, 32, 8, 2), (32, 32, 8, 2), (16, 16, 4, 2)],
    ("dkdv", 8, 4, 128): [(32, 32, 8, 2), (32, 16, 8, 2), (16, 16, 8, 2)],
    ("dq", 9, 4, 64): [(64, 32, 8, 2), (32, 32, 8, 2), (16, 32, 4, 2)],
    ("dq", 9, 4, 128): [(64, 32, 8, 2), (32, 32, 8, 2), (16, 32, 4, 2)],
    ("dq", 8, 4, 64): [(64, 32, 8, 2), (32, 32, 8, 2), (16, 32, 4, 2)],
    ("dq", 8, 4, 128): [(32, 16, 8, 2), (16, 32, 8, 2), (16, 32, 4, 2)],
}
# The interpreter cannot autotune: one fixed (BLOCK_M, BLOCK_N) per kernel; tests may change it.
INTERPRETER_BLOCKS: dict[str, tuple[int, int]] = {"fwd": (32, 32), "dkdv": (32, 32), "dq": (32, 32)}
PREPROCESS_BLOCK_M = 64


def config_class(capability: int, dtype: torch.dtype, head_dim: int) -> tuple[int, int, int]:
    """(GPU generation, element size, head tile class) indexing CONFIGS, as in the comment above."""
    return (9 if capability >= 90 else 8, 4 if dtype == torch.float32 else 2,
            64 if utils.head_block(head_dim) <= 64 else 128)


def configs_for(kind: str, capability: int, dtype: torch.dtype, head_dim: int) -> list[triton.Config]:
    """Autotuning candidates of kernel `kind` ("fwd", "dkdv", "dq") for a GPU of compute capability
    `capability` (80, 90, ...) and inputs of `dtype` and head size `head_dim`."""
    return [_config(*c) for c in CONFIGS[(kind, *config_class(capability, dtype, head_dim))]]


def configs_for_shape(kind: str, capability: int, dtype: torch.dtype, head_dim: int, t_q: int,
                      t_k: int) -> list[triton.Config]:
    """`configs_for`, less tiles much longer than the sequences they cover (one query against a KV cache
    keeps the 16-row query tiles); the smallest tile if none is left."""
    configs = configs_for(kind, capability, dtype, head_dim)
    cap_m, cap_n = (max(16, utils.next_power_of_2(t)) for t in (t_q, t_k))
    short = [c for c in configs if c.kwargs["BLOCK_M"] <= cap_m and c.kwargs["BLOCK_N"] <= cap_n]
    return short or [min(configs, key=lambda c: (c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"], c.num_warps))]


def _prune(kind: str, capability: int, configs: list[triton.Config], nargs: dict, **kwargs) -> list[triton.Config]:
    args = {**nargs, **kwargs}
    return configs_for_shape(kind, capability, args["Q"].dtype, args["HEAD_DIM"], args["T_Q"], args["T_K"])


_KERNELS = {"fwd": _attn_fwd_kernel, "dkdv": _attn_bwd_dkdv_kernel, "dq": _attn_bwd_dq_kernel}


@functools.cache
def _autotuned(kind: str, capability: int) -> triton.runtime.Autotuner:
    # Built on first use, never at import: autotuning asks for the active driver.
    generation = config_class(capability, torch.float16, 64)[0]
    every = sorted({c for key, cs in CONFIGS.items() if key[:2] == (kind, generation) for c in cs})
    return triton.autotune(
        configs=[_config(*c) for c in every],  # `_prune` picks those of the call's dtype and head size
        key=["HEAD_DIM", "CAUSAL", "TQ_BUCKET", "TK_BUCKET"],  # tensor dtypes are added by Triton
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
    return {f"stride_{prefix}{axis}": s for axis, s in zip("bhtd", x.stride(), strict=True)}


def _meta(q: torch.Tensor, causal: bool) -> dict:
    """Compile-time arguments shared by the attention kernels."""
    d = q.shape[3]
    return dict(
        HEAD_DIM=d, BLOCK_D=utils.head_block(d), CAUSAL=causal,
        INTERP_BF16=utils.interpreting() and q.dtype == torch.bfloat16,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",  # full float32 products, as PyTorch's
    )


def _buckets(t_q: int, t_k: int) -> dict[str, int]:
    # Autotune once per power-of-two length, not once per length (a growing KV cache changes T_K every step).
    return {"TQ_BUCKET": max(t_q - 1, 0).bit_length(), "TK_BUCKET": max(t_k - 1, 0).bit_length()}


def _new_output(q: torch.Tensor) -> torch.Tensor:
    """(B, H, T_Q, D) in (B, T_Q, H, D) memory: the usual `transpose(1, 2).reshape(B, T, C)` after attention is free."""
    b, h, t, d = q.shape
    return utils.empty(b, t, h, d, dtype=q.dtype, device=q.device).transpose(1, 2)


def attn_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
             sm_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel. q (B, H, T_Q, D), k/v (B, H, T_K, D) -> out (B, H, T_Q, D), LSE (B, H, T_Q) fp32."""
    b, h, t_q, _ = q.shape
    t_k = k.shape[2]
    o = _new_output(q)
    lse = utils.empty(b, h, t_q, dtype=torch.float32, device=q.device)
    if o.numel() == 0:
        return o, lse
    args = dict(Q=q, K=k, V=v, OUT=o, LSE=lse, **_strides("q", q), **_strides("k", k), **_strides("v", v),
                **_strides("o", o), H=h, T_Q=t_q, T_K=t_k, sm_scale=sm_scale, **_buckets(t_q, t_k), **_meta(q, causal))
    _launch("fwd", q, lambda meta: (triton.cdiv(t_q, meta["BLOCK_M"]), b * h), args)
    return o, lse


def attn_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
             causal: bool, sm_scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward kernels (rowsum(dO·O), then dK/dV over key tiles, then dQ over query tiles)."""
    b, h, t_q, d = q.shape
    t_k = k.shape[2]
    dq, dk, dv = utils.empty_like(q), utils.empty_like(k), utils.empty_like(v)
    if b * h == 0 or t_k == 0:
        return dq, dk, dv
    if t_q == 0:  # no query saw any key
        return dq, dk.zero_(), dv.zero_()
    delta = utils.empty(b, h, t_q, dtype=torch.float32, device=q.device)
    with utils.device_guard(q):
        _attn_bwd_preprocess_kernel[(triton.cdiv(t_q, PREPROCESS_BLOCK_M), b * h)](
            o, do, delta, *o.stride(), *do.stride(), h, t_q,
            HEAD_DIM=d, BLOCK_D=utils.head_block(d), BLOCK_M=PREPROCESS_BLOCK_M, **utils.LAUNCH_OPTIONS)
    common = dict(Q=q, K=k, V=v, DO=do, LSE=lse, DELTA=delta, **_strides("q", q), **_strides("k", k),
                  **_strides("v", v), **_strides("do", do), H=h, T_Q=t_q, T_K=t_k, sm_scale=sm_scale,
                  **_buckets(t_q, t_k), **_meta(q, causal))
    _launch("dkdv", q, lambda meta: (triton.cdiv(t_k, meta["BLOCK_N"]), b * h),
            dict(common, DK=dk, DV=dv, **_strides("dk", dk), **_strides("dv", dv)))
    _launch("dq", q, lambda meta: (triton.cdiv(t_q, meta["BLOCK_M"]), b * h),
            dict(common, DQ=dq, **_strides("dq", dq)))
    return dq, dk, dv


# ============================================================================ PyTorch reference
def _reference_scores(q: torch.Tensor, k: torch.Tensor, causal: bool, sm_scale: float) -> torch.Tensor:
    """(B, H, T_Q, T_K) float32 scores in log2 units, -inf where masked."""
    s = torch.einsum("bhtd,bhsd->bhts", q.float(), k.float()) * (sm_scale * LOG2E)
    if causal:
        t_q, t_k = q.shape[2], k.shape[2]
        i = torch.arange(t_q, device=q.device)[:, None]
        j = torch.arange(t_k, device=q.device)[None, :]
        s = s.masked_fill(j > i + (t_k - t_q), float("-inf"))
    return s


def reference_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                  sm_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """What `attn_fwd` computes, in plain float32 PyTorch (materialises the scores: a reference, not a kernel)."""
    s = _reference_scores(q, k, causal, sm_scale)  # (B, H, T_Q, T_K)
    m = s.amax(-1, keepdim=True)
    lse = m + torch.log2(torch.exp2(s - m).sum(-1, keepdim=True))  # (B, H, T_Q, 1)
    o = _new_output(q)
    o.copy_(torch.exp2(s - lse) @ v.float())
    return o, lse.squeeze(-1)


def reference_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                  lse: torch.Tensor, causal: bool, sm_scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What `attn_bwd` computes, in plain float32 PyTorch."""
    p = torch.exp2(_reference_scores(q, k, causal, sm_scale) - lse[..., None])  # (B, H, T_Q, T_K)
    do32 = do.float()
    delta = (do32 * o.float()).sum(-1, keepdim=True)  # (B, H, T_Q, 1)
    ds = p * (do32 @ v.float().transpose(-1, -2) - delta)  # (B, H, T_Q, T_K)
    grads = (ds @ k.float() * sm_scale, ds.transpose(-1, -2) @ q.float() * sm_scale, p.transpose(-1, -2) @ do32)
    outs = (utils.empty_like(q), utils.empty_like(k), utils.empty_like(v))
    return tuple(out.copy_(g) for out, g in zip(outs, grads, strict=True))


# ============================================================================ torch.library ops
@torch.library.custom_op("kernels::flash_attn_fwd", mutates_args=())
def _flash_attn_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                    sm_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    path = utils.dispatch_path(q)
    utils.record("flash_attn_fwd", path)
    return (reference_fwd if path == "reference" else attn_fwd)(q, k, v, causal, sm_scale)


@_flash_attn_fwd.register_fake
def _(q, k, v, causal, sm_scale):
    b, h, t, d = q.shape
    return q.new_empty(b, t, h, d).transpose(1, 2), q.new_empty(b, h, t, dtype=torch.float32)


@torch.library.custom_op("kernels::flash_attn_bwd", mutates_args=())
def _flash_attn_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                    lse: torch.Tensor, causal: bool,
                    sm_scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    path = utils.dispatch_path(q)
    utils.record("flash_attn_bwd", path)
    return (reference_bwd if path == "reference" else attn_bwd)(do, q, k, v, o, lse, causal, sm_scale)


@_flash_attn_bwd.register_fake
def _(do, q, k, v, o, lse, causal, sm_scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, causal, sm_scale = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse)
    ctx.causal, ctx.sm_scale = causal, sm_scale
    ctx.mark_non_differentiable(lse)


def _backward(ctx, do: torch.Tensor, _dlse: torch.Tensor):
    q, k, v, o, lse = ctx.saved_tensors
    dq, dk, dv = _flash_attn_bwd(do, q, k, v, o, lse, ctx.causal, ctx.sm_scale)
    return dq, dk, dv, None, None


_flash_attn_fwd.register_autograd(_backward, setup_context=_setup_context)


# ============================================================================ public API
MAX_HEAD_DIM = 128


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
                    sm_scale: float | None = None) -> torch.Tensor:
    """Softmax attention of (B, H, T_Q, D) queries over (B, H, T_K, D) keys and values -> (B, H, T_Q, D).

    As `F.scaled_dot_product_attention`, but with `causal=True` the diagonal is aligned to the end (query i
    sees key j iff j <= i + T_K - T_Q, which needs T_Q <= T_K), so one new query against a KV cache works.
    Inputs may have any strides; float16, bfloat16 or float32; D up to 128; `sm_scale` defaults to 1/sqrt(D).
    Differentiable in q, k and v.
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        utils.check_float_tensor(name, x, ndim=4)
    utils.check_same(("q", "k", "v"), (q, k, v))
    b, h, t_q, d = q.shape
    t_k = k.shape[2]
    if k.shape != v.shape or k.shape[:2] != (b, h) or k.shape[3] != d:
        raise ValueError(f"expected q (B, H, T_Q, D) and k, v (B, H, T_K, D); got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if not 1 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"head size D={d} is not supported: the kernels take 1 <= D <= {MAX_HEAD_DIM}")
    if t_k == 0 and t_q > 0:
        raise ValueError("attention over zero keys (T_K = 0) is undefined")
    if causal and t_q > t_k:
        raise ValueError(f"causal attention needs T_Q <= T_K (diagonal aligned to the end), got T_Q={t_q}, "
                         f"T_K={t_k}")
    scale = 1.0 / math.sqrt(d) if sm_scale is None else float(sm_scale)
    return _flash_attn_fwd(q, k, v, bool(causal), scale)[0]
