"""The training loop, written once for both trainers, and everything about a run that is framework-free.

`torch_gpt.train` and `jax_gpt.train` build their parser with `build_parser` (the same flags, the same
defaults), turn the flags into typed configs (`OptimizerConfig`, `RunConfig`, `DataConfig`) and hand
`run_training` a `Backend`: the few things only a framework can do (a step, an evaluation, the state to save
and restore, a sample, this process's rows and rank). The loop does the rest, identically for both: the
schedule (`OptimizerConfig.lr_at`), the batches (`gpt_core.batches`: the same windows in the same order on
both sides, fixed by (seed, step)), the progress bar, `metrics.jsonl` and `loss.png` (`RunWriter`), the
evaluation and checkpoint cadence, Ctrl-C at a step boundary (`StopFlag`) and the closing messages.

A training checkpoint (`TrainingCheckpoint`) is a directory: the model checkpoint (`config.json`,
`model.safetensors`) plus `optimizer.safetensors` (AdamW moments under the canonical parameter names and
layouts, `exp_avg.NAME` and `exp_avg_sq.NAME`) and `trainer_state.json` (step, RNG state, the flags). It is
written under a temporary name and swapped in, so a crash never leaves a half-written one; either trainer
resumes the other's.
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
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from safetensors.numpy import load_file, save_file

from gpt_core.batches import DataConfig, DataError, TrainingData, open_training_data
from gpt_core.checkpoint import load_checkpoint, load_config, resolve_checkpoint, save_checkpoint
from gpt_core.cli import HelpFormatter
from gpt_core.config import GPTConfig
from gpt_core.tokenizer import encode_text

__all__ = [
    "Backend", "DataConfig", "OptimizerConfig", "RunConfig", "RunWriter", "StopFlag", "TrainingCheckpoint",
    "TrainingData", "build_parser", "check_args", "model_config", "open_training_data", "run_training",
]

OPTIMIZER_FILE = "optimizer.safetensors"
TRAINER_STATE_FILE = "trainer_state.json"
# Flags that must match between a run and the checkpoint it resumes: the data order and model depend on them.
RESUME_MUST_MATCH = ("preset", "config", "data", "tokenizer", "val_fraction", "seq_len", "stride", "batch_size",
                     "grad_accum", "seed")


# ------------------------------------------------------------------------------------------------- the CLI
def build_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """The trainers' shared flags; each trainer adds its framework's own after this."""
    p = argparse.ArgumentParser(prog=prog, description=description,
                                formatter_class=HelpFormatter)
    m = p.add_argument_group("model")
    m.add_argument("--preset", default="tiny", help="GPTConfig preset: tiny, gpt2, gpt2-medium, gpt2-large, gpt2-xl")
    m.add_argument("--config", default=None, help="a config JSON file (any dialect); overrides --preset")
    m.add_argument("--init-from", default=None, metavar="DIR_OR_NAME",
                   help="start from these weights: a checkpoint directory or a Hugging Face Hub repository id "
                        "(gpt2, openai-community/gpt2-medium, ...; HF_HUB_OFFLINE=1 reads only the local Hub cache)")
    m.add_argument("--remat", default="none", choices=["none", "block", "dots"],
                   help="recompute activations in the backward to save memory: none; block (each block from its "
                        "input); dots (the same, keeping the linear layers' matmul outputs)")
    m.add_argument("--loss-impl", default="plain", choices=["plain", "fused"],
                   help="plain: the loss of the whole (B, T, vocab) logits; fused: chunk by chunk from the final "
                        "hidden states, never holding the logits (kernels.linear_cross_entropy / "
                        "jax_gpt.losses.linear_cross_entropy)")
    d = p.add_argument_group("data")
    d.add_argument("--data", default=None,
                   help="a folder of token shards (`python -m gpt_core.data prepare`, or llm.c's *_train_*.bin / "
                        "*_val_*.bin), read lazily; or a small plain-text file (default: the shipped sample corpus)")
    d.add_argument("--tokenizer", default="gpt2", help="gpt2, cl100k_base or word:VOCAB.json")
    d.add_argument("--val-fraction", type=float, default=0.1,
                   help="text file: tail of the token stream held out (shard folders have their own val shard)")
    d.add_argument("--seq-len", type=int, default=None, help="window length (default: the context length)")
    d.add_argument("--stride", type=int, default=None, help="text file: window stride (default: --seq-len)")
    o = p.add_argument_group("optimisation")
    o.add_argument("--batch-size", type=int, default=8, help="global windows per optimizer step")
    o.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step (batch-size must divide)")
    o.add_argument("--steps", type=int, default=None, help="optimizer steps (default: 1 epoch unless --epochs)")
    o.add_argument("--epochs", type=float, default=None,
                   help="passes over the training windows (shard folders: over the training tokens)")
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
    if args.init_from is not None:  # the config only: the backend reads the weights (torch also a .bin)
        return load_config(resolve_checkpoint(args.init_from))
    return GPTConfig.from_preset(args.preset)


# --------------------------------------------------------------------------------------- typed configs
@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW (decay on >= 2-D weights only), global-norm clipping, linear warmup then cosine decay."""

    lr: float = 6e-4
    min_lr: float = 6e-5
    warmup_steps: int = 10
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> OptimizerConfig:
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})

    def lr_at(self, step: int, total: int) -> float:
        """Learning rate for optimizer step `step` (0-based) of `total`."""
        return lr_at(step, self.lr, self.min_lr, self.warmup_steps, total)


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """How long, how often and where: everything of a run that is neither the model, the data nor AdamW."""

    steps: int  # total optimizer steps of the whole run (the schedule's length)
    batch_size: int = 8  # global windows per step
    grad_accum: int = 1
    seed: int = 1337
    dtype: str = "float32"
    eval_every: int = 50  # 0: only at the end
    eval_batches: int = 8
    ckpt_every: int = 0  # 0: only at the end
    stop_after: int | None = None  # steps of this invocation
    out: Path = Path("runs/train")
    sample_prompt: str = "Every effort moves you"
    sample_tokens: int = 30
    progress: bool = True

    @property
    def micro_batch(self) -> int:
        return self.batch_size // self.grad_accum

    def check_split(self, n: int, unit: str) -> None:
        """Every micro-batch must split evenly over the run's `n` processes or devices."""
        if self.micro_batch % n:
            raise ValueError(f"the micro-batch ({self.batch_size} / grad-accum {self.grad_accum} = "
                             f"{self.micro_batch}) does not split evenly over {n} {unit}")

    @classmethod
    def from_args(cls, args: argparse.Namespace, steps: int) -> RunConfig:
        names = {f.name for f in dataclasses.fields(cls)} - {"steps", "out", "progress"}
        return cls(steps=steps, out=Path(args.out), progress=not args.no_progress,
                   **{k: getattr(args, k) for k in names})


