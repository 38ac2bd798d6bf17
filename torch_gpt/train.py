"""`python -m torch_gpt.train`: train a GPT with AdamW, resumable, on one process or many (torchrun).

The flags, batches, schedule, outputs and the loop itself are shared with `jax_gpt.train`
(gpt_core/training.py); this file holds only what is PyTorch's: `TorchBackend`. Distributed:
`torchrun --nproc-per-node N -m torch_gpt.train` splits every micro-batch of the global `--batch-size`
across ranks (gloo on CPU, nccl on GPU); with DDP (the default) each rank holds the whole model and the
gradient all-reduce runs once per optimizer step; with `--fsdp`, PyTorch's FSDP2 (`fully_shard`) shards
every block's parameters, gradients and AdamW moments over the ranks, and checkpoints are gathered into the
same format. Only rank 0 writes.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import math
import os
import sys

import numpy as np
import torch
import torch.distributed as dist

from gpt_core.training import (
    OptimizerConfig,
    StepResult,
    TrainingCheckpoint,
    args_record,
    build_parser,
    prepare_run,
    run_training,
)
from torch_gpt import convert
from torch_gpt.generation import generate
from torch_gpt.model import ATTN_IMPLS, GPTModel

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = build_parser("python -m torch_gpt.train", __doc__.split("\n\n")[0])
    t = p.add_argument_group("torch only")
    t.add_argument("--compile", action="store_true", help="torch.compile the model")
    t.add_argument("--attn-impl", default="sdpa", choices=ATTN_IMPLS,
                   help="math: explicit softmax; sdpa: F.scaled_dot_product_attention; triton: kernels.flash_attention")
    t.add_argument("--fsdp", action="store_true",
                   help="under torchrun: shard parameters, gradients and AdamW state over the ranks (FSDP2)")
    t.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device; under torchrun each rank takes cuda:LOCAL_RANK")
    return p.parse_args(argv)


def make_optimizer(model: torch.nn.Module, opt: OptimizerConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on >=2-D weights only (matmuls and embeddings), as in GPT-2 training."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": opt.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=opt.lr, betas=(opt.beta1, opt.beta2), eps=opt.eps, foreach=False)


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind an FSDP2-sharded DTensor (a collective: every rank calls it), or `t`."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def _assign(dst: torch.Tensor, full: torch.Tensor) -> None:
    """Copy a whole tensor into `dst`, or into this rank's shard of it when `dst` is a DTensor."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    with torch.no_grad():
        if isinstance(dst, DTensor):  # every rank holds `full`: each cuts its own shard, no communication
            shard = distribute_tensor(full.to(dst.device, dst.dtype), dst.device_mesh, dst.placements,
                                      src_data_rank=None)
            dst.to_local().copy_(shard.to_local())
        else:
            dst.copy_(full)


