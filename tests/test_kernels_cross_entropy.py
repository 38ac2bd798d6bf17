"""Fused linear + cross-entropy: numerics in Triton's interpreter against float64 on awkward shapes, every
gradient, the three reductions, ignored rows (also all of them), label smoothing, softcap, bias, the three
dtypes; the chunking and its memory bound; dispatch, ops, torch.compile and bad inputs.

Every numerics test proves the Triton kernel ran (in the interpreter: conftest sets TRITON_INTERPRET=1) and
NaN-fills the kernel's outputs first. The accuracy rule (DESIGN.md §4, `kernels.testing`): the error against
float64 is at most twice that of PyTorch's own `F.cross_entropy(F.linear(hidden, weight, bias).float())` in the
same dtype (the softcap applied in float32 before it), plus the rounding of the exact answer. The exact answer
starts from the inputs already rounded to the dtype.

bfloat16: the kernel has no `tl.dot` (the GEMMs are torch's), so the interpreter's bf16 `tl.dot` gap does not
apply; its truncating float32 -> bf16 cast is worked around by `utils.cast_to` (INTERP_BF16), as for the other
kernels, so only the gradient's final rounding differs from the GPU build.
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
import torch.nn.functional as F

import kernels
from bench.loss_memory import allocation_peak
from kernels import cross_entropy as ce
from kernels import utils
from kernels.testing import assert_accurate
from tests.helpers import rel_error

pytestmark = pytest.mark.interpreter

IGNORE = -100


def reference_loss(h, w, b, t, *, reduction, label_smoothing=0.0, softcap=None, ignore_index=IGNORE):
    """PyTorch's cross-entropy of an lm_head's logits, computed in h's dtype, widened to float32 (float64 when
    h is), optionally capped."""
    z = F.linear(h, w, b).flatten(0, -2)
    z = z if z.dtype == torch.float64 else z.float()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    loss = F.cross_entropy(z, t.flatten(), ignore_index=ignore_index, reduction=reduction,
                           label_smoothing=label_smoothing)
    return loss.view(t.shape) if reduction == "none" else loss


def loss_and_grads(fn, h, w, b, grad_out):
    """fn(h, w, b) on fresh leaf copies; the loss and the gradients of Σ grad_out · loss."""
    leaves = [x.detach().clone().requires_grad_() if x is not None else None for x in (h, w, b)]
    loss = fn(*leaves)
    (loss * grad_out.to(loss.dtype)).sum().backward()
    return loss, [x.grad if x is not None else None for x in leaves]


def make_inputs(shape, v, c, dtype, *, ignored=0.25, bias=False, seed=0):
    """hidden (*shape, C), weight (V, C), bias (V,), targets (*shape): logits of order 2 whatever C is, a
    fraction `ignored` of the targets ignore_index."""
    gen = torch.Generator().manual_seed(seed + 1000 * v + c)
    h = torch.randn(*shape, c, generator=gen).to(dtype)
    w = (torch.randn(v, c, generator=gen) * (2 / c ** 0.5)).to(dtype)
    b = torch.randn(v, generator=gen).to(dtype) if bias else None
    t = torch.randint(0, v, shape, generator=gen)
    t[torch.rand(shape, generator=gen) < ignored] = IGNORE
    return h, w, b, t


def check(shape, v, c, dtype=torch.float32, *, reduction="mean", label_smoothing=0.0, softcap=None, bias=False,
          ignored=0.25, chunk_size=None, seed=0):
    """Loss and every gradient of kernels.linear_cross_entropy against float64 and PyTorch in `dtype`."""
    h, w, b, t = make_inputs(shape, v, c, dtype, ignored=ignored, bias=bias, seed=seed)
    gen = torch.Generator().manual_seed(seed + 7)
    # Not 1: the backward must scale by grad_output. Per row for "none", where the kernel folds it in before
    # rounding, as PyTorch does. "mean" and "sum" scale the forward's gradients after the GEMMs: by a power of two
    # (as for the usual 1 / grad_accum) that is exact; another factor would add one rounding per element, which
    # with GEMM noise on few rows (N = 1) can, by chance, exceed twice PyTorch's error.
    grad_out = torch.randn(shape, generator=gen) if reduction == "none" else torch.tensor(-0.5)
    opts = dict(reduction=reduction, label_smoothing=label_smoothing, softcap=softcap)
    ours = lambda h_, w_, b_: kernels.linear_cross_entropy(h_, w_, t, bias=b_, chunk_size=chunk_size, **opts)
    utils.reset_dispatch_counts()
    with utils.poisoned_outputs():
        loss, grads = loss_and_grads(ours, h, w, b, grad_out)
    expected = {("linear_cross_entropy_fwd", "interpreter"): 1}
    if reduction == "none":  # the gradients are recomputed in the backward
        expected[("linear_cross_entropy_bwd", "interpreter")] = 1
    assert utils.dispatch_counts() == expected
    torch_loss, torch_grads = loss_and_grads(lambda *a: reference_loss(*a, t, **opts), h, w, b, grad_out)
    exact_loss, exact_grads = loss_and_grads(
        lambda *a: reference_loss(*a, t, **opts), h.double(), w.double(), b.double() if bias else None,
        grad_out.double())
    assert loss.dtype == torch.float32 and loss.shape == exact_loss.shape
    verdicts = {"loss": assert_accurate("loss", loss, torch_loss, exact_loss)}
    scale = max(float(torch.linalg.vector_norm(g)) for g in exact_grads if g is not None)
    for name, g, tg, eg in zip(("dhidden", "dweight", "dbias"), grads, torch_grads, exact_grads, strict=True):
        if eg is not None:
            assert g.dtype == dtype and g.shape == eg.shape
            verdicts[name] = assert_accurate(name, g, tg, eg, scale=scale)
    return verdicts


# ----------------------------------------------------------------------------- shapes, dtypes, options
# N in 1, 17, 300 by C in 16, 768 at V = 127; GPT-2's vocabulary only at few rows (its float64 reference is slow).
SHAPES = [(n, 127, c) for n in (1, 17, 300) for c in (16, 768)] + [(1, 50257, 16), (17, 50257, 16), (17, 50257, 768)]


@pytest.mark.parametrize("n, v, c", SHAPES)
def test_shapes(n, v, c):
    check((n,), v, c, ignored=0.25 if n > 1 else 0.0)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dtypes_and_reductions(dtype, reduction):
    check((3, 7), 127, 64, dtype, reduction=reduction)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_label_smoothing(reduction, dtype):
    check((17,), 127, 16, dtype, reduction=reduction, label_smoothing=0.1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_softcap(dtype):
    """Gemma 2's cap: logits of order 2 against a cap of 1.5 bend the tanh hard; with smoothing and a bias."""
    check((17,), 127, 16, dtype, softcap=1.5)
    check((2, 9), 300, 16, dtype, softcap=30.0, label_smoothing=0.2, bias=True, reduction="sum")


