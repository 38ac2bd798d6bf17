"""Tokenizers that work offline.

`get_tokenizer("gpt2")` builds tiktoken's `r50k_base` encoding (GPT-2's byte-pair encoding) from the
ranks file shipped inside this package; tiktoken checks the file against the same sha256 it checks when
it downloads it. Other names are handed to `tiktoken.get_encoding`, which needs the network the first
time; offline, that fails with an error saying so.
"""

from __future__ import annotations

import functools
from pathlib import Path

import tiktoken
from tiktoken.load import load_tiktoken_bpe

ASSETS = Path(__file__).parent / "assets"
ENDOFTEXT = "<|endoftext|>"

# Encodings shipped in assets/: name -> (ranks file, tiktoken's expected sha256, pattern, specials, n_vocab).
_GPT2 = ("gpt2.tiktoken", "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930",
         "r50k_pat_str", {ENDOFTEXT: 50256}, 50257)
_SHIPPED = {"gpt2": _GPT2, "r50k_base": _GPT2}


@functools.cache
def get_tokenizer(name: str = "gpt2") -> tiktoken.Encoding:
    """A `tiktoken.Encoding` by name; `gpt2` (= `r50k_base`) is shipped and needs no network."""
    if name in _SHIPPED:
        return _from_shipped(name)
    try:
        return tiktoken.get_encoding(name)
    except ValueError:
        raise ValueError(
            f"unknown encoding {name!r}; shipped offline: {sorted(_SHIPPED)}; "
            f"tiktoken knows {tiktoken.list_encoding_names()}"
        ) from None
    except Exception as e:  # network errors come in many types (requests, urllib3, OSError)
        raise RuntimeError(
            f"encoding {name!r} is not shipped with gpt_core, and tiktoken could not download its "
            f"ranks file ({type(e).__name__}: {e}); are you offline? Shipped offline: {sorted(_SHIPPED)}"
        ) from e


def _from_shipped(name: str) -> tiktoken.Encoding:
    from tiktoken_ext import openai_public  # tiktoken's own regex patterns

    filename, sha256, pattern, specials, n_vocab = _SHIPPED[name]
    path = ASSETS / filename
    try:
        ranks = load_tiktoken_bpe(str(path), expected_hash=sha256)
    except ValueError as e:
        raise ValueError(f"the shipped ranks file {path} fails tiktoken's sha256 check: {e}") from None
    return tiktoken.Encoding(name=name, pat_str=getattr(openai_public, pattern), mergeable_ranks=ranks,
                             special_tokens=specials, explicit_n_vocab=n_vocab)


def encode(text: str, name: str = "gpt2", *, allow_endoftext: bool = True) -> list[int]:
    """Encode `text`; `<|endoftext|>` in the text becomes its special id when allowed."""
    enc = get_tokenizer(name)
    return enc.encode(text, allowed_special={ENDOFTEXT} if allow_endoftext else set())
