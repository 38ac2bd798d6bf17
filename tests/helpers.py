"""Shared assertions and fixtures-as-functions for the test suite."""

from __future__ import annotations

import numpy as np


def to_numpy(x) -> np.ndarray:
    """A float64 numpy copy of a torch tensor, jax array or array-like."""
    if hasattr(x, "detach"):  # torch
        x = x.detach().to("cpu")
        x = x.double() if x.dtype.is_floating_point else x
        return x.numpy().astype(np.float64)
    return np.asarray(x, dtype=np.float64)


def rel_error(actual, expected) -> float:
    """‖a − b‖ / ‖b‖ (DESIGN.md §4), in float64."""
    a, b = to_numpy(actual), to_numpy(expected)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def assert_rel_close(actual, expected, tol: float, name: str = "tensor") -> float:
    """Fail unless shapes match, all values are finite and ‖a − b‖/‖b‖ <= tol; report the worst element."""
    a, b = to_numpy(actual), to_numpy(expected)
    assert a.shape == b.shape, f"{name}: shape {a.shape} != expected {b.shape}"
    bad = ~np.isfinite(a)
    assert not bad.any(), f"{name}: {int(bad.sum())} non-finite values, first at {np.argwhere(bad)[0].tolist()}"
    err = rel_error(a, b)
    if err > tol:
        diff = np.abs(a - b)
        worst = np.unravel_index(int(diff.argmax()), diff.shape)
        raise AssertionError(
            f"{name}: relative error {err:.3e} > {tol:.1e}; worst element {list(worst)}: "
            f"{a[worst]!r} vs expected {b[worst]!r}"
        )
    return err


def free_port() -> int:
    """A TCP port free on this machine now, for a test's rendezvous (torchrun, jax.distributed)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------- the twins' test models
VOCAB, CTX = 257, 64  # the tiny models' vocabulary and context: odd sizes, so no mapping hides behind a power of 2


def tiny(**overrides):
    """A 2-layer GPTConfig of width 48 (dropout off unless asked), for the twins' tests."""
    from gpt_core.config import GPTConfig

    base = dict(vocab_size=VOCAB, context_length=CTX, emb_dim=48, n_heads=4, n_layers=2, drop_rate=0.0)
    return GPTConfig(**(base | overrides))


def random_ids(shape: tuple[int, ...], seed: int = 0, vocab: int = VOCAB, dtype=np.int32) -> np.ndarray:
    """Token ids drawn uniformly from [0, vocab), fresh per seed."""
    return np.random.default_rng(seed).integers(0, vocab, size=shape, dtype=dtype)


def off_init_(model, seed: int = 0) -> None:
    """Move a torch model's constant-initialised parameters (biases, LayerNorms) off their constants, in place, by
    gpt_core.params.off_init; works for torch_gpt and transformers' GPT-2 (`transformer.` prefixed names) alike."""
    import torch

    from gpt_core.params import off_init

    named = {n.removeprefix("transformer."): p for n, p in model.named_parameters()}
    moved = off_init({n: p.detach().cpu().numpy() for n, p in named.items()}, seed)
    with torch.no_grad():
        for n, p in named.items():
            p.copy_(torch.from_numpy(moved[n]))


def small_hf_model(tie: bool = True, act: str = "gelu_new", vocab: int = 203, ctx: int = 40):
    """A real transformers GPT2LMHeadModel (2 layers, width 48, no dropout), eval mode, biases and LayerNorms
    off their init."""
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=vocab, n_positions=ctx, n_embd=48, n_layer=2, n_head=4,
                                  activation_function=act, tie_word_embeddings=tie, resid_pdrop=0.0, embd_pdrop=0.0,
                                  attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    off_init_(model, seed=1)
    return model
