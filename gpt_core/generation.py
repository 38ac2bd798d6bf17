"""What torch_gpt and jax_gpt generation share, framework-free: argument checks and the CLI's flags."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import numpy as np

from gpt_core.cli import HelpFormatter
from gpt_core.tokenizer import Tokenizer, check_vocab_size, encode_text, get_tokenizer


def check_sampling_args(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def build_parser(prog: str, attn_impls: tuple[str, ...], default_attn: str) -> argparse.ArgumentParser:
    """The generation CLIs' shared flags; each adds its framework's own (device, dtype) after this."""
    p = argparse.ArgumentParser(
        prog=prog, formatter_class=HelpFormatter,
        description="Continue a text prompt with a GPT checkpoint: a directory with config.json and "
                    "model.safetensors (ours, or one written by transformers' save_pretrained), or a Hugging Face "
                    "Hub GPT-2 repository id such as gpt2 or openai-community/gpt2-medium (read through the local "
                    "Hub cache; HF_HUB_OFFLINE=1 reads only the cache).")
    p.add_argument("--checkpoint", "--init-from", dest="checkpoint", required=True, metavar="DIR_OR_NAME",
                   help="checkpoint directory or Hugging Face Hub repository id")
    p.add_argument("--prompt", required=True, action="append",
                   help="text to continue (repeatable: the prompts go in one batch, each continued as if alone)")
    p.add_argument("--max-new-tokens", type=int, default=50, help="tokens to add")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None, help="sample only among the k most likely")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold in (0, 1]")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole window every step")
    p.add_argument("--stop-at-eos", action="store_true", help="stop at <|endoftext|>")
    p.add_argument("--attn-impl", default=default_attn, choices=attn_impls, help="attention implementation")
    p.add_argument("--tokenizer", default="gpt2", help="gpt2, cl100k_base or word:VOCAB.json")
    return p


def encode_prompts(args: argparse.Namespace, vocab_size: int) -> tuple[Tokenizer, list[list[int]]]:
    """The tokenizer and each `--prompt`'s ids, checked against the model's vocabulary."""
    check_sampling_args(args.temperature, args.top_k, args.top_p)
    tokenizer = get_tokenizer(args.tokenizer)
    check_vocab_size(vocab_size, tokenizer)
    prompts = [encode_text(tokenizer, text) for text in args.prompt]
    for i, ids in enumerate(prompts):
        if not ids:
            raise ValueError("the prompt encodes to no tokens" if len(prompts) == 1 else
                             f"prompt {i + 1} ({args.prompt[i]!r}) encodes to no tokens")
    return tokenizer, prompts


def pad_prompts(prompts: Sequence[Sequence[int]] | np.ndarray, vocab_size: int, *,
                lengths: Sequence[int] | np.ndarray | None = None, pad_id: int = 0) -> tuple[np.ndarray, list[int]]:
    """(B, T) int64 left-padded ids and the B prompt lengths, checked on the host before any model runs.

    From a list of id lists (padded on the left with `pad_id` to the longest, as transformers pads for generation),
    or from a (B, T) integer array whose row b holds its prompt in its last lengths[b] columns (all T without
    `lengths`; what is before is replaced by `pad_id`). ValueError names a bad id and where it is, an empty prompt,
    or lengths that do not fit the array.
    """
    if hasattr(prompts, "ndim"):  # an array: numpy, or anything numpy reads
        a = np.asarray(prompts)
        if a.ndim != 2:
            raise ValueError(f"idx must be (batch, seq_len) token ids, got shape {a.shape}")
        if not np.issubdtype(a.dtype, np.integer):
            raise ValueError(f"idx must hold integer token ids, got dtype {a.dtype}")
        B, T = a.shape
        if B == 0 or T == 0:
            raise ValueError(f"the prompt batch {a.shape} holds no tokens (a prompt of length 0?)")
        lens = [T] * B if lengths is None else check_lengths(lengths, B, T)
        real = np.arange(T)[None, :] >= (T - np.asarray(lens))[:, None]  # (B, T)
        bad = np.argwhere(real & ((a < 0) | (a >= vocab_size)))
        if len(bad):
            b, j = bad[0]
            raise ValueError(f"token id {int(a[b, j])} is outside [0, {vocab_size}) (row {b}, position {j})")
        return np.where(real, a, pad_id).astype(np.int64), lens
    if lengths is not None:
        raise ValueError("lengths go with a padded array; a list of prompts has its own")
    rows = [list(p) for p in prompts]
    if not rows:
        raise ValueError("no prompts")
    for b, row in enumerate(rows):
        if not row:
            raise ValueError(f"prompt {b} is empty: a prompt needs at least one token")
        for j, t in enumerate(row):
            if isinstance(t, bool) or not isinstance(t, int | np.integer):
                raise ValueError(f"prompt {b} holds {t!r} at position {j}: token ids are integers")
            if not 0 <= t < vocab_size:
                raise ValueError(f"token id {t} is outside [0, {vocab_size}) (prompt {b}, position {j})")
    T = max(len(r) for r in rows)
    return np.array([[pad_id] * (T - len(r)) + r for r in rows], dtype=np.int64), [len(r) for r in rows]


def check_lengths(lengths: Sequence[int] | np.ndarray, batch: int, width: int) -> list[int]:
    """`lengths` as B ints, each in [1, width] (the padded width), or ValueError."""
    lens = [int(n) for n in np.asarray(lengths).reshape(-1)]
    if len(lens) != batch:
        raise ValueError(f"{len(lens)} lengths for a batch of {batch} prompts")
    for b, n in enumerate(lens):
        if not 1 <= n <= width:
            raise ValueError(f"prompt {b} has length {n}: lengths must be in [1, {width}] (the padded width)")
    return lens


def continuations(tokenizer: Tokenizer, texts: list[str], new_ids: list[list[int]], eos_id: int | None) -> str:
    """What the CLIs print: each prompt's text and its decoded new tokens (up to and including its first `eos_id`),
    prompts apart by a line of dashes."""
    outs = []
    for text, ids in zip(texts, new_ids, strict=True):
        if eos_id is not None and eos_id in ids:
            ids = ids[:ids.index(eos_id) + 1]
        outs.append(text + tokenizer.decode(ids))
    return "\n---\n".join(outs)