def test_softcap_bounds_the_loss():
    """Capped logits lie in (-cap, cap): the loss is at most log(V) + 2·cap, however large the raw logits."""
    h, w, _, t = make_inputs((17,), 127, 16, torch.float32, ignored=0.0)
    loss = kernels.linear_cross_entropy(h * 1000, w, t, softcap=2.0, reduction="none")
    assert float(loss.max()) <= torch.log(torch.tensor(127.0)) + 4.0
    assert float(kernels.linear_cross_entropy(h * 1000, w, t, reduction="none").max()) > 1000


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bias(dtype):
    check((300,), 127, 16, dtype, bias=True)
    check((17,), 50257, 16, dtype, bias=True, reduction="none")


def test_gpt2_vocabulary_in_half_precision():
    check((17,), 50257, 16, torch.bfloat16, label_smoothing=0.1)
    check((5,), 50257, 16, torch.float16, softcap=30.0, reduction="sum")


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_one_class(label_smoothing):
    """V = 1: every probability is 1, so the loss and every gradient are zero (up to rounding)."""
    h, w, b, t = make_inputs((17,), 1, 16, torch.float32, bias=True)
    loss, (dh, dw, db) = loss_and_grads(
        lambda h_, w_, b_: kernels.linear_cross_entropy(h_, w_, t, bias=b_, label_smoothing=label_smoothing,
                                                        reduction="sum"), h, w, b, torch.tensor(1.0))
    assert utils.last_path("linear_cross_entropy_fwd") == "interpreter"
    assert abs(float(loss.detach())) <= 1e-6
    for g in (dh, dw, db):
        assert float(g.abs().max()) <= 1e-6


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_every_row_ignored(reduction, label_smoothing):
    """As F.cross_entropy: "mean" is NaN (0 / 0 rows), "sum" 0, "none" zeros; every gradient zero."""
    h, w, b, t = make_inputs((2, 5), 127, 16, torch.float32, ignored=1.0, bias=True)
    assert bool((t == IGNORE).all())
    opts = dict(reduction=reduction, label_smoothing=label_smoothing)
    one = torch.ones(t.shape if reduction == "none" else ())
    with utils.poisoned_outputs():
        loss, grads = loss_and_grads(lambda *a: kernels.linear_cross_entropy(*a[:2], t, bias=a[2], **opts),
                                     h, w, b, one)
    assert utils.last_path("linear_cross_entropy_fwd") == "interpreter"
    torch_loss, torch_grads = loss_and_grads(lambda *a: reference_loss(*a, t, **opts), h, w, b, one)
    assert torch.equal(loss.isnan(), torch_loss.isnan()) and bool(torch_loss.isnan().all()) == (reduction == "mean")
    assert torch.equal(torch.nan_to_num(loss), torch.nan_to_num(torch_loss))
    for g, tg in zip(grads, torch_grads, strict=True):
        assert torch.equal(g, tg) and not g.any()


