"""`python -m torch_gpt.train`: train a GPT with AdamW, resumable, on one process or many (torchrun + DDP).

The flags, data order, schedule and outputs are those of `jax_gpt.train` (see gpt_core/training.py), so
the two trainers' runs compare step by step. Distributed: `torchrun --nproc-per-node N -m torch_gpt.train`
splits every micro-batch of the global `--batch-size` across ranks (gloo on CPU, nccl on GPU); the
gradient all-reduce runs once per optimizer step, not per micro-step; only rank 0 writes.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import math
import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from gpt_core.checkpoint import CONV1D_WEIGHTS
from gpt_core.tokenizer import encode_text
from gpt_core.training import (
    BatchStream,
    RunWriter,
    StopFlag,
    Throughput,
    build_parser,
    check_args,
    check_resume,
    load_training_checkpoint,
    lr_at,
    model_config,
    prepare_data,
    save_training_checkpoint,
    total_steps,
    validation_batches,
)
from torch_gpt.generation import generate
from torch_gpt.model import ATTN_IMPLS, GPTModel, cross_entropy_loss

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = build_parser("python -m torch_gpt.train", __doc__.split("\n\n")[0])
    t = p.add_argument_group("torch only")
    t.add_argument("--compile", action="store_true", help="torch.compile the model")
    t.add_argument("--attn-impl", default="sdpa", choices=ATTN_IMPLS,
                   help="math: explicit softmax; sdpa: F.scaled_dot_product_attention; triton: kernels.flash_attention")
    t.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device; under torchrun each rank takes cuda:LOCAL_RANK")
    return p.parse_args(argv)


def make_optimizer(model: GPTModel, args: argparse.Namespace) -> torch.optim.AdamW:
    """AdamW with weight decay on >=2-D weights only (matmuls and embeddings), as in GPT-2 training."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": args.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(args.beta1, args.beta2), eps=args.eps, foreach=False)


def optimizer_state(model: GPTModel, opt: torch.optim.AdamW) -> dict[str, np.ndarray]:
    """AdamW moments under canonical names and layouts (`exp_avg.NAME`, `exp_avg_sq.NAME`)."""
    out = {}
    for name, p in model.named_parameters():
        st = opt.state.get(p, {})
        for kind in ("exp_avg", "exp_avg_sq"):
            a = (st[kind] if kind in st else torch.zeros_like(p)).detach().to("cpu", torch.float32).numpy()
            out[f"{kind}.{name}"] = a.T if CONV1D_WEIGHTS.fullmatch(name) else a
    return out


def load_optimizer_state(model: GPTModel, opt: torch.optim.AdamW, moments: dict[str, np.ndarray], step: int) -> None:
    for name, p in model.named_parameters():
        st = {"step": torch.tensor(float(step))}
        for kind in ("exp_avg", "exp_avg_sq"):
            a = moments[f"{kind}.{name}"]
            st[kind] = torch.from_numpy(np.ascontiguousarray(a.T if CONV1D_WEIGHTS.fullmatch(name) else a)).to(p)
        opt.state[p] = st