def data_config(args: argparse.Namespace) -> DataConfig:
    return DataConfig(path=args.data, tokenizer=args.tokenizer, seq_len=args.seq_len, stride=args.stride,
                      val_fraction=args.val_fraction)


def total_steps(data: TrainingData, batch_size: int, steps: int | None, epochs: float | None) -> int:
    """--steps, or --epochs (default 1) passes over the training windows."""
    if steps is not None:
        return steps
    return max(1, math.ceil(data.batches_per_epoch(batch_size) * (epochs if epochs is not None else 1.0)))


def lr_at(step: int, lr: float, min_lr: float, warmup_steps: int, total: int) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then cosine decay to min_lr."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if total <= warmup_steps:
        return lr
    progress = min(1.0, (step - warmup_steps) / max(1, total - warmup_steps - 1))
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


# ------------------------------------------------------------------------------------- training checkpoints
@dataclasses.dataclass
class TrainingCheckpoint:
    """Everything a run needs to continue exactly: weights and AdamW moments (canonical names and layouts),
    the step, the framework's RNG state and the flags it ran with."""

    config: GPTConfig
    model: dict[str, np.ndarray]
    optimizer: dict[str, np.ndarray]  # exp_avg.NAME, exp_avg_sq.NAME
    step: int
    framework: str
    rng: dict[str, Any] = dataclasses.field(default_factory=dict)  # per framework: "torch_cpu", "jax", ...
    args: dict[str, Any] = dataclasses.field(default_factory=dict)

    def moments(self, kind: str) -> dict[str, np.ndarray]:
        """The `exp_avg` or `exp_avg_sq` moments, by parameter name."""
        return {k.removeprefix(kind + "."): v for k, v in self.optimizer.items() if k.startswith(kind + ".")}

    def save(self, directory: str | Path) -> Path:
        """Write it to `directory`, atomically (temporary directory, then swap)."""
        directory = Path(directory)
        tmp = directory.with_name(directory.name + ".tmp")
        old = directory.with_name(directory.name + ".old")
        shutil.rmtree(tmp, ignore_errors=True)
        save_checkpoint(tmp, self.config, self.model)
        save_file({k: np.ascontiguousarray(v) for k, v in self.optimizer.items()}, tmp / OPTIMIZER_FILE)
        state = {"step": self.step, "framework": self.framework, "rng": self.rng, "args": self.args}
        (tmp / TRAINER_STATE_FILE).write_text(json.dumps(state, indent=1, default=str) + "\n")
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if directory.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(directory, old)  # a crash from here on leaves `old` complete: `load` uses it
        os.replace(tmp, directory)
        shutil.rmtree(old, ignore_errors=True)
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> TrainingCheckpoint:
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
        meta = json.loads((directory / TRAINER_STATE_FILE).read_text())
        return cls(config, state, optimizer, meta["step"], meta.get("framework", "?"), meta.get("rng", {}),
                   meta.get("args", {}))

    def check_matches(self, args: argparse.Namespace, config: GPTConfig) -> None:
        """Refuse to resume when the flags describe a different model or data order than this checkpoint's."""
        if self.config != config:
            diffs = {k: (v, getattr(self.config, k)) for k, v in config.to_dict().items()
                     if getattr(self.config, k) != v}
            raise ValueError(f"the checkpoint's config differs from the flags' (flags vs checkpoint): {diffs}")
        diffs = {k: (getattr(args, k), self.args[k]) for k in RESUME_MUST_MATCH
                 if k in self.args and self.args[k] != getattr(args, k)}
        if diffs:
            raise ValueError(f"--resume with flags that change the run (flags vs checkpoint): {diffs}")


