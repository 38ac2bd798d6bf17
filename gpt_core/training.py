"""What the two trainers share, framework-free: the CLI, the data stream, the schedule, the outputs.

`torch_gpt.train` and `jax_gpt.train` build their parser with `build_parser`, so both take the same flags
with the same defaults; they read data through `prepare_data` and `BatchStream` (same windows, same
order, resumable position), take the learning rate from `lr_at`, and write `metrics.jsonl`, `loss.png`
and checkpoints through `RunWriter` and `save_training_checkpoint`.

A training checkpoint is a directory: the model checkpoint (`config.json`, `model.safetensors`) plus
`optimizer.safetensors` (AdamW moments under the canonical parameter names and layouts, `exp_avg.NAME`
and `exp_avg_sq.NAME`) and `trainer_state.json` (step, data position, RNG state, the flags). The
directory is written under a temporary name and swapped in, so a crash never leaves a half-written one.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file

from gpt_core.checkpoint import load_checkpoint, save_checkpoint
from gpt_core.cli import HelpFormatter
from gpt_core.config import GPTConfig
from gpt_core.data import iterate_batches, load_text, sliding_windows, train_val_split
from gpt_core.tokenizer import check_vocab_size, encode_text, get_tokenizer

OPTIMIZER_FILE = "optimizer.safetensors"
TRAINER_STATE_FILE = "trainer_state.json"
# Flags that must match between a run and the checkpoint it resumes: the data order and model depend on them.
RESUME_MUST_MATCH = ("preset", "config", "data", "tokenizer", "val_fraction", "seq_len", "stride", "batch_size",
                     "grad_accum", "seed")


def build_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """The trainers' shared flags; each trainer adds its framework's own after this."""
    p = argparse.ArgumentParser(prog=prog, description=description,
                                formatter_class=HelpFormatter)
    m = p.add_argument_group("model")
    m.add_argument("--preset", default="tiny", help="GPTConfig preset: tiny, gpt2, gpt2-medium, gpt2-large, gpt2-xl")
    m.add_argument("--config", default=None, help="a config JSON file (any dialect); overrides --preset")
    m.add_argument("--init-from", default=None, help="start from the weights of this checkpoint directory")
    d = p.add_argument_group("data")
    d.add_argument("--data", default=None, help="plain-text training file (default: the shipped sample corpus)")
    d.add_argument("--tokenizer", default="gpt2", help="gpt2, cl100k_base or word:VOCAB.json")
    d.add_argument("--val-fraction", type=float, default=0.1, help="tail of the token stream held out")
    d.add_argument("--seq-len", type=int, default=None, help="window length (default: the context length)")
    d.add_argument("--stride", type=int, default=None, help="window stride (default: --seq-len)")
    o = p.add_argument_group("optimisation")
    o.add_argument("--batch-size", type=int, default=8, help="global windows per optimizer step")
    o.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step (batch-size must divide)")
    o.add_argument("--steps", type=int, default=None, help="optimizer steps (default: 1 epoch unless --epochs)")
    o.add_argument("--epochs", type=float, default=None, help="passes over the training windows")
    o.add_argument("--lr", type=float, default=6e-4, help="peak learning rate")
    o.add_argument("--min-lr", type=float, default=6e-5, help="learning rate at the end of the cosine decay")
    o.add_argument("--warmup-steps", type=int, default=10, help="linear warmup steps")
    o.add_argument("--weight-decay", type=float, default=0.1, help="AdamW decay, on >=2-D weights only")
    o.add_argument("--beta1", type=float, default=0.9, help="AdamW beta1")
    o.add_argument("--beta2", type=float, default=0.95, help="AdamW beta2")
    o.add_argument("--eps", type=float, default=1e-8, help="AdamW epsilon")
    o.add_argument("--grad-clip", type=float, default=1.0, help="global-norm clip (0 disables)")
    o.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="compute dtype (float16 with loss scaling, torch only)")
    o.add_argument("--seed", type=int, default=1337, help="seed of the initial weights, batch order and dropout")
    e = p.add_argument_group("evaluation and output")
    e.add_argument("--eval-every", type=int, default=50, help="evaluate every N steps (0: only at the end)")
    e.add_argument("--eval-batches", type=int, default=8, help="validation batches per evaluation")
    e.add_argument("--out", default="runs/train", help="output directory")
    e.add_argument("--ckpt-every", type=int, default=0, help="write a training checkpoint every N steps (0: end)")
    e.add_argument("--resume", action="store_true", help="continue from --out/checkpoint")
    e.add_argument("--stop-after", type=int, default=None,
                   help="stop after N steps of this invocation, with a checkpoint (for time-limited jobs)")
    e.add_argument("--sample-prompt", default="Every effort moves you", help="prompt for the final sample")
    e.add_argument("--sample-tokens", type=int, default=30, help="tokens in the final sample")
    e.add_argument("--no-progress", action="store_true", help="no progress bar (one log line per eval)")
    return p


def check_args(args: argparse.Namespace) -> None:
    """Reject impossible flag values before any work is done."""
    positive = ["batch_size", "grad_accum", "eval_batches", "sample_tokens"]
    for name in positive + ["seq_len", "stride", "steps", "stop_after"]:
        v = getattr(args, name)
        if v is not None and v < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    for name in ["warmup_steps", "eval_every", "ckpt_every", "weight_decay", "grad_clip", "lr", "min_lr"]:
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.batch_size % args.grad_accum:
        raise ValueError(f"--batch-size {args.batch_size} is not divisible by --grad-accum {args.grad_accum}")
    if args.steps is not None and args.epochs is not None:
        raise ValueError("give --steps or --epochs, not both")
    if args.epochs is not None and args.epochs <= 0:
        raise ValueError(f"--epochs must be > 0, got {args.epochs}")
    if not (0.0 < args.beta1 < 1.0 and 0.0 < args.beta2 < 1.0):
        raise ValueError(f"--beta1/--beta2 must be in (0, 1), got {args.beta1}, {args.beta2}")


def model_config(args: argparse.Namespace) -> GPTConfig:
    """The architecture from --config, --init-from's checkpoint, or --preset (in that order)."""
    if args.config is not None:
        return GPTConfig.from_json(args.config)
    if args.init_from is not None:
        return load_checkpoint(args.init_from)[0]
    return GPTConfig.from_preset(args.preset)


