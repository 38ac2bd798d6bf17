"""Token shards in llm.c's format, and the dataset folders that hold them.

A shard is a 1024-byte header of 256 little-endian int32 (header[0] magic, header[1] version, header[2] the
token count; the rest zero) followed by the tokens:

    magic 20240520, version 1: uint16 tokens (vocabularies of at most 65,536 ids: gpt2)
    magic 20240801, version 7: uint32 tokens (larger vocabularies: cl100k_base; llm.c's llama-3 format)

exactly as llm.c's `dev/data/data_common.py` writes them and `llmc/dataloader.h` / modded-nanogpt read them.
A dataset is a folder of shards named `{prefix}_val_000000.bin`, `{prefix}_train_000001.bin`, ... (llm.c's
convention; `{prefix}_train.bin` / `{prefix}_val.bin` without an index load too). A folder written by
`python -m gpt_core.data prepare` also has a `manifest.json`: the tokenizer's name and the sha256 of its
ranks file (of the vocabulary JSON for word tokenizers), the shards and their token counts. A folder of
llm.c / modded-nanogpt shards has no manifest and no tokenizer record; llm.c writes its uint16 shards with
GPT-2's tokenizer, so such a folder opens with a tokenizer whose ranks are GPT-2's and is refused with any
other (its token ids would silently mean other words).

Opening a dataset reads only the headers, and `TokenSplit.read` reads only the tokens asked for (positional
reads; `open_shard` gives a shard as an `np.memmap`), so memory does not grow with the corpus.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np

__all__ = [
    "FORMATS", "HEADER_BYTES", "INCOMPLETE_MARKER", "MANIFEST", "MANIFEST_FORMAT", "MAX_SHARD_TOKENS",
    "ShardError", "ShardHeader", "ShardWriter", "TokenDataset", "TokenSplit", "is_token_dataset", "open_dataset",
    "open_shard", "ranks_sha256", "read_header", "shard_name", "token_dtype", "tokenizer_identity", "write_shard",
]

HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
# (magic, version) -> token dtype, as llm.c's HEADERS_INFO ("gpt-2", "llama-3").
FORMATS = {(20240520, 1): np.dtype(np.uint16), (20240801, 7): np.dtype(np.uint32)}
MAX_SHARD_TOKENS = 2**31 - 1  # header[2] is an int32
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "gpt_core.shards"
MANIFEST_VERSION = 1
# Written by prepare before its first shard and removed after its manifest: a folder that has it and no
# manifest is an unfinished prepare, never a dataset.
INCOMPLETE_MARKER = ".prepare-incomplete"
# llm.c's names: fineweb_train_000001.bin, fineweb_val_000000.bin, tiny_shakespeare_val.bin.
SHARD_NAME = re.compile(r"^(?P<prefix>.+)_(?P<split>train|val)(?:_(?P<index>\d+))?\.bin$")


class ShardError(ValueError):
    """A shard or dataset folder that cannot be read as it claims to be; the message names the file."""


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id of a `vocab_size` vocabulary fits in it, else uint32."""
    if not 1 <= vocab_size <= 2**32:
        raise ValueError(f"vocab_size must be in [1, 2**32], got {vocab_size}")
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def header_format(dtype: np.dtype) -> tuple[int, int]:
    """(magic, version) of the shards holding `dtype` tokens."""
    return next(mv for mv, dt in FORMATS.items() if dt == dtype)