# ------------------------------------------------------------------------------------------- run outputs
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


# ------------------------------------------------------------------------------------------- the loop
@dataclasses.dataclass
class StepResult:
    loss: float  # mean over the global batch; reading it waits for the step to finish
    grad_norm: float


class Backend(Protocol):
    """What a framework gives the loop. Every method is called on every process (collectives inside are
    fine); `is_lead` says which process writes."""

    name: str  # "torch_gpt", "jax_gpt": the banner
    is_lead: bool
    devices: str  # "2 x cpu (DDP)", "4 x cpu (FSDP: 30 of 41 tensors sharded)": for the banner

    def rows(self, batch_size: int) -> np.ndarray | None:
        """The rows of each global batch this process feeds its devices (None: all of them)."""

    def restore(self, ckpt: TrainingCheckpoint) -> None:
        """Take weights, AdamW moments and RNG state from a checkpoint."""

    def train_step(self, x: np.ndarray, y: np.ndarray, lr: float) -> StepResult:
        """One optimizer step on this process's rows (`rows`) of a global batch, (n, T) int64 each."""

    def evaluate(self, batches: list[tuple[np.ndarray, np.ndarray]]) -> float:
        """Mean loss over whole validation batches, without dropout."""

    def state(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, Any]]:
        """(weights, AdamW moments as exp_avg.NAME / exp_avg_sq.NAME, RNG state), canonical, on the host."""

    def should_stop(self, requested: bool) -> bool:
        """True on every process once any process has been asked to stop."""

    def sample(self, ids: list[int], n: int) -> list[int] | None:
        """Greedy continuation of `ids` by n tokens (on the lead; None elsewhere)."""


