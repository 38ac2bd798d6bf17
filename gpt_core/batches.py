"""The trainers' batches: the same windows in the same order on both sides, fixed by (seed, step).

Two sources, one interface (`TrainingData`):
- `TextData`: a small plain-text file (the shipped sample by default), tokenised at start, cut into
  `sliding_windows` (the seed's `GPTDatasetV1`), split train/validation by `val_fraction`; epoch e visits
  the windows in the order of a permutation seeded by seed + e, dropping the last partial batch.
- `ShardData`: a folder of token shards (`python -m gpt_core.data prepare`, or llm.c's), read through
  `np.memmap`: memory does not grow with the corpus. The windows of step s start at positions drawn from
  a generator seeded by (seed, s), uniformly over the training tokens (with replacement, as nanoGPT
  draws them); validation is the first windows of the validation shard, in order.
Either way `batch(step, batch_size, rows)` depends on nothing but its arguments, so resuming needs only the
step, and a process that feeds only some rows of the global batch (`rows`) reads only those.

Every id a batch holds is in [0, vocab_size), checked here where batches are made: text through a tokenizer
that fits the model (`check_vocab_size`, at open), shard windows as they are read (`DataError` naming the file).
So the models need not read the ids back from a GPU at every step.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

import numpy as np

from gpt_core.config import GPTConfig
from gpt_core.data import load_text, sliding_windows, train_val_split
from gpt_core.tokenizer import check_vocab_size, encode_text, get_tokenizer


class DataError(ValueError):
    """Bad data met while training (a token id the model cannot embed): the message names the file."""


@dataclasses.dataclass(frozen=True)
class DataConfig:
    path: str | None = None  # a shard folder, a text file, or None for the shipped sample
    tokenizer: str = "gpt2"
    seq_len: int | None = None  # default: the model's context length
    stride: int | None = None  # text only; default: seq_len
    val_fraction: float = 0.1  # text only


class TrainingData:
    """Global batches of (inputs, targets), int64 (n, T), targets the inputs shifted by one."""

    tokenizer: Any
    seq_len: int

    def batch(self, step: int, batch_size: int, rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Rows `rows` (default: all) of step `step`'s global batch of `batch_size` windows."""
        raise NotImplementedError

    def batches_per_epoch(self, batch_size: int) -> int:
        raise NotImplementedError

    def validation_batches(self, batch_size: int, n_batches: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """The first `n_batches` validation batches, in order (the same every evaluation); [] if none."""
        raise NotImplementedError

    def check_batch_size(self, batch_size: int) -> None:
        pass

    def describe(self) -> str:
        raise NotImplementedError


class TextData(TrainingData):
    def __init__(self, train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray,
                 tokenizer: Any, source: str, seed: int = 1337):
        self.train_x, self.train_y, self.val_x, self.val_y = train_x, train_y, val_x, val_y
        self.tokenizer, self.source, self.seed = tokenizer, source, seed
        self.seq_len = train_x.shape[1]

    def check_batch_size(self, batch_size: int) -> None:
        if len(self.train_x) < batch_size:
            raise ValueError(f"--batch-size {batch_size} is larger than the {len(self.train_x)} training windows "
                             f"of {self.source} (seq-len {self.seq_len})")

    def batches_per_epoch(self, batch_size: int) -> int:
        return len(self.train_x) // batch_size

    @functools.lru_cache(maxsize=2)  # noqa: B019 (one object per run; the cache holds an epoch's order)
    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng(self.seed + epoch).permutation(len(self.train_x))

    def batch(self, step: int, batch_size: int, rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        epoch, i = divmod(step, self.batches_per_epoch(batch_size))
        idx = self._order(epoch)[i * batch_size:(i + 1) * batch_size]
        if rows is not None:
            idx = idx[rows]
        return self.train_x[idx], self.train_y[idx]

    def validation_batches(self, batch_size: int, n_batches: int) -> list[tuple[np.ndarray, np.ndarray]]:
        if len(self.val_x) == 0:
            return []
        bs = min(batch_size, len(self.val_x))
        n = min(n_batches, len(self.val_x) // bs)
        return [(self.val_x[i * bs:(i + 1) * bs], self.val_y[i * bs:(i + 1) * bs]) for i in range(n)]

    def describe(self) -> str:
        return f"{len(self.train_x)} windows of {self.seq_len} tokens"


class ShardData(TrainingData):
    def __init__(self, dataset: Any, tokenizer: Any, seq_len: int, vocab_size: int, seed: int = 1337):
        self.dataset, self.tokenizer, self.seq_len, self.vocab_size, self.seed = (
            dataset, tokenizer, seq_len, vocab_size, seed)
        self.train = dataset.train
        if len(self.train) < seq_len + 1:
            raise ValueError(f"{dataset.root}: its {len(self.train)} training tokens give no window of "
                             f"seq-len {seq_len} (need at least {seq_len + 1})")

    def batches_per_epoch(self, batch_size: int) -> int:
        return max(1, len(self.train) // (batch_size * self.seq_len))

    def _windows(self, split: Any, starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        t = self.seq_len
        w = np.stack([split.read(int(s), t + 1) for s in starts]) if len(starts) else np.zeros((0, t + 1), np.int64)
        bad = np.argwhere(w >= self.vocab_size)
        if len(bad):
            r, c = bad[0]
            path, offset = split.locate(int(starts[r]) + int(c))
            raise DataError(f"{path}: token id {int(w[r, c])} at token offset {offset} is >= the model's "
                             f"vocab_size {self.vocab_size} (a dataset prepared with another tokenizer?)")
        return w[:, :-1], w[:, 1:]

    def starts(self, step: int, batch_size: int) -> np.ndarray:
        """The start positions of step `step`'s windows, from a generator seeded by (seed, step)."""
        rng = np.random.default_rng([self.seed, step])
        return rng.integers(0, len(self.train) - self.seq_len, size=batch_size)

    def batch(self, step: int, batch_size: int, rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        starts = self.starts(step, batch_size)
        return self._windows(self.train, starts if rows is None else starts[rows])

    def validation_batches(self, batch_size: int, n_batches: int) -> list[tuple[np.ndarray, np.ndarray]]:
        val = self.dataset.val
        if val is None:
            return []
        n_windows = (len(val) - 1) // self.seq_len
        bs = min(batch_size, n_windows)
        if bs == 0:
            return []
        n = min(n_batches, n_windows // bs)
        return [self._windows(val, np.arange(i * bs, (i + 1) * bs) * self.seq_len) for i in range(n)]

    def describe(self) -> str:
        val = self.dataset.val
        return (f"{len(self.train):,} training tokens in {len(self.train.paths)} shard(s) of {self.dataset.root}"
                f"{f' (+{len(val):,} validation)' if val is not None else ''}, windows of {self.seq_len}")


def open_training_data(cfg: DataConfig, config: GPTConfig, seed: int = 1337) -> TrainingData:
    """The data of a run: a shard folder read lazily, or a text file tokenised now; errors name the source."""
    tokenizer = get_tokenizer(cfg.tokenizer)
    check_vocab_size(config.vocab_size, tokenizer)
    seq_len = cfg.seq_len or config.context_length
    if seq_len > config.context_length:
        raise ValueError(f"--seq-len {seq_len} exceeds the model's context_length {config.context_length}")
    if cfg.path is not None and Path(cfg.path).is_dir():
        from gpt_core.shards import open_dataset

        return ShardData(open_dataset(cfg.path, cfg.tokenizer), tokenizer, seq_len, config.vocab_size, seed)
    stride = cfg.stride or seq_len
    ids = encode_text(tokenizer, load_text(cfg.path))
    train_ids, val_ids = train_val_split(ids, cfg.val_fraction)
    source = cfg.path or "the sample corpus"
    try:
        x, y = sliding_windows(train_ids, seq_len, stride)
    except ValueError as e:
        raise ValueError(f"{source}: its training split ({len(train_ids)} tokens) is too short: {e}") from None
    if len(val_ids) > seq_len:
        vx, vy = sliding_windows(val_ids, seq_len, seq_len)
    else:
        vx = vy = np.zeros((0, seq_len), np.int64)
    return TextData(x, y, vx, vy, tokenizer, source, seed)
