"""Fused LayerNorm over the last dimension, with an optional fused residual add, forward and backward.

Three layers: private `@triton.jit` kernels; launchers that reshape to (M, N) rows, allocate and launch
(`ln_fwd`, `ln_bwd`); and the `torch.library` ops with fake and autograd registrations, behind
`layer_norm`, `add_layer_norm` and the `FusedLayerNorm` module.

Statistics are float32 whatever the input dtype. A program works on tiles of `utils.LN_MAX_BLOCK` elements:
several short rows, or one chunk of a long row. Rows up to that length stay in registers; longer ones are
walked in chunks (Chan's parallel merge of per-chunk means and squared deviations in the forward). The
backward writes per-program float32 partial sums of dweight/dbias, reduced once afterwards: no locks, no
atomics.
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
def _ln_load_input(x_ptrs, res_ptrs, z_ptrs, mask, HAS_RESIDUAL: tl.constexpr, STORE_Z: tl.constexpr,
                   INTERP_BF16: tl.constexpr):
    """A tile of the normalised input as float32: X, or X + RES rounded to X's dtype (then stored to Z)."""
    x = tl.load(x_ptrs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        # Round the sum to the input dtype first, as `x + residual` in PyTorch does.
        x = cast_to(x.to(tl.float32) + tl.load(res_ptrs, mask=mask, other=0.0).to(tl.float32),
                    z_ptrs.dtype.element_ty, INTERP_BF16)
        if STORE_Z:
            tl.store(z_ptrs, x, mask=mask)
    return x.to(tl.float32)


@triton.jit
def _ln_affine(y, W, B, cols, col_ok, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr):
    """y (ROWS, BLOCK_N) times weight, plus bias, at columns `cols`."""
    if HAS_WEIGHT:
        y = y * tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        y = y + tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    return y


@triton.jit
def _ln_fwd_kernel(
    X,  # (M, N) input rows
    RES,  # (M, N) residual added to X (HAS_RESIDUAL)
    Z,  # (M, N) out: X + RES in X's dtype, the normalised input (HAS_RESIDUAL)
    Y,  # (M, N) out: normalised rows
    W, B,  # (N,) weight and bias (HAS_WEIGHT, HAS_BIAS)
    MEAN, RSTD,  # (M,) float32 out
    stride_x, stride_res, stride_z, stride_y,  # row strides; unit stride along N
    M, N, eps,
    ROWS: tl.constexpr, BLOCK_N: tl.constexpr,  # a program normalises ROWS rows, BLOCK_N columns at a time
    SINGLE_BLOCK: tl.constexpr,  # N <= BLOCK_N: the rows stay in registers
    HAS_RESIDUAL: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    INTERP_BF16: tl.constexpr,  # bfloat16 under the interpreter: round by hand (utils.cast_to)
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)  # (ROWS,)
    row_ok = rows < M
    r = rows.to(tl.int64)[:, None]
    cols = tl.arange(0, BLOCK_N)
    x_ptrs = X + r * stride_x + cols[None, :]  # (ROWS, BLOCK_N)
    res_ptrs = RES + r * stride_res + cols[None, :]
    z_ptrs = Z + r * stride_z + cols[None, :]
    y_ptrs = Y + r * stride_y + cols[None, :]
    if SINGLE_BLOCK:
        mask = row_ok[:, None] & (cols[None, :] < N)
        x = _ln_load_input(x_ptrs, res_ptrs, z_ptrs, mask, HAS_RESIDUAL, True, INTERP_BF16)  # (ROWS, BLOCK_N)
        mean = tl.sum(x, 1) / N  # (ROWS,)
        xc = tl.where(mask, x - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, 1) / N + eps)
        y = _ln_affine(xc * rstd[:, None], W, B, cols, cols < N, HAS_WEIGHT, HAS_BIAS)
        tl.store(y_ptrs, cast_to(y, Y.dtype.element_ty, INTERP_BF16), mask=mask)
    else:
        # Pass 1: per-chunk means and sums of squared deviations, merged into the running ones (Chan et al.):
        # no cancellation, unlike sum(x²) − N·mean².
        mean = tl.zeros((ROWS,), tl.float32)
        m2 = tl.zeros((ROWS,), tl.float32)
        count = 0.0
        for start in range(0, N, BLOCK_N):
            mask = row_ok[:, None] & (start + cols[None, :] < N)
            x = _ln_load_input(x_ptrs + start, res_ptrs + start, z_ptrs + start, mask, HAS_RESIDUAL, True,
                               INTERP_BF16)
            n_b = tl.minimum(N - start, BLOCK_N).to(tl.float32)
            mean_b = tl.sum(x, 1) / n_b
            xc = tl.where(mask, x - mean_b[:, None], 0.0)
            delta = mean_b - mean
            mean += delta * (n_b / (count + n_b))
            m2 += tl.sum(xc * xc, 1) + delta * delta * (count * n_b / (count + n_b))
            count += n_b
        rstd = 1.0 / tl.sqrt(m2 / N + eps)
        # Pass 2: read the rows again (Z is not re-read: another thread may have written it).
        for start in range(0, N, BLOCK_N):
            col_ok = start + cols < N
            mask = row_ok[:, None] & col_ok[None, :]
            x = _ln_load_input(x_ptrs + start, res_ptrs + start, z_ptrs + start, mask, HAS_RESIDUAL, False,
                               INTERP_BF16)
            y = _ln_affine((x - mean[:, None]) * rstd[:, None], W + start, B + start, cols, col_ok, HAS_WEIGHT,
                           HAS_BIAS)
            tl.store(y_ptrs + start, cast_to(y, Y.dtype.element_ty, INTERP_BF16), mask=mask)
    tl.store(MEAN + rows, mean, mask=row_ok)
    tl.store(RSTD + rows, rstd, mask=row_ok)


