"""`python -m gpt_core.tokenizer`: show how a text tokenizes, or count the tokens of a file."""

from __future__ import annotations

import argparse
import sys

from gpt_core.tokenizer import encode_text, get_tokenizer


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m gpt_core.tokenizer",
        description="Print the token ids of TEXT and its pieces joined by '|' (Hello|,| do| you), "
                    "or with --count, the number of tokens in a file.")
    p.add_argument("text", nargs="?", help="text to tokenize")
    p.add_argument("--encoding", default="gpt2",
                   help="gpt2 (default), cl100k_base, word:VOCAB.json, or another tiktoken name (needs network)")
    p.add_argument("--count", metavar="FILE", help="print the token count of FILE instead")
    args = p.parse_args(argv)
    if (args.text is None) == (args.count is None):
        p.error("give either TEXT or --count FILE")
    try:
        tok = get_tokenizer(args.encoding)
        if args.count is not None:
            with open(args.count, encoding="utf-8") as f:
                print(len(encode_text(tok, f.read())))
            return 0
        ids = encode_text(tok, args.text)
    except (ValueError, RuntimeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(ids)
    if hasattr(tok, "decode_single_token_bytes"):  # BPE: a piece may be part of a UTF-8 character
        pieces = [tok.decode_single_token_bytes(i).decode("utf-8", errors="replace") for i in ids]
    else:
        pieces = [tok.tokens[i] for i in ids]
    print("|".join(pieces))
    return 0


if __name__ == "__main__":
    sys.exit(main())