def shard_name(prefix: str, split: str, index: int) -> str:
    """`{prefix}_{split}_{index:06d}.bin`, llm.c's naming."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    return f"{prefix}_{split}_{index:06d}.bin"


# ------------------------------------------------------------------------------------------------ writing
def fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some platforms cannot open a directory; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class ShardWriter:
    """Streams tokens into one shard: written under a temporary name, fsynced, renamed on `close()`.

    Memory stays that of one `write` call however large the shard. `close(rename=False)` leaves the finished
    shard under its temporary name (`tmp_path`) for a caller that renames a set of shards at once; leaving
    the `with` block by an exception deletes the temporary file.
    """

    def __init__(self, path: str | Path, *, vocab_size: int):
        self.path = Path(path)
        self.dtype = token_dtype(vocab_size)
        self.vocab_size = vocab_size
        self.tmp_path = self.path.with_name(f".{self.path.name}.tmp")
        self.n_tokens = 0
        self._file = open(self.tmp_path, "wb")  # closed by close() or abort()
        try:
            self._file.write(bytes(HEADER_BYTES))  # the count is written by close()
        except BaseException:
            self.abort()
            raise

    def write(self, tokens: np.ndarray) -> None:
        tokens = np.asarray(tokens)
        if tokens.ndim != 1:
            raise ValueError(f"{self.path}: tokens must be 1-D, got shape {tokens.shape}")
        if tokens.size == 0:
            return
        if tokens.dtype.kind not in "iu":
            raise ValueError(f"{self.path}: tokens must be integers, got {tokens.dtype}")
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or hi >= self.vocab_size:
            raise ValueError(f"{self.path}: token ids must be in [0, {self.vocab_size}), got [{lo}, {hi}]")
        if self.n_tokens + tokens.size > MAX_SHARD_TOKENS:
            raise ValueError(f"{self.path}: a shard holds at most {MAX_SHARD_TOKENS:,} tokens (an int32 count)")
        self._file.write(np.ascontiguousarray(tokens, dtype=self.dtype.newbyteorder("<")).data)
        self.n_tokens += tokens.size

    def close(self, rename: bool = True) -> Path:
        if self.n_tokens == 0:
            self.abort()
            raise ValueError(f"{self.path}: a shard needs at least one token")
        header = np.zeros(HEADER_INTS, dtype="<i4")
        header[0], header[1] = header_format(self.dtype)
        header[2] = self.n_tokens
        self._file.seek(0)
        self._file.write(header.tobytes())
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        if not rename:
            return self.tmp_path
        os.replace(self.tmp_path, self.path)
        fsync_dir(self.path.parent)
        return self.path

    def abort(self) -> None:
        self._file.close()
        self.tmp_path.unlink(missing_ok=True)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._file.closed:
            self.close()


def write_shard(path: str | Path, tokens: np.ndarray, *, vocab_size: int) -> Path:
    """Write `tokens` (1-D ids in [0, vocab_size)) as one shard, atomically: temporary name, fsync, rename.

    uint16 tokens (magic 20240520, version 1) when vocab_size <= 65,536, else uint32 (20240801, version 7).
    """
    with ShardWriter(path, vocab_size=vocab_size) as w:
        w.write(tokens)
        return w.close()


# ------------------------------------------------------------------------------------------------ reading
@dataclasses.dataclass(frozen=True)
class ShardHeader:
    path: Path
    magic: int
    version: int
    n_tokens: int

    @property
    def dtype(self) -> np.dtype:
        return FORMATS[(self.magic, self.version)]


def read_header(path: str | Path) -> ShardHeader:
    """The validated header of a shard: known magic and version, a token count that matches the file size."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"shard {path} does not exist")
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise ShardError(f"{path}: truncated: {size} bytes, shorter than the {HEADER_BYTES}-byte shard header")
    with open(path, "rb") as f:
        header = np.frombuffer(f.read(HEADER_BYTES), dtype="<i4")
    magic, version, n = (int(v) for v in header[:3])
    if (magic, version) not in FORMATS:
        known = ", ".join(f"magic {m} version {v} ({dt.name})" for (m, v), dt in FORMATS.items())
        raise ShardError(f"{path}: not a token shard of a known format: magic {magic} version {version} "
                         f"(known: {known})")
    dtype = FORMATS[(magic, version)]
    if n <= 0:
        raise ShardError(f"{path}: its header counts {n} tokens; a shard holds at least one")
    expected = HEADER_BYTES + n * dtype.itemsize
    if size != expected:
        what = "truncated" if size < expected else "longer than its header says"
        raise ShardError(f"{path}: {what}: the header counts {n:,} {dtype.name} tokens ({expected:,} bytes with "
                         f"the header) but the file has {size:,} bytes")
    return ShardHeader(path, magic, version, n)