def test_ignore_index_may_be_a_class():
    """ignore_index = 0 ignores class 0's rows, as F.cross_entropy does."""
    h, w, _, t = make_inputs((40,), 9, 16, torch.float32, ignored=0.0)
    t[:10] = 0
    got = kernels.linear_cross_entropy(h, w, t, ignore_index=0, reduction="none")
    want = reference_loss(h, w, None, t, reduction="none", ignore_index=0)
    assert torch.equal(got[t == 0], torch.zeros(int((t == 0).sum())))
    assert rel_error(got, want) < 1e-6


# ----------------------------------------------------------------------------- chunks and memory
def test_chunk_rows():
    # GPT-2 at B=8, T=1024: 8192·768 / 50257 = 125.2 -> 128 rows, 128 × 50257 logits at a time.
    assert ce.chunk_rows(8192, 768, 50257) == 128
    assert ce.chunk_rows(17, 768, 50257) == 17  # all the rows: fewer than MIN_CHUNK_ROWS
    assert ce.chunk_rows(10_000, 4096, 32_000) == 2048  # the logits chunk as large as the hidden states
    assert ce.chunk_rows(300, 16, 127) == ce.MIN_CHUNK_ROWS  # three chunks, the last one short
    assert ce.chunk_rows(0, 16, 127) == 1


@pytest.mark.parametrize("chunk_size", [7, 300])
def test_any_chunk_size(chunk_size):
    """A size that leaves a short last chunk, and all rows at once."""
    check((300,), 127, 16, chunk_size=chunk_size, label_smoothing=0.1, softcap=5.0, bias=True)


def test_one_row_per_chunk():
    """Chunks of one row give all rows' answer to rounding. The float32 sums of d(weight) and d(bias) then take
    one addition per row, so the 2x rule (against PyTorch's blocked sums) is not asked of this extreme."""
    h, w, b, t = make_inputs((60,), 127, 16, torch.float32, bias=True)
    one = torch.tensor(1.0)
    run = lambda size: loss_and_grads(lambda *a: kernels.linear_cross_entropy(
        *a[:2], t, bias=a[2], chunk_size=size, label_smoothing=0.1, softcap=5.0), h, w, b, one)
    (loss1, grads1), (loss_all, grads_all) = run(1), run(60)
    assert rel_error(loss1, loss_all) < 1e-6
    for g1, g_all in zip(grads1, grads_all, strict=True):
        assert rel_error(g1, g_all) < 1e-5


