"""`python -m jax_gpt.generate --checkpoint DIR_OR_NAME --prompt TEXT [--prompt TEXT ...]`: print each prompt's
continuation (several prompts go in one batch)."""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np

from gpt_core.generation import build_parser, continuations, encode_prompts
from jax_gpt.generation import generate
from jax_gpt.model import ATTN_IMPLS, GPTModel

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser("python -m jax_gpt.generate", ATTN_IMPLS, "xla")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="compute dtype")
    args = parser.parse_args(argv)
    try:
        model = GPTModel.from_pretrained(args.checkpoint, attn_impl=args.attn_impl, dtype=DTYPES[args.dtype])
        enc, prompts = encode_prompts(args, model.config.vocab_size)
        eos = enc.eot_token if args.stop_at_eos else None
        out = generate(model, prompts, args.max_new_tokens, args.temperature, args.top_k, args.top_p, eos_id=eos,
                       key=jax.random.key(args.seed), use_cache=not args.no_cache)
    except (ValueError, RuntimeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    width = max(len(p) for p in prompts)
    print(continuations(enc, args.prompt, np.asarray(out)[:, width:].tolist(), eos))
    return 0


if __name__ == "__main__":
    sys.exit(main())
