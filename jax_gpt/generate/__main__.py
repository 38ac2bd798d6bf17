"""`python -m jax_gpt.generate --checkpoint DIR_OR_NAME --prompt TEXT`: print a prompt's continuation."""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp

from gpt_core.generation import build_parser, encode_prompt
from jax_gpt.generation import generate
from jax_gpt.model import ATTN_IMPLS, GPTModel

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser("python -m jax_gpt.generate", ATTN_IMPLS, "xla")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="compute dtype")
    args = parser.parse_args(argv)
    try:
        model = GPTModel.from_pretrained(args.checkpoint, attn_impl=args.attn_impl, dtype=DTYPES[args.dtype])
        enc, ids = encode_prompt(args, model.config.vocab_size)
        out = generate(model, jnp.asarray([ids]), args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                       eos_id=enc.eot_token if args.stop_at_eos else None, key=jax.random.key(args.seed),
                       use_cache=not args.no_cache)
    except (ValueError, RuntimeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(args.prompt + enc.decode(out[0, len(ids):].tolist()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
