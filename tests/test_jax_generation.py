"""jax_gpt.generate: one compilation for N tokens, cache/no-cache agreement, prompts of different lengths in one
batch, sampling, eos, the CLI. Token-for-token agreement with torch_gpt.generate is in test_jax_parity.py (and, for a
batch of different lengths, below)."""

from __future__ import annotations

import runpy
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gpt_core.config import GPTConfig
from jax_gpt import GPTModel, generate
from jax_gpt.generation import sample_next
from tests.helpers import CTX, VOCAB, random_ids, tiny

BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"


@pytest.fixture(scope="module")
def model() -> GPTModel:
    # drop_rate > 0: generation must still run without dropout
    return GPTModel(tiny(drop_rate=0.1, init_std=0.1), rngs=nnx.Rngs(0))


class CompileCounter:
    """Counts XLA compilations of jitted functions named `name`, from JAX's monitoring events."""

    def __init__(self, name: str):
        self.name, self.count = f"jit({name})", 0

    def __call__(self, event: str, duration: float, **kwargs) -> None:
        if event == BACKEND_COMPILE and kwargs.get("fun_name") == self.name:
            self.count += 1

    def __enter__(self) -> CompileCounter:
        jax.monitoring.register_event_duration_secs_listener(self)
        return self

    def __exit__(self, *exc) -> None:
        jax.monitoring.unregister_event_duration_listener(self)


def test_generating_n_tokens_compiles_once(model):
    prompt = random_ids((1, 7), seed=1)
    with CompileCounter("_generate") as compiles:
        out = generate(model, prompt, 29)  # a shape no other test uses, so the first call must compile
        assert out.shape == (1, 7 + 29) and compiles.count == 1
        generate(model, random_ids((1, 7), seed=2), 29)  # new values, same shapes: no new program
        assert compiles.count == 1
        bad = prompt.copy()
        bad[0, 3] = VOCAB
        with pytest.raises(ValueError, match=f"token id {VOCAB} is outside"):
            generate(model, bad, 29)  # refused before anything is traced
        assert compiles.count == 1


# Prompt (2, 10) and 12 new tokens: the greedy program is shared by the tests below (XLA compiles are slow on CPU).
@pytest.mark.parametrize("prompt_len", [10, CTX + 9], ids=["short", "past-context"])
def test_greedy_with_and_without_cache_agree(model, prompt_len):
    prompt = random_ids((2, prompt_len), seed=3)
    cached = generate(model, prompt, 12)
    np.testing.assert_array_equal(cached[:, :prompt_len], prompt)
    np.testing.assert_array_equal(cached, generate(model, prompt, 12, use_cache=False))


def test_scanned_model_generates_the_same(model):
    """Stacked weights and a stacked KV cache, past the context too (the cache refills inside the loop)."""
    scanned = GPTModel(model.config, rngs=nnx.Rngs(0), scan_layers=True)
    scanned.load_canonical_state(model.canonical_state())
    prompt = random_ids((2, 10), seed=3)
    with CompileCounter("_generate") as compiles:
        out = generate(scanned, prompt, CTX)
    assert compiles.count == 1
    np.testing.assert_array_equal(out, generate(model, prompt, CTX))


@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "no-cache"])
def test_prompts_of_different_lengths_get_what_they_get_alone(model, use_cache):
    """Left-padded in one batch, each prompt gets its greedy tokens alone, past the context too (the window slides,
    each row's padding with it: 10 + 60 > CTX)."""
    prompts = [random_ids((n,), seed=20 + n).tolist() for n in (3, 10, 1)]
    out = np.asarray(generate(model, prompts, 60, use_cache=use_cache))
    assert out.shape == (3, 70)
    for b, p in enumerate(prompts):
        alone = np.asarray(generate(model, np.array([p]), 60))
        np.testing.assert_array_equal(out[b, 10 - len(p):10], p)
        np.testing.assert_array_equal(out[b, 10:], alone[0, len(p):], err_msg=f"prompt {b} ({len(p)} tokens)")


def test_padded_prompts_match_torch_gpt(model):
    """The same batch of different lengths, the same tokens as torch_gpt's (its padded path), scanned or not."""
    import torch_gpt

    reference = torch_gpt.GPTModel(model.config).eval()
    reference.load_canonical_state(model.canonical_state())
    prompts = [random_ids((n,), seed=30 + n).tolist() for n in (7, 2)]
    padded = np.zeros((2, 7), np.int32) + 5  # whatever is in the padding is never read
    padded[0], padded[1, 5:] = prompts[0], prompts[1]
    expected = torch_gpt.generate(reference, prompts, 12).numpy()
    np.testing.assert_array_equal(generate(model, padded, 12, lengths=[7, 2]), expected)
    scanned = GPTModel(model.config, rngs=nnx.Rngs(0), scan_layers=True)
    scanned.load_canonical_state(model.canonical_state())
    np.testing.assert_array_equal(generate(scanned, prompts, 12), expected)


