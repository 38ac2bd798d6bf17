"""Fused RMSNorm: numerics in Triton's interpreter against float64, every gradient, Gemma's offset, the module,
the ops, errors, and the patch rule that finds RMSNorm modules by their behaviour in real transformers models.

As for LayerNorm: outputs NaN-poisoned, the interpreter path proven, and the kernel's error against float64 at
most twice PyTorch's own in the same dtype plus the rounding of the exact answer (`kernels.testing`). The exact
answer is computed from the inputs already rounded to the dtype, so the errors compared are the computations'.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels
from kernels import norm, utils
from kernels.patch import rms_norm_signature
from kernels.testing import assert_accurate
from tests.helpers import rel_error

pytestmark = pytest.mark.interpreter

EPS = 1e-6


def exact_rms_norm(x, w, offset, eps=EPS):
    """float64 RMSNorm of (already rounded) inputs."""
    x = x.double()
    y = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)
    return y * (offset + w.double()) if w is not None else y


def torch_rms_norm(x, w, offset):
    """PyTorch's own RMSNorm in x's dtype: `F.rms_norm`, or Gemma's float32 formula for `(1 + weight)`."""
    if offset == 0.0:
        return F.rms_norm(x, (x.shape[-1],), w, EPS)
    xf = x.float()
    return (xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + EPS) * (offset + w.float())).to(x.dtype)