def open_shard(path: str | Path) -> np.memmap:
    """The tokens of a validated shard as a read-only 1-D memmap (uint16 or uint32); nothing is read yet."""
    h = read_header(path)
    return np.memmap(h.path, dtype=h.dtype.newbyteorder("<"), mode="r", offset=HEADER_BYTES, shape=(h.n_tokens,))


class TokenSplit:
    """The shards of one split, concatenated virtually in file order.

    Headers are validated when the split is built. `read` copies tokens with positional reads (`os.pread`) of
    just the bytes asked for, not through a memory map: on recent Linux kernels a page fault in a file map
    maps the whole large folio of page cache around it, often a megabyte, so random windows read through
    `np.memmap` grow the process's resident memory by about that much each (measured: +145 MB for 160
    windows of a 100M-token shard on Linux 6.18). Where `os.pread` is missing, a memmap is used instead.
    """

    def __init__(self, paths: list[str | Path] | list[Path]):
        if not paths:
            raise ValueError("a split needs at least one shard")
        self.paths = [Path(p) for p in paths]
        headers = [read_header(p) for p in self.paths]
        dtypes = {h.dtype for h in headers}
        if len(dtypes) > 1:
            kinds = ", ".join(f"{h.path.name}: {h.dtype.name}" for h in headers)
            raise ShardError(f"shards of one split mix token widths ({kinds}): were they written with different "
                             "tokenizers?")
        self.dtype = headers[0].dtype
        self.counts = np.array([h.n_tokens for h in headers], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.counts)])  # starts[i]: global position of shard i
        self._files: list[int | np.memmap | None] = [None] * len(self.paths)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __repr__(self) -> str:
        return f"TokenSplit({len(self.paths)} shards, {len(self):,} {self.dtype.name} tokens)"

    def __getstate__(self) -> dict:  # open files stay with their process
        return {**self.__dict__, "_files": [None] * len(self.paths)}

    def __del__(self) -> None:
        self.close()

    def close(self) -> None:
        """Close the shards' files (reading again reopens them)."""
        for i, f in enumerate(getattr(self, "_files", [])):
            if isinstance(f, int):
                os.close(f)
            self._files[i] = None

    def _copy(self, i: int, offset: int, out: np.ndarray) -> None:
        """out[:] = tokens [offset, offset + len(out)) of shard i."""
        f = self._files[i]
        if f is None:
            f = self._files[i] = os.open(self.paths[i], os.O_RDONLY) if hasattr(os, "pread") else open_shard(
                self.paths[i])
        if isinstance(f, np.memmap):
            out[:] = f[offset:offset + len(out)]
            return
        size = self.dtype.itemsize
        buf = os.pread(f, len(out) * size, HEADER_BYTES + offset * size)
        if len(buf) != len(out) * size:
            raise ShardError(f"{self.paths[i]}: shorter than its header said when it was opened (changed since?)")
        out[:] = np.frombuffer(buf, dtype=self.dtype.newbyteorder("<"))

    def _shard_of(self, pos: int) -> int:
        return int(np.searchsorted(self.starts, pos, side="right")) - 1

    def read(self, start: int, n: int) -> np.ndarray:
        """Tokens [start, start + n) as int64, across shard boundaries; reads only those n tokens."""
        start, n = int(start), int(n)
        if n < 0 or start < 0 or start + n > len(self):
            raise IndexError(f"tokens [{start}, {start + n}) are outside this split's [0, {len(self)})")
        out = np.empty(n, dtype=np.int64)
        done, i = 0, self._shard_of(start) if n else 0
        while done < n:
            offset = start + done - int(self.starts[i])
            take = min(n - done, int(self.counts[i]) - offset)
            self._copy(i, offset, out[done:done + take])
            done += take
            i += 1
        return out

    def locate(self, pos: int) -> tuple[Path, int]:
        """(shard file, token offset in it) of the split's token `pos`, for error messages."""
        pos = int(pos)
        if not 0 <= pos < len(self):
            raise IndexError(f"token {pos} is outside this split's [0, {len(self)})")
        i = self._shard_of(pos)
        return self.paths[i], pos - int(self.starts[i])


