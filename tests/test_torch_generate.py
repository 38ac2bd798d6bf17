import subprocess
import sys

import pytest
import torch

from gpt_core import GPTConfig
from torch_gpt import GPTModel, generate

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


def test_eos_pads_and_stops(model):
    prompt = torch.randint(0, CFG.vocab_size, (2, 4))
    greedy = generate(model, prompt, 10)
    eos = int(greedy[0, 6])  # the third token sequence 0 produces
    out = generate(model, prompt, 10, eos_id=eos)
    assert (out[0, 6:] == eos).all()
    first_eos_1 = [t for t in range(4, out.shape[1]) if out[1, t] == eos]
    if first_eos_1:
        assert (out[1, first_eos_1[0]:] == eos).all()
    else:
        assert out.shape[1] == 14


@pytest.mark.parametrize("kw, match", [({"temperature": -1}, "temperature"), ({"top_k": 0}, "top_k"),
                                       ({"top_p": 1.5}, "top_p"), ({"max_new_tokens": -1}, "max_new_tokens")])
def test_bad_sampling_arguments(model, kw, match):
    args = {"max_new_tokens": 3, **kw}
    with pytest.raises(ValueError, match=match):
        generate(model, torch.zeros(1, 2, dtype=torch.long), **args)


def test_cli_prints_a_continuation(tmp_path):
    torch.manual_seed(0)
    GPTModel(GPTConfig.from_preset("tiny")).save_pretrained(tmp_path / "tiny")
    cmd = [sys.executable, "-m", "torch_gpt.generate", "--checkpoint", str(tmp_path / "tiny"),
           "--prompt", "Every effort moves you", "--max-new-tokens", "5"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("Every effort moves you") and len(out.stdout) > len("Every effort moves you\n")
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
