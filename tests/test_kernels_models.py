"""The kernels inside whole models: `kernels.patch` on Hugging Face GPT-2 and torch_gpt, torch_gpt's own
`attn_impl="triton"`/`norm_impl="triton"`, KV-cache generation, and `torch.compile(fullgraph=True)`."""

from __future__ import annotations

import copy
import importlib
import warnings

import pytest
import torch
import torch.nn as nn

import kernels
from gpt_core import GPTConfig
from kernels import utils
from tests.helpers import assert_rel_close
from torch_gpt import GPTModel
from torch_gpt.generation import generate

patch_module = importlib.import_module("kernels.patch")  # `kernels.patch` is the function

pytestmark = pytest.mark.interpreter

ALL_FOUR = {("layer_norm_fwd", "interpreter"), ("layer_norm_bwd", "interpreter"),
            ("flash_attn_fwd", "interpreter"), ("flash_attn_bwd", "interpreter")}


def logits_and_grads(model: nn.Module, idx: torch.Tensor, logits_of=lambda out: out):
    """Logits of `idx` and the gradient of a fixed random projection of them, by parameter name."""
    model.zero_grad()
    logits = logits_of(model(idx))
    weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(0))
    (logits * weights).sum().backward()
    return logits.detach(), {n.removeprefix("_orig_mod."): p.grad.clone() for n, p in model.named_parameters()}


def assert_same_function(a, b):
    (la, ga), (lb, gb) = a, b
    assert_rel_close(lb, la, 1e-5, "logits")
    assert ga.keys() == gb.keys()
    for name in ga:
        assert_rel_close(gb[name], ga[name], 1e-4, f"grad {name}")


def small_torch_gpt(**runtime) -> GPTModel:
    torch.manual_seed(0)
    model = GPTModel(GPTConfig.from_preset("tiny", context_length=64), **runtime)
    with torch.no_grad():  # LayerNorms start as (1, 0): randomise them so their gradients mean something
        for name, p in model.named_parameters():
            if ".ln_" in name or name.startswith("ln_f") or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def test_patched_torch_gpt_computes_the_same_function():
    model = small_torch_gpt()
    patched = copy.deepcopy(model)
    replaced = kernels.patch(patched)
    assert {(r.path, r.rule) for r in replaced} == {("", "attn_impl")} | {
        (f"h.{i}.{ln}", "layer_norm") for i in range(2) for ln in ("ln_1", "ln_2")} | {("ln_f", "layer_norm")}
    assert patched.attn_impl == "triton" and isinstance(patched.h[0].ln_1, kernels.FusedLayerNorm)
    assert patched.h[0].ln_1.weight is not model.h[0].ln_1.weight  # a deep copy: patch shares its own params
    assert list(patched.state_dict()) == list(model.state_dict())
    idx = torch.randint(0, model.config.vocab_size, (2, 37))
    utils.reset_dispatch_counts()
    assert_same_function(logits_and_grads(model, idx), logits_and_grads(patched, idx))
    assert set(utils.dispatch_counts()) == ALL_FOUR  # and never the reference
    kernels.unpatch(patched, replaced)
    assert patched.attn_impl == "sdpa" and type(patched.h[0].ln_1) is nn.LayerNorm


def test_torch_gpt_runtime_options_use_the_kernels():
    reference = small_torch_gpt()
    fused = small_torch_gpt(attn_impl="triton", norm_impl="triton")
    fused.load_state_dict(reference.state_dict())
    idx = torch.randint(0, reference.config.vocab_size, (2, 29))
    utils.reset_dispatch_counts()
    assert_same_function(logits_and_grads(reference, idx), logits_and_grads(fused, idx))
    assert set(utils.dispatch_counts()) == ALL_FOUR