def agree_to_stop(flag: StopFlag, world: int, device: str) -> bool:
    """True once any rank has been asked to stop: all ranks must leave the loop at the same step."""
    if world > 1:
        t = torch.tensor(float(flag.requested), device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        flag.requested = bool(t)
    return flag.requested


def setup_distributed(device: str) -> tuple[int, int, str]:
    """(rank, world size, device) from torchrun's environment; a single process without it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, device
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return rank, world, device


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        check_args(args)
        config = model_config(args)
        data = prepare_data(args, config)
        resume = None
        if args.resume:
            resume = load_training_checkpoint(Path(args.out) / "checkpoint")
            check_resume(args, config, resume[0], resume[3])
        rank, world, device = setup_distributed(args.device)
        micro = args.batch_size // args.grad_accum
        if micro % world:
            raise ValueError(f"the micro-batch ({args.batch_size} / grad-accum {args.grad_accum} = {micro}) "
                             f"does not split evenly over {world} processes")
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        code = train(args, config, data, resume, rank, world, device)
        if world > 1:
            # Rank 0 still writes the checkpoint and a sample while the others are done: tearing gloo down
            # under a peer that is still working, or leaving the DDP reducer's pending work to interpreter
            # shutdown, aborts the process ("terminate called without an active exception").
            gc.collect()
            dist.barrier(device_ids=[torch.device(device).index] if device.startswith("cuda") else None)
        return code
    finally:
        if world > 1:
            dist.destroy_process_group()


def train(args, config, data, resume, rank: int, world: int, device: str) -> int:
    torch.manual_seed(args.seed)
    if args.init_from is not None and resume is None:
        model = GPTModel.from_pretrained(args.init_from, attn_impl=args.attn_impl).train()
    else:
        model = GPTModel(config, attn_impl=args.attn_impl)
    opt = make_optimizer(model, args)
    steps = total_steps(args, len(data.train_x))
    stream = BatchStream(data.train_x, data.train_y, args.batch_size, args.seed)
    start = 0
    if resume is not None:
        _, state, moments, trainer_state = resume
        model.load_canonical_state(state)
        start = trainer_state["step"]
        load_optimizer_state(model, opt, moments, start)
        stream = BatchStream(data.train_x, data.train_y, args.batch_size, args.seed, **trainer_state["data"])
        if "torch_cpu" in trainer_state["rng"]:
            torch.set_rng_state(torch.tensor(trainer_state["rng"]["torch_cpu"], dtype=torch.uint8))
            if "torch_cuda" in trainer_state["rng"] and torch.device(device).type == "cuda":
                torch.cuda.set_rng_state(torch.tensor(trainer_state["rng"]["torch_cuda"], dtype=torch.uint8))
        elif config.drop_rate > 0:
            print("note: the checkpoint has no torch RNG state (a JAX run?): dropout masks start afresh")
    model.to(device)
    for st in opt.state.values():  # moments follow their parameters to the device
        for k in ("exp_avg", "exp_avg_sq"):
            st[k] = st[k].to(device)
    ddp = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    fwd = torch.compile(ddp) if args.compile else ddp
    dtype = DTYPES[args.dtype]
    device_type = torch.device(device).type
    autocast = (torch.autocast(device_type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext())
    scaler = torch.amp.GradScaler(device_type, enabled=dtype == torch.float16)
    micro = args.batch_size // args.grad_accum
    shard = slice(rank * micro // world, (rank + 1) * micro // world)  # this rank's rows of a micro-batch
    val = validation_batches(data, micro, args.eval_batches)
    out = Path(args.out)
    writer = RunWriter(out, enabled=rank == 0, resume_step=start if resume is not None else None)
    if rank == 0:
        print(f"torch_gpt: {config.n_params:,} parameters, {len(data.train_x)} windows of {data.train_x.shape[1]} "
              f"tokens, {steps} steps of {args.batch_size} on {world} x {device}, {args.dtype}")

    def evaluate() -> float:
        model.eval()
        with torch.no_grad(), autocast:
            losses = [cross_entropy_loss(model(torch.from_numpy(x).to(device)), torch.from_numpy(y).to(device))
                      for x, y in val]
        model.train()
        return float(torch.stack(losses).mean()) if losses else float("nan")

    def save(step: int) -> None:
        if rank == 0:
            rng = {"torch_cpu": torch.get_rng_state().tolist()}
            if device_type == "cuda":  # dropout masks on the GPU come from its own generator
                rng["torch_cuda"] = torch.cuda.get_rng_state().tolist()
            trainer_state = {"step": step, "data": stream.position(), "framework": "torch", "rng": rng,
                             "args": vars(args)}
            save_training_checkpoint(out / "checkpoint", config, model.canonical_state(),
                                     optimizer_state(model, opt), trainer_state)

    stop = steps if args.stop_after is None else min(steps, start + args.stop_after)
    bar = tqdm(total=steps, initial=start, desc="train", unit="step", disable=rank != 0 or args.no_progress)
    interrupted = StopFlag()
    clock = Throughput()
    batches = iter(stream)
    step = start
    with interrupted:
        while step < stop and not agree_to_stop(interrupted, world, device):
            lr = lr_at(step, args.lr, args.min_lr, args.warmup_steps, steps)
            for g in opt.param_groups:
                g["lr"] = lr
            x, y = next(batches)  # (batch_size, T): the same global batch on every rank
            loss_sum = torch.zeros((), device=device)
            for m in range(args.grad_accum):
                rows = slice(m * micro, (m + 1) * micro)
                xb = torch.from_numpy(x[rows][shard]).to(device)
                yb = torch.from_numpy(y[rows][shard]).to(device)
                sync = m == args.grad_accum - 1 or world == 1
                with (contextlib.nullcontext() if sync else ddp.no_sync()), autocast:
                    loss = cross_entropy_loss(fwd(xb), yb) / args.grad_accum
                scaler.scale(loss).backward()
                loss_sum += loss.detach()
            scaler.unscale_(opt)
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip or math.inf)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            if world > 1:
                dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG)
            step += 1
            loss_value = float(loss_sum)  # synchronises, so the rate below measures finished work
            rate = clock.tick(args.batch_size * x.shape[1])
            writer.log(kind="train", step=step, loss=loss_value, lr=lr, grad_norm=float(norm),
                       tokens=step * args.batch_size * x.shape[1], tokens_per_s=rate)
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", tok_s=f"{rate:,.0f}")
            bar.update()
            if (args.eval_every and step % args.eval_every == 0) or step == steps:
                val_loss = evaluate()
                writer.log(kind="eval", step=step, val_loss=val_loss)
                if args.no_progress and rank == 0:
                    print(f"step {step}: train loss {loss_value:.4f}, val loss {val_loss:.4f}")
            if args.ckpt_every and step % args.ckpt_every == 0:
                save(step)
    bar.close()
    save(step)
    writer.close()
    if interrupted.requested:
        if rank == 0:
            print(f"interrupted at step {step}: checkpoint written to {out / 'checkpoint'}; continue with --resume")
        return 130
    if rank == 0:
        if step < steps:
            print(f"stopped at step {step} of {steps}: continue with --resume")
        ids = encode_text(data.tokenizer, args.sample_prompt)
        if ids:
            sample = generate(model, torch.tensor([ids], device=device), args.sample_tokens)
            print(f"sample: {data.tokenizer.decode(sample[0].tolist())!r}")
        print(f"wrote {out / 'metrics.jsonl'}, {out / 'loss.png'}, {out / 'checkpoint'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
