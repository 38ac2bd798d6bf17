"""`python -m gpt_core.data prepare`: tokenise a corpus once into llm.c token shards with a manifest.

Inputs, in the order given (folders recursed in sorted order, globs expanded in sorted order):
- `*.txt`: one document per file; `*.jsonl`: one document per line, its text under `--text-key`;
  the `.gz` versions of both;
- a folder saved by Hugging Face `datasets` (`Dataset.save_to_disk` / `DatasetDict.save_to_disk`: it holds
  `dataset_info.json` and `state.json`, or `dataset_dict.json`): one document per row of the `--text-key`
  column (split `--hf-split` of a DatasetDict). `datasets` is imported only for such an input.

Every document's tokens are followed by the tokenizer's end-of-text token. The first `--val-tokens` tokens
of the stream form the validation shard `{prefix}_val_000000.bin` (as llm.c's fineweb.py takes its shard 0;
the cut is exact, so one document may straddle it); the rest form `{prefix}_train_000001.bin`, ... of
`--shard-tokens` tokens each, the last one shorter. Documents are tokenised in batches by `--workers`
processes and written in input order, so the shards do not depend on the number of workers. Memory holds a
few batches in flight, never the corpus (one document is the unit: a 1 GB .txt file is read whole).

Crash safety: the folder first gets a `.prepare-incomplete` marker; shards are written under temporary
names and renamed only when the whole corpus is done, then `manifest.json` is written (temporary name,
fsync, rename) and the marker removed. An interrupted run leaves no manifest and the marker, which
`open_dataset` refuses; running the same command again starts that folder over and finishes it.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import glob
import gzip
import json
import os
import signal
import sys
import time
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from gpt_core.cli import HelpFormatter
from gpt_core.shards import (
    INCOMPLETE_MARKER,
    MANIFEST,
    MANIFEST_FORMAT,
    MANIFEST_VERSION,
    MAX_SHARD_TOKENS,
    SHARD_NAME,
    ShardWriter,
    fsync_dir,
    header_format,
    open_dataset,
    shard_name,
    token_dtype,
    tokenizer_identity,
)

__all__ = ["PrepareError", "Source", "iter_documents", "main", "prepare", "resolve_inputs"]

DEFAULT_SHARD_TOKENS = 10**8
DEFAULT_VAL_TOKENS = 10**6
BATCH_CHARS = 1 << 20  # text sent to a worker at once: large enough to hide the IPC, small enough to pipeline
INFLIGHT_PER_WORKER = 3  # batches queued per worker: bounds memory, keeps workers busy while we read
HF_DATASET_FILES = (("dataset_info.json", "state.json"), ("dataset_dict.json",))


def cpu_count() -> int:
    """The CPUs this process may run on (its affinity mask where the OS has one, as in containers)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


class PrepareError(ValueError):
    """Bad input or options for prepare; the message names the file (and line or byte offset)."""


# --------------------------------------------------------------------------------------------- inputs
@dataclasses.dataclass(frozen=True)
class Source:
    path: Path
    kind: str  # "txt" | "jsonl" | "hf"

    @property
    def gz(self) -> bool:
        return self.path.name.endswith(".gz")


def _file_kind(path: Path) -> str | None:
    name = path.name.removesuffix(".gz")
    return "txt" if name.endswith(".txt") else "jsonl" if name.endswith(".jsonl") else None


def _is_hf_dataset(path: Path) -> bool:
    return any(all((path / f).is_file() for f in files) for files in HF_DATASET_FILES)


def _sources_of(path: Path, spec: str) -> list[Source]:
    if path.is_dir():
        if _is_hf_dataset(path):
            return [Source(path, "hf")]
        found = [p for p in sorted(path.rglob("*"))
                 if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
                 and _file_kind(p)]
        if not found:
            raise PrepareError(f"folder {path} holds no .txt, .jsonl (or .gz) files and is not a saved Hugging Face "
                               "dataset (no dataset_info.json + state.json, no dataset_dict.json)")
        return [Source(p, _file_kind(p)) for p in found]
    kind = _file_kind(path)
    if kind is None:
        raise PrepareError(f"{spec}: unknown input type; expected .txt, .jsonl, their .gz, or a folder (of those, or "
                           "saved by Hugging Face datasets' save_to_disk)")
    return [Source(path, kind)]