class TorchBackend:
    """One process of a run: the model (plain, DDP-wrapped or FSDP2-sharded), AdamW, autocast and scaler."""

    name = "torch_gpt"

    def __init__(self, args: argparse.Namespace, config, opt: OptimizerConfig, resume: TrainingCheckpoint | None):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank, device = 0, args.device
        if self.world > 1:
            self.rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
            if device.startswith("cuda"):
                torch.cuda.set_device(local_rank)
                device = f"cuda:{local_rank}"
            dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
        elif args.fsdp:
            raise ValueError("--fsdp shards over the processes of a torchrun job; this is a single process")
        self.device, self.is_lead, self.args, self.config = device, self.rank == 0, args, config
        torch.manual_seed(args.seed)
        runtime = dict(attn_impl=args.attn_impl, remat=args.remat, loss_impl=args.loss_impl)
        if args.init_from is not None and resume is None:
            model = GPTModel.from_pretrained(args.init_from, **runtime).train()
        else:
            model = GPTModel(config, **runtime)
        self.model = model.to(device)
        self.fsdp = args.fsdp
        if self.fsdp:
            from torch.distributed.fsdp import fully_shard

            for block in self.model.h:
                fully_shard(block)
            fully_shard(self.model)  # the rest: embeddings (tied to the head), final norm
            self.wrapped = self.model
        else:
            self.wrapped = torch.nn.parallel.DistributedDataParallel(self.model) if self.world > 1 else self.model
        self.forward = torch.compile(self.wrapped) if args.compile else self.wrapped
        self.opt = make_optimizer(self.model, opt)
        self.grad_clip, self.grad_accum = opt.grad_clip, args.grad_accum
        self.dtype = DTYPES[args.dtype]
        device_type = torch.device(device).type
        self.autocast = (torch.autocast(device_type, dtype=self.dtype) if self.dtype != torch.float32
                         else contextlib.nullcontext())
        self.scaler = torch.amp.GradScaler(device_type, enabled=self.dtype == torch.float16)
        kind = "FSDP2" if self.fsdp else ("DDP" if self.world > 1 else "")
        self.devices = f"{self.world} x {device}{f' ({kind})' if kind else ''}"

    def rows(self, batch_size: int) -> np.ndarray:
        """This rank's rows of each micro-batch: rank r of W takes the r-th W-th of every one."""
        micro = batch_size // self.grad_accum
        return np.concatenate([np.arange(m * micro + self.rank * micro // self.world,
                                         m * micro + (self.rank + 1) * micro // self.world)
                               for m in range(self.grad_accum)])

    def restore(self, ckpt: TrainingCheckpoint) -> None:
        params = dict(self.model.named_parameters())
        if not self.fsdp:
            self.model.load_canonical_state(ckpt.model)
        else:
            for name, p in params.items():
                _assign(p, convert.from_canonical(name, ckpt.model[name]))
        for name, p in params.items():
            st = {"step": torch.tensor(float(ckpt.step))}
            for kind in ("exp_avg", "exp_avg_sq"):
                st[kind] = torch.zeros_like(p)
                _assign(st[kind], convert.from_canonical(name, ckpt.optimizer[f"{kind}.{name}"]))
            self.opt.state[p] = st
        rng = ckpt.rng
        if "torch_cpu" in rng:
            torch.set_rng_state(torch.tensor(rng["torch_cpu"], dtype=torch.uint8))
            if "torch_cuda" in rng and torch.device(self.device).type == "cuda":
                torch.cuda.set_rng_state(torch.tensor(rng["torch_cuda"], dtype=torch.uint8))
        elif self.config.drop_rate > 0 and self.is_lead:
            print("note: the checkpoint has no torch RNG state (a JAX run?): dropout masks start afresh")

    def train_step(self, x: np.ndarray, y: np.ndarray, lr: float) -> StepResult:
        for g in self.opt.param_groups:
            g["lr"] = lr
        per_micro = len(x) // self.grad_accum  # this rank's rows of one micro-batch
        loss_sum = torch.zeros((), device=self.device)
        for m in range(self.grad_accum):
            rows = slice(m * per_micro, (m + 1) * per_micro)
            xb = torch.from_numpy(x[rows]).to(self.device)
            yb = torch.from_numpy(y[rows]).to(self.device)
            last = m == self.grad_accum - 1
            with self._sync(last), self.autocast:
                loss = self.forward(xb, targets=yb) / self.grad_accum
            self.scaler.scale(loss).backward()
            loss_sum += loss.detach()
        self.scaler.unscale_(self.opt)
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip or math.inf)
        self.scaler.step(self.opt)
        self.scaler.update()
        self.opt.zero_grad(set_to_none=True)
        if self.world > 1:
            dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG)
        return StepResult(float(loss_sum), float(_full(norm)))

    def _sync(self, last: bool):
        """Gradients are reduced across ranks on the last micro-step only."""
        if self.world == 1:
            return contextlib.nullcontext()
        if self.fsdp:
            self.model.set_requires_gradient_sync(last)
            return contextlib.nullcontext()
        return contextlib.nullcontext() if last else self.wrapped.no_sync()

    def evaluate(self, batches) -> float:
        self.model.eval()
        with torch.no_grad(), self.autocast:
            losses = [self.wrapped(torch.from_numpy(x).to(self.device), targets=torch.from_numpy(y).to(self.device))
                      for x, y in batches]
        self.model.train()
        return float(torch.stack(losses).mean()) if losses else float("nan")

    def state(self):
        model = convert.canonical_dict(self.config, ((n, _full(t)) for n, t in self.model.state_dict().items()))
        moments = {}
        for name, p in self.model.named_parameters():
            st = self.opt.state.get(p, {})
            for kind in ("exp_avg", "exp_avg_sq"):
                moments[f"{kind}.{name}"] = convert.to_canonical(name, _full(st[kind]) if kind in st
                                                                 else torch.zeros(p.shape))
        rng = {"torch_cpu": torch.get_rng_state().tolist()}
        if torch.device(self.device).type == "cuda":  # dropout masks on the GPU come from its own generator
            rng["torch_cuda"] = torch.cuda.get_rng_state().tolist()
        return model, moments, rng

    def should_stop(self, requested: bool) -> bool:
        if self.world > 1:
            t = torch.tensor(float(requested), device=self.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            requested = bool(t)
        return requested

    def sample(self, ids: list[int], n: int) -> list[int] | None:
        if self.fsdp:  # generate on a whole copy: sharded forwards would need every rank at every token
            weights = self.state()[0]
            if not self.is_lead:
                return None
            model = GPTModel(self.config, attn_impl=self.args.attn_impl).to(self.device)  # no grads: no remat
            model.load_canonical_state(weights)
        elif not self.is_lead:
            return None
        else:
            model = self.model
        return generate(model, torch.tensor([ids], device=self.device), n)[0].tolist()

    def close(self) -> None:
        if self.world > 1:
            # Rank 0 still writes the checkpoint and a sample while the others are done: tearing gloo down
            # under a peer that is still working, or leaving the DDP reducer's pending work to interpreter
            # shutdown, aborts the process ("terminate called without an active exception").
            self.wrapped = self.forward = None
            gc.collect()
            dev = torch.device(self.device)
            dist.barrier(device_ids=[dev.index] if dev.type == "cuda" else None)
            dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    backend = None
    try:
        try:
            config, data, run, opt, resume = prepare_run(args)
            backend = TorchBackend(args, config, opt, resume)
            run.check_split(backend.world, "processes")
        except (ValueError, FileNotFoundError, RuntimeError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return run_training(backend, config, data, run, opt, resume, args_record(args))
    finally:
        if backend is not None:
            backend.close()


if __name__ == "__main__":
    sys.exit(main())