def test_one_chunk_of_logits_at_a_time(monkeypatch):
    """Each chunk's logits are freed before the next chunk's are computed."""
    h, w, _, t = make_inputs((150,), 127, 16, torch.float32)
    seen: list[weakref.ref] = []
    shapes = []
    launch = ce.ce_chunk

    def spy(logits, *args, **kwargs):
        gc.collect()
        assert all(r() is None for r in seen), "an earlier chunk's logits are still alive"
        seen.append(weakref.ref(logits))
        shapes.append(tuple(logits.shape))
        return launch(logits, *args, **kwargs)

    monkeypatch.setattr(ce, "ce_chunk", spy)
    for reduction in ("mean", "none"):
        seen.clear(), shapes.clear()
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        loss = kernels.linear_cross_entropy(hh, ww, t, reduction=reduction, chunk_size=64)
        (loss.sum() if reduction == "none" else loss).backward()
        per_pass = [(64, 127), (64, 127), (22, 127)]
        assert shapes == per_pass * (2 if reduction == "none" else 1)  # "none": the backward's pass too


def test_memory_stays_within_a_chunk():
    """Peak allocation of forward and backward (torch's profiler): the fused loss holds about one chunk of
    logits besides its gradients; PyTorch's holds the whole (N, V) logits twice over."""
    n, v, c = 256, 4099, 32
    h, w, _, t = make_inputs((n,), v, c, torch.float32)
    logits_bytes = n * v * 4

    def step(fn):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        return allocation_peak(lambda: fn(hh, ww).backward())

    fused = step(lambda hh, ww: kernels.linear_cross_entropy(hh, ww, t, chunk_size=64))
    plain = step(lambda hh, ww: reference_loss(hh, ww, None, t, reduction="mean"))
    assert utils.last_path("linear_cross_entropy_fwd") == "interpreter"
    # Two chunks: Triton's interpreter keeps a launch's arguments in a reference cycle until the garbage collector
    # runs, so the previous chunk is freed only after the next one is allocated (compiled launches hold nothing:
    # test_one_chunk_of_logits_at_a_time, which collects, and the GPU test).
    chunk_bytes = 64 * v * 4
    grads_bytes = (n * c + v * c) * 4  # d(hidden), d(weight): scaled by grad_output in place, no copies
    assert fused <= 2 * chunk_bytes + grads_bytes + 64 * 1024, (fused, chunk_bytes, grads_bytes)
    assert plain >= 2 * logits_bytes


# ----------------------------------------------------------------------------- paths, ops, compile
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_reference_path_without_interpreter(monkeypatch, reduction):
    monkeypatch.setattr(utils, "interpreting", lambda: False)
    h, w, b, t = make_inputs((300,), 127, 16, torch.float32, bias=True)
    opts = dict(label_smoothing=0.1, softcap=5.0, reduction=reduction)
    one = torch.ones(t.shape if reduction == "none" else ())
    loss, grads = loss_and_grads(lambda *a: kernels.linear_cross_entropy(*a[:2], t, bias=a[2], **opts), h, w, b, one)
    assert utils.last_path("linear_cross_entropy_fwd") == "reference"
    if reduction == "none":
        assert utils.last_path("linear_cross_entropy_bwd") == "reference"
    exact, exact_grads = loss_and_grads(lambda *a: reference_loss(*a, t, **opts), h.double(), w.double(),
                                        b.double(), one.double())
    assert rel_error(loss, exact) < 1e-6
    for g, e in zip(grads, exact_grads, strict=True):
        assert rel_error(g, e) < 1e-5


