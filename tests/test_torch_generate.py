"""torch_gpt.generate: the static-cache path against the plain forward (today's reference), batches of prompts of
different lengths, torch.compile (one compilation, reused), eos, bad prompts, the CLI."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from gpt_core import GPTConfig
from torch_gpt import GPTModel, KVCache, generate
from torch_gpt.generation import compiled_graphs

CFG = GPTConfig(vocab_size=157, context_length=32, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.1)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPTModel(CFG)


@pytest.mark.parametrize("impl", ["math", "sdpa"])
def test_greedy_cache_and_no_cache_identical(model, impl):
    model.attn_impl = impl
    prompt = torch.randint(0, CFG.vocab_size, (3, 5))
    with_cache = generate(model, prompt, 20)
    without = generate(model, prompt, 20, use_cache=False)
    assert with_cache.shape == (3, 25) and torch.equal(with_cache[:, :5], prompt)
    assert torch.equal(with_cache, without)
    assert model.training  # put back in the mode it came in


def test_greedy_is_argmax_of_the_forward(model):
    model.eval()
    prompt = torch.randint(0, CFG.vocab_size, (2, 6))
    out = generate(model, prompt, 3, use_cache=False)
    for t in range(3):
        with torch.no_grad():
            expected = model(out[:, :6 + t])[:, -1].argmax(-1)
        assert torch.equal(out[:, 6 + t], expected)
    model.train()


def test_past_the_context_the_window_slides(model):
    """Generating beyond context_length conditions on the last context_length tokens, cache or not."""
    prompt = torch.randint(0, CFG.vocab_size, (2, 30))
    with_cache = generate(model, prompt, 40)
    assert with_cache.shape == (2, 70)
    assert torch.equal(with_cache, generate(model, prompt, 40, use_cache=False))
    long_prompt = torch.randint(0, CFG.vocab_size, (1, 50))  # longer than the context: cropped
    assert torch.equal(generate(model, long_prompt, 3), generate(model, long_prompt, 3, use_cache=False))


def test_sampling_is_seeded_and_filtered(model):
    prompt = torch.randint(0, CFG.vocab_size, (4, 3))

    def run(seed, **kw):
        return generate(model, prompt, 12, temperature=1.0, generator=torch.Generator().manual_seed(seed), **kw)

    assert torch.equal(run(1), run(1)) and not torch.equal(run(1), run(2))
    assert torch.equal(run(3, top_k=1), generate(model, prompt, 12))  # top-1 sampling is greedy
    assert torch.equal(run(4, top_p=1e-6), generate(model, prompt, 12))  # the nucleus keeps one token
    assert torch.equal(run(5, top_k=5, use_cache=True), run(5, top_k=5, use_cache=False))


@pytest.mark.parametrize("every", [1, 3, 8])
def test_eos_pads_and_stops(model, every):
    """The rule: after a row's eos, eos; stop once every row has one. Checked on the host every `every` tokens, the
    output trimmed to the step where the last row finished, so the result does not depend on `every`."""
    prompt = torch.randint(0, CFG.vocab_size, (3, 4), generator=torch.Generator().manual_seed(7))
    free = generate(model, prompt, 16)
    eos = int(free[1, 4 + 2])  # the third token row 1 produces
    expected, stops = free.clone(), []
    for row in expected:
        hits = (row[4:] == eos).nonzero()
        stops.append(4 + int(hits[0]) + 1 if len(hits) else row.numel())
        row[stops[-1]:] = eos
    out = generate(model, prompt, 16, eos_id=eos, eos_check_every=every)
    assert torch.equal(out, expected[:, :max(stops)])


@pytest.mark.parametrize("kw, match", [({"temperature": -1}, "temperature"), ({"top_k": 0}, "top_k"),
                                       ({"top_p": 1.5}, "top_p"), ({"max_new_tokens": -1}, "max_new_tokens"),
                                       ({"eos_check_every": 0}, "eos_check_every"),
                                       ({"compile": True, "use_cache": False}, "needs use_cache=True")])
def test_bad_sampling_arguments(model, kw, match):
    args = {"max_new_tokens": 3, **kw}
    with pytest.raises(ValueError, match=match):
        generate(model, torch.zeros(1, 2, dtype=torch.long), **args)


def test_the_static_cache_continues_the_forward(model):
    """Prefill then one-token steps through a KVCache give the logits of the whole sequence at once."""
    model.eval()
    ids = torch.randint(0, CFG.vocab_size, (2, 9))
    with torch.no_grad():
        full = model(ids)
        cache = KVCache(CFG, 2, 12)
        parts = [model(ids[:, :6], cache)] + [model(ids[:, t:t + 1], cache) for t in range(6, 9)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, atol=1e-5)
    assert int(cache.pos) == 9
    with pytest.raises(ValueError, match="does not fit the context of 12"):
        model(ids[:, :4], cache)  # 9 cached + 4 > 12 (a CPU cache: its fill level is read without a sync)
    with pytest.raises(ValueError, match="batch of 3 does not match"):
        model(torch.zeros(3, 1, dtype=torch.long), cache)
    model.train()


def test_forward_reads_no_values_off_the_cpu():
    """On any other device, forward checks shapes only: a meta tensor has no values, so any read-back (an id
    check, the cache's fill level) would raise here. The same ids on the CPU are checked."""
    with torch.device("meta"):
        m = GPTModel(CFG).eval()
        bad = torch.full((2, 5), CFG.vocab_size)  # out of range, but unreadable
        cache = KVCache(CFG, 2, 8)
        with torch.no_grad():
            assert m(bad).shape == (2, 5, CFG.vocab_size)
            assert m(bad, cache).shape == (2, 5, CFG.vocab_size)  # the prefill
            assert m(bad[:, :1], cache).shape == (2, 1, CFG.vocab_size)  # a decode step
    with pytest.raises(ValueError, match=f"token id {CFG.vocab_size} is outside"):
        GPTModel(CFG)(torch.full((2, 5), CFG.vocab_size))


def prompts_of(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, CFG.vocab_size, n).tolist() for n in lengths]


