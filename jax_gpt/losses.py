"""Cross-entropy of an lm_head's logits from the hidden states, never holding the (N, V) logits: the JAX twin of
`kernels.linear_cross_entropy`, in pure JAX.

Rows are taken a chunk at a time by a `lax.scan` (the same chunk size rule as the kernel: a chunk's logits
about as large as the hidden states, at least 128 rows), under a `jax.custom_vjp`, so that neither the forward
nor the backward keeps more than one chunk of logits: differentiating the scan itself would save every chunk's
softmax for the backward, the whole logits again. As in the kernel, "mean" and "sum" compute the gradients in
the forward pass (the residuals are d(hidden) (N, C) and d(weight) (V, C), which the backward scales by the
cotangent: no logits recomputed), and "none" recomputes the logits chunk by chunk in the backward, since its
per-row cotangent must weigh the rows before they are summed into d(weight). The logits (float32 products of
the inputs' dtype, never rounded to 16 bits), the log-sum-exp, the losses and the d(weight) and d(bias)
accumulators are float32; the logits' gradient is rounded to the inputs' dtype for its two GEMMs.

Semantics: `optax.softmax_cross_entropy_with_integer_labels` / `F.cross_entropy` of the float32 logits
`hidden @ weight.T + bias` (capped to softcap·tanh(logits / softcap) when `softcap` is given), rows whose target
is `ignore_index` ignored, "mean" over the rows not ignored (NaN when all are, gradients zero).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

REDUCTIONS = ("mean", "sum", "none")
MIN_CHUNK_ROWS = 128  # as kernels.cross_entropy


def chunk_rows(n: int, c: int, v: int) -> int:
    """Rows per chunk for N rows of C features and V classes, as `kernels.cross_entropy.chunk_rows`: a power of two
    of rows whose (rows, V) logits hold about as many elements as the (N, C) hidden states, at least 128, at most N."""
    rows = 1 << max(0, -(-max(n, 1) * c // max(v, 1)) - 1).bit_length()
    return max(1, min(n, max(MIN_CHUNK_ROWS, rows)))


@dataclasses.dataclass(frozen=True)
class _Options:
    ignore_index: int
    reduction: str
    label_smoothing: float
    softcap: float | None
    chunk: int


def _chunk(h, weight, bias, t, scale, opts: _Options, want_grad: bool):
    """One chunk: h (R, C), t (R,), scale (R,) float32 factors of the rows' gradients. Returns the rows' losses
    (R,) float32 and, with `want_grad`, d(loss)/d(logits) · scale (R, V) in h's dtype."""
    # (R, V) float32 products, never rounded to a 16-bit dtype: XLA keeps a dot's float32 result or not depending
    # on how it fuses the convert after it, so ask for it.
    z = jnp.einsum("RC,VC->RV", h, weight, preferred_element_type=jnp.float32)
    if bias is not None:
        z = z + bias.astype(jnp.float32)
    if opts.softcap is not None:
        cap = jnp.tanh(z / opts.softcap)
        s = cap * opts.softcap
    else:
        s = z
    m = s.max(-1, keepdims=True)  # (R, 1)
    e = jnp.exp(s - m)  # (R, V)
    d = e.sum(-1, keepdims=True)  # (R, 1)
    lse = (m + jnp.log(d))[:, 0]  # (R,)
    valid = t != opts.ignore_index
    y = jnp.where(valid, t, 0)
    s_y = jnp.take_along_axis(s, y[:, None], -1)[:, 0]  # (R,)
    eps = opts.label_smoothing
    loss = lse - (1 - eps) * s_y - eps * s.mean(-1) if eps > 0 else lse - s_y
    loss = jnp.where(valid, loss, 0.0)
    if not want_grad:
        return loss, None
    onehot = jnp.arange(s.shape[1])[None, :] == y[:, None]  # (R, V)
    g = e / d - jnp.where(onehot, 1 - eps, 0.0) - eps / s.shape[1]
    g = g * jnp.where(valid, scale, 0.0)[:, None]
    if opts.softcap is not None:
        g = g * (1 - cap * cap)  # d(c·tanh(z/c))/dz
    return loss, g.astype(h.dtype)