def test_no_gradients_without_autograd(monkeypatch):
    """Under no_grad, or for inputs that need none, only the loss is computed: no gradient GEMMs."""
    h, w, _, t = make_inputs((17,), 127, 16, torch.float32)
    calls = []
    monkeypatch.setattr(ce, "_accumulate_mm", lambda *a: calls.append(a))
    with torch.no_grad():
        loss = kernels.linear_cross_entropy(h.requires_grad_(), w.requires_grad_(), t)
    assert loss.grad_fn is None and not calls
    assert rel_error(loss, reference_loss(h, w, None, t, reduction="mean")) < 1e-6
    _, dh, dw, db = ce._lce_fwd(h.detach(), w.detach(), None, t, IGNORE, 0.0, 0.0, "mean", 8, True, False, False)
    assert dh.shape == h.shape and dw.numel() == 0 and db.numel() == 0 and not calls


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("ignored", [0.25, 1.0])
def test_retained_graph_backward_twice(reduction, ignored):
    """The first backward scales the forward's gradients in place; a second backward through the retained graph
    recomputes them: the same gradients (for any grad_output), and the first call's tensors left as they were."""
    h, w, _, t = make_inputs((17,), 127, 16, torch.float32, ignored=ignored)
    h, w = h.requires_grad_(), w.requires_grad_()
    loss = kernels.linear_cross_entropy(h, w, t, reduction=reduction)
    first = torch.autograd.grad(loss * 3, (h, w), retain_graph=True)
    kept = [g.clone() for g in first]
    second = torch.autograd.grad(loss * 0.5, (h, w), retain_graph=True)
    third = torch.autograd.grad(loss * 3, (h, w))
    for a, b, c, k in zip(first, second, third, kept, strict=True):
        assert torch.equal(a, k)  # not changed by the later backwards
        assert rel_error(c, a) < 1e-6 and rel_error(b * 6, a) < 1e-6


def test_backward_scales_in_place():
    """No copy of d(weight) in the backward: the gradient autograd hands out is the forward's own buffer."""
    h, w, _, t = make_inputs((17,), 127, 16, torch.float32)
    h, w = h.requires_grad_(), w.requires_grad_()
    loss = kernels.linear_cross_entropy(h, w, t)
    node = loss.grad_fn
    while not hasattr(node, "scaled"):  # the op's node, under any view the wrapper adds
        node = node.next_functions[0][0]
    forward_dw = node.saved_tensors[5].data_ptr()  # no reference kept: one would make autograd copy the gradient
    (loss * 2).backward()
    assert w.grad.data_ptr() == forward_dw


def test_tied_weight_gradients_add_up():
    """The lm_head weight shared with the embedding, as GPT-2 ties them: both gradients reach it."""
    h, w, _, t = make_inputs((2, 9), 50, 16, torch.float32, ignored=0.0)
    ids = torch.randint(0, 50, (2, 9))

    def run(loss_fn):
        ww = w.clone().requires_grad_()
        x = F.embedding(ids, ww) + h  # (2, 9, 16)
        loss_fn(x, ww).backward()
        return ww.grad

    fused = run(lambda x, ww: kernels.linear_cross_entropy(x, ww, t))
    plain = run(lambda x, ww: reference_loss(x, ww, None, t, reduction="mean"))
    assert rel_error(fused, plain) < 1e-6


def test_autocast_casts_the_inputs_as_linear_would():
    """Under torch.autocast the loss is that of the inputs cast to its dtype, and the gradients reach the float32
    leaves in float32, as they do through `F.linear` under autocast."""
    h, w, _, t = make_inputs((2, 9), 127, 16, torch.float32)
    h, w = h.requires_grad_(), w.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = kernels.linear_cross_entropy(h, w, t)
    loss.backward()
    assert h.grad.dtype == w.grad.dtype == torch.float32
    hb, wb = h.detach().bfloat16().requires_grad_(), w.detach().bfloat16().requires_grad_()
    cast = kernels.linear_cross_entropy(hb, wb, t)
    cast.backward()
    assert torch.equal(loss, cast)
    assert torch.equal(h.grad, hb.grad.float()) and torch.equal(w.grad, wb.grad.float())