def resolve_inputs(inputs: Iterable[str | Path]) -> list[Source]:
    """Files, folders and globs -> the documents' sources, in order; every missing path is an error now."""
    sources: list[Source] = []
    for spec in inputs:
        spec = str(spec)
        path = Path(spec)
        if path.exists():
            sources += _sources_of(path, spec)
        elif glob.has_magic(spec):
            matches = sorted(glob.glob(spec, recursive=True))
            if not matches:
                raise PrepareError(f"input pattern {spec!r} matches nothing")
            for m in matches:
                sources += _sources_of(Path(m), m)
        else:
            raise FileNotFoundError(f"input {spec} does not exist")
    if not sources:
        raise PrepareError("no inputs given")
    return sources


def _open_binary(path: Path):
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")


def _not_utf8(where: str, e: UnicodeDecodeError, data: bytes, base: int = 0, gz: bool = False) -> PrepareError:
    return PrepareError(f"{where}, byte offset {base + e.start}{' (decompressed)' if gz else ''}: not UTF-8 "
                        f"({e.reason}: {data[e.start:e.start + 4]!r}); pass --errors replace to replace such bytes "
                        "with U+FFFD and go on")


@contextlib.contextmanager
def _gzip_errors(path: Path) -> Iterator[None]:
    """Re-raise a broken gzip stream as an error that names the file."""
    try:
        yield
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise PrepareError(f"{path}: not a readable gzip file ({type(e).__name__}: {e})") from None


# Work items, the unit a worker gets: the main process only lists .txt files and cuts .jsonl files into
# runs of raw lines; workers read, decode, parse and tokenise, so the main process stays light.
#   ("txt", path)                            one document: the whole file
#   ("jsonl", path, first_lineno, first_byte_offset, [raw lines])
#   ("docs", [(where, text), ...])            documents already decoded (Hugging Face rows)
def _work_items(sources: Iterable[Source], text_key: str, hf_split: str, max_bytes: int
                ) -> Iterator[tuple[tuple, int]]:
    """(item, its size in bytes) for every source, in order."""
    for src in sources:
        if src.kind == "txt":
            yield ("txt", str(src.path)), src.path.stat().st_size
        elif src.kind == "jsonl":
            with _gzip_errors(src.path), _open_binary(src.path) as f:
                lines, size, lineno, offset = [], 0, 1, 0
                for line in f:
                    lines.append(line)
                    size += len(line)
                    if size >= max_bytes:
                        yield ("jsonl", str(src.path), lineno, offset, lines), size
                        lineno, offset, lines, size = lineno + len(lines), offset + size, [], 0
                if lines:
                    yield ("jsonl", str(src.path), lineno, offset, lines), size
        else:
            docs, size = [], 0
            for doc in _hf_documents(src, text_key, hf_split):
                docs.append(doc)
                size += len(doc[1])
                if size >= max_bytes:
                    yield ("docs", docs), size
                    docs, size = [], 0
            if docs:
                yield ("docs", docs), size


