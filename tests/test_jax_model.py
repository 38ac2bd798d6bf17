"""jax_gpt.GPTModel on its own: size, init, attention impls, the KV cache, dtypes, dropout, input and
checkpoint errors. Parity with Hugging Face and torch_gpt is in test_jax_parity.py."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import assert_rel_close
from safetensors.numpy import load_file, save_file

from gpt_core.checkpoint import CheckpointError
from gpt_core.config import GPTConfig
from jax_gpt import GPTModel, KVCache, cross_entropy_loss

VOCAB, CTX = 257, 64


def tiny(**overrides) -> GPTConfig:
    base = dict(vocab_size=VOCAB, context_length=CTX, emb_dim=48, n_heads=4, n_layers=2, drop_rate=0.0)
    return GPTConfig(**(base | overrides))


def random_ids(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, size=shape, dtype=np.int32)


# Jitted calls compile one program per model variant; eager ones compile every op once per shape, slower on CPU.
forward = nnx.jit(lambda model, idx: model(idx))
forward_train = nnx.jit(lambda model, idx: model(idx, deterministic=False))
forward_cached = nnx.jit(lambda model, idx, cache: model(idx, cache=cache))


@pytest.fixture(scope="module")
def model() -> GPTModel:
    return GPTModel(tiny(init_std=0.1), rngs=nnx.Rngs(0))


@pytest.mark.parametrize("config, expected", [(GPTConfig.from_preset("gpt2"), 124_439_808),
                                              (GPTConfig(), 163_009_536)], ids=["gpt2", "seed-dict"])
def test_parameter_count_matches_the_anchors(config, expected):
    abstract = nnx.eval_shape(lambda: GPTModel(config, rngs=nnx.Rngs(0)))  # shapes only, no memory
    n = sum(math.prod(p.shape) for _, p in nnx.to_flat_state(nnx.state(abstract, nnx.Param)))
    assert n == config.n_params == expected


def test_sinusoidal_table_is_a_buffer_not_a_parameter():
    model = GPTModel(tiny(pos_embedding="sinusoidal"), rngs=nnx.Rngs(0))
    assert "wpe.weight" not in model.canonical_state()
    table = np.asarray(model.wpe.table[...])
    np.testing.assert_allclose(table[5, 0:4], [math.sin(5), math.cos(5), math.sin(5 * 10000 ** (-2 / 48)),
                                               math.cos(5 * 10000 ** (-2 / 48))], rtol=1e-6)


def test_gpt2_init():
    config = tiny(init_std=0.02)
    state = GPTModel(config, rngs=nnx.Rngs(0)).canonical_state()
    for name, a in state.items():
        if name.endswith("bias"):
            assert not a.any(), name
        elif ".ln_" in name or name.startswith("ln_f"):
            assert (a == 1).all(), name
        else:
            std = 0.02 / math.sqrt(2 * 2) if name.endswith("c_proj.weight") else 0.02
            assert abs(a.std() / std - 1) < 0.1 and abs(a.mean()) < 0.1 * std, name


def with_impl(model: GPTModel, impl: str) -> GPTModel:
    twin = nnx.clone(model)  # the fixture stays as it is
    twin.attn_impl = impl
    return twin


def test_attention_impls_agree(model):
    idx = random_ids((2, CTX), seed=1)
    assert_rel_close(forward(model, idx), forward(with_impl(model, "math"), idx), 1e-6, "xla vs math")


@pytest.mark.parametrize("impl", ["math", "xla"])
def test_cached_chunks_match_one_full_forward(model, impl):
    model = with_impl(model, impl)
    idx = random_ids((2, CTX), seed=2)
    expected = forward(model, idx)
    cache = KVCache.create(model.config, 2, CTX)
    chunks = []
    for a, b in [(0, 24), (24, 25), (25, CTX)]:  # a prefill, one token, then a chunk at an offset
        logits, cache = forward_cached(model, idx[:, a:b], cache)
        chunks.append(logits)
    assert int(cache.pos) == CTX
    assert_rel_close(jnp.concatenate(chunks, axis=1), expected, 1e-6, f"cached chunks ({impl})")


def test_bf16_compute_keeps_float32_statistics(model):
    idx = random_ids((2, CTX), seed=3)
    expected = forward(model, idx)
    for param_dtype in (jnp.float32, jnp.bfloat16):
        bf16 = GPTModel(model.config, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, param_dtype=param_dtype)
        bf16.load_canonical_state(model.canonical_state())
        logits = forward(bf16, idx)
        assert logits.dtype == jnp.bfloat16
        assert {p.dtype for _, p in nnx.to_flat_state(nnx.state(bf16, nnx.Param))} == {jnp.dtype(param_dtype)}
        assert_rel_close(logits.astype(jnp.float32), expected, 1e-2, f"bf16 logits, params {param_dtype.__name__}")
    # The statistics themselves: a bf16 LayerNorm of a large-offset input is still right to bf16 precision.
    x = (1000.0 + jax.random.normal(jax.random.key(0), (4, 48))).astype(jnp.bfloat16)
    ln = bf16.ln_f
    ref = (x.astype(jnp.float32) - x.astype(jnp.float32).mean(-1, keepdims=True)) / jnp.sqrt(
        x.astype(jnp.float32).var(-1, keepdims=True) + model.config.ln_eps)
    ref = ref * ln.scale[...].astype(jnp.float32) + ln.bias[...].astype(jnp.float32)
    assert_rel_close(ln(x).astype(jnp.float32), ref, 1e-2, "bf16 LayerNorm")


def test_dropout_only_when_not_deterministic():
    model = GPTModel(tiny(drop_rate=0.5), rngs=nnx.Rngs(0))
    idx = random_ids((2, CTX), seed=4)
    det = forward(model, idx)
    assert_rel_close(forward(model, idx), det, 0.0, "deterministic twice")
    a, b = forward_train(model, idx), forward_train(model, idx)
    assert not jnp.allclose(a, det) and not jnp.allclose(a, b)  # on, and a fresh mask each call
    # "xla" has no attention dropout: it falls back to the math path, rather than silently skipping it.
    math = with_impl(model, "math")  # same rng state as the "xla" model, so the same masks
    assert_rel_close(forward_train(model, idx), forward_train(math, idx), 1e-6, "xla vs math with dropout")


@pytest.mark.parametrize("bad, message", [
    (jnp.array([[1, 2, -1]]), "token id -1 is outside"),
    (jnp.array([[1, VOCAB, 2]]), f"token id {VOCAB} is outside"),
    (np.array([[1, 2**40]]), f"token id {2**40} is outside"),  # int64 on the host: checked before any cast
    (jnp.zeros((1, 3)), "integer token ids"),
    (jnp.array([1, 2, 3]), "must be (batch, seq_len)"),
    ([[1, 2, 3]], "must be a numpy or JAX array"),
    (jnp.zeros((1, CTX + 1), jnp.int32), "does not fit the context of 64"),
    (jnp.zeros((1, 0), jnp.int32), "sequence of 0 tokens"),
])
def test_bad_input_raises_before_tracing(model, bad, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        model(bad)


def test_cache_overflow_raises(model):
    cache = dataclasses.replace(KVCache.create(model.config, 1, 8), pos=jnp.int32(6))
    with pytest.raises(ValueError, match=re.escape("sequence of 3 tokens (after 6 cached)")):
        model(jnp.zeros((1, 3), jnp.int32), cache=cache)
    with pytest.raises(ValueError, match="exceeds context_length"):
        KVCache.create(model.config, 1, CTX + 1)


def test_bad_runtime_arguments():
    with pytest.raises(ValueError, match="attn_impl must be one of"):
        GPTModel(tiny(), rngs=nnx.Rngs(0), attn_impl="sdpa")
    if jax.default_backend() != "gpu":
        with pytest.raises(ValueError, match="needs a GPU"):
            GPTModel(tiny(), rngs=nnx.Rngs(0), attn_impl="cudnn")
    with pytest.raises(ValueError, match="do not match"):
        cross_entropy_loss(jnp.zeros((2, 3, 5)), jnp.zeros((2, 4), jnp.int32))


def test_save_and_load_round_trip(model, tmp_path):
    model.save_pretrained(tmp_path)
    loaded = GPTModel.from_pretrained(tmp_path, attn_impl="math")
    assert loaded.config == model.config and loaded.attn_impl == "math"
    for name, a in model.canonical_state().items():
        np.testing.assert_array_equal(loaded.canonical_state()[name], a, err_msg=name)
    idx = random_ids((2, CTX), seed=5)
    assert_rel_close(forward(loaded, idx), forward(model, idx), 1e-6, "reloaded logits")


def test_checkpoint_with_missing_or_misshaped_tensor_is_refused(model, tmp_path):
    model.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    tensors = load_file(weights)
    save_file({k: v for k, v in tensors.items() if k != "h.1.mlp.c_fc.bias"}, weights)
    with pytest.raises(CheckpointError, match=re.escape("missing tensor h.1.mlp.c_fc.bias (192,)")):
        GPTModel.from_pretrained(tmp_path)
    save_file(tensors | {"h.0.attn.c_attn.weight": tensors["h.0.attn.c_attn.weight"].T.copy()}, weights)
    with pytest.raises(CheckpointError, match=re.escape("h.0.attn.c_attn.weight has shape (144, 48)")):
        GPTModel.from_pretrained(tmp_path)
    # A checkpoint for another config is refused too, rather than partly loaded.
    config = json.loads((tmp_path / "config.json").read_text()) | {"n_layer": 3}
    (tmp_path / "config.json").write_text(json.dumps(config))
    save_file(tensors, weights)
    with pytest.raises(CheckpointError, match="missing tensor h.2.ln_1.weight"):
        GPTModel.from_pretrained(tmp_path)


def test_torch_only_checkpoint_is_refused_with_a_hint(tmp_path):
    tiny().to_json(tmp_path / "config.json")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(FileNotFoundError, match="torch_gpt.GPTModel.from_pretrained"):
        GPTModel.from_pretrained(tmp_path)


def test_jax_gpt_never_imports_torch():
    code = "import sys, jax_gpt, jax_gpt.generate; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
