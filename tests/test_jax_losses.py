"""jax_gpt.losses.linear_cross_entropy, the chunked cross-entropy under a custom_vjp: against float64 on awkward
shapes, every gradient, the three reductions, ignored rows (also all of them), label smoothing, softcap, bias, the
three dtypes, under jit; its memory from XLA's own accounting; agreement with the torch kernel; bad inputs.

The accuracy rule of the kernels (DESIGN.md §4, `kernels.testing`) holds it to twice the error of the plain JAX
loss in the same dtype (the model's `cross_entropy_loss`: optax on the float32 logits of an lm_head computed in
that dtype), plus the rounding of the exact answer. The exact answer is torch's float64 cross-entropy of the
inputs already rounded to the dtype (JAX's float64 would need jax_enable_x64, a process-wide switch).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import torch.nn.functional as F

from jax_gpt import losses
from jax_gpt.losses import linear_cross_entropy
from kernels.testing import assert_accurate
from tests.helpers import rel_error

IGNORE = -100
TORCH_DTYPE = {jnp.float32: torch.float32, jnp.bfloat16: torch.bfloat16, jnp.float16: torch.float16}


def as_torch(x, dtype) -> torch.Tensor:
    """A JAX array as a torch tensor of `dtype` (16-bit values widen to float32 and back exactly)."""
    x = np.asarray(x)
    return torch.from_numpy(x.astype(np.float32) if x.dtype != np.int32 else x.astype(np.int64)).to(dtype)


def plain_loss(h, w, b, t, *, reduction, label_smoothing=0.0, softcap=None):
    """The whole-logits loss in JAX: an lm_head's logits in h's dtype, optax on them in float32."""
    z = jnp.einsum("...C,VC->...V", h, w)
    z = (z + b if b is not None else z).astype(jnp.float32)
    if softcap is not None:
        z = softcap * jnp.tanh(z / softcap)
    valid = t != IGNORE
    y = jnp.where(valid, t, 0)
    labels = (1 - label_smoothing) * jax.nn.one_hot(y, z.shape[-1]) + label_smoothing / z.shape[-1]
    rows = jnp.where(valid, optax.softmax_cross_entropy(z, labels), 0.0)
    return {"mean": rows.sum() / valid.sum(), "sum": rows.sum(), "none": rows}[reduction]


def exact_loss_and_grads(h, w, b, t, grad_out, *, reduction, label_smoothing=0.0, softcap=None):
    """float64 torch: the loss and the gradients of Σ grad_out · loss."""
    leaves = [torch.from_numpy(np.asarray(x, np.float64)).requires_grad_() if x is not None else None
              for x in (h, w, b)]
    z = torch.einsum("...c,vc->...v", leaves[0], leaves[1])
    z = z + leaves[2] if b is not None else z
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    tt = torch.from_numpy(np.asarray(t).astype(np.int64))
    loss = F.cross_entropy(z.flatten(0, -2), tt.flatten(), ignore_index=IGNORE, reduction=reduction,
                           label_smoothing=label_smoothing)
    loss = loss.view(tt.shape) if reduction == "none" else loss
    (loss * torch.from_numpy(np.asarray(grad_out, np.float64))).sum().backward()
    return loss.detach(), [x.grad if x is not None else None for x in leaves]


def make_inputs(shape, v, c, dtype, *, ignored=0.25, bias=False, seed=0):
    rng = np.random.default_rng(seed + 1000 * v + c)
    h = jnp.asarray(rng.standard_normal((*shape, c)), dtype)
    w = jnp.asarray(rng.standard_normal((v, c)) * (2 / c ** 0.5), dtype)
    b = jnp.asarray(rng.standard_normal(v), dtype) if bias else None
    t = rng.integers(0, v, shape)
    t[rng.random(shape) < ignored] = IGNORE
    return h, w, b, jnp.asarray(t, jnp.int32)


def value_and_grads(fn, h, w, b, grad_out):
    """fn(h, w, b) under jit and its vjp with `grad_out`: (loss, [dh, dw, db])."""
    loss, vjp = jax.vjp(jax.jit(fn), h, w, b)
    return loss, list(vjp(jnp.asarray(grad_out, loss.dtype)))


def check(shape, v, c, dtype=jnp.float32, *, reduction="mean", label_smoothing=0.0, softcap=None, bias=False,
          ignored=0.25, chunk_size=None, seed=0):
    h, w, b, t = make_inputs(shape, v, c, dtype, ignored=ignored, bias=bias, seed=seed)
    rng = np.random.default_rng(seed + 7)
    # A power of two for "mean"/"sum": their gradients are scaled after the GEMMs (exact then; see the torch test).
    grad_out = rng.standard_normal(shape).astype(np.float32) if reduction == "none" else np.float32(-0.5)
    opts = dict(reduction=reduction, label_smoothing=label_smoothing, softcap=softcap)
    loss, grads = value_and_grads(lambda h_, w_, b_: linear_cross_entropy(h_, w_, t, bias=b_, chunk_size=chunk_size,
                                                                          **opts), h, w, b, grad_out)
    plain, plain_grads = value_and_grads(lambda h_, w_, b_: plain_loss(h_, w_, b_, t, **opts), h, w, b, grad_out)
    exact, exact_grads = exact_loss_and_grads(h, w, b, t, grad_out, **opts)
    assert loss.dtype == jnp.float32 and loss.shape == tuple(exact.shape)
    verdicts = {"loss": assert_accurate("loss", as_torch(loss, torch.float32), as_torch(plain, torch.float32),
                                        exact)}
    scale = max(float(torch.linalg.vector_norm(g)) for g in exact_grads if g is not None)
    for name, g, pg, eg in zip(("dhidden", "dweight", "dbias"), grads, plain_grads, exact_grads, strict=True):
        if eg is not None:
            assert g.dtype == dtype and g.shape == tuple(eg.shape)
            verdicts[name] = assert_accurate(name, as_torch(g, TORCH_DTYPE[dtype]), as_torch(pg, TORCH_DTYPE[dtype]),
                                             eg, scale=scale)
    return verdicts


# N in 1, 17, 300 by C in 16, 768 at V = 127; GPT-2's vocabulary only at few rows (its float64 reference is slow).
SHAPES = [(n, 127, c) for n in (1, 17, 300) for c in (16, 768)] + [(1, 50257, 16), (17, 50257, 16), (17, 50257, 768)]


@pytest.mark.parametrize("n, v, c", SHAPES)
def test_shapes(n, v, c):
    check((n,), v, c, ignored=0.25 if n > 1 else 0.0)


@pytest.mark.parametrize("dtype, reduction", [(jnp.float32, "mean"), (jnp.float32, "sum"), (jnp.float32, "none"),
                                              (jnp.bfloat16, "mean"), (jnp.bfloat16, "none"), (jnp.float16, "sum")])
def test_dtypes_and_reductions(dtype, reduction):
    check((3, 7), 127, 64, dtype, reduction=reduction)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_label_smoothing_softcap_and_bias(dtype):
    check((17,), 127, 16, dtype, label_smoothing=0.1)
    check((17,), 127, 16, dtype, softcap=1.5, reduction="none")
    check((2, 9), 300, 16, dtype, softcap=30.0, label_smoothing=0.2, bias=True, reduction="sum")


def test_gpt2_vocabulary_in_bfloat16():
    check((17,), 50257, 16, jnp.bfloat16, label_smoothing=0.1, bias=True)


@pytest.mark.parametrize("chunk_size", [7, 128, 300])
def test_chunk_sizes(chunk_size):
    """A short last chunk (padded rows are ignored), several chunks, all rows at once."""
    check((300,), 127, 16, chunk_size=chunk_size, label_smoothing=0.1, softcap=5.0, bias=True)


def test_chunk_rows_is_the_kernels_rule():
    from kernels import cross_entropy as ce

    for n, c, v in ((8192, 768, 50257), (17, 768, 50257), (10_000, 4096, 32_000), (300, 16, 127), (0, 16, 127),
                    (5000, 3, 7)):
        assert losses.chunk_rows(n, c, v) == ce.chunk_rows(n, c, v)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_every_row_ignored(reduction):
    """As F.cross_entropy: "mean" is NaN (0 / 0 rows), "sum" 0, "none" zeros; every gradient zero."""
    h, w, b, t = make_inputs((2, 5), 127, 16, jnp.float32, ignored=1.0, bias=True)
    one = np.ones(t.shape if reduction == "none" else (), np.float32)
    loss, grads = value_and_grads(lambda *a: linear_cross_entropy(*a[:2], t, bias=a[2], reduction=reduction,
                                                                  label_smoothing=0.1), h, w, b, one)
    assert bool(jnp.isnan(loss).all()) if reduction == "mean" else not bool(jnp.any(loss))
    for g in grads:
        assert not bool(jnp.any(g))


def test_one_class():
    h, w, b, t = make_inputs((17,), 1, 16, jnp.float32, bias=True)
    loss, grads = value_and_grads(lambda *a: linear_cross_entropy(*a[:2], t, bias=a[2], reduction="sum"), h, w, b,
                                  np.float32(1))
    assert abs(float(loss)) <= 1e-6 and all(float(jnp.abs(g).max()) <= 1e-6 for g in grads)


def test_matches_the_torch_kernel():
    """The two frameworks' fused losses on the same inputs: the same loss and gradients to float32 rounding."""
    import kernels

    h, w, b, t = make_inputs((4, 75), 127, 32, jnp.float32, bias=True)
    opts = dict(label_smoothing=0.1, softcap=5.0)
    loss, grads = value_and_grads(lambda *a: linear_cross_entropy(*a[:2], t, bias=a[2], **opts), h, w, b,
                                  np.float32(1))
    leaves = [as_torch(x, torch.float32).requires_grad_() for x in (h, w, b)]
    torch_loss = kernels.linear_cross_entropy(leaves[0], leaves[1], as_torch(t, torch.int64), bias=leaves[2], **opts)
    torch_loss.backward()
    assert rel_error(np.asarray(loss), torch_loss.detach()) < 1e-6
    for g, x in zip(grads, leaves, strict=True):
        assert rel_error(np.asarray(g), x.grad) < 1e-5


