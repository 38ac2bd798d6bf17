"""GPU suite, kernels: the Triton kernels compiled for this GPU, against float64 (`pytest -m gpu`; `make gpu-check`).

Skipped without CUDA, and while Triton's interpreter is on (tests/conftest.py turns it off for `pytest -m gpu`).
The CPU suite checks the same numerics in the interpreter, where bfloat16 dots are widened to float32; here
bfloat16 and float16 multiply on the tensor cores, float32 with exact FMA products (or TF32 where PyTorch allows
it), with the configurations the autotuner picks. The rule is DESIGN.md §4's (`kernels.testing`): error against
float64 at most twice PyTorch's own in the same dtype plus the rounding of the exact answer; every output
NaN-poisoned first; every call proven to have run the compiled kernels.

Shapes are few on purpose: each new (dtype, head size, flags, alignment) builds every autotuning candidate, about a
second each. The class tests use T = 256 (every tile shape survives pruning); the feature tests use short awkward
lengths, so only the small tiles build.
"""

from __future__ import annotations

import contextlib
import inspect
import sys

import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels import utils
from kernels.testing import assert_accurate

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(utils.interpreting(), reason="Triton's interpreter is on (TRITON_INTERPRET=1): run "
                                                    "`pytest -m gpu` on its own, or `make gpu-check`"),
]

ATTN = sys.modules[kernels.flash_attention.__module__]  # the module behind the public function, whatever its name
NO_WINDOW = (-1, -1)


# ----------------------------------------------------------------------------- helpers
def randn(*shape, seed: int, dtype=torch.float32) -> torch.Tensor:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(*shape, device="cuda", generator=gen).to(dtype)


def assert_ran_triton(*ops: str) -> None:
    """Every op recorded since the last reset ran the compiled kernels, and each of `ops` ran."""
    counts = utils.dispatch_counts()
    assert counts, "no kernel op ran"
    assert all(path == "triton" for _, path in counts), f"not the compiled kernels: {counts}"
    assert {op for op, _ in counts} >= set(ops), f"expected {ops}, ran {counts}"


@contextlib.contextmanager
def tf32(allowed: bool):
    """PyTorch's float32 matmul setting (the legacy flag, as bench.twins sets it), restored afterwards."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = allowed
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def seen_mask(t_q, t_k, causal, window=NO_WINDOW, kv_range=None) -> torch.Tensor:
    """(B or 1, 1, T_Q, T_K) bool, True where query i sees key j, from FlashAttention's definitions: with
    r = j - i - (T_K - T_Q), causal needs r <= 0, window (left, right) -left <= r <= right (-1: unbounded), and
    kv_range = (starts, ends) keeps starts[b] <= j < ends[b]."""
    i = torch.arange(t_q, device="cuda")[:, None]
    j = torch.arange(t_k, device="cuda")[None, :]
    r = j - i - (t_k - t_q)
    seen = torch.ones(t_q, t_k, dtype=torch.bool, device="cuda")
    left, right = window
    if causal:
        seen &= r <= 0
    if left >= 0:
        seen &= r >= -left
    if right >= 0:
        seen &= r <= right
    seen = seen[None, None]
    if kv_range is not None:
        starts, ends = (torch.tensor(x, device="cuda")[:, None] for x in kv_range)
        seen = seen & ((j >= starts) & (j < ends))[:, None, None, :]
    return seen


def torch_attention(q, k, v, seen, softcap=0.0):
    """PyTorch's own attention in the inputs' dtype (float64 too), grouped heads repeated: sdpa, or with
    softcapping the eager form transformers uses (scores capped in the dtype, softmax in float32)."""
    group = q.shape[1] // k.shape[1]
    k, v = (x.repeat_interleave(group, dim=1) for x in (k, v))
    if not softcap:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=seen)
    s = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    s = (torch.tanh(s / softcap) * softcap).masked_fill(~seen, float("-inf"))
    p = torch.softmax(s.float() if q.dtype != torch.float64 else s, dim=-1).to(q.dtype)
    return p @ v


def run(fn, inputs, do, dtype):
    """fn on fresh leaf copies of `inputs` cast to `dtype`; its output and the inputs' gradients for `do`."""
    leaves = [x.detach().to(dtype).requires_grad_() for x in inputs]
    out = fn(*leaves)
    out.backward(do.to(out.dtype))
    return out, [x.grad for x in leaves]