@pytest.mark.parametrize("impl", ["math", "sdpa"])
@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "no-cache"])
def test_prompts_of_different_lengths_get_what_they_get_alone(model, impl, use_cache):
    """Left-padded in one batch, each prompt gets exactly its greedy tokens alone (the uncached forward, today's
    reference), past the context too (9 + 30 > 32: the window slides, each row's padding with it)."""
    model.attn_impl = impl
    prompts = prompts_of([3, 9, 1, 6])
    out = generate(model, prompts, 30, use_cache=use_cache)
    assert out.shape == (4, 39)
    for b, p in enumerate(prompts):
        alone = generate(model, torch.tensor([p]), 30, use_cache=False)
        assert torch.equal(out[b, 9 - len(p):9], torch.tensor(p)) and (out[b, :9 - len(p)] == 0).all()
        assert torch.equal(out[b, 9:], alone[0, len(p):]), f"prompt {b} ({len(p)} tokens)"
    assert model.training


def test_the_triton_kernel_takes_padded_prompts(model):
    """attn_impl="triton" (the Triton interpreter on CPU): the prefill and every decode step run the kernel, rows
    limited to their real keys (kv_start/kv_end), and give sdpa's tokens."""
    from kernels import utils

    if not utils.interpreting():
        pytest.skip("needs the Triton interpreter (TRITON_INTERPRET=1, as the CPU suite sets it)")
    prompts = prompts_of([4, 1, 6], seed=2)
    model.attn_impl = "sdpa"
    expected = generate(model, prompts, 5)
    model.attn_impl = "triton"
    utils.reset_dispatch_counts()
    try:
        assert torch.equal(generate(model, prompts, 5), expected)
    finally:
        model.attn_impl = "sdpa"
    assert utils.dispatch_counts()[("flash_attn_fwd", "interpreter")] == 5 * CFG.n_layers  # prefill + 4 steps