def test_compiled_memory_holds_one_chunk():
    """XLA's own accounting of the jitted gradient (`memory_analysis`): the fused loss's temporaries are a chunk of
    logits and the gradients; the plain loss's are the whole (N, V) logits and more."""
    n, v, c = 2048, 4099, 32
    h, w, _, t = make_inputs((n,), v, c, jnp.float32)

    def temp_bytes(fn):
        grad = jax.jit(jax.grad(lambda h_, w_: fn(h_, w_), argnums=(0, 1)))
        return grad.lower(h, w).compile().memory_analysis().temp_size_in_bytes

    fused = temp_bytes(lambda h_, w_: linear_cross_entropy(h_, w_, t))
    plain = temp_bytes(lambda h_, w_: plain_loss(h_, w_, None, t, reduction="mean"))
    logits = n * v * 4
    chunk = losses.chunk_rows(n, c, v) * v * 4
    assert plain >= logits
    assert fused <= 4 * chunk + 3 * (n * c + v * c) * 4, (fused, chunk)
    assert fused * 4 < plain


def test_targets_out_of_range_are_an_error_in_eager_mode():
    h, w, _, t = make_inputs((4,), 10, 8, jnp.float32)
    with pytest.raises(ValueError, match="target 10 is outside"):
        linear_cross_entropy(h, w, jnp.array([1, 2, 10, 0]))
    # ignore_index = 0 ignores class 0, as F.cross_entropy does: those rows have no loss.
    rows = linear_cross_entropy(h, w, jnp.array([0, 2, 3, 0]), ignore_index=0, reduction="none")
    assert float(rows[0]) == 0.0 == float(rows[3]) and float(rows[1]) > 0