def test_opcheck():
    h, w, b, t = make_inputs((9,), 31, 16, torch.float32, bias=True)
    h, w, b = (x.requires_grad_() for x in (h, w, b))
    for reduction in ("mean", "sum", "none"):
        torch.library.opcheck(ce._lce_fwd, (h, w, b, t, IGNORE, 0.1, 5.0, reduction, 4, True, True, True))
    torch.library.opcheck(ce._lce_fwd, (h, w.detach(), None, t, IGNORE, 0.0, 0.0, "mean", 5, True, False, False))
    torch.library.opcheck(ce._lce_bwd, (torch.randn(9), h.detach(), w.detach(), b.detach(), t, IGNORE, 0.1, 5.0, 4,
                                        True, True, True))


@pytest.mark.slow
def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    h, w, b, t = make_inputs((2, 9), 127, 16, torch.float32, bias=True)
    h, w, b = (x.requires_grad_() for x in (h, w, b))

    def both(h, w, b):
        mean = kernels.linear_cross_entropy(h, w, t, bias=b, label_smoothing=0.1, softcap=5.0)
        rows = kernels.linear_cross_entropy(h, w, t, reduction="none")
        return mean + (rows * torch.arange(9.0)).sum()

    eager = torch.autograd.grad(both(h, w, b), (h, w, b))
    utils.reset_dispatch_counts()
    compiled = torch.autograd.grad(torch.compile(both, fullgraph=True)(h, w, b), (h, w, b))
    assert set(utils.dispatch_counts()) == {("linear_cross_entropy_fwd", "interpreter"),
                                            ("linear_cross_entropy_bwd", "interpreter")}
    for a, c in zip(eager, compiled, strict=True):
        assert rel_error(c, a) < 1e-6


def test_no_rows():
    h = torch.randn(0, 16, requires_grad=True)
    w = torch.randn(127, 16, requires_grad=True)
    t = torch.zeros(0, dtype=torch.long)
    kernels.linear_cross_entropy(h, w, t, reduction="sum").backward()
    assert torch.equal(w.grad, torch.zeros_like(w))
    assert kernels.linear_cross_entropy(h, w, t).isnan() and kernels.linear_cross_entropy(
        h, w, t, reduction="none").shape == (0,)


H, W, T = torch.randn(4, 8), torch.randn(10, 8), torch.tensor([1, 2, 3, -100])


@pytest.mark.parametrize("call, error, match", [
    (lambda: kernels.linear_cross_entropy(H, torch.randn(10, 7), T), ValueError, "must end in weight's C = 7"),
    (lambda: kernels.linear_cross_entropy(H, W.half(), T), TypeError, "hidden is torch.float32 but weight"),
    (lambda: kernels.linear_cross_entropy(H, W, T.float()), TypeError, "integer tensor of class indices"),
    (lambda: kernels.linear_cross_entropy(H, W, T[:3]), ValueError, "leading shape"),
    (lambda: kernels.linear_cross_entropy(H, W, torch.tensor([1, 2, 10, 0])), ValueError, "target 10 is outside"),
    (lambda: kernels.linear_cross_entropy(H, W, torch.tensor([1, -1, 0, 0])), ValueError, "target -1 is outside"),
    (lambda: kernels.linear_cross_entropy(H, W, T, reduction="avg"), ValueError, "reduction must be one of"),
    (lambda: kernels.linear_cross_entropy(H, W, T, label_smoothing=1.5), ValueError, "label_smoothing"),
    (lambda: kernels.linear_cross_entropy(H, W, T, softcap=0.0), ValueError, "softcap must be a positive"),
    (lambda: kernels.linear_cross_entropy(H, W, T, bias=torch.randn(9)), ValueError, r"bias must have shape \(10,\)"),
    (lambda: kernels.linear_cross_entropy(H, W, T, chunk_size=0), ValueError, "chunk_size must be >= 1"),
    (lambda: kernels.linear_cross_entropy(H, torch.randn(0, 8), T), ValueError, "at least one class"),
    (lambda: kernels.linear_cross_entropy(H, W.to("meta"), T), ValueError, "hidden is on cpu"),
])
def test_bad_inputs(call, error, match):
    with pytest.raises(error, match=match):
        call()