def _scan(hidden, weight, bias, targets, scale, opts: _Options, want_grad: bool):
    """The chunk loop: hidden (N, C), weight (V, C), bias (V,) or None, targets (N,), scale (N,) float32. Returns
    the losses (N,) float32 and, with `want_grad`, d(hidden) (N, C), d(weight) (V, C), d(bias) (V,) (or None)."""
    n, c = hidden.shape
    v = weight.shape[0]
    rows = opts.chunk
    k = -(-n // rows)
    pad = k * rows - n  # padded rows are ignored: no loss, no gradient
    hs = jnp.pad(hidden, ((0, pad), (0, 0))).reshape(k, rows, c)
    ts = jnp.pad(targets, (0, pad), constant_values=opts.ignore_index).reshape(k, rows)
    ss = jnp.pad(scale, (0, pad)).reshape(k, rows)

    def body(acc, xs):
        h, t, s = xs
        loss, g = _chunk(h, weight, bias, t, s, opts, want_grad)
        if not want_grad:
            return acc, (loss, None)
        dw, db = acc
        dh = jnp.einsum("RV,VC->RC", g, weight)  # (R, C)
        dw = dw + jnp.einsum("RV,RC->VC", g, h, preferred_element_type=jnp.float32)  # float32 accumulation
        if db is not None:
            db = db + g.sum(0, dtype=jnp.float32)
        return (dw, db), (loss, dh)

    init = ((jnp.zeros((v, c), jnp.float32), jnp.zeros((v,), jnp.float32) if bias is not None else None)
            if want_grad else None)
    acc, (losses, dh) = lax.scan(body, init, (hs, ts, ss))
    losses = losses.reshape(-1)[:n]
    if not want_grad:
        return losses, None, None, None
    dw, db = acc
    return (losses, dh.reshape(-1, c)[:n], dw.astype(weight.dtype),
            db.astype(bias.dtype) if bias is not None else None)


def _reduce(losses, targets, opts: _Options):
    if opts.reduction == "none":
        return losses
    total = losses.sum()
    return total / (targets != opts.ignore_index).sum() if opts.reduction == "mean" else total


def _row_scale(targets, opts: _Options):
    """(N,) float32 factor of each row's gradient: 1 / (rows not ignored) for "mean" (inf when none is), else 1."""
    if opts.reduction == "mean":
        scale = 1.0 / (targets != opts.ignore_index).sum().astype(jnp.float32)
    else:
        scale = jnp.float32(1.0)
    return jnp.broadcast_to(scale, targets.shape)


def _loss(hidden, weight, bias, targets, opts: _Options):
    losses = _scan(hidden, weight, bias, targets, jnp.zeros(targets.shape, jnp.float32), opts, False)[0]
    return _reduce(losses, targets, opts)


_lce = jax.custom_vjp(_loss, nondiff_argnums=(4,))


def _lce_fwd(hidden, weight, bias, targets, opts: _Options):
    if opts.reduction == "none":  # the backward recomputes from the inputs
        return _loss(hidden, weight, bias, targets, opts), (hidden, weight, bias, targets)
    losses, dh, dw, db = _scan(hidden, weight, bias, targets, _row_scale(targets, opts), opts, True)
    return _reduce(losses, targets, opts), (dh, dw, db)


def _lce_bwd(opts: _Options, residuals, g):
    if opts.reduction == "none":
        hidden, weight, bias, targets = residuals
        _, dh, dw, db = _scan(hidden, weight, bias, targets, g.astype(jnp.float32), opts, True)
    else:
        dh, dw, db = residuals
        dh, dw = (dh * g).astype(dh.dtype), (dw * g).astype(dw.dtype)
        db = (db * g).astype(db.dtype) if db is not None else None
    return dh, dw, db, None


_lce.defvjp(_lce_fwd, _lce_bwd)


def _check(hidden, weight, targets, bias, reduction, label_smoothing, softcap, chunk_size) -> None:
    if hidden.ndim == 0 or weight.ndim != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden (..., C) must end in weight's C (weight is (V, C) = {tuple(weight.shape)}), got "
                         f"shape {tuple(hidden.shape)}")
    if weight.shape[0] == 0:
        raise ValueError("weight has no rows: a vocabulary needs at least one class")
    for name, x in (("hidden", hidden), ("weight", weight)) + ((("bias", bias),) if bias is not None else ()):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"{name} must be a floating-point array, got {x.dtype}")
    if hidden.dtype != weight.dtype or bias is not None and bias.dtype != weight.dtype:
        raise TypeError(f"hidden, weight and bias must share a dtype, got {hidden.dtype}, {weight.dtype}"
                        + (f", {bias.dtype}" if bias is not None else ""))
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    if not jnp.issubdtype(targets.dtype, jnp.integer):
        raise TypeError(f"targets must hold integer class indices, got {targets.dtype}")
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(f"targets {tuple(targets.shape)} must have hidden's leading shape {tuple(hidden.shape[:-1])}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if softcap is not None and not (softcap > 0 and math.isfinite(softcap)):
        raise ValueError(f"softcap must be a positive finite number or None, got {softcap}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")


def _check_targets(targets, ignore_index: int, v: int) -> None:
    """Concrete targets outside [0, V) that are not ignore_index are an error (traced ones cannot be checked: their
    rows' losses come out NaN). Read on the host, so that a jit trace over concrete targets checks them too."""
    if isinstance(targets, jax.core.Tracer):
        return
    t = np.asarray(targets)
    bad = (t != ignore_index) & ((t < 0) | (t >= v))
    if bad.any():
        value = int(t[bad][0])
        raise ValueError(f"target {value} is outside [0, {v}) and is not ignore_index ({ignore_index})")


def linear_cross_entropy(hidden: jax.Array, weight: jax.Array, targets: jax.Array, *, bias: jax.Array | None = None,
                         ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0,
                         softcap: float | None = None, chunk_size: int | None = None) -> jax.Array:
    """Cross-entropy of the logits `hidden @ weight.T + bias` against `targets`, never holding the logits whole.

    hidden (..., C); weight (V, C), the layout of a tied embedding table (pass an `nnx.Linear` lm_head's kernel
    (C, V) transposed); bias (V,) or None; one floating dtype. targets (...) integer class indices. Returns the
    float32 loss: a scalar for "mean" and "sum", targets' shape for "none". Differentiable in hidden, weight and
    bias (`jax.grad`, under `jax.jit` too). `chunk_size` rows at a time (default: `chunk_rows`).
    """
    _check(hidden, weight, targets, bias, reduction, label_smoothing, softcap, chunk_size)
    c, v = weight.shape[1], weight.shape[0]
    _check_targets(targets, ignore_index, v)
    h2, t1 = hidden.reshape(-1, c), targets.reshape(-1)
    chunk = int(chunk_size) if chunk_size is not None else chunk_rows(h2.shape[0], c, v)
    opts = _Options(int(ignore_index), reduction, float(label_smoothing),
                    float(softcap) if softcap is not None else None, max(1, min(chunk, max(h2.shape[0], 1))))
    loss = _lce(h2, weight, bias, t1, opts)
    return loss.reshape(targets.shape) if reduction == "none" else loss