def outputs_and_grads(fn, inputs, grads):
    """fn on fresh leaf copies of `inputs` (None stays None); its outputs and the inputs' gradients."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in inputs]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    torch.autograd.backward(outs, [g.to(o.dtype) for o, g in zip(outs, grads, strict=True)])
    return outs, [t.grad if t is not None else None for t in leaves]


def check_rms_norm(shape, dtype, offset, *, residual=False, weight=True, param_dtype=None, seed=0):
    """Forward and every gradient of rms_norm / add_rms_norm against float64 and PyTorch in `dtype`."""
    gen = torch.Generator().manual_seed(seed + shape[-1] + int(10 * offset))
    n = shape[-1]
    x = torch.randn(shape, generator=gen).to(dtype)
    r = torch.randn(shape, generator=gen).to(dtype) if residual else None
    # Gemma's weights sit near zero, scaling by about one; plain RMSNorm's near one.
    w = (torch.randn(n, generator=gen) * (0.3 if offset else 1.0)).to(param_dtype or dtype) if weight else None
    grads = [torch.randn(shape, generator=gen) for _ in range(2 if residual else 1)]
    if residual:
        # The op normalises the sum rounded to `dtype`, as the unfused `x + r` does: the exact answer is the
        # RMSNorm of that rounded sum, in float64.
        ours = lambda x_, r_, w_: kernels.add_rms_norm(x_, r_, w_, EPS, offset=offset)
        theirs = lambda x_, r_, w_: (torch_rms_norm(x_ + r_, w_, offset), x_ + r_)
        z = (x + r).double()
        exact_outs, exact_grads = outputs_and_grads(lambda z_, w_: (exact_rms_norm(z_, w_, offset), z_),
                                                    (z, w.double() if weight else None), grads)
        exact_grads = [exact_grads[0], exact_grads[0], exact_grads[1]]  # d(x) = d(r) = d(z)
        inputs = (x, r, w)
    else:
        ours = lambda x_, w_: kernels.rms_norm(x_, w_, EPS, offset=offset)
        theirs = lambda x_, w_: torch_rms_norm(x_, w_, offset)
        inputs = (x, w)
        exact_outs, exact_grads = outputs_and_grads(lambda x_, w_: exact_rms_norm(x_, w_, offset),
                                                    (x.double(), w.double() if weight else None), grads)
    utils.reset_dispatch_counts()
    with utils.poisoned_outputs():
        outs, got_grads = outputs_and_grads(ours, inputs, grads)
    assert utils.dispatch_counts() == {("rms_norm_fwd", "interpreter"): 1, ("rms_norm_bwd", "interpreter"): 1}
    torch_outs, torch_grads = outputs_and_grads(theirs, inputs, grads)
    if residual:  # the sum is rounded to `dtype` exactly as PyTorch rounds `x + residual`
        assert torch.equal(outs[1], torch_outs[1])
    verdicts = {}
    for name, o, t, e in zip(("y", "x + residual")[: len(outs)], outs, torch_outs, exact_outs, strict=True):
        assert o.dtype == dtype and o.shape == shape
        verdicts[name] = assert_accurate(name, o, t, e)
    # A gradient that is zero in exact arithmetic up to eps (dx for N = 1, where x̂ = sign(x)) is measured
    # against the largest gradient of the call.
    scale = max(float(torch.linalg.vector_norm(e)) for e in exact_grads if e is not None)
    names = ("dx", "dresidual", "dweight") if residual else ("dx", "dweight")
    for name, g, t, e in zip(names, got_grads, torch_grads, exact_grads, strict=True):
        if e is not None:
            assert g.dtype == t.dtype
            verdicts[name] = assert_accurate(name, g, t, e, scale=scale)
    return verdicts


@pytest.mark.parametrize("offset", [0.0, 1.0])
@pytest.mark.parametrize("n", [1, 17, 768, 4099])
def test_hidden_sizes(n, offset):
    check_rms_norm((3, 5, n), torch.float16, offset)


@pytest.mark.parametrize("offset", [0.0, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [17, 4099])
def test_dtypes(dtype, n, offset):
    check_rms_norm((7, n), dtype, offset)


@pytest.mark.parametrize("dtype, offset", [(torch.float32, 0.0), (torch.bfloat16, 1.0), (torch.float16, 0.0)])
def test_long_rows_are_chunked(dtype, offset):
    """N > utils.LN_MAX_BLOCK walks the row in chunks (and hidden sizes of 16384 and more must work)."""
    assert 20000 > utils.LN_MAX_BLOCK
    check_rms_norm((2, 20000), dtype, offset)


@pytest.mark.parametrize("n, dtype, offset", [(17, torch.float32, 0.0), (768, torch.bfloat16, 1.0),
                                              (4099, torch.float16, 0.0), (20000, torch.bfloat16, 0.0)])
def test_add_rms_norm(n, dtype, offset):
    check_rms_norm((2, 3, n), dtype, offset, residual=True)


def test_without_weight():
    check_rms_norm((5, 300), torch.float32, 0.0, weight=False)
    check_rms_norm((2, 9000), torch.bfloat16, 0.0, weight=False)


@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_float32_weight_with_bf16_activations(offset):
    """The weight's gradient comes back in the weight's dtype, summed in float32."""
    check_rms_norm((6, 768), torch.bfloat16, offset, param_dtype=torch.float32)


def test_weight_gradient_is_summed_in_float32():
    """Many rows into one bf16 dweight: summing in bf16 (a known bug elsewhere) would miss the 2x rule by far."""
    verdicts = check_rms_norm((512, 64), torch.bfloat16, 1.0)
    assert verdicts["dweight"].error < 2 * verdicts["dweight"].floor


def test_more_rows_than_programs():
    """Each backward program sums several row tiles into its partials; more tiles than programs exercises that."""
    check_rms_norm((64, 33), torch.float32, 1.0)
    check_rms_norm((9, 5000), torch.float32, 0.0)


def test_strided_rows(monkeypatch):
    x = torch.randn(6, 200)[:, 50:146]  # rows of stride 200, unit stride along N: passed as a view
    y = torch.randn(6, 2 * 96)[:, ::2]  # elements of stride 2: copied to unit stride
    z = torch.randn(5, 3, 96).transpose(0, 1)  # (3, 5, 96) that no (15, 96) view describes: copied
    w = torch.randn(96)
    for t in (x, y, z):
        exact = exact_rms_norm(t, w, 1.0)
        assert rel_error(kernels.rms_norm(t, w, EPS, offset=1.0), exact) < 1e-6
        monkeypatch.setattr(utils, "interpreting", lambda: False)  # the reference's output is contiguous too
        out = kernels.rms_norm(t, w, EPS, offset=1.0)
        assert out.is_contiguous() and rel_error(out, exact) < 1e-6
        monkeypatch.undo()
    torch.library.opcheck(norm._rms_norm_fwd, (z.requires_grad_(), w, None, EPS, 1.0))


@pytest.mark.parametrize("residual", [False, True])
def test_opcheck(residual):
    x = torch.randn(3, 40, requires_grad=True)
    r = torch.randn(3, 40, requires_grad=True) if residual else None
    w = torch.randn(40, requires_grad=True)
    torch.library.opcheck(norm._rms_norm_fwd, (x, w, r, EPS, 1.0))
    y, z, rstd = norm._rms_norm_fwd(x, w, r, EPS, 1.0)
    saved = (z if residual else x).detach()
    dz = torch.randn_like(z) if residual else None
    torch.library.opcheck(norm._rms_norm_bwd, (torch.randn_like(y), saved, w.detach(), rstd, dz, 1.0))


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    module = kernels.FusedRMSNorm(48, offset=1.0)
    with torch.no_grad():
        module.weight.normal_()
    x = torch.randn(2, 5, 48, requires_grad=True)
    res = torch.randn(2, 5, 48)

    def f(x_):
        y, s = kernels.add_rms_norm(x_, res, module.weight, EPS, offset=1.0)
        return module(y).sum() + s.square().sum()

    utils.reset_dispatch_counts()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    (gx,) = torch.autograd.grad(out, x)
    assert utils.dispatch_counts() == {("rms_norm_fwd", "interpreter"): 2, ("rms_norm_bwd", "interpreter"): 2}
    x64 = x.detach().double().requires_grad_()
    z64 = x64 + res.double()
    w64 = module.weight.detach().double()
    out64 = exact_rms_norm(exact_rms_norm(z64, w64, 1.0), w64, 1.0).sum() + z64.square().sum()
    (gx64,) = torch.autograd.grad(out64, x64)
    assert abs(out.item() - out64.item()) <= 1e-5 * abs(out64.item())
    assert rel_error(gx, gx64) < 1e-5


def test_reference_path_without_interpreter(monkeypatch):
    monkeypatch.setattr(utils, "interpreting", lambda: False)
    x, r = torch.randn(4, 100, requires_grad=True), torch.randn(4, 100, requires_grad=True)
    w = torch.randn(100, requires_grad=True)
    y, z = kernels.add_rms_norm(x, r, w, EPS, offset=1.0)
    (y.sum() + z.square().sum()).backward()
    assert utils.last_path("rms_norm_fwd") == "reference" and utils.last_path("rms_norm_bwd") == "reference"
    x64, r64, w64 = (t.detach().double().requires_grad_() for t in (x, r, w))
    z64 = x64 + r64
    (exact_rms_norm(z64, w64, 1.0).sum() + z64.square().sum()).backward()
    for got, exact in ((x.grad, x64.grad), (r.grad, r64.grad), (w.grad, w64.grad)):
        assert rel_error(got, exact) < 1e-5


def test_no_rows():
    x = torch.randn(0, 16, requires_grad=True)
    w = torch.randn(16, requires_grad=True)
    kernels.rms_norm(x, w).sum().backward()
    assert torch.equal(w.grad, torch.zeros(16)) and x.grad.shape == (0, 16)


# ----------------------------------------------------------------------------- the module
def test_fused_rms_norm_module():
    fresh = kernels.FusedRMSNorm(8)
    gemma = kernels.FusedRMSNorm(8, eps=1e-5, offset=1.0)
    assert torch.equal(fresh.weight, torch.ones(8)) and torch.equal(gemma.weight, torch.zeros(8))  # scale 1
    assert list(gemma.state_dict()) == ["weight"]
    assert repr(gemma) == "FusedRMSNorm(8, eps=1e-05, offset=1.0, elementwise_affine=True)"
    x = torch.randn(3, 8)
    assert rel_error(gemma(x), exact_rms_norm(x, torch.zeros(8), 1.0, eps=1e-5)) < 1e-6
    torch_norm = nn.RMSNorm(8)  # eps=None: the input dtype's machine epsilon at each call
    ours = kernels.FusedRMSNorm.from_weight(torch_norm.weight, torch_norm.eps)
    assert ours.weight is torch_norm.weight and ours.eps is None
    small = torch.randn(3, 8) * 1e-4  # where eps matters
    assert rel_error(ours(small), torch_norm(small)) < 1e-6
    bare = kernels.FusedRMSNorm(8, elementwise_affine=False)
    assert bare.weight is None and rel_error(bare(x), F.rms_norm(x, (8,), eps=EPS)) < 1e-6


@pytest.mark.parametrize("call, error, match", [
    (lambda: kernels.rms_norm(torch.randn(4, 8), torch.randn(7)), ValueError, r"weight must have shape \(8,\)"),
    (lambda: kernels.rms_norm(torch.ones(4, 8, dtype=torch.int32)), TypeError, "float16, bfloat16 or float32"),
    (lambda: kernels.rms_norm(torch.randn(4, 0)), ValueError, "non-empty last dimension"),
    (lambda: kernels.rms_norm(torch.randn(4, 8), None, offset=1.0), ValueError, "there is no weight"),
    (lambda: kernels.rms_norm(torch.randn(4, 8), torch.randn(8, device="meta")), ValueError, "x is on cpu"),
    (lambda: kernels.add_rms_norm(torch.randn(4, 8), torch.randn(4, 8).half()), TypeError, "residual is"),
    (lambda: kernels.add_rms_norm(torch.randn(4, 8), torch.randn(2, 8)), ValueError, "residual must have"),
    (lambda: kernels.FusedRMSNorm(8)(torch.randn(4, 9)), ValueError, r"FusedRMSNorm\(8\) got input"),
    (lambda: kernels.FusedRMSNorm(8, offset=1.0, elementwise_affine=False), ValueError, "there is no weight"),
    (lambda: kernels.FusedRMSNorm.from_weight(nn.Parameter(torch.ones(2, 4)), 1e-6), ValueError, "1-D weight"),
])
def test_bad_inputs(call, error, match):
    with pytest.raises(error, match=match):
        call()


# ----------------------------------------------------------------------------- finding RMSNorm by behaviour
class EpsilonNamedRMSNorm(nn.Module):
    """An RMSNorm as a user might write it: another epsilon name, weight applied before the cast."""

    def __init__(self, n):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.epsilon = 1e-5

    def forward(self, x):
        return (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.epsilon) * self.weight).to(x)


class EpsOutsideTheRoot(EpsilonNamedRMSNorm):
    """x / (rms + eps): not the RMSNorm the kernel computes (visible where eps dominates)."""

    def forward(self, x):
        return x / (x.pow(2).mean(-1, keepdim=True).sqrt() + self.epsilon) * self.weight


class ScaledByTwo(EpsilonNamedRMSNorm):
    def forward(self, x):
        return 2 * super().forward(x)


class BiaslessLayerNorm(EpsilonNamedRMSNorm):
    def forward(self, x):
        return F.layer_norm(x, x.shape[-1:], self.weight, None, self.epsilon)


def test_rms_norm_found_by_behaviour():
    assert rms_norm_signature(EpsilonNamedRMSNorm(16)) == (1e-5, 0.0)
    assert rms_norm_signature(nn.RMSNorm(16)) == (None, 0.0)
    assert rms_norm_signature(nn.RMSNorm(16, eps=1e-5)) == (1e-5, 0.0)
    for impostor in (EpsOutsideTheRoot(16), ScaledByTwo(16), BiaslessLayerNorm(16), nn.LayerNorm(16, bias=False),
                     nn.Linear(16, 1), nn.Embedding(4, 16), kernels.FusedRMSNorm(16)):
        assert rms_norm_signature(impostor) is None, type(impostor).__name__
    probed = EpsilonNamedRMSNorm(16)
    weight = probed.weight
    calls = []
    probed.register_forward_hook(lambda *_: calls.append(1))
    rms_norm_signature(probed)
    assert probed.weight is weight and torch.equal(weight, torch.ones(16)) and not calls  # put back, no hooks ran


def test_patch_and_unpatch_custom_and_torch_rms_norms():
    model = nn.Sequential(EpsilonNamedRMSNorm(16), nn.Linear(16, 16), nn.RMSNorm(16), ScaledByTwo(16))
    shared = model[0]
    model.append(shared)  # one module under two names: one replacement module for both
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    x = torch.randn(3, 16)
    before = model(x)
    replaced = kernels.patch(model)
    assert [(r.path, r.rule) for r in replaced] == [("0", "rms_norm"), ("2", "rms_norm"), ("4", "rms_norm")]
    assert model[0] is model[4] and model[0].weight is shared.weight and isinstance(model[3], ScaledByTwo)
    utils.reset_dispatch_counts()
    assert rel_error(model(x), before) < 1e-6
    assert utils.dispatch_counts() == {("rms_norm_fwd", "interpreter"): 3}
    assert kernels.patch(model) == []  # already patched
    kernels.unpatch(model, replaced)
    assert model[0] is shared and model[4] is shared and type(model[2]) is nn.RMSNorm
    assert not kernels.patch(model, rms_norm=False)


# ----------------------------------------------------------------------------- tiny transformers models
def tiny_model(family: str):
    """A tiny random transformers model of `family` (float32)."""
    import transformers

    common = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6)
    config = {
        "llama": lambda: transformers.LlamaConfig(**common),
        "qwen2": lambda: transformers.Qwen2Config(**common),
        "gemma2": lambda: transformers.Gemma2Config(**common, head_dim=8, sliding_window=4,
                                                    attn_logit_softcapping=50.0, final_logit_softcapping=30.0),
    }[family]()
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # random norm weights: Gemma's start at zero, Llama's at one, which would hide bugs
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.5)
    return model


def norm_modules(model):
    """The model's own RMSNorm modules (transformers' classes)."""
    return [m for m in model.modules() if type(m).__module__.startswith("transformers.") and
            type(m).__name__.endswith("RMSNorm")]


@pytest.mark.slow
@pytest.mark.parametrize("family, offset", [("llama", 0.0), ("qwen2", 0.0), ("gemma2", 1.0)])
def test_transformers_models(family, offset):
    """Patched against unpatched (float32): logits <= 1e-5, every gradient <= 1e-4; every norm call ran a kernel."""
    model = tiny_model(family)
    norms = norm_modules(model)
    ids = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(1))
    calls = []
    hooks = [m.register_forward_hook(lambda *_: calls.append(1)) for m in norms]
    out = model(ids).logits
    out.square().mean().backward()
    for h in hooks:
        h.remove()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    replaced = kernels.patch(model, attention=False)
    assert {r.rule for r in replaced} == {"rms_norm"} and len(replaced) == len(norms)
    assert all(r.new.offset == offset and r.new.weight is r.old.weight for r in replaced)
    assert not norm_modules(model)
    utils.reset_dispatch_counts()
    patched = model(ids).logits
    patched.square().mean().backward()
    assert utils.dispatch_counts() == {("rms_norm_fwd", "interpreter"): len(calls),
                                       ("rms_norm_bwd", "interpreter"): len(calls)}
    assert rel_error(patched, out) <= 1e-5
    for name, p in model.named_parameters():
        assert rel_error(p.grad, grads[name]) <= 1e-4, name

    kernels.unpatch(model, replaced)
    assert norm_modules(model) == norms
