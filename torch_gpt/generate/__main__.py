"""`python -m torch_gpt.generate --checkpoint DIR_OR_NAME --prompt TEXT`: print a prompt's continuation."""

from __future__ import annotations

import sys

import torch

from gpt_core.generation import build_parser, encode_prompt
from torch_gpt.generation import generate
from torch_gpt.model import ATTN_IMPLS, GPTModel


def main(argv: list[str] | None = None) -> int:
    parser = build_parser("python -m torch_gpt.generate", ATTN_IMPLS, "sdpa")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    args = parser.parse_args(argv)
    try:
        model = GPTModel.from_pretrained(args.checkpoint, attn_impl=args.attn_impl, device=args.device)
        enc, ids = encode_prompt(args, model.config.vocab_size)
        gen = torch.Generator(device=args.device).manual_seed(args.seed)
        out = generate(model, torch.tensor([ids], device=args.device), args.max_new_tokens, args.temperature,
                       args.top_k, args.top_p, eos_id=enc.eot_token if args.stop_at_eos else None,
                       use_cache=not args.no_cache, generator=gen)
    except (ValueError, RuntimeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(args.prompt + enc.decode(out[0, len(ids):].tolist()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