@triton.jit
def _ln_bwd_kernel(
    DY,  # (M, N) gradient of the normalised rows
    X,  # (M, N) the normalised input (X + RES for the fused residual)
    W,  # (N,) weight (HAS_WEIGHT)
    MEAN, RSTD,  # (M,) float32
    DZ,  # (M, N) gradient of the residual-sum output, added to DX (HAS_DZ)
    DX,  # (M, N) out
    DW_PART, DB_PART,  # (P, N) float32 out: this program's partial sums of dweight / dbias
    stride_dy, stride_x, stride_dz, stride_dx,  # row strides; unit stride along N
    M, N,
    ROWS: tl.constexpr, BLOCK_N: tl.constexpr,  # tiles of ROWS rows, BLOCK_N columns at a time
    SINGLE_BLOCK: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DZ: tl.constexpr,
    INTERP_BF16: tl.constexpr,
):
    # Program p takes row tiles p, p + P, p + 2P, ... and sums their dweight/dbias terms into row p of the
    # partials; the launcher adds the P rows up once. dx = rstd · (w·dy − mean(w·dy) − x̂ · mean(w·dy·x̂)).
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    DW_PART += pid.to(tl.int64) * N
    DB_PART += pid.to(tl.int64) * N
    if SINGLE_BLOCK:
        col_ok = cols < N
        if HAS_WEIGHT:
            w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
        dw = tl.zeros((BLOCK_N,), tl.float32)
        db = tl.zeros((BLOCK_N,), tl.float32)
    else:
        # The partials live in this program's own row of DW_PART/DB_PART: zero them, then accumulate there.
        for start in range(0, N, BLOCK_N):
            if HAS_WEIGHT:
                tl.store(DW_PART + start + cols, tl.zeros((BLOCK_N,), tl.float32), mask=start + cols < N)
            if HAS_BIAS:
                tl.store(DB_PART + start + cols, tl.zeros((BLOCK_N,), tl.float32), mask=start + cols < N)
    for tile in range(pid, tl.cdiv(M, ROWS), tl.num_programs(0)):
        rows = tile * ROWS + tl.arange(0, ROWS)  # (ROWS,)
        row_ok = rows < M
        r = rows.to(tl.int64)[:, None]
        x_ptrs = X + r * stride_x + cols[None, :]  # (ROWS, BLOCK_N)
        dy_ptrs = DY + r * stride_dy + cols[None, :]
        dz_ptrs = DZ + r * stride_dz + cols[None, :]
        dx_ptrs = DX + r * stride_dx + cols[None, :]
        mean = tl.load(MEAN + rows, mask=row_ok, other=0.0)[:, None]  # rows past M: x̂ = 0, dy = 0
        rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)[:, None]
        if SINGLE_BLOCK:
            mask = row_ok[:, None] & col_ok[None, :]
            xhat = tl.where(mask, (tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32) - mean) * rstd, 0.0)
            dy = tl.load(dy_ptrs, mask=mask, other=0.0).to(tl.float32)
            wdy = dy
            if HAS_WEIGHT:
                wdy = dy * w[None, :]
            c1 = tl.sum(xhat * wdy, 1)[:, None] / N
            c2 = tl.sum(wdy, 1)[:, None] / N
            dx = (wdy - (xhat * c1 + c2)) * rstd
            if HAS_DZ:
                dx += tl.load(dz_ptrs, mask=mask, other=0.0).to(tl.float32)
            tl.store(dx_ptrs, cast_to(dx, DX.dtype.element_ty, INTERP_BF16), mask=mask)
            dw += tl.sum(dy * xhat, 0)
            db += tl.sum(dy, 0)
        else:
            c1 = tl.zeros((ROWS, 1), tl.float32)
            c2 = tl.zeros((ROWS, 1), tl.float32)
            for start in range(0, N, BLOCK_N):
                mask = row_ok[:, None] & (start + cols[None, :] < N)
                xhat = tl.where(mask, (tl.load(x_ptrs + start, mask=mask, other=0.0).to(tl.float32) - mean) * rstd,
                                0.0)
                wdy = tl.load(dy_ptrs + start, mask=mask, other=0.0).to(tl.float32)
                if HAS_WEIGHT:
                    wdy = wdy * tl.load(W + start + cols, mask=start + cols < N, other=0.0).to(tl.float32)[None, :]
                c1 += tl.sum(xhat * wdy, 1)[:, None]
                c2 += tl.sum(wdy, 1)[:, None]
            c1 = c1 / N
            c2 = c2 / N
            for start in range(0, N, BLOCK_N):
                col_ok = start + cols < N
                mask = row_ok[:, None] & col_ok[None, :]
                xhat = tl.where(mask, (tl.load(x_ptrs + start, mask=mask, other=0.0).to(tl.float32) - mean) * rstd,
                                0.0)
                dy = tl.load(dy_ptrs + start, mask=mask, other=0.0).to(tl.float32)
                wdy = dy
                if HAS_WEIGHT:
                    wdy = dy * tl.load(W + start + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
                    # Same pointers, same layout: each thread re-reads what it wrote itself.
                    dw_ptrs = DW_PART + start + cols
                    tl.store(dw_ptrs, tl.load(dw_ptrs, mask=col_ok) + tl.sum(dy * xhat, 0), mask=col_ok)
                if HAS_BIAS:
                    db_ptrs = DB_PART + start + cols
                    tl.store(db_ptrs, tl.load(db_ptrs, mask=col_ok) + tl.sum(dy, 0), mask=col_ok)
                dx = (wdy - (xhat * c1 + c2)) * rstd
                if HAS_DZ:
                    dx += tl.load(dz_ptrs + start, mask=mask, other=0.0).to(tl.float32)
                tl.store(dx_ptrs + start, cast_to(dx, DX.dtype.element_ty, INTERP_BF16), mask=mask)
    if SINGLE_BLOCK:
        if HAS_WEIGHT:
            tl.store(DW_PART + cols, dw, mask=col_ok)
        if HAS_BIAS:
            tl.store(DB_PART + cols, db, mask=col_ok)


# ============================================================================ launchers
def _interp_bf16(x: torch.Tensor) -> bool:
    """The interpreter's bfloat16 workaround is on (see utils.cast_to)."""
    return utils.interpreting() and x.dtype == torch.bfloat16


def _bwd_programs(x2: torch.Tensor, rows: int) -> int:
    """Programs of the backward: each owns one row of the partial sums; a few per SM hide latency."""
    tiles = triton.cdiv(x2.shape[0], rows)
    return max(1, min(tiles, 4 if utils.interpreting() or not x2.is_cuda else 2 * utils.num_sms(x2)))


def ln_fwd(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
           residual: torch.Tensor | None, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the forward. x (..., N) -> y (..., N), z = x + residual (..., N) or empty, mean and rstd (...) float32."""
    n = x.shape[-1]
    x2 = utils.rows_view(x)  # (M, N)
    m = x2.shape[0]
    y = utils.empty(m, n, dtype=x.dtype, device=x.device)
    z = utils.empty(m, n, dtype=x.dtype, device=x.device) if residual is not None else x.new_empty(0)
    mean = utils.empty(m, dtype=torch.float32, device=x.device)
    rstd = utils.empty(m, dtype=torch.float32, device=x.device)
    if m > 0:
        r2 = utils.rows_view(residual) if residual is not None else x2
        rows, block, warps = utils.ln_block_config(n)
        with utils.device_guard(x):
            _ln_fwd_kernel[(triton.cdiv(m, rows),)](
                x2, r2, z if residual is not None else y, y, weight if weight is not None else x2,
                bias if bias is not None else x2, mean, rstd,
                x2.stride(0), r2.stride(0), n if residual is not None else 0, y.stride(0), m, n, eps,
                ROWS=rows, BLOCK_N=block, SINGLE_BLOCK=n <= block, HAS_RESIDUAL=residual is not None,
                HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, INTERP_BF16=_interp_bf16(x),
                num_warps=warps, **utils.LAUNCH_OPTIONS)
    lead = x.shape[:-1]
    return y.view(x.shape), z.view(x.shape) if residual is not None else z, mean.view(lead), rstd.view(lead)


def ln_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
           mean: torch.Tensor, rstd: torch.Tensor,
           dz: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward. Returns dx (..., N) (plus dz when given), dweight (N,) and dbias (N,), or empty."""
    n = x.shape[-1]
    x2, dy2 = utils.rows_view(x), utils.rows_view(dy)
    m = x2.shape[0]
    dx = utils.empty(m, n, dtype=x.dtype, device=x.device)
    rows, block, warps = utils.ln_block_config(n)
    programs = _bwd_programs(x2, rows)
    dw_part = utils.empty(programs, n, dtype=torch.float32, device=x.device) if weight is not None else None
    db_part = utils.empty(programs, n, dtype=torch.float32, device=x.device) if bias is not None else None
    if m > 0:
        dz2 = utils.rows_view(dz) if dz is not None else dy2
        with utils.device_guard(x):
            _ln_bwd_kernel[(programs,)](
                dy2, x2, weight if weight is not None else x2, mean.reshape(-1), rstd.reshape(-1), dz2, dx,
                dw_part if dw_part is not None else dx, db_part if db_part is not None else dx,
                dy2.stride(0), x2.stride(0), dz2.stride(0), dx.stride(0), m, n,
                ROWS=rows, BLOCK_N=block, SINGLE_BLOCK=n <= block, HAS_WEIGHT=weight is not None,
                HAS_BIAS=bias is not None,
                HAS_DZ=dz is not None, INTERP_BF16=_interp_bf16(x), num_warps=warps, **utils.LAUNCH_OPTIONS)
    else:  # no rows: zero gradients
        for part in (dw_part, db_part):
            if part is not None:
                part.zero_()
    # The one reduction of the per-program partial sums.
    dw = dw_part.sum(0).to(weight.dtype) if weight is not None else x.new_empty(0)
    db = db_part.sum(0).to(bias.dtype) if bias is not None else x.new_empty(0)
    return dx.view(x.shape), dw, db


# ============================================================================ PyTorch reference
def reference_fwd(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                  residual: torch.Tensor | None, eps: float) -> tuple[torch.Tensor, ...]:
    """What `ln_fwd` computes, in plain float32 PyTorch."""
    z = x + residual if residual is not None else None
    xf = (z if z is not None else x).float()
    mean = xf.mean(-1)
    rstd = torch.rsqrt((xf - mean[..., None]).square().mean(-1) + eps)
    y = (xf - mean[..., None]) * rstd[..., None]
    y = y * weight.float() if weight is not None else y
    y = y + bias.float() if bias is not None else y
    # Contiguous like the kernels' outputs (and the fake's), whatever the input's strides.
    z = z.contiguous() if z is not None else x.new_empty(0)
    return y.to(x.dtype).contiguous(), z, mean.contiguous(), rstd.contiguous()


def reference_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                  mean: torch.Tensor, rstd: torch.Tensor, dz: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """What `ln_bwd` computes, in plain float32 PyTorch."""
    xhat = (x.float() - mean[..., None]) * rstd[..., None]
    dyf = dy.float()
    wdy = dyf * weight.float() if weight is not None else dyf
    c1 = (xhat * wdy).mean(-1, keepdim=True)
    c2 = wdy.mean(-1, keepdim=True)
    dx = (wdy - (xhat * c1 + c2)) * rstd[..., None]
    dx = dx + dz.float() if dz is not None else dx
    rows = (-1, x.shape[-1])
    dw = (dyf * xhat).reshape(rows).sum(0).to(weight.dtype) if weight is not None else x.new_empty(0)
    db = dyf.reshape(rows).sum(0).to(bias.dtype) if bias is not None else x.new_empty(0)
    return dx.to(x.dtype).contiguous(), dw, db


# ============================================================================ torch.library ops
@torch.library.custom_op("kernels::layer_norm_fwd", mutates_args=())
def _layer_norm_fwd(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                    residual: torch.Tensor | None, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                        torch.Tensor]:
    path = utils.dispatch_path(x)
    utils.record("layer_norm_fwd", path)
    return (reference_fwd if path == "reference" else ln_fwd)(x, weight, bias, residual, eps)


@_layer_norm_fwd.register_fake
def _(x, weight, bias, residual, eps):
    lead = x.shape[:-1]
    z = torch.empty_like(x, memory_format=torch.contiguous_format) if residual is not None else x.new_empty(0)
    stats = x.new_empty(lead, dtype=torch.float32)
    return torch.empty_like(x, memory_format=torch.contiguous_format), z, stats, torch.empty_like(stats)


@torch.library.custom_op("kernels::layer_norm_bwd", mutates_args=())
def _layer_norm_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                    mean: torch.Tensor, rstd: torch.Tensor,
                    dz: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    path = utils.dispatch_path(x)
    utils.record("layer_norm_bwd", path)
    return (reference_bwd if path == "reference" else ln_bwd)(dy, x, weight, bias, mean, rstd, dz)


@_layer_norm_bwd.register_fake
def _(dy, x, weight, bias, mean, rstd, dz):
    dw = torch.empty_like(weight) if weight is not None else x.new_empty(0)
    db = torch.empty_like(bias) if bias is not None else x.new_empty(0)
    return torch.empty_like(x, memory_format=torch.contiguous_format), dw, db


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, residual, eps = inputs
    _, z, mean, rstd = output
    ctx.has_residual = residual is not None
    ctx.has_bias = bias is not None
    # The backward needs the normalised input: x, or the residual sum z = x + residual.
    ctx.save_for_backward(z if ctx.has_residual else x, weight, bias, mean, rstd)
    ctx.mark_non_differentiable(mean, rstd)


def _backward(ctx, dy: torch.Tensor, dz: torch.Tensor, _dmean: torch.Tensor, _drstd: torch.Tensor):
    x, weight, bias, mean, rstd = ctx.saved_tensors
    dx, dw, db = _layer_norm_bwd(dy, x, weight, bias if ctx.has_bias else None, mean, rstd,
                                 dz if ctx.has_residual else None)
    return dx, dw if weight is not None else None, db if ctx.has_bias else None, dx if ctx.has_residual else None, None


_layer_norm_fwd.register_autograd(_backward, setup_context=_setup_context)


# ============================================================================ public API
def _check(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None) -> None:
    utils.check_float_tensor("x", x)
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"x must have a non-empty last dimension to normalise, got shape {tuple(x.shape)}")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None:
            utils.check_float_tensor(name, p)
            if p.shape != (x.shape[-1],):
                raise ValueError(f"{name} must have shape ({x.shape[-1]},) for x of shape {tuple(x.shape)}, "
                                 f"got {tuple(p.shape)}")
            utils.check_same(("x", name), (x, p), dtype=False)


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
               eps: float = 1e-5) -> torch.Tensor:
    """LayerNorm of x (..., N) over its last dimension, times weight (N,), plus bias (N,); float32 statistics.

    As `F.layer_norm(x, (N,), weight, bias, eps)`; float16, bfloat16 or float32 (weight and bias may be
    another float dtype). Differentiable in x, weight and bias.
    """
    _check(x, weight, bias)
    return _layer_norm_fwd(x, weight, bias, None, float(eps))[0]


def add_layer_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None = None,
                   bias: torch.Tensor | None = None, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """(layer_norm(x + residual), x + residual) in one pass; x and residual (..., N) of one shape and dtype.

    The sum is rounded to the input dtype before it is normalised, as the unfused `x + residual` would be.
    """
    _check(x, weight, bias)
    utils.check_float_tensor("residual", residual)
    utils.check_same(("x", "residual"), (x, residual))
    if residual.shape != x.shape:
        raise ValueError(f"residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
    y, z, _, _ = _layer_norm_fwd(x, weight, bias, residual, float(eps))
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