def _item_documents(item: tuple, text_key: str, errors: str, stats: dict) -> Iterator[tuple[str, str]]:
    """(where, text) of every document of a work item, empty ones included."""
    if item[0] == "docs":
        yield from item[1]
        return
    path = Path(item[1])
    gz = path.name.endswith(".gz")
    if item[0] == "txt":
        with _gzip_errors(path), _open_binary(path) as f:
            data = f.read()
        try:
            yield str(path), data.decode("utf-8")
        except UnicodeDecodeError as e:
            if errors == "strict":
                raise _not_utf8(str(path), e, data, gz=gz) from None
            stats["documents_with_replaced_bytes"] += 1
            yield str(path), data.decode("utf-8", errors="replace")
        return
    _, _, first_lineno, offset, lines = item
    for lineno, line in enumerate(lines, first_lineno):
        where = f"{path} line {lineno}"
        start, offset = offset, offset + len(line)
        if not line.strip():
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            if errors == "strict":
                raise _not_utf8(where, e, line, start, gz) from None
            stats["documents_with_replaced_bytes"] += 1
            text = line.decode("utf-8", errors="replace")
        try:
            record = json.loads(text)
        except json.JSONDecodeError as e:
            raise PrepareError(f"{where} is not JSON: {e.msg} (column {e.colno})") from None
        if not isinstance(record, dict) or text_key not in record:
            keys = sorted(record)[:10] if isinstance(record, dict) else type(record).__name__
            raise PrepareError(f"{where} has no key {text_key!r} (it has {keys}); choose the key with --text-key")
        value = record[text_key]
        if not isinstance(value, str):
            raise PrepareError(f"{where}: {text_key!r} is a {type(value).__name__}, not a string")
        yield where, value


def _hf_documents(src: Source, text_key: str, split: str) -> Iterator[tuple[str, str]]:
    try:
        import datasets
    except ImportError:
        raise PrepareError(f"{src.path} is a Hugging Face dataset; reading it needs the `datasets` package "
                           "(pip install datasets)") from None
    ds = datasets.load_from_disk(str(src.path))
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise PrepareError(f"{src.path} has splits {sorted(ds)}, not {split!r}; choose one with --hf-split")
        ds = ds[split]
    if text_key not in ds.column_names:
        raise PrepareError(f"{src.path} has no column {text_key!r} (columns: {ds.column_names}); choose it with "
                           "--text-key")
    row = 0
    for batch in ds.select_columns([text_key]).iter(batch_size=1024):
        for value in batch[text_key]:
            if not isinstance(value, str):
                raise PrepareError(f"{src.path} row {row}: {text_key!r} is a {type(value).__name__}, not a string")
            yield f"{src.path} row {row}", value
            row += 1


def iter_documents(sources: Iterable[Source], *, text_key: str = "text", errors: str = "strict",
                   hf_split: str = "train", stats: dict | None = None) -> Iterator[tuple[str, str]]:
    """(where, text) for every non-empty document, streamed in order; `where` names its file and line or row.

    The documents `prepare` tokenises, read in this process (prepare reads them in its workers)."""
    if errors not in ("strict", "replace"):
        raise ValueError(f"errors must be 'strict' or 'replace', got {errors!r}")
    stats = stats if stats is not None else collections.Counter()
    for item, _ in _work_items(sources, text_key, hf_split, BATCH_CHARS):
        for where, text in _item_documents(item, text_key, errors, stats):
            if text:
                yield where, text
            else:
                stats["empty_documents_skipped"] += 1


