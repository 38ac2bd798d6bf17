"""Tokenizers that work offline: GPT-2 and cl100k_base byte-pair encodings, and the seed's word tokenizer.

`get_tokenizer(name)`:
- `"gpt2"` (= `"r50k_base"`) and `"cl100k_base"`: a `tiktoken.Encoding` built by tiktoken's own
  definition (pattern, special tokens) from the ranks file shipped in `gpt_core/assets`, checked by
  tiktoken against the sha256 it checks on download. A file that fails the check is refused.
- `"word:PATH.json"`: a `WordTokenizer` saved with `WordTokenizer.save`.
- any other name: handed to `tiktoken.get_encoding`, which downloads on first use; offline that fails
  with an error saying so.

`python -m gpt_core.tokenizer --help` shows ids and pieces of a text, or counts the tokens of a file.
"""

from __future__ import annotations

import functools
import threading
from pathlib import Path
from unittest import mock

import tiktoken
from tiktoken.load import load_tiktoken_bpe

from gpt_core.tokenizer.word import WordTokenizer

ASSETS = Path(__file__).resolve().parent.parent / "assets"
ENDOFTEXT = "<|endoftext|>"
# Encodings shipped in assets/: our name -> (tiktoken's name, file in assets/).
SHIPPED = {
    "gpt2": ("r50k_base", "gpt2.tiktoken"),
    "r50k_base": ("r50k_base", "gpt2.tiktoken"),
    "cl100k_base": ("cl100k_base", "cl100k_base.tiktoken"),
}
Tokenizer = tiktoken.Encoding | WordTokenizer
_LOCK = threading.Lock()

__all__ = ["ENDOFTEXT", "SHIPPED", "Tokenizer", "WordTokenizer", "check_vocab_size", "encode_text",
           "get_tokenizer", "load_shipped"]


@functools.cache
def get_tokenizer(name: str = "gpt2") -> Tokenizer:
    """A tokenizer by name (see the module docstring); shipped encodings need no network."""
    if name.startswith("word:"):
        return WordTokenizer.load(name.removeprefix("word:"))
    if name in SHIPPED:
        return load_shipped(name)
    try:
        return tiktoken.get_encoding(name)
    except ValueError:
        raise ValueError(
            f"unknown encoding {name!r}; shipped offline: {sorted(SHIPPED)} and word:VOCAB.json; "
            f"tiktoken knows {tiktoken.list_encoding_names()}"
        ) from None
    except Exception as e:  # network errors come in many types (requests, urllib3, OSError)
        raise RuntimeError(
            f"encoding {name!r} is not shipped with gpt_core, and tiktoken could not download its ranks "
            f"file ({type(e).__name__}: {e}); are you offline? Shipped offline: {sorted(SHIPPED)}"
        ) from e


def load_shipped(name: str, assets: Path = ASSETS) -> tiktoken.Encoding:
    """Build a shipped encoding with tiktoken's own constructor, reading the ranks file from `assets`.

    tiktoken's constructor names the download URL and the expected sha256; we hand it the local file
    instead of the URL, so tiktoken itself verifies the hash.
    """
    from tiktoken_ext import openai_public

    tiktoken_name, filename = SHIPPED[name]
    path = Path(assets) / filename
    if not path.is_file():
        raise FileNotFoundError(f"the ranks file of {name!r} is missing: {path}")

    def local_ranks(url: str, expected_hash: str | None = None) -> dict[bytes, int]:
        try:
            return load_tiktoken_bpe(str(path), expected_hash=expected_hash)
        except ValueError as e:
            raise ValueError(f"refusing {path}: it fails tiktoken's sha256 check for {tiktoken_name} "
                             f"(expected {expected_hash}): {e}") from None

    with _LOCK, mock.patch.object(openai_public, "load_tiktoken_bpe", local_ranks):
        spec = openai_public.ENCODING_CONSTRUCTORS[tiktoken_name]()
    return tiktoken.Encoding(**{**spec, "name": name})


def encode_text(tokenizer: Tokenizer, text: str) -> list[int]:
    """Encode a training text; a literal `<|endoftext|>` becomes the special token, not its characters."""
    if isinstance(tokenizer, WordTokenizer):
        return tokenizer.encode(text)
    return tokenizer.encode(text, allowed_special={ENDOFTEXT} & tokenizer.special_tokens_set)


def check_vocab_size(vocab_size: int, tokenizer: Tokenizer) -> None:
    """Raise unless a model with `vocab_size` outputs can represent every id of `tokenizer`."""
    if vocab_size < tokenizer.n_vocab:
        raise ValueError(f"the model's vocab_size {vocab_size} is smaller than the tokenizer's "
                         f"{tokenizer.n_vocab} ids ({tokenizer.name}); set vocab_size >= {tokenizer.n_vocab}")
