"""Fused row norms over the last dimension, LayerNorm and RMSNorm, with an optional fused residual add, forward
and backward.

Three layers: private `@triton.jit` kernels, one forward and one backward shared by both norms (RMSNorm is
LayerNorm without the centring: the kernels centre when they are given a MEAN to write or read, and scale by
`w_offset + weight`); launchers that reshape to (M, N) rows, allocate and launch (`norm_fwd`, `norm_bwd`); and
the `torch.library` ops with fake and autograd registrations, behind `layer_norm`, `add_layer_norm`,
`FusedLayerNorm` and `rms_norm`, `add_rms_norm`, `FusedRMSNorm`.

Statistics are float32 whatever the input dtype, and the output is rounded once: x̂ · (offset + w) + b in float32,
then cast (Gemma's order; Llama's reference rounds x̂ to the input dtype before multiplying by its weight, so in
half precision its results and ours may differ by that one rounding). A program works on tiles of
`utils.LN_MAX_BLOCK` elements: several short rows, or one chunk of a long row. Rows up to that length stay in
registers; longer ones are walked in chunks. The backward writes per-program float32 partial sums of dweight and
dbias, reduced once afterwards: no locks, no atomics.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import triton
import triton.language as tl

from kernels import utils
from kernels.utils import cast_to


# ============================================================================ Triton kernels
@triton.jit
def _load_input(X, RES, Z, offs, mask, STORE_Z: tl.constexpr, INTERP_BF16: tl.constexpr):
    """The normalised input at `offs` of the tile's rows, as float32: X, or X + RES rounded to X's dtype (then
    stored to Z when STORE_Z). X, RES, Z point at the rows (ROWS, 1); RES and Z are None without a residual."""
    x = tl.load(X + offs, mask=mask, other=0.0)
    if RES is not None:
        # Round the sum to the input dtype first, as `x + residual` in PyTorch does.
        x = cast_to(x.to(tl.float32) + tl.load(RES + offs, mask=mask, other=0.0).to(tl.float32),
                    X.dtype.element_ty, INTERP_BF16)
        if STORE_Z:
            tl.store(Z + offs, x, mask=mask)
    return x.to(tl.float32)


@triton.jit
def _load_weight(W, cols, col_ok, w_offset):
    """(1, BLOCK_N) float32 `w_offset + weight` at columns `cols`."""
    return (tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32) + w_offset)[None, :]


@triton.jit
def _scale_shift(xhat, W, B, cols, col_ok, w_offset):
    """x̂ (ROWS, BLOCK_N) times (w_offset + weight), plus bias, at columns `cols`; W and B may be None."""
    y = xhat
    if W is not None:
        y = y * _load_weight(W, cols, col_ok, w_offset)
    if B is not None:
        y = y + tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    return y


@triton.jit
def _norm_fwd_kernel(
    X,  # (M, N) input rows
    RES,  # (M, N) residual added to X, or None
    Z,  # (M, N) out: X + RES in X's dtype, the normalised input (None without RES)
    Y,  # (M, N) out: normalised rows
    W, B,  # (N,) weight and bias, or None
    MEAN,  # (M,) float32 out: LayerNorm centres the rows; None: RMSNorm does not
    RSTD,  # (M,) float32 out: 1 / sqrt(mean((x - mean)²) + eps)
    stride_x, stride_res, stride_z, stride_y,  # row strides; unit stride along N
    M, N, eps,
    w_offset,  # the scale is w_offset + W: 1.0 for Gemma's RMSNorm
    ROWS: tl.constexpr, BLOCK_N: tl.constexpr,  # a program normalises ROWS rows, BLOCK_N columns at a time
    SINGLE_BLOCK: tl.constexpr,  # N <= BLOCK_N: the rows stay in registers
    INTERP_BF16: tl.constexpr,  # bfloat16 under the interpreter: round by hand (utils.cast_to)
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)  # (ROWS,)
    row_ok = rows < M
    r = rows.to(tl.int64)[:, None]
    cols = tl.arange(0, BLOCK_N)
    X += r * stride_x  # (ROWS, 1) pointers to the tile's rows
    Y += r * stride_y
    if RES is not None:
        RES += r * stride_res
        Z += r * stride_z
    mean = tl.zeros((ROWS,), tl.float32)
    if SINGLE_BLOCK:
        mask = row_ok[:, None] & (cols[None, :] < N)
        x = _load_input(X, RES, Z, cols[None, :], mask, True, INTERP_BF16)  # (ROWS, BLOCK_N)
        if MEAN is not None:
            mean = tl.sum(x, 1) / N
            x = tl.where(mask, x - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, 1) / N + eps)
        y = _scale_shift(x * rstd[:, None], W, B, cols, cols < N, w_offset)
        tl.store(Y + cols[None, :], cast_to(y, Y.dtype.element_ty, INTERP_BF16), mask=mask)
    else:
        # Pass 1: the sum of squares (RMSNorm), or per-chunk means and sums of squared deviations merged into
        # the running ones (LayerNorm, Chan et al.: no cancellation, unlike sum(x²) − N·mean²).
        m2 = tl.zeros((ROWS,), tl.float32)
        count = 0.0
        for start in range(0, N, BLOCK_N):
            mask = row_ok[:, None] & (start + cols[None, :] < N)
            x = _load_input(X, RES, Z, start + cols[None, :], mask, True, INTERP_BF16)
            if MEAN is not None:
                n_b = tl.minimum(N - start, BLOCK_N).to(tl.float32)
                mean_b = tl.sum(x, 1) / n_b
                x = tl.where(mask, x - mean_b[:, None], 0.0)
                delta = mean_b - mean
                mean += delta * (n_b / (count + n_b))
                m2 += delta * delta * (count * n_b / (count + n_b))
                count += n_b
            m2 += tl.sum(x * x, 1)
        rstd = 1.0 / tl.sqrt(m2 / N + eps)
        # Pass 2: read the rows again (Z is not re-read: another thread may have written it).
        for start in range(0, N, BLOCK_N):
            col_ok = start + cols < N
            mask = row_ok[:, None] & col_ok[None, :]
            x = _load_input(X, RES, Z, start + cols[None, :], mask, False, INTERP_BF16)
            y = _scale_shift((x - mean[:, None]) * rstd[:, None], W, B, start + cols, col_ok, w_offset)
            tl.store(Y + start + cols[None, :], cast_to(y, Y.dtype.element_ty, INTERP_BF16), mask=mask)
    if MEAN is not None:
        tl.store(MEAN + rows, mean, mask=row_ok)
    tl.store(RSTD + rows, rstd, mask=row_ok)


@triton.jit
def _bwd_chunk(X, DY, W, mean, offs, cols, col_ok, mask, w_offset):
    """x − mean, dy and g = (w_offset + w)·dy (ROWS, BLOCK_N) float32 at `offs` of the tile's rows, zero outside
    `mask`."""
    xc = tl.where(mask, tl.load(X + offs, mask=mask, other=0.0).to(tl.float32) - mean, 0.0)
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    wdy = dy
    if W is not None:
        wdy = dy * _load_weight(W, cols, col_ok, w_offset)
    return xc, dy, wdy


@triton.jit
def _dx_sums(xc, wdy, MEAN):
    """The row sums (ROWS, 1) dx needs: Σ (x − mean)·g, and Σ g for LayerNorm (MEAN given; zero for RMSNorm)."""
    s1 = tl.sum(xc * wdy, 1)[:, None]
    s2 = tl.zeros_like(s1)
    if MEAN is not None:
        s2 = tl.sum(wdy, 1)[:, None]
    return s1, s2


@triton.jit
def _store_dx(DX, DZ, offs, mask, xc, wdy, c1, c2, rstd, INTERP_BF16: tl.constexpr):
    """dx = rstd · (g − ((x − mean)·c1 + c2)), plus DZ (the residual sum's gradient) when given."""
    dx = (wdy - (xc * c1 + c2)) * rstd
    if DZ is not None:
        dx += tl.load(DZ + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(DX + offs, cast_to(dx, DX.dtype.element_ty, INTERP_BF16), mask=mask)


@triton.jit
def _add_to_partial(PART, cols, col_ok, value):
    """PART[cols] += value: this program's own row of partial sums (each thread re-reads what it wrote)."""
    if PART is not None:
        tl.store(PART + cols, tl.load(PART + cols, mask=col_ok) + value, mask=col_ok)


@triton.jit
def _norm_bwd_kernel(
    DY,  # (M, N) gradient of the normalised rows
    X,  # (M, N) the normalised input (X + RES for the fused residual)
    W,  # (N,) weight, or None
    MEAN,  # (M,) float32: LayerNorm; None: RMSNorm
    RSTD,  # (M,) float32
    DZ,  # (M, N) gradient of the residual-sum output, added to DX, or None
    DX,  # (M, N) out
    DW_PART, DB_PART,  # (P, N) float32 out: this program's partial sums of dweight / dbias, or None
    stride_dy, stride_x, stride_dz, stride_dx,  # row strides; unit stride along N
    M, N,
    w_offset,  # the forward's scale is w_offset + W
    ROWS: tl.constexpr, BLOCK_N: tl.constexpr,  # tiles of ROWS rows, BLOCK_N columns at a time
    SINGLE_BLOCK: tl.constexpr,
    INTERP_BF16: tl.constexpr,
):
    # Program p takes row tiles p, p + P, p + 2P, ... and sums their dweight/dbias terms into row p of the
    # partials; the launcher adds the P rows up once. With g = (w_offset + w)·dy and x̂ = (x − mean)·rstd,
    # dx = rstd · (g − x̂·mean(g·x̂) − mean(g)), the last term for LayerNorm only, computed as
    # rstd · (g − (x − mean)·(rstd²·mean(g·(x − mean))) − mean(g)): x̂ rounded once per element instead of twice
    # matters where the terms cancel (rows with mean(x²) near eps).
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    if DW_PART is not None:
        DW_PART += pid.to(tl.int64) * N
    if DB_PART is not None:
        DB_PART += pid.to(tl.int64) * N
    if SINGLE_BLOCK:  # partial sums in registers, stored once at the end
        dw = tl.zeros((BLOCK_N,), tl.float32)
        db = tl.zeros((BLOCK_N,), tl.float32)
    else:  # partial sums in this program's rows of DW_PART/DB_PART: zero them, then accumulate there
        for start in range(0, N, BLOCK_N):
            zero = tl.zeros((BLOCK_N,), tl.float32)
            if DW_PART is not None:
                tl.store(DW_PART + start + cols, zero, mask=start + cols < N)
            if DB_PART is not None:
                tl.store(DB_PART + start + cols, zero, mask=start + cols < N)
    for tile in range(pid, tl.cdiv(M, ROWS), tl.num_programs(0)):
        rows = tile * ROWS + tl.arange(0, ROWS)  # (ROWS,)
        row_ok = rows < M
        r = rows.to(tl.int64)[:, None]
        x_rows, dy_rows, dx_rows = X + r * stride_x, DY + r * stride_dy, DX + r * stride_dx  # (ROWS, 1)
        dz_rows = DZ
        if DZ is not None:
            dz_rows = DZ + r * stride_dz
        mean = tl.zeros((ROWS, 1), tl.float32)  # rows past M: x̂ = 0, dy = 0
        if MEAN is not None:
            mean = tl.load(MEAN + rows, mask=row_ok, other=0.0)[:, None]
        rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)[:, None]
        if SINGLE_BLOCK:
            col_ok = cols < N
            mask = row_ok[:, None] & col_ok[None, :]
            xc, dy, wdy = _bwd_chunk(x_rows, dy_rows, W, mean, cols[None, :], cols, col_ok, mask, w_offset)
            s1, s2 = _dx_sums(xc, wdy, MEAN)
            _store_dx(dx_rows, dz_rows, cols[None, :], mask, xc, wdy, s1 / N * rstd * rstd, s2 / N, rstd, INTERP_BF16)
            dw += tl.sum(dy * (xc * rstd), 0)
            db += tl.sum(dy, 0)
        else:
            s1 = tl.zeros((ROWS, 1), tl.float32)
            s2 = tl.zeros((ROWS, 1), tl.float32)
            for start in range(0, N, BLOCK_N):
                col_ok = start + cols < N
                mask = row_ok[:, None] & col_ok[None, :]
                xc, _, wdy = _bwd_chunk(x_rows, dy_rows, W, mean, start + cols[None, :], start + cols, col_ok, mask,
                                        w_offset)
                a, b = _dx_sums(xc, wdy, MEAN)
                s1, s2 = s1 + a, s2 + b
            c1, c2 = s1 / N * rstd * rstd, s2 / N
            for start in range(0, N, BLOCK_N):
                col_ok = start + cols < N
                mask = row_ok[:, None] & col_ok[None, :]
                xc, dy, wdy = _bwd_chunk(x_rows, dy_rows, W, mean, start + cols[None, :], start + cols, col_ok, mask,
                                         w_offset)
                _store_dx(dx_rows, dz_rows, start + cols[None, :], mask, xc, wdy, c1, c2, rstd, INTERP_BF16)
                _add_to_partial(DW_PART, start + cols, col_ok, tl.sum(dy * (xc * rstd), 0))
                _add_to_partial(DB_PART, start + cols, col_ok, tl.sum(dy, 0))
    if SINGLE_BLOCK:
        if DW_PART is not None:
            tl.store(DW_PART + cols, dw, mask=cols < N)
        if DB_PART is not None:
            tl.store(DB_PART + cols, db, mask=cols < N)


# ============================================================================ launchers
def _interp_bf16(x: torch.Tensor) -> bool:
    """The interpreter's bfloat16 workaround is on (see utils.cast_to)."""
    return utils.interpreting() and x.dtype == torch.bfloat16


def _bwd_programs(m: int, rows: int, x: torch.Tensor) -> int:
    """Programs of the backward: each owns one row of the partial sums; a few per SM hide latency."""
    tiles = triton.cdiv(m, rows)
    return max(1, min(tiles, 4 if utils.interpreting() or not x.is_cuda else 2 * utils.num_sms(x)))


def _launch_options(num_warps: int) -> dict:
    return dict(num_warps=num_warps, maxnreg=utils.register_cap(num_warps), **utils.LAUNCH_OPTIONS)


def _stride(t: torch.Tensor | None) -> int:
    return t.stride(0) if t is not None else 0


def norm_fwd(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, residual: torch.Tensor | None,
             eps: float, *, centred: bool, offset: float = 0.0) -> tuple[torch.Tensor, ...]:
    """Launch the forward: LayerNorm (`centred`) or RMSNorm of x (..., N), scaled by `offset + weight`.

    Returns y (..., N); z = x + residual (..., N), or empty; mean (...) float32, or empty (RMSNorm); rstd (...).
    """
    n = x.shape[-1]
    x2 = utils.rows_view(x)  # (M, N)
    m = x2.shape[0]
    r2 = utils.rows_view(residual) if residual is not None else None
    y = utils.empty(m, n, dtype=x.dtype, device=x.device)
    z = utils.empty(m, n, dtype=x.dtype, device=x.device) if residual is not None else None
    mean = utils.empty(m, dtype=torch.float32, device=x.device) if centred else None
    rstd = utils.empty(m, dtype=torch.float32, device=x.device)
    if m > 0:
        rows, block, warps = utils.ln_block_config(n)
        with utils.device_guard(x):
            _norm_fwd_kernel[(triton.cdiv(m, rows),)](
                X=x2, RES=r2, Z=z, Y=y, W=weight, B=bias, MEAN=mean, RSTD=rstd,
                stride_x=x2.stride(0), stride_res=_stride(r2), stride_z=_stride(z), stride_y=y.stride(0),
                M=m, N=n, eps=eps, w_offset=offset,
                ROWS=rows, BLOCK_N=block, SINGLE_BLOCK=n <= block, INTERP_BF16=_interp_bf16(x),
                **_launch_options(warps))
    lead = x.shape[:-1]
    z = z.view(x.shape) if z is not None else x.new_empty(0)
    mean = mean.view(lead) if mean is not None else x.new_empty(0, dtype=torch.float32)
    return y.view(x.shape), z, mean, rstd.view(lead)


def norm_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
             mean: torch.Tensor | None, rstd: torch.Tensor, dz: torch.Tensor | None, *,
             offset: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward (LayerNorm when `mean` is given, RMSNorm otherwise).

    Returns dx (..., N) (plus dz when given), dweight (N,) and dbias (N,) in the parameters' dtypes, each empty
    when absent (the bias's values are not read).
    """
    n = x.shape[-1]
    x2, dy2 = utils.rows_view(x), utils.rows_view(dy)
    dz2 = utils.rows_view(dz) if dz is not None else None
    m = x2.shape[0]
    dx = utils.empty(m, n, dtype=x.dtype, device=x.device)
    rows, block, warps = utils.ln_block_config(n)
    programs = _bwd_programs(m, rows, x)
    partial = lambda wanted: utils.empty(programs, n, dtype=torch.float32, device=x.device) if wanted else None
    dw_part, db_part = partial(weight is not None), partial(bias is not None)
    if m > 0:
        with utils.device_guard(x):
            _norm_bwd_kernel[(programs,)](
                DY=dy2, X=x2, W=weight, MEAN=mean.reshape(-1) if mean is not None else None, RSTD=rstd.reshape(-1),
                DZ=dz2, DX=dx, DW_PART=dw_part, DB_PART=db_part,
                stride_dy=dy2.stride(0), stride_x=x2.stride(0), stride_dz=_stride(dz2), stride_dx=dx.stride(0),
                M=m, N=n, w_offset=offset,
                ROWS=rows, BLOCK_N=block, SINGLE_BLOCK=n <= block, INTERP_BF16=_interp_bf16(x),
                **_launch_options(warps))
    # The one reduction of the per-program partial sums (no rows: zero gradients).
    reduce = lambda part, dtype: (part.sum(0) if m > 0 else part.zero_()[0]).to(dtype)
    dw = reduce(dw_part, weight.dtype) if weight is not None else x.new_empty(0)
    db = reduce(db_part, bias.dtype) if bias is not None else x.new_empty(0)
    return dx.view(x.shape), dw, db


# ============================================================================ PyTorch reference
def reference_fwd(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                  residual: torch.Tensor | None, eps: float, *, centred: bool,
                  offset: float = 0.0) -> tuple[torch.Tensor, ...]:
    """What `norm_fwd` computes, in plain float32 PyTorch."""
    z = x + residual if residual is not None else None
    xf = (z if z is not None else x).float()
    mean = xf.mean(-1) if centred else None
    xc = xf - mean[..., None] if centred else xf
    rstd = torch.rsqrt(xc.square().mean(-1) + eps)
    y = xc * rstd[..., None]
    y = y * (offset + weight.float()) if weight is not None else y
    y = y + bias.float() if bias is not None else y
    # Contiguous like the kernels' outputs (and the fake's), whatever the input's strides.
    z = z.contiguous() if z is not None else x.new_empty(0)
    mean = mean.contiguous() if centred else x.new_empty(0, dtype=torch.float32)
    return y.to(x.dtype).contiguous(), z, mean, rstd.contiguous()


def reference_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                  mean: torch.Tensor | None, rstd: torch.Tensor, dz: torch.Tensor | None, *,
                  offset: float = 0.0) -> tuple[torch.Tensor, ...]:
    """What `norm_bwd` computes, in plain float32 PyTorch."""
    xhat = (x.float() - mean[..., None] if mean is not None else x.float()) * rstd[..., None]
    dyf = dy.float()
    wdy = dyf * (offset + weight.float()) if weight is not None else dyf
    dx = wdy - xhat * (xhat * wdy).mean(-1, keepdim=True)
    dx = dx - wdy.mean(-1, keepdim=True) if mean is not None else dx
    dx = dx * rstd[..., None]
    dx = dx + dz.float() if dz is not None else dx
    rows = (-1, x.shape[-1])
    dw = (dyf * xhat).reshape(rows).sum(0).to(weight.dtype) if weight is not None else x.new_empty(0)
    db = dyf.reshape(rows).sum(0).to(bias.dtype) if bias is not None else x.new_empty(0)
    return dx.to(x.dtype).contiguous(), dw, db


def _run(op: str, x: torch.Tensor, kernel, reference, *args, **kwargs):
    """Record which path `op` takes for `x` (utils.dispatch_path) and run the kernel launcher or the reference."""
    path = utils.dispatch_path(x)
    utils.record(op, path)
    return (reference if path == "reference" else kernel)(*args, **kwargs)


def _fake_like(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


# ============================================================================ torch.library ops: LayerNorm
@torch.library.custom_op("kernels::layer_norm_fwd", mutates_args=())
def _layer_norm_fwd(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                    residual: torch.Tensor | None, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                        torch.Tensor]:
    return _run("layer_norm_fwd", x, norm_fwd, reference_fwd, x, weight, bias, residual, eps, centred=True)


@_layer_norm_fwd.register_fake
def _(x, weight, bias, residual, eps):
    stats = x.new_empty(x.shape[:-1], dtype=torch.float32)
    z = _fake_like(x) if residual is not None else x.new_empty(0)
    return _fake_like(x), z, stats, torch.empty_like(stats)


@torch.library.custom_op("kernels::layer_norm_bwd", mutates_args=())
def _layer_norm_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                    mean: torch.Tensor, rstd: torch.Tensor,
                    dz: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _run("layer_norm_bwd", x, norm_bwd, reference_bwd, dy, x, weight, bias, mean, rstd, dz)


@_layer_norm_bwd.register_fake
def _(dy, x, weight, bias, mean, rstd, dz):
    dw = torch.empty_like(weight) if weight is not None else x.new_empty(0)
    db = torch.empty_like(bias) if bias is not None else x.new_empty(0)
    return _fake_like(x), dw, db


def _layer_norm_setup_context(ctx, inputs, output) -> None:
    x, weight, bias, residual, eps = inputs
    _, z, mean, rstd = output
    ctx.has_residual = residual is not None
    ctx.has_bias = bias is not None
    # The backward needs the normalised input: x, or the residual sum z = x + residual.
    ctx.save_for_backward(z if ctx.has_residual else x, weight, bias, mean, rstd)
    ctx.mark_non_differentiable(mean, rstd)


def _layer_norm_backward(ctx, dy: torch.Tensor, dz: torch.Tensor, _dmean: torch.Tensor, _drstd: torch.Tensor):
    x, weight, bias, mean, rstd = ctx.saved_tensors
    dx, dw, db = _layer_norm_bwd(dy, x, weight, bias if ctx.has_bias else None, mean, rstd,
                                 dz if ctx.has_residual else None)
    return dx, dw if weight is not None else None, db if ctx.has_bias else None, dx if ctx.has_residual else None, None


_layer_norm_fwd.register_autograd(_layer_norm_backward, setup_context=_layer_norm_setup_context)


# ============================================================================ torch.library ops: RMSNorm
@torch.library.custom_op("kernels::rms_norm_fwd", mutates_args=())
def _rms_norm_fwd(x: torch.Tensor, weight: torch.Tensor | None, residual: torch.Tensor | None, eps: float,
                  offset: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    y, z, _, rstd = _run("rms_norm_fwd", x, norm_fwd, reference_fwd, x, weight, None, residual, eps, centred=False,
                         offset=offset)
    return y, z, rstd


@_rms_norm_fwd.register_fake
def _(x, weight, residual, eps, offset):
    z = _fake_like(x) if residual is not None else x.new_empty(0)
    return _fake_like(x), z, x.new_empty(x.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("kernels::rms_norm_bwd", mutates_args=())
def _rms_norm_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, rstd: torch.Tensor,
                  dz: torch.Tensor | None, offset: float) -> tuple[torch.Tensor, torch.Tensor]:
    dx, dw, _ = _run("rms_norm_bwd", x, norm_bwd, reference_bwd, dy, x, weight, None, None, rstd, dz,
                     offset=offset)
    return dx, dw


@_rms_norm_bwd.register_fake
def _(dy, x, weight, rstd, dz, offset):
    return _fake_like(x), torch.empty_like(weight) if weight is not None else x.new_empty(0)


def _rms_norm_setup_context(ctx, inputs, output) -> None:
    x, weight, residual, eps, offset = inputs
    _, z, rstd = output
    ctx.has_residual, ctx.offset = residual is not None, offset
    ctx.save_for_backward(z if ctx.has_residual else x, weight, rstd)
    ctx.mark_non_differentiable(rstd)


def _rms_norm_backward(ctx, dy: torch.Tensor, dz: torch.Tensor, _drstd: torch.Tensor):
    x, weight, rstd = ctx.saved_tensors
    dx, dw = _rms_norm_bwd(dy, x, weight, rstd, dz if ctx.has_residual else None, ctx.offset)
    return dx, dw if weight is not None else None, dx if ctx.has_residual else None, None, None


_rms_norm_fwd.register_autograd(_rms_norm_backward, setup_context=_rms_norm_setup_context)


# ============================================================================ public API
def _check(x: torch.Tensor, residual: torch.Tensor | None, **params: torch.Tensor | None) -> None:
    utils.check_float_tensor("x", x)
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"x must have a non-empty last dimension to normalise, got shape {tuple(x.shape)}")
    for name, p in params.items():
        if p is not None:
            utils.check_float_tensor(name, p)
            if p.shape != (x.shape[-1],):
                raise ValueError(f"{name} must have shape ({x.shape[-1]},) for x of shape {tuple(x.shape)}, "
                                 f"got {tuple(p.shape)}")
            utils.check_same(("x", name), (x, p), dtype=False)
    if residual is not None:
        utils.check_float_tensor("residual", residual)
        utils.check_same(("x", "residual"), (x, residual))
        if residual.shape != x.shape:
            raise ValueError(f"residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
               eps: float = 1e-5) -> torch.Tensor:
    """LayerNorm of x (..., N) over its last dimension, times weight (N,), plus bias (N,); float32 statistics.

    As `F.layer_norm(x, (N,), weight, bias, eps)`; float16, bfloat16 or float32 (weight and bias may be
    another float dtype). Differentiable in x, weight and bias.
    """
    _check(x, None, weight=weight, bias=bias)
    return _layer_norm_fwd(x, weight, bias, None, float(eps))[0]


def add_layer_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None = None,
                   bias: torch.Tensor | None = None, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """(layer_norm(x + residual), x + residual) in one pass; x and residual (..., N) of one shape and dtype.

    The sum is rounded to the input dtype before it is normalised, as the unfused `x + residual` would be.
    """
    _check(x, residual, weight=weight, bias=bias)
    y, z, _, _ = _layer_norm_fwd(x, weight, bias, residual, float(eps))
    return y, z


def _check_offset(weight: torch.Tensor | None, offset: float) -> float:
    if weight is None and offset != 0.0:
        raise ValueError(f"offset={offset} scales by offset + weight, but there is no weight")
    return float(offset)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None = None, eps: float = 1e-6, *,
             offset: float = 0.0) -> torch.Tensor:
    """RMSNorm of x (..., N) over its last dimension: x / sqrt(mean(x²) + eps) · (offset + weight).

    float16, bfloat16 or float32 (weight (N,) may be another float dtype), float32 statistics, one rounding to
    x's dtype at the end. `offset=1.0` is Gemma's `(1 + weight)`. As `F.rms_norm(x, (N,), weight, eps)` for
    offset 0. Differentiable in x and weight.
    """
    _check(x, None, weight=weight)
    return _rms_norm_fwd(x, weight, None, float(eps), _check_offset(weight, offset))[0]


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None = None, eps: float = 1e-6, *,
                 offset: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual) in one pass; x and residual (..., N) of one shape and dtype.

    The sum is rounded to the input dtype before it is normalised, as the unfused `x + residual` would be.
    """
    _check(x, residual, weight=weight)
    y, z, _ = _rms_norm_fwd(x, weight, residual, float(eps), _check_offset(weight, offset))
    return y, z


class FusedLayerNorm(nn.LayerNorm):
    """Drop-in for `nn.LayerNorm` (same constructor, parameters and `state_dict` keys) running `layer_norm`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = tuple(self.normalized_shape)
        if tuple(x.shape[x.dim() - len(shape):]) != shape:
            raise ValueError(f"FusedLayerNorm{shape} got input of shape {tuple(x.shape)}")
        if len(shape) == 1:
            return layer_norm(x, self.weight, self.bias, self.eps)
        # Several normalised dimensions: flatten them (and the parameters) into one of size prod(shape).
        lead = x.shape[: x.dim() - len(shape)]
        flat = lambda p: p.reshape(-1) if p is not None else None
        return layer_norm(x.reshape(*lead, -1), flat(self.weight), flat(self.bias), self.eps).view(x.shape)

    @classmethod
    def from_layer_norm(cls, ln: nn.LayerNorm) -> FusedLayerNorm:
        """A FusedLayerNorm sharing `ln`'s parameters (the same Parameter objects, so optimisers still see them)."""
        new = cls(ln.normalized_shape, ln.eps, ln.elementwise_affine, bias=ln.bias is not None, device="meta")
        new.weight, new.bias = ln.weight, ln.bias
        return new.train(ln.training)


class FusedRMSNorm(nn.Module):
    """RMSNorm over the last dimension running `rms_norm`: x / sqrt(mean(x²) + eps) · (offset + weight).

    The parameter is `weight` (hidden_size,), as in Hugging Face's RMSNorm modules and `nn.RMSNorm`; it starts
    at `1 - offset`, so a fresh module scales by one (Gemma's zeros for offset 1). `eps=None` takes the input
    dtype's machine epsilon at each call, as `nn.RMSNorm` does.
    """

    def __init__(self, hidden_size: int, eps: float | None = 1e-6, *, offset: float = 0.0,
                 elementwise_affine: bool = True, device=None, dtype=None) -> None:
        super().__init__()
        self.hidden_size, self.eps, self.offset = int(hidden_size), eps, float(offset)
        if elementwise_affine:
            self.weight = nn.Parameter(torch.full((self.hidden_size,), 1.0 - self.offset, device=device, dtype=dtype))
        else:
            _check_offset(None, self.offset)
            self.register_parameter("weight", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 0 or x.shape[-1] != self.hidden_size:
            raise ValueError(f"FusedRMSNorm({self.hidden_size}) got input of shape {tuple(x.shape)}")
        eps = self.eps if self.eps is not None else torch.finfo(x.dtype).eps
        return rms_norm(x, self.weight, eps, offset=self.offset)

    def extra_repr(self) -> str:
        offset = f", offset={self.offset}" if self.offset else ""
        return f"{self.hidden_size}, eps={self.eps}{offset}, elementwise_affine={self.weight is not None}"

    @classmethod
    def from_weight(cls, weight: nn.Parameter | None, eps: float | None, *, offset: float = 0.0,
                    hidden_size: int | None = None, training: bool = True) -> FusedRMSNorm:
        """A FusedRMSNorm whose `weight` is this very Parameter (optimisers and tied weights still see it)."""
        if weight is not None and weight.dim() != 1:
            raise ValueError(f"FusedRMSNorm needs a 1-D weight, got shape {tuple(weight.shape)}")
        size = weight.shape[0] if weight is not None else hidden_size
        if size is None:
            raise ValueError("without a weight, FusedRMSNorm.from_weight needs hidden_size")
        new = cls(size, eps, offset=offset, elementwise_affine=weight is not None, device="meta")
        new.weight = weight
        return new.train(training)