def test_generation_with_kv_cache():
    """Prefill, then one query at a time against the cache: the causal diagonal aligned to the end."""
    model = small_torch_gpt().eval()
    fused = copy.deepcopy(model)
    kernels.patch(fused)
    prompt = torch.randint(0, model.config.vocab_size, (2, 9))
    utils.reset_dispatch_counts()
    out = generate(fused, prompt, max_new_tokens=5)
    assert utils.dispatch_counts()[("flash_attn_fwd", "interpreter")] == 5 * model.config.n_layers
    assert torch.equal(out, generate(model, prompt, max_new_tokens=5))


def small_hf_model():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=211, n_positions=48, n_embd=64, n_layer=2, n_head=4,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln_" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def test_patched_hugging_face_gpt2_computes_the_same_function():
    model = small_hf_model()
    patched = copy.deepcopy(model)
    replaced = kernels.patch(patched)
    rules = sorted({r.rule for r in replaced})
    assert rules == ["hf_attention", "layer_norm"] and len(replaced) == 1 + 2 * 2 + 1
    assert patched.config._attn_implementation == patch_module.ATTN_KEY
    idx = torch.randint(0, 211, (2, 33))
    utils.reset_dispatch_counts()
    assert_same_function(logits_and_grads(model, idx, lambda o: o.logits),
                         logits_and_grads(patched, idx, lambda o: o.logits))
    assert set(utils.dispatch_counts()) == ALL_FOUR
    # Greedy decoding through transformers' own cache: one query against the cached keys each step.
    with torch.no_grad():
        kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert torch.equal(patched.generate(idx[:1, :6], **kw), model.generate(idx[:1, :6], **kw))
    kernels.unpatch(patched, replaced)
    assert patched.config._attn_implementation == model.config._attn_implementation


def test_hugging_face_padding_runs_the_kernel():
    """A left-padded batch: the mask becomes per-sequence key ranges, no fallback (tests/test_kernels_hf_families.py
    covers the other model families)."""
    model = small_hf_model()
    patched = copy.deepcopy(model)
    kernels.patch(patched)
    idx = torch.randint(0, 211, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :3] = 0
    utils.reset_dispatch_counts()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")  # a fallback would warn
        got = patched(idx, attention_mask=mask).logits
    assert utils.dispatch_counts()[("flash_attn_fwd", "interpreter")] == 2
    valid = mask.bool()  # padded queries see no key: their outputs are not compared
    assert_rel_close(got[valid], model(idx, attention_mask=mask).logits[valid], 1e-5, "logits with padding")


def test_walker_registry_and_shared_modules():
    ln = nn.LayerNorm(8)
    model = nn.Sequential(ln, nn.Linear(8, 8), ln)  # one LayerNorm at two places
    replaced = kernels.patch(model)
    assert [r.path for r in replaced] == ["0", "2"] and model[0] is model[2]
    assert isinstance(model[0], kernels.FusedLayerNorm) and model[0].weight is ln.weight
    with pytest.raises(ValueError, match="root module"):
        kernels.patch(nn.LayerNorm(8))
    # A new model family is one more rule, not another walker.
    seen = []
    rule = kernels.Rule("gelu", "attention", lambda m: isinstance(m, nn.GELU),
                        lambda m, path: seen.append(path) or None)
    kernels.register_rule(rule)
    try:
        kernels.patch(nn.Sequential(nn.Linear(2, 2), nn.GELU()))
        assert seen == ["1"]
    finally:
        patch_module.RULES.remove(rule)


@pytest.mark.slow
def test_torch_compile_fullgraph():
    """The ops' fake and autograd registrations let Dynamo capture a whole model (forward and backward)."""
    torch._dynamo.reset()
    model = small_torch_gpt(attn_impl="triton", norm_impl="triton")
    compiled = torch.compile(model, fullgraph=True)
    idx = torch.randint(0, model.config.vocab_size, (2, 24))
    eager = logits_and_grads(model, idx)
    utils.reset_dispatch_counts()
    assert_same_function(eager, logits_and_grads(compiled, idx))
    assert set(utils.dispatch_counts()) == ALL_FOUR  # the compiled graph calls the Triton kernels