def test_a_padded_tensor_with_lengths_is_the_same_batch(model):
    prompts = prompts_of([5, 2, 4], seed=1)
    padded = torch.full((3, 5), 150)  # whatever is in the padding is never read
    for b, p in enumerate(prompts):
        padded[b, 5 - len(p):] = torch.tensor(p)
    from_list = generate(model, prompts, 8)
    assert torch.equal(generate(model, padded, 8, lengths=[5, 2, 4]), from_list)
    assert torch.equal(generate(model, padded, 8, lengths=torch.tensor([5, 2, 4])), from_list)
    sampled = [generate(model, x, 8, temperature=1.0, top_k=20, generator=torch.Generator().manual_seed(3), **kw)
               for x, kw in ((prompts, {}), (padded, {"lengths": [5, 2, 4]}))]
    assert torch.equal(*sampled)


@pytest.mark.parametrize("prompt, kw, match", [
    ([[1, 2], [3, 157, 4]], {}, r"token id 157 is outside \[0, 157\) \(prompt 1, position 1\)"),
    ([[1, -2]], {}, r"token id -2 is outside \[0, 157\) \(prompt 0, position 1\)"),
    (torch.tensor([[1, 2, 3], [4, 5, 200]]), {}, r"token id 200 is outside \[0, 157\) \(row 1, position 2\)"),
    (torch.tensor([[-1, 2, 3], [-1, -1, 9]]), {"lengths": [2, 2]}, r"token id -1 is outside .* \(row 1, position 1\)"),
    ([[1, 2], []], {}, "prompt 1 is empty"),
    ([], {}, "no prompts"),
    (torch.zeros(2, 0, dtype=torch.long), {}, "holds no tokens"),
    (torch.zeros(2, 3, dtype=torch.long), {"lengths": [3]}, "1 lengths for a batch of 2"),
    (torch.zeros(2, 3, dtype=torch.long), {"lengths": [3, 4]}, r"prompt 1 has length 4: lengths must be in \[1, 3\]"),
    (torch.zeros(2, 3, dtype=torch.long), {"lengths": [0, 3]}, "prompt 0 has length 0"),
    ([[1, 2]], {"lengths": [2]}, "lengths go with a padded"),
    ([[1, 2.0]], {}, "token ids are integers"),
    (torch.zeros(2, 3), {}, "integer token ids"),
])
def test_bad_prompts_are_refused_before_the_model_runs(model, prompt, kw, match):
    calls = []
    hook = model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(ValueError, match=match):
            generate(model, prompt, 3, **kw)
    finally:
        hook.remove()
    assert not calls