def check_attention(b, h, t_q, t_k, d, dtype, causal=True, *, kv_heads=None, window=NO_WINDOW, softcap=0.0,
                    kv_range=None, seed=0):
    """Forward and every gradient of kernels.flash_attention on CUDA against float64 and PyTorch in `dtype`."""
    kv_heads = kv_heads or h
    q = randn(b, h, t_q, d, seed=seed)
    k, v = randn(b, kv_heads, t_k, d, seed=seed + 1), randn(b, kv_heads, t_k, d, seed=seed + 2)
    do = randn(b, h, t_q, d, seed=seed + 3)
    seen = seen_mask(t_q, t_k, causal, window, kv_range)
    assert seen.expand(b, 1, t_q, t_k).any(-1).all(), "test shapes must leave every query some key"
    options = {}
    if window != NO_WINDOW:
        options["window"] = window
    if softcap:
        options["softcap"] = softcap
    if kv_range is not None:
        options |= {"kv_start": torch.tensor(kv_range[0], dtype=torch.int32, device="cuda"),
                    "kv_end": torch.tensor(kv_range[1], dtype=torch.int32, device="cuda")}
    reference = lambda q_, k_, v_: torch_attention(q_, k_, v_, seen, softcap)
    exact, exact_grads = run(reference, (q, k, v), do, torch.float64)
    theirs, their_grads = run(reference, (q, k, v), do, dtype)
    utils.reset_dispatch_counts()
    with utils.poisoned_outputs():
        out, grads = run(lambda q_, k_, v_: kernels.flash_attention(q_, k_, v_, causal=causal, **options), (q, k, v),
                         do, dtype)
    torch.cuda.synchronize()
    assert_ran_triton("flash_attn_fwd", "flash_attn_bwd")
    assert out.dtype == dtype and out.shape == (b, h, t_q, d)
    assert_accurate("out", out, theirs, exact)
    scale = max(float(g.norm()) for g in exact_grads)
    for name, g, r, e in zip(("dq", "dk", "dv"), grads, their_grads, exact_grads, strict=True):
        assert g.dtype == dtype and g.shape == e.shape
        assert_accurate(name, g, r, e, scale=scale)
    return out


def _candidates(kind: str, capability: int, dtype: torch.dtype, d: int, t_q: int, t_k: int) -> list:
    """The autotuning candidates the kernels' module declares for this call (aligned inputs, this precision)."""
    extra = {}
    params = inspect.signature(ATTN.configs_for_shape).parameters
    if "precision" in params and hasattr(ATTN, "precision_for"):
        extra["precision"] = ATTN.precision_for(dtype)
    return ATTN.configs_for_shape(kind, capability, dtype, d, t_q, t_k, **extra)


def _describe(cfg) -> str:
    return (f"BLOCK_M={cfg.kwargs['BLOCK_M']} BLOCK_N={cfg.kwargs['BLOCK_N']} warps={cfg.num_warps} "
            f"stages={cfg.num_stages}")


# ----------------------------------------------------------------------------- attention
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("d", [64, 128])
def test_attention_autotunes_each_configuration_class(dtype, d, record_property):
    """Each (GPU generation, math, head tile) class: the numbers hold with the autotuner's choice, and the
    choice is one of the class's candidates. The choice is printed and recorded (gpu-check's summary lists it)."""
    t = 256  # and H = 16, as `python -m bench kernels` has them: gpu-check's kernel bench reuses these builds
    with tf32(False):  # float32: the exact-products class
        q = check_attention(2, 16, t, t, d, dtype, causal=True, seed=d)
        capability = utils.cuda_capability(q)
        for kind in ("fwd", "dkdv", "dq"):
            best = ATTN._autotuned(kind, capability).best_config
            wanted = {_describe(c) for c in _candidates(kind, capability, dtype, d, t, t)}
            assert _describe(best) in wanted, f"{kind}: autotuner chose {_describe(best)}, not among {sorted(wanted)}"
            name = f"autotune {kind} {str(dtype).removeprefix('torch.')} D={d} sm_{capability}"
            print(f"{name}: {_describe(best)}")
            record_property(name, _describe(best))


def test_attention_float16_masked_head_non_causal():
    """Head size 80 (a 128-wide tile, masked), odd lengths, more keys than queries, no causal mask."""
    check_attention(2, 2, 45, 61, 80, torch.float16, causal=False, seed=80)