@pytest.mark.parametrize("prompt, kw, match", [
    ([[1, 2], [3, VOCAB, 4]], {}, rf"token id {VOCAB} is outside \[0, {VOCAB}\) \(prompt 1, position 1\)"),
    (np.array([[1, 2, 3], [4, -5, 6]]), {}, r"token id -5 is outside .* \(row 1, position 1\)"),
    ([[1, 2], []], {}, "prompt 1 is empty"),
    (np.zeros((2, 0), np.int32), {}, "holds no tokens"),
    (np.zeros((2, 3), np.int32), {"lengths": [3, 4]}, r"prompt 1 has length 4: lengths must be in \[1, 3\]"),
    (np.zeros((2, 3), np.int32), {"lengths": [3]}, "1 lengths for a batch of 2"),
])
def test_bad_prompts_are_refused_on_the_host(model, prompt, kw, match):
    with CompileCounter("_generate") as compiles:
        with pytest.raises(ValueError, match=match):
            generate(model, prompt, 3, **kw)
    assert compiles.count == 0


def test_sampling_is_reproducible_and_narrow_filters_give_greedy(model):
    prompt = random_ids((2, 10), seed=4)
    a = generate(model, prompt, 12, temperature=1.0, key=jax.random.key(0))
    np.testing.assert_array_equal(a, generate(model, prompt, 12, temperature=1.0, key=jax.random.key(0)))
    assert not np.array_equal(a, generate(model, prompt, 12, temperature=1.0, key=jax.random.key(1)))
    narrow = generate(model, prompt, 12, temperature=2.0, top_k=1, top_p=0.5, key=jax.random.key(0))
    np.testing.assert_array_equal(narrow, generate(model, prompt, 12))


def test_sample_next_keeps_only_the_allowed_tokens():
    logits = jnp.log(jnp.array([[0.05, 0.4, 0.1, 0.3, 0.15]] * 4000))  # (B, V): one row per draw
    key = jax.random.key(0)
    assert set(np.unique(sample_next(logits, 1.0, 2, None, key)).tolist()) == {1, 3}  # top-2
    # Nucleus 0.75: 0.4 + 0.3 = 0.7 falls short, so the third most likely (0.15) is kept too.
    assert set(np.unique(sample_next(logits, 1.0, None, 0.75, key)).tolist()) == {1, 3, 4}
    counts = np.bincount(np.asarray(sample_next(logits, 1.0, None, None, key)), minlength=5) / 4000
    np.testing.assert_allclose(counts, [0.05, 0.4, 0.1, 0.3, 0.15], atol=0.03)
    np.testing.assert_array_equal(sample_next(logits[:2], 0.0, None, None, None), [1, 1])


def test_eos_pads_and_stops_when_all_are_done(model):
    prompt = random_ids((2, 10), seed=5)
    free = np.asarray(generate(model, prompt, 12))
    eos = int(free[0, 10 + 2])
    expected, stops = free.copy(), []
    for row in expected:  # torch_gpt's rule: after a sequence's eos, eos; stop once every sequence has one
        hits = np.flatnonzero(row[10:] == eos)
        stops.append(10 + hits[0] + 1 if hits.size else row.size)
        row[stops[-1]:] = eos
    np.testing.assert_array_equal(generate(model, prompt, 12, eos_id=eos), expected[:, :max(stops)])


def test_bad_arguments(model):
    prompt = random_ids((1, 4))
    for kwargs, message in [(dict(temperature=-1.0), "temperature"), (dict(top_k=0), "top_k"),
                            (dict(top_p=0.0), "top_p"), (dict(temperature=1.0), "needs a key")]:
        with pytest.raises(ValueError, match=message):
            generate(model, prompt, 4, **kwargs)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, prompt, -1)
    with pytest.raises(ValueError, match="integer token ids"):
        generate(model, prompt.astype(np.float32), 4)
    np.testing.assert_array_equal(generate(model, prompt, 0), prompt)


def test_cli(tmp_path, capsys, monkeypatch):  # in this process: runpy, as `python -m` runs it
    config = GPTConfig(vocab_size=50257, context_length=32, emb_dim=32, n_heads=2, n_layers=1, qkv_bias=True,
                       tie_embeddings=True)  # GPT-2's tokenizer needs its vocabulary
    GPTModel(config, rngs=nnx.Rngs(0)).save_pretrained(tmp_path)
    argv = ["jax_gpt.generate", "--checkpoint", str(tmp_path), "--prompt", "Hello", "--max-new-tokens", "5"]
    monkeypatch.setattr(sys, "argv", argv)
    # run_module leaves the package attribute `jax_gpt.generate` (the function) alone; an import would not.
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("jax_gpt.generate", run_name="__main__")
    assert exit_info.value.code == 0
    single = capsys.readouterr().out
    assert single.startswith("Hello")
    monkeypatch.setattr(sys, "argv", argv + ["--prompt", "A longer second prompt"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("jax_gpt.generate", run_name="__main__")
    assert exit_info.value.code == 0
    first, second = capsys.readouterr().out.split("\n---\n")
    assert first == single.rstrip("\n") and second.startswith("A longer second prompt")
    monkeypatch.setattr(sys, "argv", argv + ["--temperature", "-1"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("jax_gpt.generate", run_name="__main__")
    assert exit_info.value.code == 2 and "temperature" in capsys.readouterr().err


def test_bf16_generation(model):
    bf16 = GPTModel(model.config, rngs=nnx.Rngs(0), dtype=jnp.bfloat16)  # float32 parameters, bf16 compute
    bf16.load_canonical_state(model.canonical_state())
    out = np.asarray(generate(bf16, random_ids((2, 10), seed=6), 12))
    assert out.shape == (2, 22) and out.min() >= 0 and out.max() < VOCAB