@dataclasses.dataclass
class TokenDataset:
    """A dataset folder: its training split, its validation split (None without a val shard), its manifest."""

    root: Path
    train: TokenSplit
    val: TokenSplit | None
    manifest: dict | None  # None for a folder of llm.c / modded-nanogpt shards
    tokenizer_name: str | None  # the manifest's record; None without a manifest

    def describe(self) -> str:
        val = f", {len(self.val):,} validation tokens" if self.val is not None else ", no validation shard"
        kind = f"tokenizer {self.tokenizer_name}" if self.manifest else "llm.c shards, no manifest"
        return (f"{self.root}: {len(self.train):,} training tokens in {len(self.train.paths)} shard(s){val} "
                f"({kind})")


def is_token_dataset(path: str | Path) -> bool:
    """True for a directory: the trainers read `--data DIR` as a token dataset and `--data FILE` as text."""
    return Path(path).is_dir()


# ------------------------------------------------------------------------------------------- tokenizers
@functools.cache
def _file_sha256(path: Path, size: int, mtime_ns: int) -> str:  # size and mtime: a changed file hashes again
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_sha256(path: str | Path) -> str:
    st = Path(path).stat()
    return _file_sha256(Path(path).resolve(), st.st_size, st.st_mtime_ns)


def tokenizer_identity(spec: str) -> tuple[str, str]:
    """(name, sha256 of its ranks file) for a tokenizer spec as `get_tokenizer` takes it.

    Shipped encodings (gpt2 = r50k_base, cl100k_base): the sha256 of their file in gpt_core/assets, the one
    tiktoken checks. word:VOCAB.json: the sha256 of that JSON file. Other tiktoken encodings: the sha256 of
    their ranks serialised in tiktoken's file format (base64 token, space, rank, newline, in rank order),
    which equals the sha256 of tiktoken's own ranks file (checked for the shipped ones in the tests).
    """
    from gpt_core.tokenizer import ASSETS, SHIPPED, get_tokenizer

    if spec.startswith("word:"):
        path = Path(spec.removeprefix("word:"))
        if not path.is_file():
            raise FileNotFoundError(f"word vocabulary {path} does not exist")
        return spec, file_sha256(path)
    if spec in SHIPPED:
        path = ASSETS / SHIPPED[spec][1]
        if not path.is_file():
            raise FileNotFoundError(f"the ranks file of {spec!r} is missing: {path}")
        return spec, file_sha256(path)
    return spec, ranks_sha256(get_tokenizer(spec))


def ranks_sha256(encoding) -> str:
    """sha256 of a tiktoken encoding's ranks written in tiktoken's file format (its ranks file's hash)."""
    ranks = getattr(encoding, "_mergeable_ranks", None)
    if ranks is None:
        raise ValueError(f"cannot hash the ranks of tokenizer {getattr(encoding, 'name', encoding)!r}")
    h = hashlib.sha256()
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        h.update(base64.b64encode(token) + b" " + str(rank).encode() + b"\n")
    return h.hexdigest()


# ------------------------------------------------------------------------------------------ dataset folders
def _check_tokenizer(root: Path, recorded: dict, tokenizer: str) -> None:
    name, sha = tokenizer_identity(tokenizer)
    if recorded.get("sha256") != sha:
        raise ShardError(
            f"{root} was prepared with tokenizer {recorded.get('name')!r} (ranks sha256 "
            f"{str(recorded.get('sha256'))[:12]}…) but the tokenizer given is {name!r} (ranks sha256 {sha[:12]}…): "
            f"its token ids would mean other words. Pass --tokenizer {recorded.get('name')} or prepare the corpus "
            f"again with --tokenizer {name}")


