"""`python -m bench [parity|speed|kernels|compile]`: prove the twins agree, and measure them.

With no subcommand it runs everything this machine supports on embedded defaults (the `tiny` preset;
a few minutes on a 2-core CPU). Every row carries device, dtype, shape, versions and git commit.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from bench import report
from gpt_core.cli import HelpFormatter

# The twins share one GPU in one process: JAX must not take 75% of its memory at first use (its default), which
# starves torch. Set before jax is imported; every row's environment says what was in force (jax_gpu_memory).
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

DESCRIPTION = """Parity and speed of torch_gpt vs jax_gpt, and of the Triton kernels.

  parity   logits, loss, every gradient, an N-step AdamW run and greedy generation, torch vs jax,
           from one checkpoint; PASS/FAIL per row against DESIGN.md's tolerances; exit 1 on any FAIL
  speed    forward, forward+backward, train step, prefill and per-token decode for every implementation
           this machine runs (torch math/sdpa/triton, torch.compile, jax.jit xla/cudnn; transformers'
           generate for prefill/decode): median time, spread, tokens/s, achieved TFLOP/s, MFU, compile
           time, peak memory; decode also the measured read bandwidth and the floor it sets
  kernels  on CUDA, flash attention and LayerNorm throughput against PyTorch; elsewhere, the
           interpreter correctness sweep
  compile  every Triton kernel configuration compiled for sm_80 and sm_90 without a GPU: registers,
           spills, shared memory, tensor-core instructions; exit 1 if any configuration spills
  data     prepare tokens/s (1 and 2 workers vs a plain tiktoken loop) on a generated 200 MB corpus; the
           trainers' peak memory on 10M- and 1B-token shard datasets, and their time waiting for data
  loss     memory and time of the loss, whole logits against the fused linear cross-entropy, both sides:
           the loss alone (forward+backward) and one training step with each --loss-impl

