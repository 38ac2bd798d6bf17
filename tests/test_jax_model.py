"""jax_gpt.GPTModel on its own: size, attention impls, the KV cache, dtypes, dropout, scan over layers,
rematerialisation, input and checkpoint errors. Parity with Hugging Face and torch_gpt is in test_jax_parity.py;
the init and the sinusoidal table, shared with torch_gpt, in test_shared_rules.py."""

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
from safetensors.numpy import load_file, save_file

from gpt_core.checkpoint import CheckpointError, expected_shapes
from gpt_core.config import GPTConfig
from jax_gpt import GPTModel, KVCache, convert, cross_entropy_loss
from tests.helpers import CTX, VOCAB, assert_rel_close, random_ids, tiny

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


def with_impl(model: GPTModel, impl: str) -> GPTModel:
    twin = nnx.clone(model)  # the fixture stays as it is
    twin.attn_impl = impl
    return twin


def test_attention_impls_agree(model):
    idx = random_ids((2, CTX), seed=1)
    assert_rel_close(forward(model, idx), forward(with_impl(model, "math"), idx), 1e-6, "xla vs math")


@pytest.mark.parametrize("impl, scan", [("math", False), ("xla", False), ("xla", True)],
                         ids=["math", "xla", "xla-scanned"])
def test_cached_chunks_match_one_full_forward(model, impl, scan):
    model = with_impl(scanned(model) if scan else model, impl)
    idx = random_ids((2, CTX), seed=2)
    expected = forward(model, idx)
    cache = KVCache.create(model.config, 2, CTX, stacked=scan)
    chunks = []
    for a, b in [(0, 24), (24, 25), (25, CTX)]:  # a prefill, one token, then a chunk at an offset
        logits, cache = forward_cached(model, idx[:, a:b], cache)
        chunks.append(logits)
    assert int(cache.pos) == CTX
    assert_rel_close(jnp.concatenate(chunks, axis=1), expected, 1e-6, f"cached chunks ({impl})")


def scanned(model: GPTModel, **runtime) -> GPTModel:
    """The same weights in a scanned model (loaded through the canonical state: per-layer names, stacked)."""
    twin = GPTModel(model.config, rngs=nnx.Rngs(0), scan_layers=True, **runtime)
    twin.load_canonical_state(model.canonical_state())
    return twin


def test_scanned_and_unrolled_compute_the_same(model):
    """Stacked weights, one lax.scan: the same logits (1e-6, float32) and every gradient, per canonical name."""
    twin = scanned(model)
    assert twin.h.attn.c_attn.kernel.shape == (2, 48, 144) and twin.scan_layers and not model.scan_layers
    idx, targets = random_ids((2, CTX), seed=11), random_ids((2, CTX), seed=12)
    assert_rel_close(forward(twin, idx), forward(model, idx), 1e-6, "scanned vs unrolled logits")
    grad = nnx.jit(nnx.grad(lambda m, x, y: cross_entropy_loss(m(x), y)))
    expected, actual = convert.to_canonical(grad(model, idx, targets)), convert.to_canonical(grad(twin, idx, targets))
    assert actual.keys() == expected.keys() == expected_shapes(model.config).keys()
    for name in expected:
        assert_rel_close(actual[name], expected[name], 1e-6, f"grad {name}")


def test_scanned_checkpoints_are_per_layer_and_interchangeable(model, tmp_path):
    twin = scanned(model)
    twin.save_pretrained(tmp_path / "scanned")
    model.save_pretrained(tmp_path / "unrolled")
    a, b = load_file(tmp_path / "scanned" / "model.safetensors"), load_file(tmp_path / "unrolled" / "model.safetensors")
    assert a.keys() == b.keys() and "h.1.attn.c_attn.weight" in a  # unstacked on save
    assert all(np.array_equal(a[k], b[k]) for k in a)
    back = GPTModel.from_pretrained(tmp_path / "unrolled", scan_layers=True)  # stacked on load
    idx = random_ids((2, CTX), seed=13)
    assert_rel_close(forward(back, idx), forward(model, idx), 1e-6, "unrolled checkpoint in a scanned model")


def residual_bytes(model: GPTModel, idx: np.ndarray, targets: np.ndarray) -> int:
    """Bytes the forward keeps for the backward (the VJP's residuals, the weights themselves left out)."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    found = {}

    def trace(params):
        _, vjp = jax.vjp(lambda p: cross_entropy_loss(nnx.merge(graphdef, p, rest)(idx), targets), params)
        weights = {id(x) for x in jax.tree.leaves(params)}
        found["bytes"] = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(vjp) if id(x) not in weights)
        return jnp.zeros(())

    jax.eval_shape(trace, params)
    return found["bytes"]


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
def test_remat_keeps_loss_and_gradients_and_saves_less(scan):
    """Dropout on: the recomputed blocks draw the same masks (the keys are values), so loss and gradients match."""
    config = tiny(drop_rate=0.1, init_std=0.2)  # logits far from uniform: dropout moves the loss visibly
    idx, targets = random_ids((2, 16), seed=14), random_ids((2, 16), seed=15)
    loss_and_grad = nnx.jit(nnx.value_and_grad(lambda m, x, y: cross_entropy_loss(m(x, deterministic=False), y)))
    runs, saved = {}, {}
    for remat in ("none", "block", "dots"):
        m = GPTModel(config, rngs=nnx.Rngs(0), scan_layers=scan, remat=remat)  # the same weights and dropout keys
        loss, grads = loss_and_grad(m, idx, targets)
        runs[remat] = float(loss), convert.to_canonical(grads)
        saved[remat] = residual_bytes(m, idx, targets)
        if remat == "none":  # dropout was on: the next call draws other masks
            assert abs(float(loss_and_grad(m, idx, targets)[0]) - runs[remat][0]) > 1e-3
    for remat in ("block", "dots"):
        assert_rel_close(runs[remat][0], runs["none"][0], 1e-6, f"{remat} loss")
        for name, g in runs["none"][1].items():
            assert_rel_close(runs[remat][1][name], g, 1e-6, f"{remat} grad {name}")
    # block keeps each block's input only; dots adds the linear layers' matmul outputs.
    assert saved["block"] < saved["dots"] < saved["none"], saved


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


def test_bad_runtime_arguments(model):
    with pytest.raises(ValueError, match="attn_impl must be one of"):
        GPTModel(tiny(), rngs=nnx.Rngs(0), attn_impl="sdpa")
    with pytest.raises(ValueError, match="remat must be one of"):
        GPTModel(tiny(), rngs=nnx.Rngs(0), remat="all")
    with pytest.raises(ValueError, match="needs a KVCache made with stacked=True"):
        scanned(model)(jnp.zeros((1, 3), jnp.int32), cache=KVCache.create(model.config, 1, 8))
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
