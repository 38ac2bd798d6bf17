"""`python -m torch_gpt.generate --checkpoint DIR --prompt TEXT`: print a prompt's continuation."""

from __future__ import annotations

import argparse
import sys

import torch

from torch_gpt.generation import check_sampling_args, generate
from torch_gpt.model import ATTN_IMPLS, GPTModel


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m torch_gpt.generate",
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
    parser.add_argument("--attn-impl", default="sdpa", choices=ATTN_IMPLS)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tokenizer", default="gpt2", help="gpt2 (default), cl100k_base or word:VOCAB.json")
    args = parser.parse_args(argv)

    from gpt_core.tokenizer import check_vocab_size, encode_text, get_tokenizer

    try:
        check_sampling_args(args.temperature, args.top_k, args.top_p)
        model = GPTModel.from_pretrained(args.checkpoint, attn_impl=args.attn_impl, device=args.device)
        enc = get_tokenizer(args.tokenizer)
        check_vocab_size(model.config.vocab_size, enc)
        ids = encode_text(enc, args.prompt)
        if not ids:
            raise ValueError("the prompt encodes to no tokens")
        idx = torch.tensor([ids], device=args.device)
        gen = torch.Generator(device=args.device).manual_seed(args.seed)
        out = generate(model, idx, args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                       eos_id=enc.eot_token if args.stop_at_eos else None, use_cache=not args.no_cache,
                       generator=gen)
    except (ValueError, RuntimeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(args.prompt + enc.decode(out[0, len(ids):].tolist()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
