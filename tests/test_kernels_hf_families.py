"""`kernels.patch` on tiny random Hugging Face models of the families people use: Llama (grouped-query heads),
Qwen2 (multi-query), Mistral (sliding window), Gemma 2 (softcap, sliding window, (1 + weight) RMSNorm, eager
attention before patching), GPT-NeoX, BERT (bidirectional, right padding) and ViT.

For each: patched against unpatched logits and gradients (float32, 1e-5 / 1e-4) on a plain batch, a padded batch
and `generate` on a left-padded batch (decode steps included); launch counts prove every attention and every norm
call ran a kernel (in Triton's interpreter, never the reference), and no fallback warning is raised. Configs are
built here, never downloaded. Padded positions' outputs are not compared: a query that sees no key (left padding)
gives 0 in sdpa and in the kernel but an average in eager attention; the gradient is that of the valid positions.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import kernels
from kernels import hf_attention, utils
from tests.helpers import assert_rel_close

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.interpreter

VOCAB = 97
LAYERS = 2
COMMON = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
              max_position_embeddings=64, initializer_range=0.2)


def _llama():
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(vocab_size=VOCAB, num_key_value_heads=2, **COMMON))


def _qwen2():
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(vocab_size=VOCAB, num_key_value_heads=1, **COMMON))


def _mistral():
    return transformers.MistralForCausalLM(transformers.MistralConfig(vocab_size=VOCAB, num_key_value_heads=2,
                                                                      sliding_window=5, **COMMON))


def _gemma2():
    # A cap of 2 on scores of a few units: the softcap changes every score.
    config = transformers.Gemma2Config(vocab_size=VOCAB, num_key_value_heads=2, head_dim=16, sliding_window=5,
                                       attn_logit_softcapping=2.0, final_logit_softcapping=30.0,
                                       query_pre_attn_scalar=16, **COMMON)
    return transformers.Gemma2ForCausalLM(config)


def _gpt_neox():
    config = transformers.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=LAYERS, num_attention_heads=4, max_position_embeddings=64,
                                        initializer_range=0.2)
    return transformers.GPTNeoXForCausalLM(config)


def _bert():
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS,
                                     num_attention_heads=4, max_position_embeddings=64, initializer_range=0.2,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return transformers.BertForMaskedLM(config)


def _vit():
    config = transformers.ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=LAYERS, num_attention_heads=4, num_labels=5,
                                    initializer_range=0.2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return transformers.ViTForImageClassification(config)


FAMILIES = {"llama": _llama, "qwen2": _qwen2, "mistral": _mistral, "gemma2": _gemma2, "gpt_neox": _gpt_neox,
            "bert": _bert, "vit": _vit}
CAUSAL_LMS = ["llama", "qwen2", "mistral", "gemma2", "gpt_neox"]
TEXT = [*CAUSAL_LMS, "bert"]


def build(family: str):
    """(unpatched model, patched deep copy, what patch replaced), eval mode, norms and biases randomised so their
    gradients mean something (they start as ones and zeros)."""
    torch.manual_seed(0)
    model = FAMILIES[family]().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name.lower() or name.endswith("bias"):
                p.add_(0.3 * torch.randn_like(p))
    patched = copy.deepcopy(model)
    return model, patched, kernels.patch(patched)


@pytest.fixture(autouse=True)
def _fresh_warnings():
    """Each test sees the fallback warnings its own calls raise (they are issued once per reason)."""
    hf_attention._WARNED.clear()
    yield
    hf_attention._WARNED.clear()


class NoFallback:
    """Records warnings; fails if any says a kernel was not used."""

    def __enter__(self):
        self._catch = warnings.catch_warnings(record=True)
        self.caught = self._catch.__enter__()
        warnings.simplefilter("always")
        return self

    def __exit__(self, *exc):
        self._catch.__exit__(*exc)
        fallbacks = [str(w.message) for w in self.caught if "kernels." in str(w.message)]
        assert not fallbacks, fallbacks


def inputs(family: str, padded: bool):
    """Model inputs and (B, T) bool of the positions whose outputs are compared."""
    gen = torch.Generator().manual_seed(1)
    if family == "vit":
        return {"pixel_values": torch.randn(2, 3, 16, 16, generator=gen)}, None
    ids = torch.randint(1, VOCAB, (3, 12), generator=gen)
    mask = torch.ones(3, 12, dtype=torch.long)
    if padded:
        if family == "bert":
            mask[1, 7:] = 0  # right padding: every query sees the valid keys
            mask[2, 1:] = 0
        else:
            mask[1, :4] = 0  # left padding, as `generate` pads
            mask[2, :11] = 0
    return {"input_ids": ids, "attention_mask": mask}, mask.bool()


def logits_and_grads(model, batch, valid):
    """Logits (at the valid positions) and every parameter's gradient of a fixed random projection of them."""
    model.zero_grad()
    logits = model(**batch).logits
    if valid is not None:
        logits = logits[valid]
    weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(0))
    (logits * weights).sum().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_function(reference, patched):
    (la, ga), (lb, gb) = reference, patched
    assert_rel_close(lb, la, 1e-5, "logits")
    assert ga.keys() == gb.keys() and ga
    scale = max(float(g.norm()) for g in ga.values())
    for name in ga:
        if ga[name].norm() < 1e-3 * scale:
            # Zero in exact arithmetic (a key bias: softmax ignores a constant added to a row's scores): only
            # rounding noise is left, compared with the largest gradient.
            assert (gb[name] - ga[name]).norm() <= 1e-6 * scale, f"grad {name} should be 0"
            continue
        assert_rel_close(gb[name], ga[name], 1e-4, f"grad {name}")