def test_attention_grouped_heads_window_softcap_padding():
    """Grouped-query heads (12 over 4), a sliding window, softcapping and per-sequence key ranges, at once."""
    if not {"window", "softcap", "kv_start"} <= set(inspect.signature(kernels.flash_attention).parameters):
        pytest.skip("kernels.flash_attention has no window/softcap/kv_start yet")
    check_attention(2, 12, 45, 61, 64, torch.bfloat16, causal=True, kv_heads=4, window=(16, 0), softcap=30.0,
                    kv_range=([0, 5], [61, 58]), seed=12)


def test_attention_varlen_packed_sequences():
    varlen = getattr(kernels, "flash_attention_varlen", None) or getattr(ATTN, "flash_attention_varlen", None)
    if varlen is None:
        pytest.skip("no flash_attention_varlen in kernels yet")
    lengths, h, d, dtype = [1, 17, 64, 5], 4, 64, torch.bfloat16
    total = sum(lengths)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    q, k, v, do = (randn(total, h, d, seed=s) for s in range(4))
    exact_parts, theirs_parts = [], []
    for lo, hi in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):  # each sequence alone, (1, H, T, D)
        piece = [x[lo:hi].transpose(0, 1)[None] for x in (q, k, v)]
        seen = seen_mask(hi - lo, hi - lo, causal=True)
        fn = lambda q_, k_, v_, seen=seen: torch_attention(q_, k_, v_, seen)
        exact_parts.append(run(fn, piece, do[lo:hi].transpose(0, 1)[None], torch.float64))
        theirs_parts.append(run(fn, piece, do[lo:hi].transpose(0, 1)[None], dtype))

    def packed(parts):
        out = torch.cat([o[0].transpose(0, 1) for o, _ in parts])
        grads = [torch.cat([g[i][0].transpose(0, 1) for _, g in parts]) for i in range(3)]
        return out, grads

    (exact, exact_grads), (theirs, their_grads) = packed(exact_parts), packed(theirs_parts)
    utils.reset_dispatch_counts()
    with utils.poisoned_outputs():
        out, grads = run(lambda q_, k_, v_: varlen(q_, k_, v_, cu, cu, max(lengths), max(lengths), causal=True),
                         (q, k, v), do, dtype)
    torch.cuda.synchronize()
    assert_ran_triton()
    assert_accurate("out", out, theirs, exact)
    scale = max(float(g.norm()) for g in exact_grads)
    for name, g, r, e in zip(("dq", "dk", "dv"), grads, their_grads, exact_grads, strict=True):
        assert_accurate(name, g, r, e, scale=scale)


def test_attention_one_query_against_a_cache():
    """Decoding: T_Q = 1 (which Triton specialises) against 300 cached keys, forward only."""
    q, k, v = randn(4, 2, 1, 64, seed=1), randn(4, 2, 300, 64, seed=2), randn(4, 2, 300, 64, seed=3)
    exact = torch_attention(q.double(), k.double(), v.double(), seen_mask(1, 300, True))
    theirs = torch_attention(*(x.bfloat16() for x in (q, k, v)), seen_mask(1, 300, True))
    utils.reset_dispatch_counts()
    with torch.no_grad(), utils.poisoned_outputs():
        out = kernels.flash_attention(*(x.bfloat16() for x in (q, k, v)), causal=True)
    assert_ran_triton("flash_attn_fwd")
    assert_accurate("out", out, theirs, exact)


def test_attention_float32_follows_pytorch_tf32_setting():
    """float32 multiplies in TF32 where PyTorch allows TF32 matmuls, exactly where it does not. PyTorch's own
    under TF32 is the eager form (cuBLAS TF32 matmuls, softmax in float32)."""
    if not hasattr(ATTN, "precision_for"):
        pytest.skip("the attention kernels have no TF32 mode yet")
    b, h, t, d = 2, 2, 61, 64
    q, k, v = (randn(b, h, t, d, seed=s) for s in (5, 6, 7))
    seen = seen_mask(t, t, True)
    exact = torch_attention(q.double(), k.double(), v.double(), seen)

    def eager(q_, k_, v_):
        s = (q_ @ k_.transpose(-1, -2) * d**-0.5).masked_fill(~seen, float("-inf"))
        return torch.softmax(s, dim=-1) @ v_

    errors = {}
    for allowed in (False, True):
        with tf32(allowed), torch.no_grad(), utils.poisoned_outputs():
            utils.reset_dispatch_counts()
            out = kernels.flash_attention(q, k, v, causal=True)
            assert_ran_triton("flash_attn_fwd")
            errors[allowed] = assert_accurate(f"out (tf32={allowed})", out, eager(q, k, v), exact).error
    # TF32 keeps 10 mantissa bits: its error is orders of magnitude above exact float32 products'.
    assert errors[True] > 10 * errors[False], f"TF32 allowed but the error did not grow: {errors}"