@pytest.mark.slow
def test_compiled_generation_equals_eager_and_compiles_once():
    """compile=True: one prefill graph (dynamic shapes) and one decode graph per batch size, cache length and
    greedy-or-sampling (greedy steps return their argmax; dynamo's own counts), reused by later calls: new prompts,
    another prompt length with the same cache length, prompts of different lengths (whose prefill takes a padding
    mask: one more graph). Tokens equal eager's."""
    torch.manual_seed(1)
    m = GPTModel(GPTConfig(vocab_size=97, context_length=24, emb_dim=32, n_heads=2, n_layers=2)).eval()
    before = {step: compiled_graphs(step) for step in ("prefill", "decode")}

    def built():
        return {step: compiled_graphs(step) - n for step, n in before.items()}

    def same(prompt, n, **kw):
        return torch.equal(generate(m, prompt, n, compile=True, **kw), generate(m, prompt, n, **kw))

    prompt = torch.randint(0, 97, (2, 5))
    assert same(prompt, 12) and built() == {"prefill": 1, "decode": 1}  # B=2, 5 + 12 -> 24 slots (the context)
    assert same(torch.randint(0, 97, (2, 5)), 12)
    seeded = [generate(m, prompt, 12, temperature=1.0, top_p=0.9, compile=c, generator=torch.Generator().manual_seed(5))
              for c in (True, False)]
    assert torch.equal(*seeded) and built() == {"prefill": 1, "decode": 2}  # the sampling step: logits out
    assert torch.equal(generate(m, prompt, 12, temperature=0.7, compile=True, generator=torch.Generator()
                                .manual_seed(6)), generate(m, prompt, 12, temperature=0.7, generator=torch.Generator()
                                                           .manual_seed(6)))
    assert same(torch.randint(0, 97, (2, 8)), 9)  # 8 + 9: the same 24 slots
    assert same(torch.randint(0, 97, (2, 3)), 2)  # 3 + 2, rounded up to a multiple of 64, capped: 24 again
    assert built() == {"prefill": 1, "decode": 2}, "a later call with the same cache shape recompiled"
    for seed in (2, 3):
        assert same([[t % 97 for t in p] for p in prompts_of([5, 2], seed)], 12)
    assert built() == {"prefill": 2, "decode": 2}
    for t, n in ((5, 12), (8, 9), (3, 2)):  # B=1, where a (1, 1) slice of the output kept its width's strides
        assert same(torch.randint(0, 97, (1, t)), n)
    assert built() == {"prefill": 3, "decode": 3}, "B=1: a later call with the same cache shape recompiled"


def test_cli_prints_a_continuation(tmp_path):
    torch.manual_seed(0)
    GPTModel(GPTConfig.from_preset("tiny")).save_pretrained(tmp_path / "tiny")
    cmd = [sys.executable, "-m", "torch_gpt.generate", "--checkpoint", str(tmp_path / "tiny"),
           "--prompt", "Every effort moves you", "--max-new-tokens", "5"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("Every effort moves you") and len(out.stdout) > len("Every effort moves you\n")
    several = subprocess.run(cmd + ["--prompt", "Hello"], capture_output=True, text=True, timeout=120)
    assert several.returncode == 0, several.stderr
    first, second = several.stdout.split("\n---\n")
    assert first == out.stdout.split("\n---\n")[0].rstrip("\n") and second.startswith("Hello")
    bad = subprocess.run(cmd[:4] + [str(tmp_path / "missing")] + cmd[5:], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "does not exist" in bad.stderr
    helped = subprocess.run([sys.executable, "-m", "torch_gpt.generate", "--help"], capture_output=True, text=True)
    assert helped.returncode == 0 and "--temperature" in helped.stdout


def test_the_function_and_the_cli_share_the_name():
    """`torch_gpt.generate` stays the function whatever is imported (the CLI is the package's __main__), and
    `python -m` runs the CLIs without runpy's warning about a module imported before it ran."""
    code = ("import torch, torch_gpt, torch_gpt.generate, jax_gpt, jax_gpt.generate, torch_gpt.generate.__main__\n"
            "from flax import nnx\n"
            "from gpt_core import GPTConfig\n"
            "cfg = GPTConfig.from_preset('tiny')\n"
            "t = torch_gpt.generate(torch_gpt.GPTModel(cfg).eval(), torch.tensor([[1, 2, 3]]), 2)\n"
            "j = jax_gpt.generate(jax_gpt.GPTModel(cfg, rngs=nnx.Rngs(0)), torch.tensor([[1, 2, 3]]).numpy(), 2)\n"
            "print(tuple(t.shape), tuple(j.shape))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "(1, 5) (1, 5)"
    for package in ("torch_gpt", "jax_gpt"):
        helped = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-m", f"{package}.generate", "--help"],
                                capture_output=True, text=True, timeout=120)
        assert helped.returncode == 0 and "--init-from" in helped.stdout, helped.stderr[-2000:]