H, W, T = jnp.ones((4, 8)), jnp.ones((10, 8)), jnp.array([1, 2, 3, IGNORE])


@pytest.mark.parametrize("call, error, match", [
    (lambda: linear_cross_entropy(H, jnp.ones((10, 7)), T), ValueError, "must end in weight's C"),
    (lambda: linear_cross_entropy(H, W.astype(jnp.bfloat16), T), TypeError, "must share a dtype"),
    (lambda: linear_cross_entropy(H, W, T.astype(jnp.float32)), TypeError, "integer class indices"),
    (lambda: linear_cross_entropy(H, W, T[:3]), ValueError, "leading shape"),
    (lambda: linear_cross_entropy(H, W, T, reduction="avg"), ValueError, "reduction must be one of"),
    (lambda: linear_cross_entropy(H, W, T, label_smoothing=-0.1), ValueError, "label_smoothing"),
    (lambda: linear_cross_entropy(H, W, T, softcap=-1.0), ValueError, "softcap must be a positive"),
    (lambda: linear_cross_entropy(H, W, T, bias=jnp.ones(9)), ValueError, r"bias must have shape \(10,\)"),
    (lambda: linear_cross_entropy(H, W, T, chunk_size=0), ValueError, "chunk_size must be >= 1"),
    (lambda: linear_cross_entropy(H, jnp.ones((0, 8)), T), ValueError, "at least one class"),
])
def test_bad_inputs(call, error, match):
    with pytest.raises(error, match=match):
        call()
