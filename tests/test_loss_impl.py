"""`loss_impl="fused"` in the twins and `--loss-impl` in the trainers: the loss from the final hidden states without
the logits gives the plain loss, its gradients and its training runs, on each side and across the two.

The torch fused loss runs its Triton kernel in the interpreter here (conftest sets TRITON_INTERPRET=1); the JAX
one is pure JAX.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import jax_gpt
import torch_gpt
from gpt_core import GPTConfig, WordTokenizer, load_text
from jax_gpt.train import main as jax_main
from kernels import utils
from tests.helpers import assert_rel_close
from torch_gpt.train import main as torch_main

# An untied head too: the fused loss then reads lm_head's weight (torch) or its transposed kernel (JAX).
CFG = GPTConfig(vocab_size=1135, context_length=32, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0,
                qkv_bias=True, tie_embeddings=True)


def ids(shape, seed=0):
    return np.random.default_rng(seed).integers(0, CFG.vocab_size, shape)


@pytest.mark.parametrize("tied", [True, False])
def test_torch_model_fused_loss_equals_plain(tied):
    config = dataclasses.replace(CFG, tie_embeddings=tied)
    torch.manual_seed(0)
    plain = torch_gpt.GPTModel(config)
    fused = torch_gpt.GPTModel(config, loss_impl="fused")
    fused.load_state_dict(plain.state_dict())
    x, y = (torch.from_numpy(ids((3, 17), seed)) for seed in (1, 2))
    losses, grads = [], []
    for model in (plain, fused):
        loss = model(x, targets=y)
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert utils.last_path("linear_cross_entropy_fwd") == "interpreter"
    assert_rel_close(losses[1], losses[0], 1e-6, "loss")
    for name, g in grads[0].items():
        assert_rel_close(grads[1][name], g, 1e-5, name)
    assert torch.equal(fused(x), plain(x))  # model(idx) is the logits, whatever loss_impl says


@pytest.mark.parametrize("tied", [True, False])
def test_jax_model_fused_loss_equals_plain(tied):
    config = dataclasses.replace(CFG, tie_embeddings=tied)
    models = [jax_gpt.GPTModel(config, rngs=nnx.Rngs(0), loss_impl=impl) for impl in ("plain", "fused")]
    x, y = (jnp.asarray(ids((3, 17), seed)) for seed in (1, 2))
    results = [nnx.jit(nnx.value_and_grad(lambda m: m(x, targets=y)))(m) for m in models]
    (lp, gp), (lf, gf) = results
    assert_rel_close(lf, lp, 1e-6, "loss")
    for (path, a), (_, b) in zip(jax.tree_util.tree_leaves_with_path(gp), jax.tree_util.tree_leaves_with_path(gf),
                                 strict=True):
        assert_rel_close(b, a, 1e-5, jax.tree_util.keystr(path))
    logits = nnx.jit(lambda m: m(x))
    assert np.array_equal(np.asarray(logits(models[1])), np.asarray(logits(models[0])))


def test_bad_loss_impl_and_targets_with_a_cache():
    with pytest.raises(ValueError, match="loss_impl must be one of"):
        torch_gpt.GPTModel(CFG, loss_impl="chunked")
    with pytest.raises(ValueError, match="loss_impl must be one of"):
        jax_gpt.GPTModel(CFG, rngs=nnx.Rngs(0), loss_impl="chunked")
    x = torch.from_numpy(ids((1, 4)))
    with pytest.raises(ValueError, match="do not go together"):
        torch_gpt.GPTModel(CFG)(x, torch_gpt.KVCache(CFG, 1, 8), targets=x)


# ----------------------------------------------------------------------------------------------- trainers
@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("loss_impl")
    vocab = WordTokenizer.from_text(load_text()).save(d / "vocab.json")
    torch.manual_seed(0)
    torch_gpt.GPTModel(CFG).save_pretrained(d / "init")
    return d, ["--init-from", str(d / "init"), "--tokenizer", f"word:{vocab}", "--seq-len", "16",
               "--batch-size", "8", "--grad-accum", "2", "--warmup-steps", "3", "--eval-every", "10",
               "--eval-batches", "2", "--no-progress", "--sample-tokens", "4", "--steps", "20"]


def metrics(out, kind):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == kind]


def max_rel(a, b):
    assert len(a) == len(b) > 0
    return max(abs(x - y) / abs(y) for x, y in zip(a, b, strict=True))


@pytest.fixture(scope="module")
def runs(setup):
    """Each side's plain and fused runs. The torch trainer runs as on any CPU, Triton's interpreter off, so its
    fused loss takes the PyTorch reference of the per-chunk step (the interpreter would take a minute more; the
    kernel itself is compared with the plain loss above and in test_kernels_cross_entropy.py)."""
    d, args = setup
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(utils, "interpreting", lambda: False)
        for side, main in (("torch", torch_main), ("jax", jax_main)):
            for impl in ("plain", "fused"):
                out[side, impl] = d / f"{side}-{impl}"
                assert main(args + ["--loss-impl", impl, "--out", str(out[side, impl])]) == 0
        assert utils.last_path("linear_cross_entropy_fwd") == "reference"
    return out


@pytest.mark.slow
@pytest.mark.parametrize("side", ["torch", "jax"])
def test_fused_and_plain_runs_give_the_same_losses(runs, side):
    """20 float32 steps: the training losses, gradient norms and evaluations of the two loss_impls agree."""
    plain, fused = (metrics(runs[side, impl], "train") for impl in ("plain", "fused"))
    assert len(plain) == 20
    assert max_rel([r["loss"] for r in fused], [r["loss"] for r in plain]) <= 1e-5
    assert max_rel([r["grad_norm"] for r in fused], [r["grad_norm"] for r in plain]) <= 1e-5
    evals = [[r["val_loss"] for r in metrics(runs[side, impl], "eval")] for impl in ("plain", "fused")]
    assert max_rel(evals[1], evals[0]) <= 1e-5
    assert plain[-1]["loss"] < plain[0]["loss"]


@pytest.mark.slow
def test_fused_runs_agree_across_frameworks(runs):
    """The torch and the JAX fused runs from one checkpoint: the tolerance of the plain cross-framework test."""
    t, j = (metrics(runs[side, "fused"], "train") for side in ("torch", "jax"))
    assert max_rel([r["loss"] for r in j], [r["loss"] for r in t]) <= 1e-4
    assert max_rel([r["grad_norm"] for r in j], [r["grad_norm"] for r in t]) <= 1e-4