No subcommand: all six on defaults (kernels, compile and data on their --quick subsets).
Outputs: a terminal table, and --json/--csv/--plot files."""


def add_common(p: argparse.ArgumentParser, top: bool = False) -> None:
    # Subcommands must not reset what was given before them (`--json x parity`): SUPPRESS their defaults.
    default = None if top else argparse.SUPPRESS
    p.add_argument("--json", metavar="FILE", default=default, help="write rows (with environment) as JSON")
    p.add_argument("--csv", metavar="FILE", default=default, help="write rows as CSV")
    p.add_argument("--plot", metavar="FILE.png", default=default,
                   help="bar chart of throughput per implementation and phase")


def add_model(p: argparse.ArgumentParser, batch: int, seq_len: int) -> None:
    p.add_argument("--preset", default="tiny", help="GPTConfig preset (tiny, gpt2, gpt2-medium, ...)")
    p.add_argument("--config", default=None, help="config JSON file (any dialect); overrides --preset")
    p.add_argument("--batch", type=int, default=batch, help="batch size")
    p.add_argument("--seq-len", type=int, default=seq_len, help="sequence length")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype of both models")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and inputs")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common(p, top=True)
    sub = p.add_subparsers(dest="command", metavar="{parity,speed,kernels,compile,data,loss}")
    par = sub.add_parser("parity", help="torch vs jax: same function?",
                         formatter_class=HelpFormatter)
    add_model(par, batch=2, seq_len=64)
    par.add_argument("--train-steps", type=int, default=5, help="AdamW steps compared (0: none)")
    par.add_argument("--gen-tokens", type=int, default=16, help="greedy tokens compared (0: none)")
    par.add_argument("--precision", default="highest", choices=["highest", "default"],
                     help="highest: full float32 matmuls on both sides; default: each framework's own")
    par.add_argument("--perturb", metavar="PARAM", default=None,
                     help="self-test: nudge this weight (e.g. h.0.attn.c_attn.weight) on the JAX side; must FAIL")
    add_common(par)
    spd = sub.add_parser("speed", help="time every implementation",
                         formatter_class=HelpFormatter)
    add_model(spd, batch=4, seq_len=128)
    spd.add_argument("--repeats", type=int, default=5, help="timed repeats per measurement (median reported)")
    spd.add_argument("--decode-tokens", type=int, default=16, help="tokens generated for the decode timing")
    spd.add_argument("--impl", action="append", help="only these implementations (repeatable), e.g. jax/xla")
    spd.add_argument("--phase", action="append", help="only these phases (repeatable), e.g. forward")
    spd.add_argument("--precision", default="highest", choices=["highest", "tf32"],
                     help="float32 matmuls on both sides: exact, or TF32 where the GPU has it")
    spd.add_argument("--study", default=None, choices=["depth", "memory"],
                     help="instead of the phases: depth (JAX train-step compile and step time at each --layers, "
                          "scanned and unrolled) or memory (activation memory with each --remat, both sides)")
    spd.add_argument("--layers", type=int, action="append", help="--study depth: depths (repeatable; default 12 24 48)")
    spd.add_argument("--remat", action="append", choices=["none", "block", "dots"],
                     help="--study memory: remat modes (repeatable; default all three)")
    add_common(spd)
    ker = sub.add_parser("kernels", help="Triton kernels: speed on CUDA, correctness sweep elsewhere",
                         formatter_class=HelpFormatter)
    ker.add_argument("--repeats", type=int, default=10, help="timed repeats per CUDA measurement (median reported)")
    ker.add_argument("--quick", action="store_true", help="fewer shapes")
    add_common(ker)
    com = sub.add_parser("compile", help="ahead-of-time resource report for sm_80 and sm_90",
                         formatter_class=HelpFormatter)
    com.add_argument("--arch", type=int, action="append", help="compute capability, e.g. 90 (default 80 and 90)")
    com.add_argument("--quick", action="store_true", help="a subset of configurations (bf16/fp32, D 64 and 128)")
    com.add_argument("--kernel", default=None, help="one kernel only, e.g. attn_fwd, ln_fwd")
    add_common(com)
    dat = sub.add_parser("data", help="prepare throughput, trainer memory and data wait on token shards",
                         formatter_class=HelpFormatter)
    dat.add_argument("--quick", action="store_true", help="small sizes (2 MB corpus, 100k/1M tokens, 3 steps)")
    dat.add_argument("--stage", action="append", choices=["prepare", "trainer"], help="only these (repeatable)")
    dat.add_argument("--trainer", action="append", choices=["torch", "jax"], help="only these trainers (repeatable)")
    dat.add_argument("--corpus-mb", type=float, default=None, help="generated corpus size in MB (default 200)")
    dat.add_argument("--workers", type=int, action="append", help="prepare worker counts (default 1 and 2)")
    dat.add_argument("--small-tokens", type=int, default=None, help="tokens of the small dataset (default 10^7)")
    dat.add_argument("--large-tokens", type=int, default=None, help="tokens of the large dataset (default 10^9)")
    dat.add_argument("--steps", type=int, default=None, help="trainer steps per run (default 20)")
    dat.add_argument("--tmp", default=None, help="folder for the corpus and datasets (default: the system's)")
    add_common(dat)
    los = sub.add_parser("loss", help="memory and time of the loss: whole logits vs fused, both sides",
                         formatter_class=HelpFormatter)
    add_model(los, batch=4, seq_len=128)  # 512 rows: 4 chunks of logits, so the default run shows the effect
    los.add_argument("--repeats", type=int, default=3, help="timed repeats per measurement (median reported)")
    los.add_argument("--side", action="append", choices=["torch", "jax"], help="only these sides (repeatable)")
    los.add_argument("--part", action="append", choices=["loss", "step"],
                     help="only these parts (repeatable): the loss alone, or a whole training step")
    add_common(los)
    return p


def model_config(args):
    from gpt_core.config import GPTConfig

    return GPTConfig.from_json(args.config) if args.config else GPTConfig.from_preset(args.preset)


def progress(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run_parity(args) -> list[report.Row]:
    from bench import parity

    return parity.run(model_config(args), batch=args.batch, seq_len=args.seq_len, dtype=args.dtype, seed=args.seed,
                      train_steps=args.train_steps, gen_tokens=args.gen_tokens, precision=args.precision,
                      perturb=args.perturb, progress=progress)


def run_speed(args) -> list[report.Row]:
    from bench import speed

    if getattr(args, "study", None) is not None:
        from bench import depth

        if args.study == "depth":
            return depth.depth_rows(model_config(args), args.layers or [12, 24, 48], batch=args.batch,
                                    seq_len=args.seq_len, repeats=args.repeats, progress=progress)
        return depth.memory_rows(model_config(args), tuple(args.remat or depth.REMATS), batch=args.batch,
                                 seq_len=args.seq_len, repeats=args.repeats, progress=progress)

    return speed.run(model_config(args), batch=args.batch, seq_len=args.seq_len, dtype=args.dtype,
                     repeats=args.repeats, decode_tokens=args.decode_tokens, impls=args.impl, precision=args.precision,
                     phases=tuple(args.phase) if args.phase else speed.PHASES, progress=progress)


def run_kernels(args) -> list[report.Row]:
    from bench import kernel_bench

    return kernel_bench.run(repeats=args.repeats, quick=args.quick, progress=progress)


def run_compile(args) -> list[report.Row]:
    from bench import kernel_bench

    return kernel_bench.compile_rows(archs=tuple(args.arch) if args.arch else (80, 90), quick=args.quick,
                                     only=args.kernel, progress=progress)


def run_data(args) -> list[report.Row]:
    from bench import data

    return data.run(quick=args.quick, stages=tuple(args.stage or data.STAGES),
                    trainers=tuple(args.trainer or data.TRAINERS), corpus_mb=args.corpus_mb,
                    workers=tuple(args.workers or (1, 2)), small_tokens=args.small_tokens,
                    large_tokens=args.large_tokens, steps=args.steps, tmp=args.tmp, progress=progress)


def run_loss(args) -> list[report.Row]:
    from bench import loss_memory

    return loss_memory.run(model_config(args), batch=args.batch, seq_len=args.seq_len, dtype=args.dtype,
                           repeats=args.repeats, seed=args.seed, sides=tuple(args.side or loss_memory.SIDES),
                           parts=tuple(args.part or loss_memory.PARTS), progress=progress)


# `python -m bench` with no subcommand: each suite on its defaults, the Triton ones on their quick subsets,
# so that the whole run stays within a few minutes on a 2-core CPU.
NO_SUBCOMMAND = {"parity": ["parity"], "speed": ["speed"], "kernels": ["kernels", "--quick"],
                 "compile": ["compile", "--quick"], "data": ["data", "--quick"], "loss": ["loss"]}


def defaults(command: str) -> argparse.Namespace:
    return parser().parse_args(NO_SUBCOMMAND[command])


def check(args) -> None:
    for name in ("batch", "seq_len", "repeats", "decode_tokens"):
        v = getattr(args, name, None)
        if v is not None and v < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    for name in ("train_steps", "gen_tokens"):
        v = getattr(args, name, None)
        if v is not None and v < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {v}")


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    runners = {"parity": run_parity, "speed": run_speed, "kernels": run_kernels, "compile": run_compile,
               "data": run_data, "loss": run_loss}
    suites = [args.command] if args.command else list(runners)
    rows: list[report.Row] = []
    t0 = time.perf_counter()
    try:
        for i, suite in enumerate(suites, 1):
            sargs = args if args.command else defaults(suite)
            check(sargs)
            if not args.command:
                progress(f"suite {i}/{len(suites)}: {suite}")
            suite_rows = runners[suite](sargs)
            print(report.table(suite_rows, title=f"== {suite} =="))
            rows += suite_rows
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    env = report.environment()
    print("environment: " + ", ".join(f"{k}={v}" for k, v in env.items()))
    print(f"{len(rows)} rows in {time.perf_counter() - t0:.0f} s")
    if args.json:
        report.write_json(rows, args.json)
    if args.csv:
        report.write_csv(rows, args.csv)
    if args.plot:
        if report.plot(rows, args.plot) is None:
            print(f"no throughput rows to plot; {args.plot} not written", file=sys.stderr)
    for path in (args.json, args.csv, args.plot):
        if path and Path(path).exists():
            print(f"wrote {path}")
    failed = [r for r in rows if r.status == "FAIL"]
    if failed:
        print(f"{len(failed)} FAIL: " + "; ".join(f"{r.suite} {r.name}" for r in failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
