"""jax_gpt against Hugging Face GPT-2 and against torch_gpt, from one checkpoint: logits, loss, every
gradient, greedy generation. CPU, float32, full matmul precision (conftest.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import GPT2Config, GPT2LMHeadModel

import jax_gpt
import torch_gpt
from jax_gpt import convert
from jax_gpt.model import cross_entropy_loss
from tests.helpers import CTX, VOCAB, assert_rel_close, off_init_, random_ids, tiny
from torch_gpt.convert import canonical_grads


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_hf_checkpoint_logits_match_hf(tmp_path, tie):
    hf_config = GPT2Config(vocab_size=VOCAB, n_positions=CTX, n_embd=48, n_layer=2, n_head=4,
                           tie_word_embeddings=tie, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(hf_config).eval()
    off_init_(hf, seed=1)
    hf.save_pretrained(tmp_path)
    ids = random_ids((2, CTX), seed=2, dtype=np.int64)
    with torch.no_grad():
        expected = hf(torch.from_numpy(ids)).logits

    model = jax_gpt.GPTModel.from_pretrained(tmp_path)
    assert model.config.tie_embeddings is tie
    err = assert_rel_close(model(ids), expected, 1e-5, "logits vs HF")
    print(f"HF -> jax_gpt logits rel err ({'tied' if tie else 'untied'}): {err:.2e}")


def test_saved_checkpoint_loads_in_transformers(tmp_path):
    model = jax_gpt.GPTModel(tiny(tie_embeddings=False, qkv_bias=True, drop_rate=0.1), rngs=nnx.Rngs(3))
    model.save_pretrained(tmp_path)
    hf = GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    ids = random_ids((2, CTX), seed=4, dtype=np.int64)
    with torch.no_grad():
        expected = hf(torch.from_numpy(ids)).logits
    assert_rel_close(model(ids), expected, 1e-5, "jax_gpt logits vs HF loading its checkpoint")


@pytest.mark.parametrize("pos", ["learned", "sinusoidal"])
@pytest.mark.parametrize("qkv_bias", [True, False], ids=["qkv_bias", "no_qkv_bias"])
@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_logits_loss_and_every_gradient_match_torch(tmp_path, tie, qkv_bias, pos):
    config = tiny(tie_embeddings=tie, qkv_bias=qkv_bias, pos_embedding=pos, drop_rate=0.1)
    torch.manual_seed(0)
    reference = torch_gpt.GPTModel(config, attn_impl="math").eval()  # eval: dropout off on both sides
    off_init_(reference, seed=5)
    reference.save_pretrained(tmp_path)
    ids, targets = random_ids((2, CTX), seed=6, dtype=np.int64), random_ids((2, CTX), seed=7, dtype=np.int64)
    t_logits = reference(torch.from_numpy(ids))
    t_loss = torch_gpt.cross_entropy_loss(t_logits, torch.from_numpy(targets))
    t_loss.backward()

    # Both jax attention impls meet the torch reference: "math" with sinusoidal positions, "xla" with learned.
    model = jax_gpt.GPTModel.from_pretrained(tmp_path, attn_impl="math" if pos == "sinusoidal" else "xla")
    logits = model(ids)
    logit_err = assert_rel_close(logits, t_logits, 1e-5, "logits")
    loss, grads = nnx.value_and_grad(lambda m: cross_entropy_loss(m(ids), targets))(model)
    loss_err = assert_rel_close(loss, t_loss, 1e-6, "loss")

    expected, actual = canonical_grads(reference), convert.to_canonical(grads)
    assert actual.keys() == expected.keys()
    worst = max(assert_rel_close(actual[k], expected[k], 1e-4, f"grad {k}") for k in expected)
    print(f"tie={tie} qkv_bias={qkv_bias} {pos} ({model.attn_impl}): logits {logit_err:.2e}, loss {loss_err:.2e}, "
          f"worst of {len(expected)} grads {worst:.2e}")


@pytest.fixture(scope="module")
def twins(tmp_path_factory) -> tuple[torch_gpt.GPTModel, jax_gpt.GPTModel]:
    directory = tmp_path_factory.mktemp("twins")
    torch.manual_seed(0)
    reference = torch_gpt.GPTModel(tiny(drop_rate=0.1), attn_impl="sdpa").eval()
    off_init_(reference, seed=8)
    reference.save_pretrained(directory)
    return reference, jax_gpt.GPTModel.from_pretrained(directory)


def test_last_only_logits_are_the_last_positions_on_both_sides(twins):
    """`last_only` (generation's prefill) runs the output head over the last position alone: the same logits as
    the full call's last position, with and without a cache, and no loss may come with it."""
    reference, model = twins
    ids = random_ids((2, 23), seed=4, dtype=np.int64)
    with torch.no_grad():
        full = reference(torch.from_numpy(ids))
        last = reference(torch.from_numpy(ids), last_only=True)
        cache = torch_gpt.KVCache(reference.config, 2, CTX)
        cached = reference(torch.from_numpy(ids), cache, last_only=True)
    assert last.shape == cached.shape == (2, 1, VOCAB)
    torch.testing.assert_close(last, full[:, -1:], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(cached, full[:, -1:], rtol=1e-6, atol=1e-6)
    j_full = model(jnp.asarray(ids))
    j_last = model(jnp.asarray(ids), last_only=True)
    j_cached, _ = model(jnp.asarray(ids), cache=jax_gpt.KVCache.create(model.config, 2, CTX), last_only=True)
    assert j_last.shape == j_cached.shape == (2, 1, VOCAB)
    np.testing.assert_allclose(np.asarray(j_last), np.asarray(j_full)[:, -1:], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(j_cached), np.asarray(j_full)[:, -1:], rtol=1e-6, atol=1e-6)
    assert_rel_close(j_last, last, 1e-5, "jax last_only against torch's")
    targets = torch.from_numpy(ids)
    with pytest.raises(ValueError, match="last_only"):
        reference(targets, targets=targets, last_only=True)
    with pytest.raises(ValueError, match="last_only"):
        model(jnp.asarray(ids), targets=jnp.asarray(ids), last_only=True)


def test_greedy_generation_matches_torch_past_the_context(twins):
    reference, model = twins
    prompt = random_ids((2, 40), seed=9, dtype=np.int64)  # 40 + 32 > CTX: the cache fills and is prefilled again
    expected = torch_gpt.generate(reference, torch.from_numpy(prompt), 32).numpy()
    cached = np.asarray(jax_gpt.generate(model, prompt, 32))
    uncached = np.asarray(jax_gpt.generate(model, prompt, 32, use_cache=False))
    np.testing.assert_array_equal(cached, expected)
    np.testing.assert_array_equal(uncached, expected)
    scanned = jax_gpt.GPTModel(model.config, rngs=nnx.Rngs(0), scan_layers=True)  # stacked KV cache, one scan
    scanned.load_canonical_state(model.canonical_state())
    np.testing.assert_array_equal(np.asarray(jax_gpt.generate(scanned, prompt, 32)), expected)


def test_eos_padding_and_early_stop_match_torch(twins):
    reference, model = twins
    prompt = random_ids((2, 12), seed=10, dtype=np.int64)
    free = torch_gpt.generate(reference, torch.from_numpy(prompt), 20).numpy()
    eos = int(free[0, 12 + 3])  # row 0 stops by its 4th new token; row 1 may run on
    expected = torch_gpt.generate(reference, torch.from_numpy(prompt), 20, eos_id=eos).numpy()
    actual = np.asarray(jax_gpt.generate(model, prompt, 20, eos_id=eos))
    np.testing.assert_array_equal(actual, expected)
    single = np.asarray(jax_gpt.generate(model, prompt[:1], 20, eos_id=eos))
    stop = 12 + int(np.argmax(free[0, 12:] == eos)) + 1  # everyone done: stops early, as torch does
    np.testing.assert_array_equal(single, free[:1, :stop])


@pytest.mark.parametrize("ignored", ["some", "all"])
def test_plain_loss_ignores_minus_100_as_torch_does(ignored):
    """Both plain losses leave out positions whose target is -100 (padding, a masked prompt), as F.cross_entropy
    does: the mean over the rest, NaN when every position is ignored; the gradient zero on ignored rows."""
    rng = np.random.default_rng(8)
    logits = rng.standard_normal((2, 5, 11)).astype(np.float32)
    targets = rng.integers(0, 11, (2, 5))
    if ignored == "all":
        targets[:] = -100
    else:
        targets[0, 1] = targets[1, 3] = targets[1, 4] = -100
    t_logits = torch.from_numpy(logits).requires_grad_()
    t_loss = torch_gpt.cross_entropy_loss(t_logits, torch.from_numpy(targets))
    loss, grad = jax.value_and_grad(cross_entropy_loss)(jnp.asarray(logits), jnp.asarray(targets, jnp.int32))
    if ignored == "all":
        assert np.isnan(t_loss.item()) and np.isnan(float(loss))
        return
    t_loss.backward()
    assert_rel_close(loss, t_loss, 1e-6, "loss with ignored rows")
    assert_rel_close(grad, t_logits.grad, 1e-6, "d(loss)/d(logits) with ignored rows")
    assert not np.asarray(grad)[0, 1].any() and not np.asarray(grad)[1, 3:].any()