@dataclasses.dataclass
class Data:
    train_x: np.ndarray  # (n_train, T) int64
    train_y: np.ndarray
    val_x: np.ndarray  # (n_val, T) int64; empty when there is no validation split
    val_y: np.ndarray
    tokenizer: Any


def prepare_data(args: argparse.Namespace, config: GPTConfig) -> Data:
    """Tokenize --data, split it, cut windows; every error here comes before any training work."""
    tokenizer = get_tokenizer(args.tokenizer)
    check_vocab_size(config.vocab_size, tokenizer)
    seq_len = args.seq_len or config.context_length
    if seq_len > config.context_length:
        raise ValueError(f"--seq-len {seq_len} exceeds the model's context_length {config.context_length}")
    stride = args.stride or seq_len
    ids = encode_text(tokenizer, load_text(args.data))
    train_ids, val_ids = train_val_split(ids, args.val_fraction)
    source = args.data or "the sample corpus"
    try:
        x, y = sliding_windows(train_ids, seq_len, stride)
    except ValueError as e:
        raise ValueError(f"{source}: its training split ({len(train_ids)} tokens) is too short: {e}") from None
    if len(x) < args.batch_size:
        raise ValueError(f"--batch-size {args.batch_size} is larger than the {len(x)} training windows of "
                         f"{source} (seq-len {seq_len}, stride {stride})")
    if len(val_ids) > seq_len:
        vx, vy = sliding_windows(val_ids, seq_len, seq_len)
    else:
        vx = vy = np.zeros((0, seq_len), np.int64)
    return Data(x, y, vx, vy, tokenizer)


def total_steps(args: argparse.Namespace, n_windows: int) -> int:
    per_epoch = n_windows // args.batch_size
    if args.steps is not None:
        return args.steps
    return max(1, math.ceil(per_epoch * (args.epochs if args.epochs is not None else 1.0)))


def lr_at(step: int, lr: float, min_lr: float, warmup_steps: int, total: int) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then cosine decay to min_lr."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if total <= warmup_steps:
        return lr
    progress = min(1.0, (step - warmup_steps) / max(1, total - warmup_steps - 1))
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


class BatchStream:
    """Endless, seeded, resumable stream of (inputs, targets) batches: epoch e shuffles with seed + e."""

    def __init__(self, x: np.ndarray, y: np.ndarray, batch_size: int, seed: int, epoch: int = 0, index: int = 0):
        self.x, self.y, self.batch_size, self.seed = x, y, batch_size, seed
        self.epoch, self.index = epoch, index  # the next batch is batch `index` of epoch `epoch`

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        while True:
            for batch in iterate_batches(self.x, self.y, self.batch_size, seed=self.seed + self.epoch,
                                         start=self.index):
                self.index += 1
                yield batch
            self.epoch, self.index = self.epoch + 1, 0

    def position(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}