# ----------------------------------------------------------------------------------------- tokenising
class _Encoder:
    """Work items -> one array of their documents' tokens, each document followed by the end-of-text token."""

    def __init__(self, spec: str, text_key: str = "text", errors: str = "strict"):
        from gpt_core.tokenizer import WordTokenizer, get_tokenizer

        tok = get_tokenizer(spec)
        self.text_key, self.errors = text_key, errors
        self.dtype = token_dtype(tok.n_vocab)
        if isinstance(tok, WordTokenizer):
            if tok.eot_token is None:
                raise PrepareError(f"word tokenizer {spec.removeprefix('word:')} has no <|endoftext|> token to end "
                                   "documents with; build it with that special (WordTokenizer.from_text does)")
            self.encode = lambda text: np.asarray(tok.encode(text), dtype=np.uint32)
        elif hasattr(tok, "encode_to_numpy"):  # tiktoken >= 0.8: no Python list in between
            self.encode = lambda text: tok.encode_to_numpy(text, disallowed_special=())
        else:  # special tokens' text is ordinary text in a document: only our EOT is special
            self.encode = lambda text: np.asarray(tok.encode_ordinary(text), dtype=np.uint32)
        self.eot = tok.eot_token

    def __call__(self, items: list[tuple]) -> tuple[np.ndarray, collections.Counter]:
        """(tokens, counts of documents, empty documents skipped and documents with replaced bytes)."""
        stats: collections.Counter = collections.Counter()
        parts = []
        for item in items:
            for where, text in _item_documents(item, self.text_key, self.errors, stats):
                if not text:
                    stats["empty_documents_skipped"] += 1
                    continue
                try:
                    parts.append(self.encode(text))
                except ValueError as e:
                    raise PrepareError(f"{where}: {e}") from None
        stats["documents"] += len(parts)
        out = np.empty(sum(len(p) for p in parts) + len(parts), dtype=self.dtype)
        i = 0
        for p in parts:
            out[i:i + len(p)] = p
            out[i + len(p)] = self.eot
            i += len(p) + 1
        return out, stats


_WORKER: _Encoder | None = None


def _init_worker(spec: str, text_key: str, errors: str) -> None:
    global _WORKER
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the main process handles it
    _WORKER = _Encoder(spec, text_key, errors)


def _encode_in_worker(items: list[tuple]) -> tuple[np.ndarray, collections.Counter]:
    return _WORKER(items)


def _batches(items: Iterable[tuple[tuple, int]], max_bytes: int) -> Iterator[list[tuple]]:
    batch, size = [], 0
    for item, n in items:
        batch.append(item)
        size += n
        if size >= max_bytes:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def encode_batches(batches: Iterable[list[tuple]], encoder: _Encoder, spec: str, workers: int
                   ) -> Iterator[tuple[np.ndarray, collections.Counter]]:
    """(tokens, counts) per batch of work items, in order. More than one worker: a process pool with a
    bounded queue (Pool.imap would read the whole corpus ahead); one worker: this process."""
    if workers == 1:
        for b in batches:
            yield encoder(b)
        return
    import multiprocessing as mp

    # On Linux, fork: workers start in milliseconds with the tokenizer loaded (spawn re-imports everything,
    # a second or more). The pool starts before any document is read or the progress bar exists, so no
    # thread of ours (tqdm's monitor, Arrow's readers) is running to leave a lock held in the children.
    method = "fork" if sys.platform == "linux" else None
    with mp.get_context(method).Pool(workers, initializer=_init_worker,
                                     initargs=(spec, encoder.text_key, encoder.errors)) as pool:
        pending: collections.deque = collections.deque()
        for b in batches:
            pending.append(pool.apply_async(_encode_in_worker, (b,)))
            if len(pending) >= INFLIGHT_PER_WORKER * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


# -------------------------------------------------------------------------------------------- writing
class _Shards:
    """Cuts the token stream into the val shard, then train shards; finished shards wait under temporary
    names until `commit` renames them all."""

    def __init__(self, out: Path, prefix: str, vocab_size: int, shard_tokens: int, val_tokens: int):
        self.out, self.prefix, self.vocab_size = out, prefix, vocab_size
        self.shard_tokens, self.val_tokens = shard_tokens, val_tokens
        self.writer: ShardWriter | None = None
        self.split = "val" if val_tokens else "train"
        self.index = 0 if val_tokens else 1
        self.done: list[tuple[Path, Path, str, int]] = []  # (temporary path, final path, split, tokens)

    def _capacity(self) -> int:
        return self.val_tokens if self.split == "val" else self.shard_tokens

    def write(self, tokens: np.ndarray) -> None:
        pos = 0
        while pos < len(tokens):
            if self.writer is None:
                path = self.out / shard_name(self.prefix, self.split, self.index)
                self.writer = ShardWriter(path, vocab_size=self.vocab_size)
            take = min(self._capacity() - self.writer.n_tokens, len(tokens) - pos)
            self.writer.write(tokens[pos:pos + take])
            pos += take
            if self.writer.n_tokens == self._capacity():
                self._finish()

    def _finish(self) -> None:
        w, self.writer = self.writer, None
        self.done.append((w.close(rename=False), w.path, self.split, w.n_tokens))
        self.split, self.index = "train", self.index + 1

    def tokens(self, split: str) -> int:
        n = sum(t for _, _, s, t in self.done if s == split)
        return n + (self.writer.n_tokens if self.writer is not None and self.split == split else 0)

    def commit(self) -> list[dict[str, Any]]:
        if self.writer is not None:
            self._finish()
        for tmp, final, _, _ in self.done:
            os.replace(tmp, final)
        fsync_dir(self.out)
        return [{"file": final.name, "split": split, "tokens": n} for _, final, split, n in self.done]

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.abort()
        # every temporary shard, also one whose writer a Ctrl-C interrupted before it was recorded
        for p in self.out.glob(f".{glob.escape(self.prefix)}_*.bin.tmp"):
            p.unlink(missing_ok=True)


