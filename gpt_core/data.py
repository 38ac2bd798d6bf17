"""Sliding-window next-token data, as numpy arrays both frameworks can take.

`sliding_windows` has exactly the semantics of the seed notebooks' `GPTDatasetV1`: windows start at
0, stride, 2·stride, … while a full target window still fits, and targets are the inputs shifted by one.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

SAMPLE_CORPUS = Path(__file__).parent / "assets" / "the-verdict.txt"


def load_text(path: str | Path | None = None) -> str:
    """Read a UTF-8 text file; with no path, the shipped sample corpus (Wharton's "The Verdict")."""
    path = SAMPLE_CORPUS if path is None else Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    return path.read_text(encoding="utf-8")


def sliding_windows(token_ids: Sequence[int] | np.ndarray, max_length: int, stride: int
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets), each int64 of shape (n_windows, max_length); targets = inputs shifted by one."""
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    ids = np.asarray(token_ids, dtype=np.int64)
    if ids.ndim != 1:
        raise ValueError(f"token_ids must be 1-D, got shape {ids.shape}")
    if len(ids) < max_length + 1:
        raise ValueError(
            f"text too short: {len(ids)} tokens give no window of max_length {max_length} "
            f"(need at least {max_length + 1} tokens: one window plus its shifted target)"
        )
    starts = np.arange(0, len(ids) - max_length, stride)
    offsets = starts[:, None] + np.arange(max_length)[None, :]  # (n_windows, max_length)
    return ids[offsets], ids[offsets + 1]


def train_val_split(token_ids: Sequence[int] | np.ndarray, val_fraction: float = 0.1
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Split a token stream in two contiguous parts: the first (1 - val_fraction) trains."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    ids = np.asarray(token_ids, dtype=np.int64)
    split = int(round(len(ids) * (1.0 - val_fraction)))
    return ids[:split], ids[split:]


def iterate_batches(inputs: np.ndarray, targets: np.ndarray, batch_size: int, *, shuffle: bool = True,
                    seed: int = 0, drop_last: bool = True, start: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """One epoch of (inputs, targets) batches, each (batch_size, T); order shuffled from `seed`.

    `start` skips the epoch's first batches (resuming mid-epoch) without building them."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if len(inputs) != len(targets):
        raise ValueError(f"inputs ({len(inputs)}) and targets ({len(targets)}) differ in length")
    if drop_last and len(inputs) < batch_size:
        raise ValueError(f"batch_size {batch_size} is larger than the {len(inputs)} windows of data "
                         "(with drop_last=True no batch would be produced)")
    order = np.random.default_rng(seed).permutation(len(inputs)) if shuffle else np.arange(len(inputs))
    stop = len(order) - len(order) % batch_size if drop_last else len(order)
    for i in range(start * batch_size, stop, batch_size):
        idx = order[i:i + batch_size]
        yield inputs[idx], targets[idx]


if __name__ == "__main__":  # `python -m gpt_core.data prepare ...`: the CLI lives in gpt_core.prepare
    import sys

    from gpt_core.prepare import main

    sys.exit(main())
