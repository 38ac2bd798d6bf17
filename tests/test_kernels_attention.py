"""Flash attention: numerics in Triton's interpreter against float64, gradients, dispatch, ops, bad inputs.

Every numerics test proves the Triton kernels ran (in the interpreter: conftest sets TRITON_INTERPRET=1)
and NaN-fills every kernel output before the kernels write it. The accuracy rule (DESIGN.md §4,
`kernels.testing`): the kernel's error against a float64 reference is at most twice that of PyTorch's own
attention in the same dtype (sdpa; with softcapping, which sdpa lacks, the eager form transformers uses),
plus the error of merely rounding the exact answer to that dtype. The masks the references use are built
here from FlashAttention's definitions, not taken from the kernels' module.

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

import math

import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels import attention as fa
from kernels import utils
from kernels.testing import assert_accurate
from tests.helpers import rel_error

pytestmark = pytest.mark.interpreter

NO_WINDOW = (-1, -1)
OPS = ("flash_attn_fwd", "flash_attn_bwd", "flash_attn_varlen_fwd", "flash_attn_varlen_bwd")


@pytest.fixture(autouse=True)
def _kernels_ran(request):
    """Every attention op a test calls runs the Triton kernels in the interpreter: never the reference (except in
    the one test that checks the reference)."""
    utils.reset_dispatch_counts()
    yield
    paths = {path for (op, path) in utils.dispatch_counts() if op in OPS}
    assert paths <= ({"reference"} if request.node.name == "test_reference_path_without_interpreter"
                     else {"interpreter"}), utils.dispatch_counts()


# ----------------------------------------------------------------------------- references
def seen_mask(t_q: int, t_k: int, causal: bool, window=NO_WINDOW, kv_range=None) -> torch.Tensor:
    """(B or 1, 1, T_Q, T_K) bool, True where query i sees key j (FlashAttention's definitions): with
    r = j - i - (T_K - T_Q), causal needs r <= 0, window (left, right) -left <= r <= right (-1: unbounded),
    and kv_range = (starts, ends) keeps keys starts[b] <= j < ends[b]."""
    i, j = torch.arange(t_q)[:, None], torch.arange(t_k)[None, :]
    r = j - i - (t_k - t_q)
    seen = torch.ones(t_q, t_k, dtype=torch.bool)
    left, right = window
    if causal:
        seen &= r <= 0
    if left >= 0:
        seen &= r >= -left
    if right >= 0:
        seen &= r <= right
    seen = seen[None, None]
    if kv_range is not None:
        starts, ends = (torch.as_tensor(x)[:, None] for x in kv_range)
        seen = seen & ((j >= starts) & (j < ends))[:, None, None, :]
    return seen


def torch_attention(q, k, v, seen, scale=None, softcap=0.0):
    """PyTorch's own attention in the inputs' dtype, grouped heads repeated: sdpa, or with softcapping the eager
    form transformers uses (scores capped in the dtype, softmax in float32). A row that sees nothing gives 0."""
    group = q.shape[1] // k.shape[1]
    k, v = (x.repeat_interleave(group, dim=1) for x in (k, v))
    if not softcap:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=seen, scale=scale)
    s = q @ k.transpose(-1, -2) * (scale or q.shape[-1] ** -0.5)
    s = (torch.tanh(s / softcap) * softcap).masked_fill(~seen, float("-inf"))
    p = torch.softmax(s.float(), dim=-1).nan_to_num(0.0).to(q.dtype)
    return p @ v


def run(fn, q, k, v, do, dtype=None):
    """fn(q, k, v) and (dq, dk, dv) for output gradient `do`, on fresh leaf copies (cast to `dtype`)."""
    leaves = [x.detach().to(dtype or x.dtype).requires_grad_() for x in (q, k, v)]
    out = fn(*leaves)
    out.backward(do.to(out.dtype))
    return out, [x.grad for x in leaves]


def assert_matches_rule(out, grads, ref, ref_grads, exact, exact_grads):
    """Output and gradients within the accuracy rule; near-zero exact gradients measured against the largest."""
    assert_accurate("out", out, ref, exact)
    scale = max(float(g.norm()) for g in exact_grads)
    for name, g, r, e in zip(("dq", "dk", "dv"), grads, ref_grads, exact_grads, strict=True):
        assert g.dtype == out.dtype
        assert_accurate(name, g, r, e, scale=scale)


def check_attention(b, h, t_q, t_k, d, dtype, causal=True, *, kv_heads=None, window=NO_WINDOW, softcap=0.0,
                    kv_range=None):
    """Forward and every gradient of kernels.flash_attention against float64 and PyTorch in `dtype`."""
    kv_heads = kv_heads or h
    gen = torch.Generator().manual_seed(1000 * t_q + 10 * d + t_k)
    q = torch.randn(b, h, t_q, d, generator=gen)
    k, v = (torch.randn(b, kv_heads, t_k, d, generator=gen) for _ in range(2))
    do = torch.randn(b, h, t_q, d, generator=gen)
    seen = seen_mask(t_q, t_k, causal, window, kv_range)
    ranges = {} if kv_range is None else dict(zip(("kv_start", "kv_end"), (torch.tensor(x, dtype=torch.int32)
                                                                           for x in kv_range), strict=True))
    reference = lambda q_, k_, v_: torch_attention(q_, k_, v_, seen, softcap=softcap)
    exact, exact_grads = run(reference, q, k, v, do, torch.float64)
    ref, ref_grads = run(reference, q, k, v, do, dtype)
    utils.reset_dispatch_counts()
    with utils.poisoned_outputs():
        out, grads = run(lambda q_, k_, v_: kernels.flash_attention(
            q_, k_, v_, causal=causal, window=window, softcap=softcap, **ranges), q, k, v, do, dtype)
    assert utils.dispatch_counts() == {("flash_attn_fwd", "interpreter"): 1, ("flash_attn_bwd", "interpreter"): 1}
    assert out.dtype == dtype and out.shape == (b, h, t_q, d)
    assert_matches_rule(out, grads, ref, ref_grads, exact, exact_grads)
    blind = ~seen.expand(b, 1, t_q, t_k).any(-1).expand(b, h, t_q)  # queries that see no key: exactly 0
    assert not out[blind].any() and not grads[0][blind].any()
    return out, grads


# ----------------------------------------------------------------------------- plain causal and full attention
@pytest.mark.parametrize("t", [1, 17, 64, 129])  # interpreter tiles are 32 x 32: 129 has a 1-row tile
def test_sequence_lengths(t):
    check_attention(1, 2, t, t, 32, torch.float16, causal=True)


@pytest.mark.parametrize("d", [16, 32, 80, 128])
def test_head_sizes(d):
    check_attention(1, 2, 40, 40, d, torch.float16, causal=True)


@pytest.mark.parametrize("dtype, d", [(torch.float32, 64), (torch.bfloat16, 64), (torch.bfloat16, 80)])
def test_dtypes(dtype, d):
    check_attention(2, 1, 70, 70, d, dtype, causal=True)


@pytest.mark.parametrize("t_q, t_k, causal", [
    (1, 129, True),  # one new query against a KV cache: sees every key
    (17, 150, True),  # a chunk of queries against a longer cache: diagonal aligned to the end
    (45, 100, False),
    (100, 45, False),  # non-causal cross attention may have more queries than keys
])
def test_unequal_lengths_and_non_causal(t_q, t_k, causal):
    check_attention(1, 2, t_q, t_k, 32, torch.float16, causal)


@pytest.mark.parametrize("t_q, t_k", [(45, 17), (64, 1), (33, 32)])
def test_causal_with_more_queries_than_keys(t_q, t_k):
    """Aligned to the end: query i sees keys j <= i + T_K - T_Q; the first T_Q - T_K see none (0, zero grads)."""
    out, grads = check_attention(1, 2, t_q, t_k, 32, torch.float32, causal=True)
    assert not out[:, :, : t_q - t_k].any() and not grads[0][:, :, : t_q - t_k].any()
    assert out[:, :, t_q - t_k:].abs().amin(-1).gt(0).all()


# ----------------------------------------------------------------------------- grouped-query attention
@pytest.mark.parametrize("kv_heads, dtype", [(4, torch.float16), (1, torch.float16), (4, torch.float32),
                                             (1, torch.bfloat16)])
def test_grouped_and_multi_query_heads(kv_heads, dtype):
    check_attention(1, 12, 33, 33, 16, dtype, causal=True, kv_heads=kv_heads)


def test_grouped_heads_with_everything_else():
    check_attention(2, 6, 33, 50, 16, torch.float16, causal=True, kv_heads=2, window=(7, -1), softcap=30.0,
                    kv_range=([0, 9], [50, 41]))


def test_grouped_keys_are_read_in_place(monkeypatch):
    """The kernels get the (B, H_KV, T, D) keys and values as they are: no repeat, no copy."""
    q = torch.randn(1, 12, 20, 16)
    k, v = torch.randn(1, 4, 20, 16), torch.randn(1, 4, 20, 16)
    seen = []
    launch = fa.attn_fwd
    monkeypatch.setattr(fa, "attn_fwd", lambda *a: seen.append([(x.data_ptr(), x.shape) for x in a[1:3]]) or launch(*a))
    kernels.flash_attention(q, k, v)
    assert seen == [[(k.data_ptr(), k.shape), (v.data_ptr(), v.shape)]]


# ----------------------------------------------------------------------------- windows and softcapping
@pytest.mark.parametrize("left", [0, 1, 7, 100])  # 100 > T: the window changes nothing
def test_causal_sliding_windows(left):
    check_attention(1, 2, 70, 70, 16, torch.float16, causal=True, window=(left, -1))


@pytest.mark.parametrize("t_q, t_k, window", [
    (70, 70, (3, 5)),  # a local window both ways
    (70, 70, (-1, 0)),  # causal spelled as a window
    (20, 90, (7, 2)),  # fewer queries than keys: the window moves with the end-aligned diagonal
    (90, 20, (7, 7)),  # more queries than keys: the first queries see nothing
    (40, 40, (0, 0)),  # only the diagonal
])
def test_non_causal_windows(t_q, t_k, window):
    check_attention(1, 2, t_q, t_k, 16, torch.float32, causal=False, window=window)


@pytest.mark.parametrize("softcap, dtype", [(30.0, torch.float32), (50.0, torch.float32), (30.0, torch.float16),
                                            (50.0, torch.bfloat16)])
def test_softcap(softcap, dtype):
    check_attention(1, 2, 50, 50, 32, dtype, causal=True, softcap=softcap)


def test_softcap_caps_large_scores():
    """Scores far past the cap (here about 4·softcap) saturate at ±softcap, as c·tanh(s/c) does."""
    q = torch.randn(1, 1, 30, 16) * 6
    check_attention(1, 1, 30, 30, 16, torch.float32, causal=False, softcap=5.0)
    out = kernels.flash_attention(q, q, q, causal=False, softcap=5.0)
    ref = torch_attention(q.double(), q.double(), q.double(), seen_mask(30, 30, False), softcap=5.0)
    assert rel_error(out, ref) < 1e-5 and utils.last_path("flash_attn_fwd") == "interpreter"


def test_softcap_and_window_with_decoding():
    check_attention(2, 4, 1, 60, 16, torch.float16, causal=True, kv_heads=2, window=(7, -1), softcap=50.0)


def _count_key_tiles(monkeypatch) -> list[int]:
    """Count the key tiles the kernels score (each `_scores` call is one tile), through the interpreter."""
    calls = []
    scores = fa._scores
    monkeypatch.setattr(fa, "_scores", lambda *a, **kw: calls.append(1) or scores(*a, **kw))
    return calls


def test_tiles_outside_the_window_are_never_visited(monkeypatch):
    """The forward's cost grows with the window, not with T: per query tile, the key tiles from its window's first
    key to its last (interpreter tiles 32 x 32)."""
    t, left = 256, 7
    block_m, block_n = fa.INTERPRETER_BLOCKS["fwd"]
    q = torch.randn(1, 1, t, 16)
    calls = _count_key_tiles(monkeypatch)
    kernels.flash_attention(q, q, q, causal=True, window=(left, -1))
    expected = sum(math.ceil((min(t, m + block_m) - max(0, m - left)) / block_n) for m in range(0, t, block_m))
    assert len(calls) == expected == 15
    calls.clear()
    kernels.flash_attention(q, q, q, causal=True)
    assert len(calls) == sum(range(1, t // block_m + 1)) == 36  # without the window: the whole causal triangle
    assert utils.dispatch_counts() == {("flash_attn_fwd", "interpreter"): 2}


# ----------------------------------------------------------------------------- padded batches
@pytest.mark.parametrize("kv_range, causal", [
    (([5, 0, 31], [40, 40, 40]), True),  # left padding, as `generate` makes it
    (([0, 0, 0], [40, 23, 1]), True),  # right padding
    (([0, 3, 0], [40, 30, 17]), False),  # bidirectional (BERT-like) with padding
    (([40, 0, 12], [40, 40, 12]), True),  # a sequence with no keys at all: zeros
])
def test_padded_batches(kv_range, causal):
    check_attention(3, 2, 40, 40, 16, torch.float16, causal, kv_range=kv_range)


def test_padding_with_decoding_and_window():
    check_attention(2, 2, 1, 45, 16, torch.float32, causal=True, window=(7, -1), kv_range=([5, 0], [45, 30]))


def test_key_ranges_may_be_expanded_or_strided_views():
    """kv_start / kv_end as views (an expanded scalar, every other element): the same as dense copies."""
    q = torch.randn(3, 2, 1, 16)  # one query each against a cache, as a decode step
    k, v = (torch.randn(3, 2, 20, 16) for _ in range(2))
    end = torch.tensor(10, dtype=torch.int32).expand(3)  # stride 0: the cache's fill level for every row
    start = torch.tensor([4, 0, 0, 0, 2, 0], dtype=torch.int32)[::2]  # stride 2
    got = kernels.flash_attention(q, k, v, causal=True, kv_start=start, kv_end=end)
    want = kernels.flash_attention(q, k, v, causal=True, kv_start=start.clone(), kv_end=end.clone())
    assert torch.equal(got, want)
    assert utils.last_path("flash_attn_fwd") == "interpreter"


def test_padded_keys_are_never_visited(monkeypatch):
    q = torch.randn(1, 1, 64, 16)
    calls = _count_key_tiles(monkeypatch)
    start = torch.tensor([40], dtype=torch.int32)
    kernels.flash_attention(q, q, q, causal=False, kv_start=start, kv_end=start + 24)
    assert len(calls) == 2  # two query tiles, each one key tile (keys 40..63), none of the 40 padded keys
    assert utils.last_path("flash_attn_fwd") == "interpreter"


# ----------------------------------------------------------------------------- packed sequences (varlen)
def check_varlen(lens_q, lens_k, h, d, dtype, causal=True, *, kv_heads=None, window=NO_WINDOW, softcap=0.0):
    """flash_attention_varlen on packed sequences against one masked attention over the concatenation."""
    kv_heads = kv_heads or h
    gen = torch.Generator().manual_seed(sum(lens_q) + 7 * sum(lens_k))
    q, do = (torch.randn(sum(lens_q), h, d, generator=gen) for _ in range(2))
    k, v = (torch.randn(sum(lens_k), kv_heads, d, generator=gen) for _ in range(2))
    seen = torch.zeros(1, 1, sum(lens_q), sum(lens_k), dtype=torch.bool)  # block diagonal
    q0 = k0 = 0
    for t_q, t_k in zip(lens_q, lens_k, strict=True):
        seen[..., q0:q0 + t_q, k0:k0 + t_k] = seen_mask(t_q, t_k, causal, window)
        q0, k0 = q0 + t_q, k0 + t_k
    batch = lambda x: x.transpose(0, 1).unsqueeze(0)  # (total, H, D) -> (1, H, total, D)
    unbatch = lambda x: x[0].transpose(0, 1)
    reference = lambda q_, k_, v_: unbatch(torch_attention(batch(q_), batch(k_), batch(v_), seen, softcap=softcap))
    exact, exact_grads = run(reference, q, k, v, do, torch.float64)
    ref, ref_grads = run(reference, q, k, v, do, dtype)
    cu_q, cu_k = (torch.tensor([0, *torch.tensor(n).cumsum(0).tolist()], dtype=torch.int32) for n in (lens_q, lens_k))
    utils.reset_dispatch_counts()
    with utils.poisoned_outputs():
        out, grads = run(lambda q_, k_, v_: kernels.flash_attention_varlen(
            q_, k_, v_, cu_q, cu_k, max(lens_q), max(lens_k), causal, window=window, softcap=softcap), q, k, v, do,
            dtype)
    assert utils.dispatch_counts() == {("flash_attn_varlen_fwd", "interpreter"): 1,
                                       ("flash_attn_varlen_bwd", "interpreter"): 1}
    assert out.shape == q.shape and out.dtype == dtype
    assert_matches_rule(out, grads, ref, ref_grads, exact, exact_grads)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.bfloat16])
def test_varlen(dtype):
    check_varlen([1, 17, 64, 5], [1, 17, 64, 5], 2, 16, dtype)


def test_varlen_grouped_heads_windows_and_softcap():
    check_varlen([1, 17, 64, 5], [3, 17, 40, 9], 4, 16, torch.float16, kv_heads=2, window=(7, -1), softcap=50.0)


def test_varlen_non_causal_with_empty_sequences():
    check_varlen([0, 17, 33, 5], [9, 0, 33, 70], 2, 32, torch.float32, causal=False, window=(-1, 4))


# ----------------------------------------------------------------------------- memory layout and dispatch
@pytest.mark.parametrize("blocks", [(16, 32), (64, 16)])
def test_other_tile_shapes(monkeypatch, blocks):
    """BLOCK_M != BLOCK_N exercises the block bookkeeping the GPU configurations rely on."""
    monkeypatch.setattr(fa, "INTERPRETER_BLOCKS", {"fwd": blocks, "dkdv": blocks[::-1], "dq": blocks})
    check_attention(1, 1, 70, 100, 32, torch.float32, causal=True)
    check_attention(1, 1, 33, 33, 16, torch.float32, causal=False)
    check_attention(2, 2, 70, 70, 16, torch.float32, causal=True, window=(9, -1), kv_range=([3, 0], [70, 50]))


def test_strided_views_are_not_copied(monkeypatch):
    """q, k, v as views of one fused (B, T, 3, H, D) projection go to the kernels as they are."""
    b, t, h, d = 2, 40, 3, 32
    qkv = torch.randn(b, t, 3, h, d, requires_grad=True)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 × (B, H, T, D), strides (3HTD.., D, 3HD, 1)
    seen = []
    launch = fa.attn_fwd
    monkeypatch.setattr(fa, "attn_fwd", lambda *a: seen.append([x.data_ptr() for x in a[:3]]) or launch(*a))
    out = kernels.flash_attention(q, k, v)
    assert seen == [[q.data_ptr(), k.data_ptr(), v.data_ptr()]] and utils.last_path("flash_attn_fwd") == "interpreter"
    assert out.transpose(1, 2).is_contiguous()  # (B, T, H, D) memory: the reshape to (B, T, C) is free
    ref = torch_attention(q.double(), k.double(), v.double(), seen_mask(t, t, True))
    assert rel_error(out, ref) < 1e-6
    out.sum().backward()
    qkv64 = qkv.detach().double().requires_grad_()
    torch_attention(*qkv64.permute(2, 0, 3, 1, 4).unbind(0), seen_mask(t, t, True)).sum().backward()
    assert rel_error(qkv.grad, qkv64.grad) < 1e-5


def test_unaligned_inputs_are_copied_to_aligned_buffers(monkeypatch):
    """Triton specialises 16-byte aligned pointers and strides; builds without that spill at every tile size, so a
    view at an odd offset or head size 59 goes to the kernels as an aligned copy (rows padded to 16 elements), and
    every output the kernels write is aligned. Aligned inputs are not copied."""
    launched = []
    original = fa._launch
    tensors = ("Q", "K", "V", "OUT", "LSE", "DO", "DELTA", "DK", "DV", "DQ", "KV_START", "KV_END")
    monkeypatch.setattr(fa, "_launch", lambda kind, x, grid, args: launched.append(
        (kind, {n: args[n] for n in tensors if n in args})) or original(kind, x, grid, args))
    base = torch.randn(1 + 3 * 2 * 24 * 32, requires_grad=True)
    q, k, v = base[1:].view(3, 1, 2, 24, 32).unbind(0)  # one element (4 bytes) past an aligned allocation
    out = kernels.flash_attention(q, k, v)
    out.sum().backward()
    assert [kind for kind, _ in launched] == ["fwd", "dkdv", "dq"]
    assert utils.last_path("flash_attn_bwd") == "interpreter"
    assert all(fa._is_aligned(t) for _, args in launched for t in args.values())
    assert rel_error(out, torch_attention(q.double(), k.double(), v.double(), seen_mask(24, 24, True))) < 1e-6
    leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    torch_attention(*leaves, seen_mask(24, 24, True)).sum().backward()
    assert rel_error(base.grad[1:].view(3, 1, 2, 24, 32), torch.stack([x.grad for x in leaves])) < 1e-5

    launched.clear()
    q59 = torch.randn(1, 2, 24, 59, requires_grad=True)
    out = kernels.flash_attention(q59, q59, q59)
    out.sum().backward()
    assert all(fa._is_aligned(t) for _, args in launched for t in args.values())
    assert out.shape == q59.shape and out.stride(2) == 2 * 64  # (B, T, H, 64) memory: rows padded to 16 elements
    ref = q59.detach().double().requires_grad_()
    torch_attention(ref, ref, ref, seen_mask(24, 24, True)).sum().backward()
    assert rel_error(q59.grad, ref.grad) < 1e-5

    launched.clear()
    aligned = torch.randn(1, 2, 24, 64)
    kernels.flash_attention(aligned, aligned, aligned)
    assert launched[0][1]["Q"].data_ptr() == aligned.data_ptr()


def test_float32_precision_follows_pytorch(monkeypatch):
    """float32 multiplies exactly unless PyTorch allows TF32 matmuls; 16-bit dtypes always use tensor cores."""
    matmul = torch.backends.cuda.matmul
    previous = matmul.fp32_precision
    try:
        matmul.fp32_precision = "tf32"
        assert fa.allows_tf32() and fa.precision_for(torch.float32) == "tf32"
        assert fa.precision_for(torch.float32, on_gpu=False) == "ieee"  # the interpreter and CPU: exact
        matmul.fp32_precision = "ieee"
        assert not fa.allows_tf32() and fa.precision_for(torch.float32) == "ieee"
    finally:
        matmul.fp32_precision = previous
    assert fa.config_class(90, torch.float32, 128, "tf32") == (9, "tf32", 128)
    assert fa.config_class(80, torch.float32, 64, "ieee") == (8, "f32", 64)
    assert fa.config_class(80, torch.bfloat16, 80, "ieee") == (8, "f16", 128)


def test_kv_cache_decoding_matches_full_attention():
    """Queries fed one at a time against a growing cache give the rows of one causal pass."""
    q, k, v = (torch.randn(1, 2, 20, 16) for _ in range(3))
    full = kernels.flash_attention(q, k, v)
    steps = [kernels.flash_attention(q[:, :, i:i + 1], k[:, :, :i + 1], v[:, :, :i + 1]) for i in range(17, 20)]
    assert rel_error(torch.cat(steps, dim=2), full[:, :, 17:]) < 1e-6
    assert utils.dispatch_counts() == {("flash_attn_fwd", "interpreter"): 4}


def test_custom_scale():
    q, k, v = (torch.randn(1, 2, 17, 16, dtype=torch.float64).float() for _ in range(3))
    out = kernels.flash_attention(q, k, v, causal=False, sm_scale=0.3)
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), scale=0.3)
    assert rel_error(out, ref) < 1e-6 and utils.last_path("flash_attn_fwd") == "interpreter"


def test_reference_path_without_interpreter(monkeypatch):
    """With the interpreter off, CPU tensors run the exact PyTorch reference, and the path says so."""
    monkeypatch.setattr(utils, "interpreting", lambda: False)
    q = torch.randn(2, 4, 19, 16, requires_grad=True)
    k, v = (torch.randn(2, 2, 19, 16, requires_grad=True) for _ in range(2))
    start, end = torch.tensor([0, 4], dtype=torch.int32), torch.tensor([19, 19], dtype=torch.int32)
    out = kernels.flash_attention(q, k, v, causal=True, window=(5, -1), softcap=20.0, kv_start=start, kv_end=end)
    out.sum().backward()
    assert utils.last_path("flash_attn_fwd") == "reference" and utils.last_path("flash_attn_bwd") == "reference"
    seen = seen_mask(19, 19, True, (5, -1), ([0, 4], [19, 19]))
    leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ref = torch_attention(*leaves, seen, softcap=20.0)
    ref.sum().backward()
    assert rel_error(out, ref) < 1e-6
    for x, r in zip((q, k, v), leaves, strict=True):
        assert rel_error(x.grad, r.grad) < 1e-5
    assert out.stride() == fa._new_output(q).stride()  # the same layout as the kernels and the fake
    packed = torch.randn(10, 2, 16, requires_grad=True)
    cu = torch.tensor([0, 3, 10], dtype=torch.int32)
    out = kernels.flash_attention_varlen(packed, packed, packed, cu, cu, 7, 7)
    out.sum().backward()
    assert utils.last_path("flash_attn_varlen_bwd") == "reference"
    rows = packed.detach().double()
    pieces = [torch_attention(*(rows[a:b].transpose(0, 1)[None],) * 3, seen_mask(b - a, b - a, True))[0]
              for a, b in ((0, 3), (3, 10))]
    assert rel_error(out, torch.cat(pieces, dim=1).transpose(0, 1)) < 1e-6


# ----------------------------------------------------------------------------- the interpreter's bf16 gaps
def test_bf16_interpreter_workaround_is_flagged():
    """INTERP_BF16 is set for bf16 under the interpreter only; a GPU build never has it."""
    q = torch.empty(1, 1, 4, 16, dtype=torch.bfloat16)
    assert utils.interpreting()
    meta = lambda x: fa._common(x, x, True, 0.25, NO_WINDOW, 0.0, 4, 4, None, None)
    assert meta(q)["INTERP_BF16"] is True
    assert meta(q.half())["INTERP_BF16"] is False and meta(q.float())["INTERP_BF16"] is False


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


def test_tanh_is_accurate_in_float32():
    """The kernels' own tanh (`kernels.utils.tanh`, for attention's and cross-entropy's softcap; no libdevice in the
    interpreter) is within a few float32 ulps everywhere."""
    import triton
    import triton.language as tl

    @triton.jit
    def tanh(X, Y):
        i = tl.arange(0, 4096)
        tl.store(Y + i, utils.tanh(tl.load(X + i)))

    x = torch.cat([torch.linspace(-12, 12, 2048), torch.linspace(-0.7, 0.7, 2047), torch.tensor([0.0])])
    y = torch.empty_like(x)
    tanh[(1,)](x, y)
    exact = torch.tanh(x.double())
    ulp = torch.finfo(torch.float32).eps * exact.abs().clamp_min(torch.finfo(torch.float32).tiny)
    assert ((y.double() - exact).abs() <= 4 * ulp).all()


# ----------------------------------------------------------------------------- ops, compile, bad inputs
def test_opcheck():
    q = torch.randn(2, 2, 9, 16, requires_grad=True)
    k, v = (torch.randn(2, 1, 9, 16, requires_grad=True) for _ in range(2))
    start, end = torch.tensor([0, 3], dtype=torch.int32), torch.tensor([9, 9], dtype=torch.int32)
    for kv in ((None, None), (start, end)):
        args = (q, k, v, *kv, True, 0.25, 5, -1, 30.0)
        torch.library.opcheck(fa._flash_attn_fwd, args)
        o, lse = fa._flash_attn_fwd(*args)
        torch.library.opcheck(fa._flash_attn_bwd, (torch.randn_like(o), q.detach(), k.detach(), v.detach(),
                                                   o.detach(), lse, *args[3:]))
    packed = torch.randn(8, 2, 16, requires_grad=True)
    kv = torch.randn(10, 1, 16, requires_grad=True)
    cu_q, cu_k = torch.tensor([0, 3, 8], dtype=torch.int32), torch.tensor([0, 6, 10], dtype=torch.int32)
    args = (packed, kv, kv, cu_q, cu_k, 5, 6, True, 0.25, 3, -1, 0.0)
    torch.library.opcheck(fa._flash_attn_varlen_fwd, args)
    o, lse = fa._flash_attn_varlen_fwd(*args)
    torch.library.opcheck(fa._flash_attn_varlen_bwd, (torch.randn_like(o), packed.detach(), kv.detach(), kv.detach(),
                                                      o.detach(), lse, *args[3:]))


@pytest.mark.slow
def test_torch_compile_fullgraph_new_signatures():
    """Dynamo captures the dense op with grouped heads, a window, softcap and key ranges, and the varlen op."""
    torch._dynamo.reset()
    q = torch.randn(2, 4, 17, 16, requires_grad=True)
    k, v = (torch.randn(2, 2, 17, 16, requires_grad=True) for _ in range(2))
    start, end = torch.tensor([0, 3], dtype=torch.int32), torch.tensor([17, 17], dtype=torch.int32)
    cu = torch.tensor([0, 5, 17], dtype=torch.int32)

    def both(q, k, v):
        dense = kernels.flash_attention(q, k, v, window=(4, -1), softcap=30.0, kv_start=start, kv_end=end)
        packed = kernels.flash_attention_varlen(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1),
                                                cu, cu, 12, 12)
        return dense.sum() + packed.sum()

    eager = torch.autograd.grad(both(q, k, v), (q, k, v))
    utils.reset_dispatch_counts()
    with torch._inductor.config.patch(fx_graph_cache=False):  # compile here, not from an earlier run's cache
        compiled = torch.autograd.grad(torch.compile(both, fullgraph=True)(q, k, v), (q, k, v))
    assert set(utils.dispatch_counts()) == {(op, "interpreter") for op in (
        "flash_attn_fwd", "flash_attn_bwd", "flash_attn_varlen_fwd", "flash_attn_varlen_bwd")}
    for a, b in zip(eager, compiled, strict=True):
        assert rel_error(b, a) < 1e-6


def test_empty_batch_and_zero_queries_or_keys():
    q, k = torch.randn(0, 2, 5, 16, requires_grad=True), torch.randn(0, 2, 5, 16, requires_grad=True)
    assert kernels.flash_attention(q, k, k).shape == (0, 2, 5, 16)
    q0, kv = torch.randn(1, 2, 0, 16, requires_grad=True), torch.randn(1, 2, 5, 16, requires_grad=True)
    out = kernels.flash_attention(q0, kv, kv, causal=False)
    out.sum().backward()
    assert out.shape == (1, 2, 0, 16) and torch.equal(kv.grad, torch.zeros_like(kv))
    q1, k0 = torch.randn(1, 2, 3, 16, requires_grad=True), torch.randn(1, 2, 0, 16, requires_grad=True)
    with utils.poisoned_outputs():
        out = kernels.flash_attention(q1, k0, k0, causal=False)  # no key to see: zeros, as any blind query
        out.sum().backward()
    assert torch.equal(out, torch.zeros_like(out)) and torch.equal(q1.grad, torch.zeros_like(q1))


def _qkv(shape=(1, 2, 8, 16), **kw):
    return [torch.randn(shape, **kw) for _ in range(3)]


@pytest.mark.parametrize("make, kw, error, match", [
    (lambda: _qkv((8, 16)), {}, ValueError, "must have 4 dimensions"),
    (lambda: [*_qkv()[:2], torch.randn(1, 2, 8)], {}, ValueError, "v must have 4 dimensions"),
    (lambda: [*_qkv()[:2], torch.randn(1, 2, 9, 16)], {}, ValueError, "expected q"),
    (lambda: [_qkv()[0], torch.randn(1, 3, 8, 16), torch.randn(1, 3, 8, 16)], {}, ValueError,
     "H=2 must be a multiple of key/value heads H_KV=3"),
    (lambda: _qkv((1, 2, 8, 160)), {}, ValueError, "head size D=160"),
    (lambda: [_qkv()[0].half(), *_qkv()[1:]], {}, TypeError, "q is torch.float16 but k is torch.float32"),
    (lambda: _qkv(dtype=torch.float64), {}, TypeError, "float16, bfloat16 or float32"),
    (lambda: [torch.ones(1, 2, 8, 16, dtype=torch.int64)] * 3, {}, TypeError, "float16, bfloat16 or float32"),
    (lambda: [_qkv()[0].to("meta"), *_qkv()[1:]], {}, ValueError, "q is on meta but k is on cpu"),
    (lambda: [_qkv()[0].numpy(), *_qkv()[1:]], {}, TypeError, "must be a torch.Tensor"),
    (_qkv, dict(window=(-2, 0)), ValueError, "window sides must be >= 0, or -1"),
    (_qkv, dict(window=3), TypeError, "window must be a pair of ints"),
    (_qkv, dict(softcap=-1.0), ValueError, "softcap must be a finite number >= 0"),
    (_qkv, dict(kv_start=torch.zeros(1, dtype=torch.int32)), ValueError, "both kv_start and kv_end"),
    (_qkv, dict(kv_start=torch.zeros(2, dtype=torch.int32), kv_end=torch.ones(2, dtype=torch.int32)), TypeError,
     r"kv_start must be an int32 tensor of shape \(1,\)"),
    (_qkv, dict(kv_start=torch.zeros(1), kv_end=torch.ones(1)), TypeError, "kv_start must be an int32 tensor"),
])
def test_bad_inputs(make, kw, error, match):
    with pytest.raises(error, match=match):
        kernels.flash_attention(*make(), **kw)


@pytest.mark.parametrize("change, error, match", [
    (dict(q=torch.randn(10, 2, 16)[None]), ValueError, "q must have 3 dimensions"),
    (dict(cu_q=torch.tensor([0, 4, 10])), TypeError, "cu_seqlens_q must be an int32 tensor"),
    (dict(cu_k=torch.tensor([0, 10], dtype=torch.int32)), TypeError, r"cu_seqlens_k must be an int32 tensor of "
                                                                       r"shape \(3,\)"),
    (dict(cu_q=torch.tensor([0, 4, 9], dtype=torch.int32)), ValueError, "must rise from 0 to the 10 rows of q"),
    (dict(cu_q=torch.tensor([0, 6, 10], dtype=torch.int32)), ValueError, "max_seqlen_q=5 is shorter than"),
    (dict(k=torch.randn(10, 3, 16)), ValueError, "H=2 must be a multiple of key/value heads H_KV=3"),
])
def test_bad_varlen_inputs(change, error, match):
    args = dict(q=torch.randn(10, 2, 16), k=torch.randn(10, 1, 16), cu_q=torch.tensor([0, 4, 10], dtype=torch.int32),
                cu_k=torch.tensor([0, 5, 10], dtype=torch.int32))
    args.update(change)
    k = args["k"]
    with pytest.raises(error, match=match):
        kernels.flash_attention_varlen(args["q"], k, k, args["cu_q"], args["cu_k"], 5, 5)


def test_default_scale_is_inverse_sqrt_head_size():
    q, k, v = _qkv((1, 1, 5, 36))
    out = kernels.flash_attention(q, k, v, causal=False)
    assert rel_error(out, kernels.flash_attention(q, k, v, causal=False, sm_scale=1 / math.sqrt(36))) == 0
    assert utils.dispatch_counts() == {("flash_attn_fwd", "interpreter"): 2}