def run_training(backend: Backend, config: GPTConfig, data: TrainingData, run: RunConfig, opt: OptimizerConfig,
                 resume: TrainingCheckpoint | None, args_record: dict[str, Any]) -> int:
    """Train from `resume`'s step (or 0) to `run.steps` (or `run.stop_after` steps sooner); checkpoint at the
    end, every `ckpt_every` steps and on Ctrl-C. Returns the exit status: 0, 130 when interrupted, 2 on bad data
    (token ids the model cannot embed: the error names the file)."""
    try:
        return _run_training(backend, config, data, run, opt, resume, args_record)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _run_training(backend: Backend, config: GPTConfig, data: TrainingData, run: RunConfig, opt: OptimizerConfig,
                  resume: TrainingCheckpoint | None, args_record: dict[str, Any]) -> int:
    from tqdm import tqdm

    start = 0
    if resume is not None:
        backend.restore(resume)
        start = resume.step
    lead = backend.is_lead
    rows = backend.rows(run.batch_size)
    data.batch(start, run.batch_size, rows)  # bad data (ids the model cannot embed) fails before any output
    val = data.validation_batches(run.micro_batch, run.eval_batches)
    writer = RunWriter(run.out, enabled=lead, resume_step=start if resume is not None else None)
    if lead:
        print(f"{backend.name}: {config.n_params:,} parameters, {data.describe()}, {run.steps} steps of "
              f"{run.batch_size} on {backend.devices}, {run.dtype}")

    def save(step: int) -> None:
        model, moments, rng = backend.state()  # a collective where parameters are sharded: every process
        if lead:
            TrainingCheckpoint(config, model, moments, step, backend.name, rng, args_record).save(
                run.out / "checkpoint")

    stop = run.steps if run.stop_after is None else min(run.steps, start + run.stop_after)
    bar = tqdm(total=run.steps, initial=start, desc="train", unit="step", disable=not lead or not run.progress)
    interrupted = StopFlag()
    tokens_per_step = run.batch_size * data.seq_len
    step = start
    try:
        with interrupted:
            while step < stop and not backend.should_stop(interrupted.requested):
                t0 = time.perf_counter()
                lr = opt.lr_at(step, run.steps)
                x, y = data.batch(step, run.batch_size, rows)
                t_data = time.perf_counter() - t0
                result = backend.train_step(x, y, lr)
                step += 1
                loss = float(result.loss)  # waits for the step, so the times below measure finished work
                t_step = time.perf_counter() - t0
                rate = tokens_per_step / max(t_step, 1e-9)
                writer.log(kind="train", step=step, loss=loss, lr=lr, grad_norm=float(result.grad_norm),
                           tokens=step * tokens_per_step, tokens_per_s=rate, data_s=t_data, step_s=t_step)
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{rate:,.0f}")
                bar.update()
                if (run.eval_every and step % run.eval_every == 0) or step == run.steps:
                    val_loss = backend.evaluate(val)
                    writer.log(kind="eval", step=step, val_loss=val_loss)
                    if not run.progress and lead:
                        print(f"step {step}: train loss {loss:.4f}, val loss {val_loss:.4f}")
                if run.ckpt_every and step % run.ckpt_every == 0:
                    save(step)
        save(step)
    finally:  # a crash keeps every finished step's line (and the last periodic checkpoint)
        bar.close()
        writer.close()
    out = run.out
    if interrupted.requested or (step < stop):
        if lead:
            print(f"interrupted at step {step}: checkpoint written to {out / 'checkpoint'}; continue with --resume")
        return 130
    ids = encode_text(data.tokenizer, run.sample_prompt)
    sample = backend.sample(ids, run.sample_tokens) if ids else None
    if lead:
        if step < run.steps:
            print(f"stopped at step {step} of {run.steps}: continue with --resume")
        if sample is not None:
            print(f"sample: {decode_sample(data.tokenizer, sample)!r}")
        print(f"wrote {out / 'metrics.jsonl'}, {out / 'loss.png'}, {out / 'checkpoint'}")
    return 0


def decode_sample(tokenizer, ids: list[int]) -> str:
    """Decode a sample; ids the model has but the tokenizer lacks (a vocabulary padded past the tokenizer's,
    as GPT-2's 50,304) are shown as <|id N|> instead of failing the run at its last line."""
    out, run = [], []
    for i in ids:
        if i < tokenizer.n_vocab:
            run.append(i)
            continue
        if run:
            out.append(tokenizer.decode(run))
            run = []
        out.append(f"<|id {i}|>")
    if run:
        out.append(tokenizer.decode(run))
    return "".join(out)


def prepare_run(args: argparse.Namespace) -> tuple[GPTConfig, TrainingData, RunConfig, OptimizerConfig,
                                                   TrainingCheckpoint | None]:
    """The CLI's flags -> (model config, data, run, optimizer, checkpoint to resume): every error here comes
    before any training work."""
    check_args(args)
    config = model_config(args)
    data = open_training_data(data_config(args), config, seed=args.seed)
    data.check_batch_size(args.batch_size)
    resume = None
    if args.resume:
        resume = TrainingCheckpoint.load(Path(args.out) / "checkpoint")
        resume.check_matches(args, config)
    run = RunConfig.from_args(args, total_steps(data, args.batch_size, args.steps, args.epochs))
    return config, data, run, OptimizerConfig.from_args(args), resume


def args_record(args: argparse.Namespace) -> dict[str, Any]:
    """The flags as the checkpoint keeps them (JSON-able)."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
