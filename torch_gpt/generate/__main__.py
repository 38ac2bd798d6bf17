"""`python -m torch_gpt.generate --checkpoint DIR_OR_NAME --prompt TEXT [--prompt TEXT ...]`: print each prompt's
continuation (several prompts go in one batch)."""

from __future__ import annotations

import sys

import torch

from gpt_core.generation import build_parser, continuations, encode_prompts
from torch_gpt.generation import generate
from torch_gpt.model import ATTN_IMPLS, GPTModel


def main(argv: list[str] | None = None) -> int:
    parser = build_parser("python -m torch_gpt.generate", ATTN_IMPLS, "sdpa")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the prefill and decode step (CUDA graphs on a GPU): slow to start")
    args = parser.parse_args(argv)
    try:
        model = GPTModel.from_pretrained(args.checkpoint, attn_impl=args.attn_impl, device=args.device)
        enc, prompts = encode_prompts(args, model.config.vocab_size)
        gen = torch.Generator(device=args.device).manual_seed(args.seed)
        eos = enc.eot_token if args.stop_at_eos else None
        out = generate(model, prompts, args.max_new_tokens, args.temperature, args.top_k, args.top_p, eos_id=eos,
                       use_cache=not args.no_cache, generator=gen, compile=args.compile)
    except (ValueError, RuntimeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    width = max(len(p) for p in prompts)
    print(continuations(enc, args.prompt, out[:, width:].tolist(), eos))
    return 0


if __name__ == "__main__":
    sys.exit(main())