def norm_count(replaced) -> tuple[str, int] | None:
    """The norm op the patched model calls, and how many norm modules patch swapped (each runs once per call)."""
    norms = [r for r in replaced if r.rule in ("layer_norm", "rms_norm")]
    return (norms[0].rule, len(norms)) if norms else None


def assert_kernels_ran(replaced, calls: int = 1, backward: bool = True):
    """Every attention call (LAYERS per model call) and every norm call ran a kernel in the interpreter."""
    counts = utils.dispatch_counts()
    assert {path for _, path in counts} == {"interpreter"}, counts  # never the reference, never skipped
    expected = {("flash_attn_fwd", "interpreter"): LAYERS * calls}
    rule, n = norm_count(replaced)
    expected[(f"{rule}_fwd", "interpreter")] = n * calls
    if backward:
        expected[("flash_attn_bwd", "interpreter")] = LAYERS * calls
        expected[(f"{rule}_bwd", "interpreter")] = n * calls
    assert counts == expected


def test_every_family_patches_attention_and_norms():
    """What `patch` replaces, per family: the attention switch, and every norm (LayerNorm or RMSNorm; BERT has one
    more in its masked-LM head)."""
    norms = {"llama": ("rms_norm", 5), "qwen2": ("rms_norm", 5), "mistral": ("rms_norm", 5),
             "gemma2": ("rms_norm", 9), "gpt_neox": ("layer_norm", 5), "bert": ("layer_norm", 6),
             "vit": ("layer_norm", 5)}
    for family, expected in norms.items():
        model, patched, replaced = build(family)
        assert [r.rule for r in replaced].count("hf_attention") == 1
        assert patched.config._attn_implementation == hf_attention.ATTN_KEY
        assert norm_count(replaced) == expected, family
        kernels.unpatch(patched, replaced)
        assert patched.config._attn_implementation == model.config._attn_implementation
        assert [type(m) for m in patched.modules()] == [type(m) for m in model.modules()]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_plain_batch(family):
    model, patched, replaced = build(family)
    batch, valid = inputs(family, padded=False)
    reference = logits_and_grads(model, batch, valid)
    utils.reset_dispatch_counts()
    with NoFallback():
        assert_same_function(reference, logits_and_grads(patched, batch, valid))
    assert_kernels_ran(replaced)


@pytest.mark.parametrize("family", TEXT)
def test_padded_batch(family):
    model, patched, replaced = build(family)
    batch, valid = inputs(family, padded=True)
    reference = logits_and_grads(model, batch, valid)
    utils.reset_dispatch_counts()
    with NoFallback():
        assert_same_function(reference, logits_and_grads(patched, batch, valid))
    assert_kernels_ran(replaced)


