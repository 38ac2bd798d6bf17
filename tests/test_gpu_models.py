"""GPU suite, models: torch_gpt on the kernels, jax_gpt under jit, DDP over NCCL (`pytest -m gpu`; `make gpu-check`).

Skipped without CUDA (the JAX tests also without a JAX GPU backend, DDP without two GPUs), and while Triton's
interpreter is on (tests/conftest.py turns it off for `pytest -m gpu`). float32 runs with TF32 off on both sides
(PyTorch's default for matmuls; JAX_DEFAULT_MATMUL_PRECISION=highest from conftest), so DESIGN.md §4's float32
tolerances apply; bfloat16 runs are held to the accuracy rule against a float64 model instead.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import pytest
import torch

import torch_gpt
from gpt_core import GPTConfig
from kernels import utils
from kernels.testing import accuracy
from tests.helpers import assert_rel_close, free_port

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(utils.interpreting(), reason="Triton's interpreter is on (TRITON_INTERPRET=1): run "
                                                    "`pytest -m gpu` on its own, or `make gpu-check`"),
]

CFG = GPTConfig(vocab_size=503, context_length=256, emb_dim=256, n_heads=4, n_layers=2, drop_rate=0.0,
                qkv_bias=True, tie_embeddings=True)


def batch(b: int, t: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x, y = (torch.randint(0, CFG.vocab_size, (b, t), generator=gen) for _ in range(2))
    return x.cuda(), y.cuda()


def models(dtype: torch.dtype) -> dict[str, torch_gpt.GPTModel]:
    """The same random weights as sdpa + torch LayerNorm, and as the Triton kernels for both, on CUDA."""
    torch.manual_seed(0)
    ref = torch_gpt.GPTModel(CFG, attn_impl="sdpa", norm_impl="torch")
    with torch.no_grad():  # LayerNorms and biases off their constant init, so a wrong mapping shows
        for name, p in ref.named_parameters():
            if name.endswith("bias") or ".ln_" in name or name.startswith("ln_f"):
                p.add_(0.1 * torch.randn_like(p))
    fused = torch_gpt.GPTModel(CFG, attn_impl="triton", norm_impl="triton")
    fused.load_state_dict(ref.state_dict())
    return {"sdpa": ref.cuda().to(dtype), "triton": fused.cuda().to(dtype)}


def loss_and_grads(model, x, y):
    model.train()
    model.zero_grad(set_to_none=True)
    logits = model(x)
    loss = torch_gpt.cross_entropy_loss(logits, y)
    loss.backward()
    return logits.detach(), loss.detach(), {n: p.grad.detach() for n, p in model.named_parameters()}


def test_training_step_on_the_kernels_matches_sdpa_float32():
    """Logits, loss, every gradient and the loss after one AdamW step: Triton attention and LayerNorm against
    sdpa and torch.nn.LayerNorm, float32 (tolerances 1e-5 / 1e-4 / 1e-4)."""
    assert not torch.backends.cuda.matmul.allow_tf32
    x, y = batch(4, 128)
    ms = models(torch.float32)
    utils.reset_dispatch_counts()
    results = {name: loss_and_grads(m, x, y) for name, m in ms.items()}
    counts = utils.dispatch_counts()
    assert {op for op, _ in counts} >= {"flash_attn_fwd", "flash_attn_bwd", "layer_norm_fwd", "layer_norm_bwd"}
    assert all(path == "triton" for _, path in counts), counts
    (ref_logits, ref_loss, ref_grads), (logits, loss, grads) = results["sdpa"], results["triton"]
    assert_rel_close(logits, ref_logits, 1e-5, "logits")
    assert abs(float(loss) - float(ref_loss)) <= 1e-5 * abs(float(ref_loss))
    for name in ref_grads:
        assert_rel_close(grads[name], ref_grads[name], 1e-4, f"grad {name}")
    after = {}
    for name, m in ms.items():
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=0.1)
        loss_and_grads(m, x, y)
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        opt.step()
        after[name] = float(loss_and_grads(m, x, y)[1])
    assert abs(after["triton"] - after["sdpa"]) <= 1e-4 * abs(after["sdpa"]), after
    assert after["sdpa"] < float(ref_loss)


def test_training_step_on_the_kernels_bfloat16_within_the_accuracy_rule():
    """bfloat16 on the tensor cores: the fused model's logits and gradients are at most twice as far from a
    float64 model's as the sdpa model's are (kernels.testing's rule, at the scale of a whole model)."""
    x, y = batch(4, 128, seed=1)
    exact_logits, _, exact_grads = loss_and_grads(models(torch.float64)["sdpa"], x, y)
    results = {name: loss_and_grads(m, x, y) for name, m in models(torch.bfloat16).items()}
    (ref_logits, _, ref_grads), (logits, _, grads) = results["sdpa"], results["triton"]
    verdict = accuracy(logits, ref_logits, exact_logits)
    assert verdict.ok, verdict.describe("logits")
    scale = max(float(g.norm()) for g in exact_grads.values())
    bad = [accuracy(grads[n], ref_grads[n], exact_grads[n], scale=scale).describe(n) for n in exact_grads
           if not accuracy(grads[n], ref_grads[n], exact_grads[n], scale=scale).ok]
    assert not bad, "\n".join(bad)


def test_generation_on_the_kernels_matches_sdpa():
    """Greedy decoding through the KV cache (one query against a growing cache) on the Triton kernels."""
    ms = models(torch.float32)
    prompt = batch(2, 9, seed=2)[0]
    out = {name: torch_gpt.generate(m, prompt, 24) for name, m in ms.items()}
    assert torch.equal(out["triton"], out["sdpa"])


# ----------------------------------------------------------------------------------------------------- JAX
def _jax_gpu():
    jax = pytest.importorskip("jax")
    if jax.default_backend() != "gpu":
        pytest.skip(f"JAX has no GPU backend here ({jax.default_backend()})")
    return jax


@pytest.fixture(scope="module")
def twin_checkpoint(tmp_path_factory):
    """A torch_gpt checkpoint (random weights, LayerNorms moved off their init) and the torch model, on CUDA."""
    d = tmp_path_factory.mktemp("twin")
    model = models(torch.float32)["sdpa"]
    model.save_pretrained(d)
    return d, model


def test_jax_jit_forward_on_the_gpu_matches_torch(twin_checkpoint):
    jax = _jax_gpu()
    import jax_gpt

    d, torch_model = twin_checkpoint
    from flax import nnx

    graphdef, state = nnx.split(jax_gpt.GPTModel.from_pretrained(d))
    x = batch(2, 64, seed=3)[0]
    forward = jax.jit(lambda state, ids: nnx.merge(graphdef, state)(ids))
    logits = forward(state, jax.numpy.asarray(x.cpu().numpy()))
    assert {dev.platform for dev in logits.devices()} == {"gpu"}
    with torch.no_grad():
        expected = torch_model.eval()(x).cpu().numpy()
    assert_rel_close(np.asarray(logits), expected, 1e-5, "jax logits vs torch")


def test_jax_generation_on_the_gpu_matches_torch(twin_checkpoint):
    jax = _jax_gpu()
    import jax_gpt

    d, torch_model = twin_checkpoint
    jm = jax_gpt.GPTModel.from_pretrained(d)
    prompt = batch(2, 9, seed=4)[0]
    ours = np.asarray(jax_gpt.generate(jm, jax.numpy.asarray(prompt.cpu().numpy()), 24))
    theirs = torch_gpt.generate(torch_model, prompt, 24).cpu().numpy()
    assert (ours == theirs).all(), f"first difference at position {int(np.argmax((ours != theirs).any(0)))}"


def test_jax_cudnn_attention_within_the_accuracy_rule(twin_checkpoint):
    """attn_impl="cudnn" in bfloat16: logits at most twice as far from the float32 model's as XLA's attention."""
    _jax_gpu()
    import jax.numpy as jnp

    import jax_gpt

    d, _ = twin_checkpoint
    x = batch(2, 128, seed=5)[0].cpu().numpy()
    exact = np.asarray(jax_gpt.GPTModel.from_pretrained(d)(x), np.float64)
    got = {impl: np.asarray(jax_gpt.GPTModel.from_pretrained(d, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
                                                               attn_impl=impl)(x).astype(jnp.float32))
           for impl in ("xla", "cudnn")}
    # The float32 model is the reference here: its own error is orders below bfloat16's.
    verdict = accuracy(torch.tensor(got["cudnn"]).bfloat16(), torch.tensor(got["xla"]).bfloat16(), torch.tensor(exact))
    assert verdict.ok, verdict.describe("cudnn logits")


# ----------------------------------------------------------------------------------------------------- DDP
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="DDP over NCCL needs two GPUs")
def test_ddp_over_nccl_equals_one_process():
    from gpt_core import WordTokenizer, load_text

    small = GPTConfig(vocab_size=1135, context_length=32, emb_dim=64, n_heads=4, n_layers=2, drop_rate=0.0,
                      qkv_bias=True, tie_embeddings=True)
    with tempfile.TemporaryDirectory() as tmp:
        small.to_json(os.path.join(tmp, "config.json"))
        vocab = WordTokenizer.from_text(load_text()).save(os.path.join(tmp, "vocab.json"))
        args = ["--config", os.path.join(tmp, "config.json"), "--tokenizer", f"word:{vocab}", "--seq-len", "16",
                "--batch-size", "4", "--grad-accum", "2", "--steps", "8", "--warmup-steps", "2", "--eval-every",
                "4", "--eval-batches", "2", "--no-progress", "--sample-tokens", "4", "--device", "cuda"]
        runs = {"single": [sys.executable, "-m", "torch_gpt.train"],
                "ddp": [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                        str(free_port()), "-m", "torch_gpt.train"]}
        losses = {}
        for name, cmd in runs.items():
            out = os.path.join(tmp, name)
            done = subprocess.run([*cmd, *args, "--out", out], capture_output=True, text=True, timeout=240)
            assert done.returncode == 0, f"{name}: stdout:\n{done.stdout[-2000:]}\nstderr:\n{done.stderr[-3000:]}"
            with open(os.path.join(out, "metrics.jsonl")) as fh:
                rows = [json.loads(line) for line in fh if line.strip()]
            losses[name] = [r["loss"] for r in rows if r["kind"] == "train"]
    assert len(losses["ddp"]) == 8
    assert max(abs(a - b) / abs(a) for a, b in zip(losses["single"], losses["ddp"], strict=True)) <= 1e-5