def validation_batches(data: Data, batch_size: int, n_batches: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """The first `n_batches` validation batches, in order (the same every evaluation)."""
    if len(data.val_x) == 0:
        return []
    bs = min(batch_size, len(data.val_x))
    return list(iterate_batches(data.val_x, data.val_y, bs, shuffle=False))[:n_batches]


class RunWriter:
    """Appends metrics.jsonl lines (flushed, so a crash keeps every finished step) and draws loss.png.

    `resume_step`: continuing from a checkpoint at that step, so lines of later steps (written after the
    checkpoint by a run that then died) are dropped: they will be written again.
    """

    def __init__(self, out: Path, enabled: bool = True, resume_step: int | None = None):
        self.out, self.enabled = out, enabled
        if enabled:
            out.mkdir(parents=True, exist_ok=True)
            path = out / "metrics.jsonl"
            kept = []
            if resume_step is not None and path.exists():
                for line in path.read_text().split("\n")[:-1]:  # whole lines only
                    if json.loads(line)["step"] <= resume_step:
                        kept.append(line + "\n")
            self._f = open(path, "w")
            self._f.writelines(kept)
            self._f.flush()

    def log(self, **row: Any) -> None:
        if self.enabled:
            self._f.write(json.dumps(row) + "\n")
            self._f.flush()

    def close(self) -> None:
        if self.enabled:
            self._f.close()
            plot_losses(self.out / "metrics.jsonl", self.out / "loss.png")


def plot_losses(metrics: Path, png: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no loss plot", file=sys.stderr)
        return None
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    train = [(r["step"], r["loss"]) for r in rows if r.get("kind") == "train"]
    val = [(r["step"], r["val_loss"]) for r in rows if r.get("kind") == "eval"]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train, strict=True), label="train", lw=1)
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png


class StopFlag:
    """Ctrl-C (SIGINT) asks the training loop to stop at its next step boundary, never inside a step, so
    the checkpoint written then is exact; a second Ctrl-C aborts at once. A context manager."""

    def __init__(self) -> None:
        self.requested = False

    def __enter__(self) -> StopFlag:
        self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        signal.signal(signal.SIGINT, self._old)

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True


class Throughput:
    """Tokens per second over the last step, measured around the caller's synchronised step."""

    def __init__(self) -> None:
        self.t = time.perf_counter()

    def tick(self, tokens: int) -> float:
        now = time.perf_counter()
        rate = tokens / max(now - self.t, 1e-9)
        self.t = now
        return rate


# --------------------------------------------------------------------------------- training checkpoints
def save_training_checkpoint(directory: str | Path, config: GPTConfig, state: dict[str, np.ndarray],
                             optimizer: dict[str, np.ndarray], trainer_state: dict[str, Any]) -> Path:
    """Write model + optimizer + trainer state to `directory`, atomically (temporary dir, then swap)."""
    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    old = directory.with_name(directory.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    save_checkpoint(tmp, config, state)
    save_file({k: np.ascontiguousarray(v) for k, v in optimizer.items()}, tmp / OPTIMIZER_FILE)
    (tmp / TRAINER_STATE_FILE).write_text(json.dumps(trainer_state, indent=1) + "\n")
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if directory.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(directory, old)  # a crash from here on leaves `old` complete: load_training_checkpoint uses it
    os.replace(tmp, directory)
    shutil.rmtree(old, ignore_errors=True)
    return directory


def load_training_checkpoint(directory: str | Path) -> tuple[GPTConfig, dict[str, np.ndarray],
                                                              dict[str, np.ndarray], dict[str, Any]]:
    """(config, model state, optimizer state, trainer state) from `save_training_checkpoint`'s directory."""
    directory = Path(directory)
    if not directory.exists() and directory.with_name(directory.name + ".old").exists():
        directory = directory.with_name(directory.name + ".old")  # a crash hit between the two renames
    if not (directory / TRAINER_STATE_FILE).is_file():
        raise FileNotFoundError(f"no training checkpoint in {directory} (missing {TRAINER_STATE_FILE})")
    config, state = load_checkpoint(directory)
    optimizer = load_file(directory / OPTIMIZER_FILE)
    expected = {f"{kind}.{k}": v.shape for k, v in state.items() for kind in ("exp_avg", "exp_avg_sq")}
    problems = sorted(set(expected) ^ set(optimizer))
    problems += [k for k in expected if k in optimizer and optimizer[k].shape != expected[k]]
    if problems:
        raise ValueError(f"{directory / OPTIMIZER_FILE} does not match the model: {problems[:10]}")
    return config, state, optimizer, json.loads((directory / TRAINER_STATE_FILE).read_text())


def check_resume(args: argparse.Namespace, config: GPTConfig, ckpt_config: GPTConfig,
                 trainer_state: dict[str, Any]) -> None:
    """Refuse to resume when the flags describe a different model or data order than the checkpoint's."""
    if ckpt_config != config:
        diffs = {k: (v, getattr(ckpt_config, k)) for k, v in config.to_dict().items()
                 if getattr(ckpt_config, k) != v}
        raise ValueError(f"the checkpoint's config differs from the flags' (flags vs checkpoint): {diffs}")
    saved = trainer_state.get("args", {})
    diffs = {k: (getattr(args, k), saved[k]) for k in RESUME_MUST_MATCH if k in saved and saved[k] != getattr(args, k)}
    if diffs:
        raise ValueError(f"--resume with flags that change the run (flags vs checkpoint): {diffs}")