@pytest.mark.parametrize("family", CAUSAL_LMS)
def test_generate_on_a_left_padded_batch(family):
    """Prefill and two decode steps against transformers' own cache (sliding-window layers' caches included)."""
    model, patched, replaced = build(family)
    batch, _ = inputs(family, padded=True)
    kw = dict(max_new_tokens=3, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        expected = model.generate(**batch, **kw)
        utils.reset_dispatch_counts()
        with NoFallback():
            got = patched.generate(**batch, **kw)
    assert torch.equal(got, expected)
    assert_kernels_ran(replaced, calls=3, backward=False)


def test_other_masks_fall_back_once_saying_why():
    """A mask the kernel cannot express runs sdpa (the model's implementation before patch), warning once."""
    model, patched, _ = build("llama")
    ids = torch.randint(1, VOCAB, (2, 10), generator=torch.Generator().manual_seed(2))
    mask = torch.rand(2, 1, 10, 10, generator=torch.Generator().manual_seed(3)) > 0.3
    mask |= torch.eye(10, dtype=torch.bool)  # every query sees one key at least
    with torch.no_grad(), pytest.warns(UserWarning, match="not causal or bidirectional attention with padding.*sdpa"):
        got = patched(ids, attention_mask=mask).logits
    assert_rel_close(got, model(ids, attention_mask=mask).logits, 1e-5, "logits")
    with torch.no_grad(), NoFallback() as record:  # the same reason again: no second warning
        patched(ids, attention_mask=mask)
    assert not record.caught


def test_gemma2_falls_back_to_eager_never_to_sdpa():
    """Gemma 2's softcap has no sdpa form (it raises): its fallback is the eager attention it ran before."""
    model, patched, _ = build("gemma2")
    assert model.config._attn_implementation == "eager"
    ids = torch.randint(1, VOCAB, (2, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), pytest.warns(UserWarning, match="attention weights output: transformers' eager"):
        got = patched(ids, output_attentions=True)
        expected = model(ids, output_attentions=True)
    assert_rel_close(got.logits, expected.logits, 1e-5, "logits")
    for a, b in zip(got.attentions, expected.attentions, strict=True):
        assert_rel_close(a, b, 1e-5, "attention weights")
    seen = torch.ones(2, 1, 10, 10, dtype=torch.bool).tril()
    seen[:, :, 5, 2] = False  # one hole: no kernel for that
    mask = torch.zeros(seen.shape).masked_fill(~seen, torch.finfo(torch.float32).min)  # additive, as eager takes
    with torch.no_grad(), pytest.warns(UserWarning, match="not causal or bidirectional.*eager"):
        got = patched(ids, attention_mask=mask).logits
    assert_rel_close(got, model(ids, attention_mask=mask).logits, 1e-5, "logits with a custom mask")


def test_packed_sequences_from_flash_attention_kwargs():
    """FlashAttention's packed-batch kwargs (DataCollatorWithFlattening's cu_seq_lens) run the varlen kernel: the
    same logits as the sequences one by one."""
    model, patched, _ = build("llama")
    gen = torch.Generator().manual_seed(4)
    lengths = [3, 7, 5]
    seqs = [torch.randint(1, VOCAB, (1, n), generator=gen) for n in lengths]
    cu = torch.tensor([0, 3, 10, 15], dtype=torch.int32)
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    utils.reset_dispatch_counts()
    with torch.no_grad(), NoFallback():
        got = patched(torch.cat(seqs, dim=1), position_ids=position_ids, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                      max_length_q=7, max_length_k=7).logits
    assert utils.dispatch_counts()[("flash_attn_varlen_fwd", "interpreter")] == LAYERS
    with torch.no_grad():
        expected = torch.cat([model(s).logits for s in seqs], dim=1)
    assert_rel_close(got, expected, 1e-5, "packed logits")


# ----------------------------------------------------------------------------- reading transformers' masks
def _padding(b: int, t: int, left: dict[int, int] | None = None, right: dict[int, int] | None = None):
    mask = torch.ones(b, t, dtype=torch.bool)
    for row, n in (left or {}).items():
        mask[row, :n] = False
    for row, n in (right or {}).items():
        mask[row, t - n:] = False
    return mask


@pytest.mark.parametrize("build, t_q, t_k, causal, window, expected", [
    # (masking_utils mask factory and its kwargs), queries, keys, the module's causality, sliding_window kwarg,
    # expected (causal, window, kv_start, kv_end, keys)
    (dict(attention_mask=_padding(2, 10, left={1: 3})), 10, 10, True, None,
     (True, (-1, -1), [0, 3], [10, 10], None)),  # left padding
    (dict(attention_mask=_padding(2, 10, left={1: 3}), q_offset=9), 1, 10, True, None,
     (True, (-1, -1), [0, 3], [10, 10], None)),  # a decode step of `generate`
    (dict(attention_mask=_padding(2, 10, left={0: 2}), mask_function="sliding", local_size=4), 10, 10, True, 4,
     (True, (3, -1), [2, 0], [10, 10], None)),  # Mistral: keys j > i - 4
    (dict(attention_mask=_padding(2, 10, right={1: 4}), mask_function="bidirectional"), 10, 10, False, None,
     (False, (-1, -1), [0, 0], [10, 6], None)),  # BERT
    (dict(attention_mask=_padding(2, 10, right={1: 4}), mask_function="bidirectional sliding", local_size=3), 10,
     10, False, 3, (False, (3, 3), [0, 0], [10, 6], None)),  # |i - j| <= 3
    (dict(attention_mask=_padding(2, 10, left={1: 3}), q_offset=6, allow_is_causal_skip=False), 4, 16, True, None,
     (True, (-1, -1), [0, 3], [10, 10], 10)),  # a static cache of 16 with 10 filled: the rest dropped
])
def test_masks_become_key_ranges(build, t_q, t_k, causal, window, expected):
    masking = pytest.importorskip("transformers.masking_utils")
    functions = {"sliding": masking.sliding_window_causal_mask_function(4),
                 "bidirectional": masking.bidirectional_mask_function,
                 "bidirectional sliding": masking.sliding_window_bidirectional_mask_function(3)}
    kwargs = dict(build)
    if "mask_function" in kwargs:
        kwargs["mask_function"] = functions[kwargs["mask_function"]]
    mask = masking.sdpa_mask(batch_size=2, q_length=t_q, kv_length=t_k, **kwargs)
    plan = hf_attention._plan_for_mask(mask, t_q, t_k, causal, window)
    got = (plan.causal, plan.window, plan.kv_start.tolist(), plan.kv_end.tolist(), plan.keys)
    assert got == expected
    # The plan means exactly the mask: rebuilt from FlashAttention's definitions.
    keys = plan.keys or t_k
    rebuilt = kernels.attention.visible(t_q, keys, plan.causal, plan.window)[None]
    j = torch.arange(keys)
    rebuilt = rebuilt & ((j >= plan.kv_start[:, None]) & (j < plan.kv_end[:, None]))[:, None, :]
    assert torch.equal(rebuilt, mask[:, 0, :, :keys]) and not mask[..., keys:].any()


def test_masks_without_a_kernel_say_why():
    seen = torch.ones(1, 1, 6, 6, dtype=torch.bool).tril()
    holes = seen.clone()
    holes[0, 0, 4, 1] = False
    assert "not causal or bidirectional" in hf_attention._plan_for_mask(holes, 6, 6, True, None)
    bias = torch.zeros(1, 1, 6, 6).masked_fill(~seen, float("-inf")) + 0.5 * seen
    assert "biases" in hf_attention._plan_for_mask(bias, 6, 6, True, None)
    assert "per head" in hf_attention._plan_for_mask(seen.expand(1, 2, 6, 6), 6, 6, True, None)
    plain = torch.zeros(1, 1, 6, 6).masked_fill(~seen, torch.finfo(torch.float32).min)  # eager's additive form
    assert hf_attention._plan_for_mask(plain, 6, 6, True, None).kv_start is None  # plain causal: no ranges


def test_packed_sequences_from_position_ids():
    """Sequences packed in rows with restarting position ids (DataCollatorWithFlattening's default output, no
    cu_seq_lens): transformers' block-diagonal mask runs the varlen kernel, each sequence on its own."""
    model, patched, _ = build("mistral")  # sliding window 5: the window applies inside each sequence
    gen = torch.Generator().manual_seed(5)
    rows = [[3, 7, 5], [9, 6]]
    seqs = [[torch.randint(1, VOCAB, (1, n), generator=gen) for n in row] for row in rows]
    ids = torch.cat([torch.cat(row, dim=1) for row in seqs])
    position_ids = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in rows])
    utils.reset_dispatch_counts()
    with torch.no_grad(), NoFallback():
        got = patched(ids, position_ids=position_ids, use_cache=False).logits
    assert utils.dispatch_counts()[("flash_attn_varlen_fwd", "interpreter")] == LAYERS
    with torch.no_grad():
        expected = torch.cat([torch.cat([model(s).logits for s in row], dim=1) for row in seqs])
    assert_rel_close(got, expected, 1e-5, "packed logits")
