"""`python -m jax_gpt.generate --checkpoint DIR --prompt TEXT`: print a prompt's continuation."""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp

from jax_gpt.generation import check_sampling_args, generate
from jax_gpt.model import ATTN_IMPLS, GPTModel

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jax_gpt.generate",
        description="Continue a text prompt with a GPT checkpoint (a directory with config.json and "
                    "model.safetensors, ours or one written by transformers' save_pretrained).")
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory")
    parser.add_argument("--prompt", required=True, help="text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=50, help="tokens to add (default 50)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-k", type=int, default=None, help="sample only among the k most likely")
    parser.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold in (0, 1]")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    parser.add_argument("--no-cache", action="store_true", help="recompute the whole window every step")
    parser.add_argument("--stop-at-eos", action="store_true", help="stop at <|endoftext|>")
    parser.add_argument("--attn-impl", default="xla", choices=ATTN_IMPLS)
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="compute dtype")
    parser.add_argument("--tokenizer", default="gpt2", help="tiktoken encoding (default gpt2, shipped)")
    args = parser.parse_args(argv)

    from gpt_core.tokenizer import get_tokenizer

    try:
        check_sampling_args(args.temperature, args.top_k, args.top_p)
        model = GPTModel.from_pretrained(args.checkpoint, attn_impl=args.attn_impl, dtype=DTYPES[args.dtype])
        enc = get_tokenizer(args.tokenizer)
        ids = enc.encode(args.prompt, allowed_special="all")
        if not ids:
            raise ValueError("the prompt encodes to no tokens")
        out = generate(model, jnp.asarray([ids]), args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                       eos_id=enc.eot_token if args.stop_at_eos else None, key=jax.random.key(args.seed),
                       use_cache=not args.no_cache)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(args.prompt + enc.decode(out[0, len(ids):].tolist()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
