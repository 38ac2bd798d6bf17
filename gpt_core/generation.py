"""What torch_gpt and jax_gpt generation share, framework-free: argument checks and the CLI's flags."""

from __future__ import annotations

import argparse

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
    p.add_argument("--prompt", required=True, help="text to continue")
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


def encode_prompt(args: argparse.Namespace, vocab_size: int) -> tuple[Tokenizer, list[int]]:
    """The tokenizer and the prompt's ids, checked against the model's vocabulary."""
    check_sampling_args(args.temperature, args.top_k, args.top_p)
    tokenizer = get_tokenizer(args.tokenizer)
    check_vocab_size(vocab_size, tokenizer)
    ids = encode_text(tokenizer, args.prompt)
    if not ids:
        raise ValueError("the prompt encodes to no tokens")
    return tokenizer, ids
