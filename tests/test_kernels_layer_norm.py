"""Fused LayerNorm: numerics in Triton's interpreter against float64, every gradient, the module, ops, errors.

As for attention: outputs NaN-poisoned, the Triton path proven, and the kernel's error against float64 at
most twice PyTorch's own `F.layer_norm` error in the same dtype plus the rounding of the exact answer
(`kernels.testing`).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels
from kernels import norm, utils
from kernels.testing import assert_accurate
from tests.helpers import rel_error

pytestmark = pytest.mark.interpreter


def run(fn, tensors, grads, dtype):
    """fn on fresh leaf copies of `tensors` (None stays None) cast to `dtype`; its outputs and input grads."""
    leaves = [t.detach().to(dtype).requires_grad_() if t is not None else None for t in tensors]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    torch.autograd.backward(outs, [g.to(o.dtype) for o, g in zip(outs, grads, strict=True)])
    return outs, [t.grad if t is not None else None for t in leaves]


def check_layer_norm(shape, dtype, *, residual=False, weight=True, bias=True, param_dtype=None, seed=0):
    gen = torch.Generator().manual_seed(seed + shape[-1])
    n = shape[-1]
    # Inputs already rounded to their dtypes (held exactly in float32): the exact answer is of these values, so the
    # errors compared are the computations', not the inputs' rounding.
    act = lambda t: t.to(dtype).float()
    par = lambda t: t.to(param_dtype or dtype).float()
    x = act(torch.randn(shape, generator=gen) * 2 + 0.5)  # an offset mean: the variance must not cancel
    r = act(torch.randn(shape, generator=gen)) if residual else None
    w = par(torch.randn(n, generator=gen)) if weight else None
    b = par(torch.randn(n, generator=gen)) if bias else None
    grads = [torch.randn(shape, generator=gen) for _ in range(2 if residual else 1)]
    if residual:
        # The op normalises the sum rounded to `dtype`, as the unfused `x + r` does: the exact answer is
        # LayerNorm of that rounded sum, in float64.
        z = (x.to(dtype) + r.to(dtype)).double()
        ours = lambda x_, r_, w_, b_: kernels.add_layer_norm(x_, r_, w_, b_)
        torch_fn = lambda x_, r_, w_, b_: (F.layer_norm(x_ + r_, (n,), w_, b_), x_ + r_)
        exact_outs, exact_grads = run(lambda z_, w_, b_: (F.layer_norm(z_, (n,), w_, b_), z_), (z, w, b), grads,
                                      torch.float64)
        exact_grads = [exact_grads[0], exact_grads[0], *exact_grads[1:]]  # d(x) = d(r) = d(z)
        inputs = (x, r, w, b)
    else:
        ours = lambda x_, w_, b_: kernels.layer_norm(x_, w_, b_)
        torch_fn = lambda x_, w_, b_: F.layer_norm(x_, (n,), w_, b_)
        inputs = (x, w, b)
        exact_outs, exact_grads = run(torch_fn, inputs, grads, torch.float64)
    utils.reset_dispatch_counts()
    with utils.poisoned_outputs():
        outs, got_grads = run_mixed(ours, inputs, grads, dtype, param_dtype)
    assert utils.dispatch_counts() == {("layer_norm_fwd", "interpreter"): 1, ("layer_norm_bwd", "interpreter"): 1}
    torch_outs, torch_grads = run_mixed(torch_fn, inputs, grads, dtype, param_dtype)
    if residual:  # the sum is rounded to `dtype` exactly as PyTorch rounds `x + residual`
        assert torch.equal(outs[1], torch_outs[1])
    for name, o, t, e in zip(("y", "x + residual")[: len(outs)], outs, torch_outs, exact_outs, strict=True):
        assert o.dtype == dtype and o.shape == shape
        assert_accurate(name, o, t, e)
    # A gradient that is zero in exact arithmetic (dx for N = 1: LayerNorm of one element is 0) is measured
    # against the largest gradient of the call.
    scale = max(float(torch.linalg.vector_norm(e)) for e in exact_grads if e is not None)
    names = ("dx", "dresidual", "dweight", "dbias") if residual else ("dx", "dweight", "dbias")
    for name, g, t, e in zip(names, got_grads, torch_grads, exact_grads, strict=True):
        if e is not None:
            assert_accurate(name, g, t, e, scale=scale)


def run_mixed(fn, inputs, grads, dtype, param_dtype):
    """`run` with activations in `dtype` and weight/bias (the last two inputs) in `param_dtype`."""
    if param_dtype is None:
        return run(fn, inputs, grads, dtype)
    acts, params = inputs[:-2], inputs[-2:]
    leaves = [t.detach().to(dtype).requires_grad_() for t in acts] + [p.detach().to(param_dtype).requires_grad_()
                                                                     for p in params]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    torch.autograd.backward(outs, [g.to(o.dtype) for o, g in zip(outs, grads, strict=True)])
    return outs, [t.grad for t in leaves]


@pytest.mark.parametrize("n", [1, 17, 768, 1000, 4099])
def test_hidden_sizes(n):
    check_layer_norm((3, 5, n), torch.float16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dtypes(dtype):
    check_layer_norm((7, 1000), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_long_rows_are_chunked(dtype):
    """N > utils.LN_MAX_BLOCK walks the row in chunks (and N > 16384 is required to work)."""
    assert 20000 > utils.LN_MAX_BLOCK
    check_layer_norm((3, 20000), dtype)


@pytest.mark.parametrize("n, dtype", [(17, torch.float32), (768, torch.bfloat16), (20000, torch.float16)])
def test_add_layer_norm(n, dtype):
    check_layer_norm((2, 3, n), dtype, residual=True)


@pytest.mark.parametrize("weight, bias", [(True, False), (False, False)])
def test_without_affine_parameters(weight, bias):
    check_layer_norm((5, 300), torch.float32, weight=weight, bias=bias)
    check_layer_norm((2, 9000), torch.float32, weight=weight, bias=bias)


def test_float32_parameters_with_bf16_activations():
    check_layer_norm((6, 768), torch.bfloat16, param_dtype=torch.float32)


def test_more_rows_than_programs():
    """Each backward program sums several rows into its partials; more rows than programs exercises that."""
    check_layer_norm((64, 33), torch.float32)


def test_strided_rows(monkeypatch):
    x = torch.randn(6, 200)[:, 50:146]  # rows of stride 200, unit stride along N: passed as a view
    y = torch.randn(6, 2 * 96)[:, ::2]  # elements of stride 2: copied to unit stride
    z = torch.randn(5, 3, 96).transpose(0, 1)  # (3, 5, 96) that no (15, 96) view describes: copied
    w, b = torch.randn(96), torch.randn(96)
    for t in (x, y, z):
        exact = F.layer_norm(t.double(), (96,), w.double(), b.double())
        assert rel_error(kernels.layer_norm(t, w, b), exact) < 1e-6
        monkeypatch.setattr(utils, "interpreting", lambda: False)  # the reference's output is contiguous too
        out = kernels.layer_norm(t, w, b)
        assert out.is_contiguous() and rel_error(out, exact) < 1e-6
        monkeypatch.undo()
    torch.library.opcheck(norm._layer_norm_fwd, (z.requires_grad_(), w, b, None, 1e-5))


def test_fused_layer_norm_is_a_drop_in():
    torch.manual_seed(0)
    for shape, kwargs in [(48, {}), (48, dict(eps=1e-6, bias=False)), (48, dict(elementwise_affine=False)),
                          ((4, 12), {})]:
        ref, fused = nn.LayerNorm(shape, **kwargs), kernels.FusedLayerNorm(shape, **kwargs)
        assert isinstance(fused, nn.LayerNorm)
        assert list(fused.state_dict()) == list(ref.state_dict())
        assert [n for n, _ in fused.named_parameters()] == [n for n, _ in ref.named_parameters()]
        with torch.no_grad():
            for p in ref.parameters():
                p.normal_()
        fused.load_state_dict(ref.state_dict())
        x = torch.randn(2, 3, 48).view(2, 3, *ref.normalized_shape)
        assert rel_error(fused(x), ref(x)) < 1e-6
        assert fused.extra_repr() == ref.extra_repr()


def test_from_layer_norm_shares_parameters():
    ln = nn.LayerNorm(32, eps=1e-6)
    fused = kernels.FusedLayerNorm.from_layer_norm(ln)
    assert fused.weight is ln.weight and fused.bias is ln.bias and fused.eps == 1e-6
    x = torch.randn(4, 32)
    assert rel_error(fused(x), ln(x)) < 1e-6


def test_reference_path_without_interpreter(monkeypatch):
    monkeypatch.setattr(utils, "interpreting", lambda: False)
    x, r = torch.randn(4, 100, requires_grad=True), torch.randn(4, 100, requires_grad=True)
    w, b = torch.randn(100, requires_grad=True), torch.randn(100, requires_grad=True)
    y, z = kernels.add_layer_norm(x, r, w, b)
    (y.sum() + z.square().sum()).backward()
    assert utils.last_path("layer_norm_fwd") == "reference" and utils.last_path("layer_norm_bwd") == "reference"
    x64, r64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, r, w, b))
    z64 = x64 + r64
    (F.layer_norm(z64, (100,), w64, b64).sum() + z64.square().sum()).backward()
    for got, exact in ((x.grad, x64.grad), (r.grad, r64.grad), (w.grad, w64.grad), (b.grad, b64.grad)):
        assert rel_error(got, exact) < 1e-5


@pytest.mark.parametrize("residual", [False, True])
def test_opcheck(residual):
    x = torch.randn(3, 40, requires_grad=True)
    r = torch.randn(3, 40, requires_grad=True) if residual else None
    w, b = torch.randn(40, requires_grad=True), torch.randn(40, requires_grad=True)
    torch.library.opcheck(norm._layer_norm_fwd, (x, w, b, r, 1e-5))
    y, z, mean, rstd = norm._layer_norm_fwd(x, w, b, r, 1e-5)
    saved = (z if residual else x).detach()
    dz = torch.randn_like(z) if residual else None
    torch.library.opcheck(norm._layer_norm_bwd, (torch.randn_like(y), saved, w.detach(), b.detach(), mean, rstd, dz))


def test_no_rows():
    x = torch.randn(0, 16, requires_grad=True)
    w = torch.randn(16, requires_grad=True)
    kernels.layer_norm(x, w).sum().backward()
    assert torch.equal(w.grad, torch.zeros(16))


@pytest.mark.parametrize("call, error, match", [
    (lambda: kernels.layer_norm(torch.randn(4, 8), torch.randn(7)), ValueError, r"weight must have shape \(8,\)"),
    (lambda: kernels.layer_norm(torch.randn(4, 8), None, torch.randn(8, 1)), ValueError, "bias must have shape"),
    (lambda: kernels.layer_norm(torch.ones(4, 8, dtype=torch.int32)), TypeError, "float16, bfloat16 or float32"),
    (lambda: kernels.layer_norm(torch.randn(4, 0)), ValueError, "non-empty last dimension"),
    (lambda: kernels.layer_norm(torch.randn(4, 8), torch.randn(8, device="meta")), ValueError, "x is on cpu"),
    (lambda: kernels.add_layer_norm(torch.randn(4, 8), torch.randn(4, 8).half()), TypeError, "residual is"),
    (lambda: kernels.add_layer_norm(torch.randn(4, 8), torch.randn(2, 8)), ValueError, "residual must have"),
    (lambda: kernels.FusedLayerNorm(8)(torch.randn(4, 9)), ValueError, r"FusedLayerNorm\(8,\) got input"),
])
def test_bad_inputs(call, error, match):
    with pytest.raises(error, match=match):
        call()