def _open_manifest(root: Path, tokenizer: str) -> TokenDataset:
    path = root / MANIFEST
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ShardError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(m, dict) or m.get("format") != MANIFEST_FORMAT:
        raise ShardError(f"{path} is not a manifest written by `python -m gpt_core.data prepare` "
                         f"(no \"format\": \"{MANIFEST_FORMAT}\")")
    if m.get("version") != MANIFEST_VERSION:
        raise ShardError(f"{path}: manifest version {m.get('version')!r}; this gpt_core reads version "
                         f"{MANIFEST_VERSION}")
    try:
        tok, shards = m["tokenizer"], m["shards"]
        entries = [(s["file"], s["split"], int(s["tokens"])) for s in shards]
    except (KeyError, TypeError, ValueError) as e:
        raise ShardError(f"{path}: malformed manifest ({type(e).__name__}: {e})") from None
    _check_tokenizer(root, tok, tokenizer)
    splits: dict[str, list[Path]] = {"train": [], "val": []}
    for file, split, count in entries:
        if split not in splits:
            raise ShardError(f"{path}: shard {file} has split {split!r}; expected 'train' or 'val'")
        p = root / file
        if not p.is_file():
            raise ShardError(f"{p} is listed in {path} but missing")
        n = read_header(p).n_tokens
        if n != count:
            raise ShardError(f"{p} holds {n:,} tokens but {path} lists {count:,}: the folder was changed after "
                             "it was prepared")
        splits[split].append(p)
    if not splits["train"]:
        raise ShardError(f"{path} lists no training shards")
    return TokenDataset(root, TokenSplit(splits["train"]), TokenSplit(splits["val"]) if splits["val"] else None,
                        m, tok.get("name"))


def _open_llmc(root: Path, tokenizer: str) -> TokenDataset:
    found = [(SHARD_NAME.match(p.name), p) for p in sorted(root.iterdir()) if p.is_file()]
    found = [(m, p) for m, p in found if m]
    if (root / INCOMPLETE_MARKER).exists():
        raise ShardError(f"{root} holds an unfinished `python -m gpt_core.data prepare` (it has "
                         f"{INCOMPLETE_MARKER} and no {MANIFEST}): run the same prepare command again to finish it")
    if not found:
        raise ShardError(f"{root} holds no token shards: expected a {MANIFEST} (from `python -m gpt_core.data "
                         "prepare`) or llm.c shards named *_train_*.bin and *_val_*.bin")
    prefixes = sorted({m["prefix"] for m, _ in found})
    if len(prefixes) > 1:
        raise ShardError(f"{root} holds shards of several datasets (prefixes {', '.join(prefixes)}); "
                         "keep one dataset per folder")
    train = [p for m, p in found if m["split"] == "train"]
    val = [p for m, p in found if m["split"] == "val"]
    if not train:
        raise ShardError(f"{root} has validation shards but no training shards (*_train_*.bin)")
    # No manifest, no tokenizer record: llm.c writes uint16 shards with GPT-2's tokenizer, so only that is safe.
    gpt2 = tokenizer_identity("gpt2")[1]
    name, sha = tokenizer_identity(tokenizer)
    if sha != gpt2:
        raise ShardError(f"{root} holds llm.c shards without a {MANIFEST}: they carry no tokenizer record and llm.c "
                         f"writes them with GPT-2's tokenizer, so they open only with --tokenizer gpt2, not "
                         f"{name!r}. For another tokenizer, prepare the corpus with `python -m gpt_core.data prepare`")
    split = TokenSplit(train)
    if split.dtype != np.uint16:
        raise ShardError(f"{root}: its shards hold {split.dtype.name} tokens (llm.c's llama-3 format), which GPT-2's "
                         "tokenizer never writes; this folder was not tokenised with gpt2")
    return TokenDataset(root, split, TokenSplit(val) if val else None, None, None)


def open_dataset(path: str | Path, tokenizer: str) -> TokenDataset:
    """Open a dataset folder for a run with `tokenizer` (a spec as `get_tokenizer` takes it).

    A folder with `manifest.json` opens when the tokenizer's ranks sha256 equals the one recorded, and every
    listed shard exists with its listed count. A folder of llm.c shards (no manifest) opens with gpt2 only.
    Every header is validated; no token is read.
    """
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"dataset folder {root} does not exist")
    if not root.is_dir():
        raise ShardError(f"{root} is a file; a token dataset is a folder of shards (see `python -m gpt_core.data "
                         "prepare --help`)")
    if (root / MANIFEST).is_file():
        return _open_manifest(root, tokenizer)
    return _open_llmc(root, tokenizer)