def test_no_t_by_t_allocation_at_8192():
    """Forward and backward at T = 8192 allocate far less than one head's T×T scores (T² bytes = 64 MiB here,
    half a bf16 score matrix of one head; a materialising implementation needs H of them)."""
    b, h, t, d = 1, 4, 8192, 64
    q, k, v = (randn(b, h, t, d, seed=s, dtype=torch.bfloat16).requires_grad_() for s in range(3))
    do = randn(b, h, t, d, seed=3, dtype=torch.bfloat16)
    kernels.flash_attention(q, k, v, causal=True).backward(do)  # autotunes (its benchmarks allocate) and warms up
    q.grad = k.grad = v.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    utils.reset_dispatch_counts()
    kernels.flash_attention(q, k, v, causal=True).backward(do)
    torch.cuda.synchronize()
    assert_ran_triton("flash_attn_fwd", "flash_attn_bwd")
    peak = torch.cuda.max_memory_allocated() - base
    print(f"T={t}: peak {peak / 2**20:.1f} MiB above the inputs")
    assert peak < t * t, f"peak {peak / 2**20:.1f} MiB: something of T×T size was allocated"


# ----------------------------------------------------------------------------- LayerNorm and RMSNorm
def _norm_case(kind: str, m: int, n: int, dtype, residual: bool):
    """(ours, theirs, exact, inputs, grads) for LayerNorm or RMSNorm (with Gemma's offset on odd n) on CUDA."""
    x = (randn(m, n, seed=n) * 2 + 0.5).to(dtype)  # an offset mean: the variance must not cancel
    r = randn(m, n, seed=n + 1, dtype=dtype) if residual else None
    w = (1 + 0.1 * randn(n, seed=n + 2)).to(dtype)
    bias = (0.1 * randn(n, seed=n + 3)).to(dtype)
    # Everything rounded to the dtype first: the exact answer is then of the very inputs the kernels see.
    dys = [randn(m, n, seed=n + 4, dtype=dtype)] + ([randn(m, n, seed=n + 5, dtype=dtype)] if residual else [])
    if kind == "layer_norm":
        def ours(x_, w_, b_, r_=None):
            return kernels.add_layer_norm(x_, r_, w_, b_) if r_ is not None else kernels.layer_norm(x_, w_, b_)

        def plain(x_, w_, b_):
            return F.layer_norm(x_, (n,), w_, b_)
        params = (w, bias)
    else:
        offset = 1.0 if n % 2 else 0.0

        def ours(x_, w_, r_=None):
            return (kernels.add_rms_norm(x_, r_, w_, 1e-6, offset=offset) if r_ is not None
                    else kernels.rms_norm(x_, w_, 1e-6, offset=offset))

        def plain(x_, w_):  # PyTorch's own: F.rms_norm, or Gemma's float32 formula for (1 + weight)
            if not offset:
                return F.rms_norm(x_, (n,), w_, 1e-6)
            xf = x_.float() if x_.dtype != torch.float64 else x_
            y = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + 1e-6) * (offset + w_.to(xf.dtype))
            return y.to(x_.dtype)
        params = (0.3 * w if offset else w,)
    return ours, plain, x, r, params, dys


