"""Flash attention: numerics in Triton's interpreter against float64, gradients, dispatch, ops, bad inputs.

Every numerics test proves the Triton kernels ran (in the interpreter: conftest sets TRITON_INTERPRET=1)
and NaN-fills every kernel output before the kernels write it. The accuracy rule (DESIGN.md §4): the
kernel's error against a float64 reference is at most twice that of PyTorch's own attention in the same
dtype, plus the error of merely rounding the exact answer to that dtype.

bfloat16: Triton 3.9's interpreter gets two bf16 operations wrong: `tl.dot` on bf16 operands returns
garbage, and float32 -> bf16 casts truncate instead of rounding to nearest even. Under the interpreter,
for bf16 only, the kernels run with INTERP_BF16 set: dot operands are widened exactly to float32 (the
products a bf16 MMA forms) and casts round by hand first (`utils.cast_to`). Everything else (bf16 loads
and stores, rounding P and dS to bf16 before their matmuls, float32 accumulation) is the GPU code. The
bf16 build without INTERP_BF16, which a GPU runs, is covered by ahead-of-time compilation only
(test_kernels_compile.py): its numerics are not tested here. Two canaries below fail once Triton fixes
either gap, so the workaround can go.
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels import utils
from tests.helpers import rel_error

fa = importlib.import_module("kernels.flash_attention")  # the package's `flash_attention` is the function

pytestmark = pytest.mark.interpreter


def end_aligned_mask(t_q: int, t_k: int) -> torch.Tensor:
    """(T_Q, T_K) bool, True where query i sees key j: j <= i + T_K - T_Q."""
    return torch.arange(t_k)[None, :] <= torch.arange(t_q)[:, None] + (t_k - t_q)


def torch_attention(q, k, v, causal: bool):
    """PyTorch's own attention, in the inputs' dtype."""
    mask = end_aligned_mask(q.shape[2], k.shape[2]) if causal else None
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def attention_and_grads(fn, q, k, v, do, causal: bool, dtype=None):
    """fn's output and (dq, dk, dv) for output gradient `do`, on fresh leaf copies of q, k, v (cast to dtype)."""
    leaves = [x.detach().to(dtype or x.dtype).requires_grad_() for x in (q, k, v)]
    out = fn(*leaves, causal)
    out.backward(do.to(out.dtype))
    return out, [x.grad for x in leaves]


def assert_within_torch_error(name, got, torch_val, exact, dtype):
    """Finite, and err(got) <= 2·err(PyTorch, same dtype) + err(exact rounded to dtype), errors vs float64."""
    assert torch.isfinite(got).all(), f"{name}: non-finite values (unwritten outputs are NaN)"
    err, err_torch = rel_error(got, exact), rel_error(torch_val, exact)
    floor = rel_error(exact.to(dtype), exact)
    assert err <= 2 * err_torch + floor, f"{name}: error {err:.3e} > 2 x PyTorch's {err_torch:.3e} + {floor:.1e}"
    return err, err_torch


def check_attention(b, h, t_q, t_k, d, dtype, causal):
    """Forward and every gradient of kernels.flash_attention against float64 and PyTorch in `dtype`."""
    gen = torch.Generator().manual_seed(1000 * t_q + 10 * d + t_k)
    q, k, v = (torch.randn(b, h, t, d, generator=gen) for t in (t_q, t_k, t_k))
    do = torch.randn(b, h, t_q, d, generator=gen)
    exact, exact_grads = attention_and_grads(torch_attention, q, k, v, do, causal, torch.float64)
    ours_fn = lambda q_, k_, v_, c: kernels.flash_attention(q_, k_, v_, causal=c)
    utils.reset_dispatch_counts()
    with utils.poisoned_outputs():
        out, grads = attention_and_grads(ours_fn, q, k, v, do, causal, dtype)
    assert utils.dispatch_counts() == {("flash_attn_fwd", "interpreter"): 1, ("flash_attn_bwd", "interpreter"): 1}
    ref, ref_grads = attention_and_grads(torch_attention, q, k, v, do, causal, dtype)
    assert out.dtype == dtype and out.shape == (b, h, t_q, d)
    assert_within_torch_error("out", out, ref, exact, dtype)
    for name, g, r, e in zip(("dq", "dk", "dv"), grads, ref_grads, exact_grads, strict=True):
        assert g.dtype == dtype
        if name != "dv" and t_k == 1:
            # One key: P = 1, so dS = 0 and dQ = dK = 0 exactly; a relative error means nothing. What is
            # left is float32 rounding of dS = P·(dO·v − rowsum(dO∘O)), a few ulps of D·|dO||v|, times
            # |q| or |k| and sm_scale, summed over the queries.
            eps = torch.finfo(torch.float32).eps
            bound = 4 * d * eps * do.abs().max() * v.abs().max() * max(q.abs().max(), k.abs().max()) * t_q
            assert g.abs().max() <= bound / math.sqrt(d), f"{name} should be 0 for a single key"
            continue
        assert_within_torch_error(name, g, r, e, dtype)