def _prepare_out_dir(out: Path, overwrite: bool) -> None:
    """Make `out` ready: new, empty, or a folder of an earlier prepare (finished only with `overwrite`)."""
    if out.exists() and not out.is_dir():
        raise PrepareError(f"--out {out} is a file, not a folder")
    out.mkdir(parents=True, exist_ok=True)
    entries = list(out.iterdir())
    ours = (out / MANIFEST).exists() or (out / INCOMPLETE_MARKER).exists()
    if (out / MANIFEST).exists() and not overwrite:
        raise PrepareError(f"{out} already holds a prepared dataset ({MANIFEST}); pass --overwrite to prepare it "
                           "again, or choose another --out")
    if entries and not ours:
        raise PrepareError(f"--out {out} is not empty and holds no earlier prepare; choose a new or empty folder")
    marker = out / INCOMPLETE_MARKER
    with open(marker, "w") as f:  # before anything else changes: from here on the folder is not a dataset
        f.write("an unfinished `python -m gpt_core.data prepare`; run it again to finish\n")
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(out)
    (out / MANIFEST).unlink(missing_ok=True)
    for p in out.iterdir():  # an earlier run's shards and temporary files
        if SHARD_NAME.match(p.name) or (p.name.startswith(".") and p.name.endswith(".tmp")):
            p.unlink()
    fsync_dir(out)


def _write_manifest(out: Path, manifest: dict) -> None:
    tmp = out / f".{MANIFEST}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out / MANIFEST)
    fsync_dir(out)


