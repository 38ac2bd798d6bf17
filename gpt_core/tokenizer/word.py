"""The seed notebooks' word-level tokenizer, reproduced exactly (see shared data README values).

Text is split on `([,.:;?_!"()\']|--|\\s)`. The vocabulary is every piece of the corpus, blanks included
(the seed keeps `''`, `'\\n'` and `' '`, which sort first), sorted, then the specials. Encoding drops
blank pieces and maps unknown words to `<|unk|>` when that special exists. Decoding puts a space before
every token, then removes the spaces before punctuation, as the seed does.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

SPLIT = re.compile(r'([,.:;?_!"()\']|--|\s)')
PUNCT_SPACE = re.compile(r'\s+([,.:;?!"()\'])')
UNK = "<|unk|>"


class WordTokenizer:
    """Word-level tokenizer with a fixed vocabulary; `encode`/`decode`/`vocab`/`save`/`load`."""

    def __init__(self, tokens: Sequence[str], specials: Iterable[str] = ()):
        self.tokens = list(tokens)  # id -> token
        self.specials = tuple(specials)
        self.vocab = {t: i for i, t in enumerate(self.tokens)}  # token -> id
        if len(self.vocab) != len(self.tokens):
            raise ValueError("the vocabulary has duplicate tokens")
        missing = [s for s in self.specials if s not in self.vocab]
        if missing:
            raise ValueError(f"specials {missing} are not in the vocabulary")
        self.name = f"word({len(self.tokens)})"

    @classmethod
    def from_text(cls, text: str, specials: Sequence[str] = ("<|endoftext|>", "<|unk|>")) -> WordTokenizer:
        words = sorted(set(SPLIT.split(text)) - set(specials))
        return cls(words + list(specials), specials)

    @property
    def n_vocab(self) -> int:
        return len(self.tokens)

    @property
    def eot_token(self) -> int | None:
        return self.vocab.get("<|endoftext|>")

    def encode(self, text: str) -> list[int]:
        pieces = [p.strip() for p in SPLIT.split(text) if p.strip()]
        unk = self.vocab.get(UNK) if UNK in self.specials else None
        ids = []
        for p in pieces:
            i = self.vocab.get(p, unk)
            if i is None:
                raise ValueError(f"word {p!r} is not in the vocabulary and there is no {UNK} special")
            ids.append(i)
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        try:
            text = "".join(" " + self.tokens[i] for i in ids)
        except (IndexError, TypeError):
            bad = [i for i in ids if not (isinstance(i, int) and 0 <= i < len(self.tokens))]
            raise ValueError(f"token ids {bad[:5]} are outside [0, {len(self.tokens)})") from None
        return PUNCT_SPACE.sub(r"\1", text)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps({"type": "word", "tokens": self.tokens, "specials": list(self.specials)},
                                   ensure_ascii=False, indent=0) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | Path) -> WordTokenizer:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"word vocabulary {path} does not exist")
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"word vocabulary {path} is not valid JSON: {e}") from None
        if not isinstance(d, dict) or d.get("type") != "word" or "tokens" not in d:
            raise ValueError(f"{path} is not a word vocabulary saved by WordTokenizer.save")
        return cls(d["tokens"], d.get("specials", ()))