@pytest.mark.parametrize("kind", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("dtype, m, n", [
    (torch.bfloat16, 4096, 768),  # many row tiles per program: the partial sums of dweight/dbias
    (torch.float16, 64, 768), (torch.float32, 64, 768),
    (torch.bfloat16, 7, 1), (torch.bfloat16, 33, 17), (torch.bfloat16, 64, 1000),
    (torch.bfloat16, 40, 4099), (torch.float16, 40, 4099), (torch.float32, 40, 4099),  # chunked rows
    (torch.bfloat16, 16, 16384),
])
def test_norms(kind, dtype, m, n):
    if not hasattr(kernels, kind):
        pytest.skip(f"kernels has no {kind} yet")
    ours, plain, x, _, params, dys = _norm_case(kind, m, n, dtype, residual=False)
    inputs = (x, *params)
    exact, exact_grads = _norm_run(plain, inputs, dys, torch.float64)
    theirs, their_grads = _norm_run(plain, inputs, dys, dtype)
    utils.reset_dispatch_counts()
    with utils.poisoned_outputs():
        got, grads = _norm_run(ours, inputs, dys, dtype)
    torch.cuda.synchronize()
    assert_ran_triton(f"{kind}_fwd", f"{kind}_bwd")
    assert_accurate("y", got[0], theirs[0], exact[0])
    scale = max(float(g.norm()) for g in exact_grads)
    for name, g, r, e in zip(("dx", "dweight", "dbias"), grads, their_grads, exact_grads, strict=False):
        assert_accurate(name, g, r, e, scale=scale)


@pytest.mark.parametrize("kind", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("dtype, n", [(torch.bfloat16, 768), (torch.float32, 4099)])
def test_norms_with_residual(kind, dtype, n):
    if not hasattr(kernels, f"add_{kind}"):
        pytest.skip(f"kernels has no add_{kind} yet")
    ours, plain, x, r, params, dys = _norm_case(kind, 96, n, dtype, residual=True)
    # The op normalises the sum rounded to the dtype, as `x + r` does: the exact answer normalises that sum.
    z = (x + r).double()
    exact, exact_grads = _norm_run(lambda z_, *p: (plain(z_, *p), z_), (z, *params), dys, torch.float64)
    theirs, their_grads = _norm_run(lambda x_, r_, *p: (plain(x_ + r_, *p), x_ + r_), (x, r, *params), dys, dtype)
    utils.reset_dispatch_counts()
    with utils.poisoned_outputs():
        got, grads = _norm_run(lambda x_, r_, *p: ours(x_, *p, r_=r_), (x, r, *params), dys, dtype)
    torch.cuda.synchronize()
    assert_ran_triton(f"{kind}_fwd", f"{kind}_bwd")
    assert_accurate("y", got[0], theirs[0], exact[0])
    assert torch.equal(got[1], (x + r).to(dtype)), "the residual sum must be x + residual rounded to the dtype"
    scale = max(float(g.norm()) for g in exact_grads)
    exact_grads = [exact_grads[0], *exact_grads]  # d(x) = d(residual) = d(z)
    for name, g, rr, e in zip(("dx", "dresidual", "dweight", "dbias"), grads, their_grads, exact_grads,
                              strict=False):
        assert_accurate(name, g, rr, e, scale=scale)


def _norm_run(fn, inputs, dys, dtype):
    leaves = [t.detach().to(dtype).requires_grad_() for t in inputs]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    torch.autograd.backward(outs, [g.to(o.dtype) for o, g in zip(outs, dys, strict=True)])
    return outs, [t.grad for t in leaves]


# ----------------------------------------------------------------------------- torch.compile
def test_custom_ops_under_torch_compile():
    """The ops in one fullgraph-compiled function on CUDA: the same values and gradients as eager, and the
    compiled graph calls the compiled kernels."""
    torch._dynamo.reset()
    n, h, t, d = 1024, 16, 256, 64  # the attention shapes of the float32 class test: its builds are reused
    x, res = randn(2, t, n, seed=1), randn(2, t, n, seed=2)
    w, b = 1 + 0.1 * randn(n, seed=3), 0.1 * randn(n, seed=4)

    def block(x, res, w, b):
        y, z = kernels.add_layer_norm(x, res, w, b)
        q, k, v = (y @ torch.eye(n, device="cuda")).view(2, t, h, d).transpose(1, 2), y.view(2, t, h, d).transpose(
            1, 2), z.view(2, t, h, d).transpose(1, 2)
        a = kernels.flash_attention(q, k, v, causal=True).transpose(1, 2).reshape(2, t, n)
        out = kernels.layer_norm(a + z, w, b)
        if hasattr(kernels, "rms_norm"):
            out = kernels.rms_norm(out, w)
        return out.square().mean()

    compiled = torch.compile(block, fullgraph=True)
    results = []
    for fn in (block, compiled):
        leaves = [p.detach().clone().requires_grad_() for p in (x, res, w, b)]
        utils.reset_dispatch_counts()
        loss = fn(*leaves)
        loss.backward()
        torch.cuda.synchronize()
        assert_ran_triton("flash_attn_fwd", "flash_attn_bwd", "layer_norm_fwd", "layer_norm_bwd")
        results.append([loss.detach(), *(p.grad for p in leaves)])
    for name, e, c in zip(("loss", "dx", "dres", "dw", "db"), *results, strict=True):
        err = float((c.double() - e.double()).norm() / e.double().norm())
        assert err <= 1e-5, f"{name}: compiled differs from eager by {err:.2e}"


# ----------------------------------------------------------------------------- fused linear + cross-entropy
@pytest.mark.parametrize("dtype, softcap", [(torch.bfloat16, None), (torch.float32, None), (torch.bfloat16, 30.0)],
                         ids=["bf16", "fp32", "bf16-softcap"])
def test_linear_cross_entropy(dtype, softcap):
    """Loss and the gradients of hidden and weight against float64, with ignored targets, an awkward vocabulary
    and several chunks of rows."""
    if not hasattr(kernels, "linear_cross_entropy"):
        pytest.skip("kernels has no linear_cross_entropy yet")
    n, c, v = 300, 256, 5003
    hidden, weight = randn(n, c, seed=1, dtype=dtype), (0.05 * randn(v, c, seed=2)).to(dtype)
    gen = torch.Generator(device="cuda").manual_seed(3)
    targets = torch.randint(0, v, (n,), device="cuda", generator=gen)
    targets[::7] = -100  # ignored rows

    def plain(h, w):  # PyTorch's own: the logits in the dtype, the loss in float32 (float64 for the exact one)
        z = h @ w.T
        z = z.float() if z.dtype != torch.float64 else z
        if softcap:
            z = softcap * torch.tanh(z / softcap)
        return F.cross_entropy(z, targets, ignore_index=-100)

    def run_ce(fn, dt):
        h, w = (t.detach().to(dt).requires_grad_() for t in (hidden, weight))
        loss = fn(h, w)
        loss.backward()
        return loss.detach(), h.grad, w.grad

    exact = run_ce(plain, torch.float64)
    theirs = run_ce(plain, dtype)
    utils.reset_dispatch_counts()
    with utils.poisoned_outputs():
        ours = run_ce(lambda h, w: kernels.linear_cross_entropy(h, w, targets, softcap=softcap, chunk_size=64), dtype)
    torch.cuda.synchronize()
    assert_ran_triton()
    assert_accurate("loss", ours[0].reshape(1), theirs[0].reshape(1), exact[0].reshape(1))
    scale = max(float(g.norm()) for g in exact[1:])
    for name, g, r, e in zip(("d(hidden)", "d(weight)"), ours[1:], theirs[1:], exact[1:], strict=True):
        assert g.dtype == dtype
        assert_accurate(name, g, r, e, scale=scale)


def test_linear_cross_entropy_never_holds_the_logits():
    """GPT-2's lm_head at 8192 rows: the forward and backward allocate far less than the bfloat16 logits
    (8192 × 50257 × 2 bytes, 785 MiB), let alone the float32 ones a plain cross-entropy makes."""
    if not hasattr(kernels, "linear_cross_entropy"):
        pytest.skip("kernels has no linear_cross_entropy yet")
    n, c, v = 8192, 768, 50257
    hidden = randn(n, c, seed=1, dtype=torch.bfloat16).requires_grad_()
    weight = (0.02 * randn(v, c, seed=2)).to(torch.bfloat16).requires_grad_()
    targets = torch.randint(0, v, (n,), device="cuda", generator=torch.Generator(device="cuda").manual_seed(3))
    kernels.linear_cross_entropy(hidden, weight, targets).backward()  # builds and warms up
    hidden.grad = weight.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    kernels.linear_cross_entropy(hidden, weight, targets).backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    logits_bytes = n * v * 2
    print(f"linear_cross_entropy N={n} V={v}: peak {peak / 2**20:.0f} MiB above the inputs "
          f"(bf16 logits: {logits_bytes / 2**20:.0f} MiB)")
    assert peak < logits_bytes / 2, f"peak {peak / 2**20:.0f} MiB: the logits were held whole"