@pytest.mark.parametrize("t", [1, 17, 64, 129, 300])
def test_sequence_lengths(t):
    check_attention(1, 2, t, t, 64, torch.float16, causal=True)


@pytest.mark.parametrize("d", [16, 32, 80, 128])
def test_head_sizes(d):
    check_attention(1, 2, 129, 129, d, torch.float16, causal=True)


@pytest.mark.parametrize("dtype, d", [(torch.float32, 64), (torch.bfloat16, 64), (torch.bfloat16, 80)])
def test_dtypes(dtype, d):
    check_attention(2, 2, 129, 129, d, dtype, causal=True)


@pytest.mark.parametrize("t_q, t_k, causal", [
    (1, 129, True),  # one new query against a KV cache: sees every key
    (17, 300, True),  # a chunk of queries against a longer cache: diagonal aligned to the end
    (45, 129, False),
    (129, 45, False),  # non-causal cross attention may have more queries than keys
])
def test_unequal_lengths_and_non_causal(t_q, t_k, causal):
    check_attention(2, 2, t_q, t_k, 32, torch.float16, causal)


@pytest.mark.parametrize("blocks", [(16, 32), (64, 16)])
def test_other_tile_shapes(monkeypatch, blocks):
    """BLOCK_M != BLOCK_N exercises the diagonal bookkeeping the GPU configurations rely on."""
    monkeypatch.setattr(fa, "INTERPRETER_BLOCKS", {"fwd": blocks, "dkdv": blocks[::-1], "dq": blocks})
    check_attention(1, 2, 70, 129, 32, torch.float32, causal=True)
    check_attention(1, 1, 33, 33, 16, torch.float32, causal=False)


def test_strided_views_are_not_copied(monkeypatch):
    """q, k, v as views of one fused (B, T, 3, H, D) projection go to the kernels as they are."""
    b, t, h, d = 2, 40, 3, 32
    qkv = torch.randn(b, t, 3, h, d, requires_grad=True)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 × (B, H, T, D), strides (3HTD.., D, 3HD, 1)
    seen = []
    launch = fa.attn_fwd
    monkeypatch.setattr(fa, "attn_fwd", lambda *a: seen.append([x.data_ptr() for x in a[:3]]) or launch(*a))
    out = kernels.flash_attention(q, k, v)
    assert seen == [[q.data_ptr(), k.data_ptr(), v.data_ptr()]]
    assert out.transpose(1, 2).is_contiguous()  # (B, T, H, D) memory: the reshape to (B, T, C) is free
    ref = torch_attention(q.double(), k.double(), v.double(), causal=True)
    assert rel_error(out, ref) < 1e-6
    out.sum().backward()
    qkv64 = qkv.detach().double().requires_grad_()
    torch_attention(*qkv64.permute(2, 0, 3, 1, 4).unbind(0), causal=True).sum().backward()
    assert rel_error(qkv.grad, qkv64.grad) < 1e-5


def test_kv_cache_decoding_matches_full_attention():
    """Queries fed one at a time against a growing cache give the rows of one causal pass."""
    q, k, v = (torch.randn(1, 2, 20, 16) for _ in range(3))
    full = kernels.flash_attention(q, k, v)
    steps = [kernels.flash_attention(q[:, :, i:i + 1], k[:, :, :i + 1], v[:, :, :i + 1]) for i in range(17, 20)]
    assert rel_error(torch.cat(steps, dim=2), full[:, :, 17:]) < 1e-6


def test_custom_scale():
    q, k, v = (torch.randn(1, 2, 17, 16, dtype=torch.float64).float() for _ in range(3))
    out = kernels.flash_attention(q, k, v, causal=False, sm_scale=0.3)
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), scale=0.3)
    assert rel_error(out, ref) < 1e-6


def test_reference_path_without_interpreter(monkeypatch):
    """With the interpreter off, CPU tensors run the exact PyTorch reference, and the path says so."""
    monkeypatch.setattr(utils, "interpreting", lambda: False)
    q, k, v = (torch.randn(1, 2, 19, 16, requires_grad=True) for _ in range(3))
    out = kernels.flash_attention(q, k[:, :, :], v, causal=True)
    out.sum().backward()
    assert utils.last_path("flash_attn_fwd") == "reference" and utils.last_path("flash_attn_bwd") == "reference"
    ref = torch_attention(q.double(), k.double(), v.double(), causal=True)
    assert rel_error(out, ref) < 1e-6
    assert out.stride() == fa._new_output(q).stride()  # the same layout as the kernels and the fake


def test_bf16_interpreter_workaround_is_flagged():
    """INTERP_BF16 is set for bf16 under the interpreter only; a GPU build never has it."""
    q = torch.empty(1, 1, 4, 16, dtype=torch.bfloat16)
    assert utils.interpreting()
    assert fa._meta(q, True)["INTERP_BF16"] is True
    assert fa._meta(q.half(), True)["INTERP_BF16"] is False and fa._meta(q.float(), True)["INTERP_BF16"] is False