def prepare(inputs: Iterable[str | Path], out: str | Path, *, tokenizer: str = "gpt2", text_key: str = "text",
            workers: int | None = None, shard_tokens: int = DEFAULT_SHARD_TOKENS,
            val_tokens: int = DEFAULT_VAL_TOKENS, prefix: str = "data", errors: str = "strict",
            hf_split: str = "train", overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
    """Tokenise `inputs` into shards in `out` (see the module docstring); returns the manifest written."""
    inputs = [str(i) for i in inputs]
    workers = cpu_count() if workers is None else workers
    if workers < 1:
        raise PrepareError(f"--workers must be >= 1, got {workers}")
    if not 1 <= shard_tokens <= MAX_SHARD_TOKENS:
        raise PrepareError(f"--shard-tokens must be in [1, {MAX_SHARD_TOKENS:,}] (an int32 count), got {shard_tokens}")
    if not 0 <= val_tokens <= MAX_SHARD_TOKENS:
        raise PrepareError(f"--val-tokens must be in [0, {MAX_SHARD_TOKENS:,}], got {val_tokens}")
    if errors not in ("strict", "replace"):
        raise PrepareError(f"--errors must be strict or replace, got {errors!r}")
    if not prefix or "/" in prefix or os.sep in prefix or prefix.startswith("."):
        raise PrepareError(f"--prefix must be a plain file-name prefix, got {prefix!r}")
    sources = resolve_inputs(inputs)
    encoder = _Encoder(tokenizer, text_key, errors)  # the tokenizer loads and has an end-of-text token
    name, sha256 = tokenizer_identity(tokenizer)
    from gpt_core.tokenizer import get_tokenizer

    n_vocab = get_tokenizer(tokenizer).n_vocab
    out = Path(out)
    _prepare_out_dir(out, overwrite)
    stats: collections.Counter = collections.Counter()
    shards = _Shards(out, prefix, n_vocab, shard_tokens, val_tokens)
    items = _work_items(sources, text_key, hf_split, BATCH_CHARS)
    n_docs = n_tokens = 0
    t0 = time.perf_counter()
    from tqdm import tqdm

    bar = None
    try:
        for tokens, counts in encode_batches(_batches(items, BATCH_CHARS), encoder, tokenizer, workers):
            if bar is None:  # after the pool has started: no thread of tqdm's in the workers
                bar = tqdm(desc=f"prepare {out}", unit="tok", unit_scale=True, disable=not progress,
                           dynamic_ncols=True)
            shards.write(tokens)
            stats.update(counts)
            n_docs, n_tokens = stats["documents"], n_tokens + len(tokens)
            bar.update(len(tokens))
            bar.set_postfix(docs=n_docs, refresh=False)
        if n_docs == 0:
            raise PrepareError(f"the inputs ({', '.join(str(s.path) for s in sources[:3])}"
                               f"{', ...' if len(sources) > 3 else ''}) hold no documents (no non-empty text)")
        if val_tokens and shards.tokens("train") == 0:
            raise PrepareError(f"--val-tokens {val_tokens:,} leaves no training tokens: the inputs hold only "
                               f"{n_tokens:,} tokens; pass a smaller --val-tokens (or 0 for no validation shard)")
        records = shards.commit()
    except BaseException:
        shards.abort()
        raise
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - t0
    magic, version = header_format(encoder.dtype)
    manifest = {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "tokenizer": {"name": name, "sha256": sha256, "n_vocab": n_vocab, "eot_token": int(encoder.eot)},
        "token_dtype": encoder.dtype.name,
        "header": {"magic": magic, "version": version},
        "shards": records,
        "tokens": {"train": shards.tokens("train"), "val": shards.tokens("val"), "total": n_tokens},
        "documents": n_docs,
        "empty_documents_skipped": stats["empty_documents_skipped"],
        "documents_with_replaced_bytes": stats["documents_with_replaced_bytes"],
        "inputs": inputs,
        "files": [{"path": str(s.path), "kind": s.kind} for s in sources],
        "settings": {"text_key": text_key, "shard_tokens": shard_tokens, "val_tokens": val_tokens, "prefix": prefix,
                     "errors": errors, "hf_split": hf_split},
    }
    _write_manifest(out, manifest)
    (out / INCOMPLETE_MARKER).unlink()
    fsync_dir(out)
    if progress:
        n_train = sum(r["split"] == "train" for r in records)
        print(f"prepare: {n_docs:,} documents, {n_tokens:,} tokens ({manifest['tokens']['val']:,} validation) "
              f"in {n_train} training shard(s){' + 1 validation' if val_tokens else ''}, {seconds:.1f} s "
              f"({n_tokens / max(seconds, 1e-9):,.0f} tokens/s) -> {out}", file=sys.stderr)
        if stats["documents_with_replaced_bytes"]:
            print(f"prepare: {stats['documents_with_replaced_bytes']:,} document(s) had bytes that are not UTF-8, "
                  "replaced with U+FFFD", file=sys.stderr)
    return manifest


# ------------------------------------------------------------------------------------------------ CLI
def _count(text: str) -> int:
    """An integer count, also written as 1e8 or 100_000_000."""
    try:
        return int(text.replace("_", ""))
    except ValueError:
        pass
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a count: {text!r}") from None
    if not v.is_integer():
        raise argparse.ArgumentTypeError(f"not a whole count: {text!r}")
    return int(v)


DESCRIPTION = """Token datasets for the trainers (`--data DIR`).

  prepare  tokenise text files, JSON lines or a saved Hugging Face dataset into llm.c token shards
           (a folder of {prefix}_val_000000.bin, {prefix}_train_000001.bin, ... and manifest.json)
  info     check a dataset folder (prepared, or llm.c / modded-nanogpt shards) and describe it"""

PREPARE_EPILOG = """Example, on the shipped sample:
  python -m gpt_core.data prepare gpt_core/assets/the-verdict.txt --out data/verdict --val-tokens 512
  python -m torch_gpt.train --data data/verdict --steps 20

Shards: a 256 x int32 header (magic 20240520, version 1, token count) then uint16 tokens, or magic 20240801 /
version 7 with uint32 tokens when the vocabulary has more than 65,536 ids (cl100k_base). The validation shard
is the first --val-tokens tokens of the stream (cut exactly, as llm.c's fineweb.py does). An interrupted run
leaves no manifest.json; run the same command again to finish it."""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m gpt_core.data", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", metavar="{prepare,info}", required=True)

    class Formatter(HelpFormatter, argparse.RawDescriptionHelpFormatter):
        pass

    pre = sub.add_parser("prepare", help="tokenise a corpus into shards", formatter_class=Formatter,
                         description="Tokenise a corpus into llm.c token shards with a manifest.json.",
                         epilog=PREPARE_EPILOG)
    pre.add_argument("inputs", nargs="+", metavar="INPUT",
                     help="files (.txt: one document per file; .jsonl: one per line; .gz of either), folders "
                          "(recursed; or saved by Hugging Face datasets' save_to_disk) and globs")
    pre.add_argument("--out", required=True, metavar="DIR", help="the dataset folder to write (new or empty)")
    pre.add_argument("--tokenizer", default="gpt2", help="gpt2, cl100k_base or word:VOCAB.json")
    pre.add_argument("--text-key", default="text", help="the text's key in .jsonl lines / column of a HF dataset")
    pre.add_argument("--hf-split", default="train", help="the split of a saved Hugging Face DatasetDict")
    pre.add_argument("--workers", type=int, default=cpu_count(),
                     help="tokenising processes (1: tokenise in this process)")
    pre.add_argument("--shard-tokens", type=_count, default=DEFAULT_SHARD_TOKENS, help="tokens per training shard")
    pre.add_argument("--val-tokens", type=_count, default=DEFAULT_VAL_TOKENS,
                     help="tokens of the validation shard, taken from the start of the stream (0: none)")
    pre.add_argument("--prefix", default="data", help="shard file names: PREFIX_train_000001.bin, ...")
    pre.add_argument("--errors", default="strict", choices=["strict", "replace"],
                     help="bytes that are not UTF-8: stop with the file and offset, or replace them with U+FFFD")
    pre.add_argument("--overwrite", action="store_true", help="prepare again into a folder that holds a dataset")
    pre.add_argument("--no-progress", action="store_true", help="no progress bar or summary")
    info = sub.add_parser("info", help="check and describe a dataset folder", formatter_class=HelpFormatter)
    info.add_argument("dir", help="a dataset folder")
    info.add_argument("--tokenizer", default="gpt2", help="the tokenizer a run would use with it")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.command == "info":
            print(open_dataset(args.dir, args.tokenizer).describe())
            return 0
        prepare(args.inputs, args.out, tokenizer=args.tokenizer, text_key=args.text_key, workers=args.workers,
                shard_tokens=args.shard_tokens, val_tokens=args.val_tokens, prefix=args.prefix, errors=args.errors,
                hf_split=args.hf_split, overwrite=args.overwrite, progress=not args.no_progress)
    except (ValueError, OSError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: no manifest was written; run the same command again to finish", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