def test_interpreter_bf16_dot_is_still_broken():
    """Canary: when Triton's interpreter gets bf16 `tl.dot` right, INTERP_BF16 can stop widening operands."""
    import triton
    import triton.language as tl

    @triton.jit
    def matmul16(A, B, C, INTERP_BF16: tl.constexpr):
        i = tl.arange(0, 16)
        a = tl.load(A + i[:, None] * 16 + i[None, :])
        b = tl.load(B + i[:, None] * 16 + i[None, :])
        c = fa._dot(a, b, tl.zeros((16, 16), tl.float32), INTERP_BF16, "tf32")
        tl.store(C + i[:, None] * 16 + i[None, :], c)

    a, b = torch.randn(16, 16).bfloat16(), torch.randn(16, 16).bfloat16()
    exact = a.double() @ b.double()
    c = torch.empty(16, 16)
    matmul16[(1,)](a, b, c, INTERP_BF16=True)
    assert rel_error(c, exact) < 1e-6
    matmul16[(1,)](a, b, c, INTERP_BF16=False)
    assert rel_error(c, exact) > 1e-2, "the interpreter's bf16 tl.dot works now: INTERP_BF16 can go"


def test_interpreter_bf16_cast_still_truncates():
    """Canary: when the interpreter rounds float32 -> bf16 to nearest even, `utils.cast_to` can stop doing it."""
    import triton
    import triton.language as tl

    @triton.jit
    def to_bf16(X, Y, BY_HAND: tl.constexpr):
        i = tl.arange(0, 1024)
        tl.store(Y + i, utils.cast_to(tl.load(X + i), tl.bfloat16, BY_HAND))

    x = torch.randn(1024)
    y = torch.empty(1024, dtype=torch.bfloat16)
    to_bf16[(1,)](x, y, BY_HAND=True)
    assert torch.equal(y, x.bfloat16())  # PyTorch rounds to nearest even
    to_bf16[(1,)](x, y, BY_HAND=False)
    assert not torch.equal(y, x.bfloat16()), "the interpreter rounds bf16 casts now: cast_to's workaround can go"


def test_opcheck():
    q, k, v = (torch.randn(1, 2, 17, 16, requires_grad=True) for _ in range(3))
    torch.library.opcheck(fa._flash_attn_fwd, (q, k, v, True, 0.25))
    o, lse = fa._flash_attn_fwd(q, k, v, True, 0.25)
    do = torch.randn_like(o)
    torch.library.opcheck(fa._flash_attn_bwd, (do, q.detach(), k.detach(), v.detach(), o.detach(), lse, True, 0.25))


def test_empty_batch_and_zero_queries():
    q, k = torch.randn(0, 2, 5, 16, requires_grad=True), torch.randn(0, 2, 5, 16, requires_grad=True)
    assert kernels.flash_attention(q, k, k).shape == (0, 2, 5, 16)
    q0, kv = torch.randn(1, 2, 0, 16, requires_grad=True), torch.randn(1, 2, 5, 16, requires_grad=True)
    out = kernels.flash_attention(q0, kv, kv, causal=False)
    out.sum().backward()
    assert out.shape == (1, 2, 0, 16) and torch.equal(kv.grad, torch.zeros_like(kv))


def _qkv(shape=(1, 2, 8, 16), **kw):
    return [torch.randn(shape, **kw) for _ in range(3)]


@pytest.mark.parametrize("make, error, match", [
    (lambda: _qkv((8, 16)), ValueError, "must have 4 dimensions"),
    (lambda: [*_qkv()[:2], torch.randn(1, 2, 8)], ValueError, "v must have 4 dimensions"),
    (lambda: [*_qkv()[:2], torch.randn(1, 2, 9, 16)], ValueError, "expected q"),
    (lambda: [_qkv()[0], torch.randn(1, 3, 8, 16), torch.randn(1, 3, 8, 16)], ValueError, "expected q"),
    (lambda: _qkv((1, 2, 8, 160)), ValueError, "head size D=160"),
    (lambda: [_qkv()[0].half(), *_qkv()[1:]], TypeError, "q is torch.float16 but k is torch.float32"),
    (lambda: _qkv(dtype=torch.float64), TypeError, "float16, bfloat16 or float32"),
    (lambda: [torch.ones(1, 2, 8, 16, dtype=torch.int64)] * 3, TypeError, "float16, bfloat16 or float32"),
    (lambda: [_qkv()[0], *_qkv((1, 2, 4, 16))[1:]], ValueError, "T_Q <= T_K"),
    (lambda: [_qkv()[0].to("meta"), *_qkv()[1:]], ValueError, "q is on meta but k is on cpu"),
    (lambda: [_qkv()[0].numpy(), *_qkv()[1:]], TypeError, "must be a torch.Tensor"),
])
def test_bad_inputs(make, error, match):
    with pytest.raises(error, match=match):
        kernels.flash_attention(*make())


def test_default_scale_is_inverse_sqrt_head_size():
    q, k, v = _qkv((1, 1, 5, 36))
    out = kernels.flash_attention(q, k, v, causal=False)
    assert rel_error(out, kernels.flash_attention(q, k, v, causal=False, sm_scale=1 / math.sqrt(36))) == 0
