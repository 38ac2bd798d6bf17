"""`python -m jax_gpt.train`: train a GPT under `jax.jit`, resumable, over every visible device.

The flags, data order, schedule and outputs are those of `torch_gpt.train` (see gpt_core/training.py), so
the two trainers' runs compare step by step. Devices: a `Mesh` with one `data` axis over every visible
device (or `--devices N`); each batch is sharded over it, parameters are replicated, or with `--fsdp`
sharded along their first dimension together with the optimizer state. Multi-host: every process runs
this command; `--distributed` lets `jax.distributed.initialize()` find the job from its cluster (SLURM,
Open MPI, Kubernetes, Cloud TPU), and `--coordinator HOST:PORT --num-processes N --process-id I` (or
JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID) start one anywhere. The mesh then spans the
devices of every process, each process feeds its own devices' rows of the batch, and the first writes
the outputs.
"""

from __future__ import annotations

import argparse
import os
import sys
from functools import partial
from pathlib import Path

import numpy as np

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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = build_parser("python -m jax_gpt.train", __doc__.split("\n\n")[0])
    j = p.add_argument_group("jax only")
    j.add_argument("--attn-impl", default="xla", choices=["math", "xla", "cudnn"],
                   help="math: explicit softmax; xla: jax.nn.dot_product_attention; cudnn: its GPU flash path")
    j.add_argument("--devices", type=int, default=None, help="use the first N devices (default: all)")
    j.add_argument("--fsdp", action="store_true", help="shard parameters and optimizer state over the data axis")
    j.add_argument("--distributed", action="store_true",
                   help="join a multi-host job: jax.distributed.initialize() detects SLURM, Open MPI, Kubernetes, TPU")
    j.add_argument("--coordinator", default=os.environ.get("JAX_COORDINATOR_ADDRESS"), metavar="HOST:PORT",
                   help="multi-host without a detected cluster: process 0's address (env JAX_COORDINATOR_ADDRESS)")
    j.add_argument("--num-processes", type=int, default=_env_int("JAX_NUM_PROCESSES"),
                   help="with --coordinator: processes in the job (env JAX_NUM_PROCESSES)")
    j.add_argument("--process-id", type=int, default=_env_int("JAX_PROCESS_ID"),
                   help="with --coordinator: this process's index, 0 to N-1 (env JAX_PROCESS_ID)")
    return p.parse_args(argv)


def _env_int(name: str) -> int | None:
    return int(os.environ[name]) if os.environ.get(name) else None


def join_job(args) -> None:
    """`jax.distributed.initialize` when the flags or the environment ask for a multi-host job."""
    manual = (args.coordinator, args.num_processes, args.process_id)
    if not args.distributed and all(v is None for v in manual):
        return
    if not args.distributed and None in manual:
        raise ValueError("--coordinator, --num-processes and --process-id go together (or use --distributed "
                         "on a cluster JAX detects)")
    if args.num_processes is not None and args.num_processes < 1:
        raise ValueError(f"--num-processes must be >= 1, got {args.num_processes}")
    if None not in (args.num_processes, args.process_id) and not 0 <= args.process_id < args.num_processes:
        raise ValueError(f"--process-id {args.process_id} is outside 0..{args.num_processes - 1}")
    import jax

    jax.distributed.initialize(*manual)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        check_args(args)
        if args.dtype == "float16":
            raise ValueError("--dtype float16 needs loss scaling, which only torch_gpt.train has; use bfloat16")
        join_job(args)
        config = model_config(args)
        data = prepare_data(args, config)
        resume = None
        if args.resume:
            resume = load_training_checkpoint(Path(args.out) / "checkpoint")
            check_resume(args, config, resume[0], resume[3])
        mesh = make_mesh(args.devices)
        micro = args.batch_size // args.grad_accum
        if micro % mesh.size:
            raise ValueError(f"the micro-batch ({args.batch_size} / grad-accum {args.grad_accum} = {micro}) "
                             f"does not split evenly over {mesh.size} devices")
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return train(args, config, data, resume, mesh)


def make_mesh(n: int | None):
    import jax
    from jax.sharding import Mesh

    devices = jax.devices()
    if n is not None:
        if not 1 <= n <= len(devices):
            raise ValueError(f"--devices {n}: {len(devices)} device(s) are visible")
        devices = devices[:n]
    return Mesh(np.array(devices), ("data",))


def param_sharding(mesh, fsdp: bool):
    """Replicated, or (FSDP) split along the first dimension where it divides evenly over the data axis."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    def spec(x):
        if fsdp and x.ndim >= 1 and x.shape[0] % mesh.size == 0:
            return NamedSharding(mesh, P("data"))
        return NamedSharding(mesh, P())

    return spec


def make_optimizer(args):
    """AdamW as optax composes it, with the learning rate applied in the step: the same lr_at as torch."""
    import jax
    import optax

    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)  # noqa: E731
    parts = [optax.clip_by_global_norm(args.grad_clip)] if args.grad_clip > 0 else []
    parts += [optax.scale_by_adam(b1=args.beta1, b2=args.beta2, eps=args.eps),
              optax.add_decayed_weights(args.weight_decay, mask=decay_mask)]
    return optax.chain(*parts)


def adam_state(opt_state):
    import optax

    found = [s for s in _walk(opt_state) if isinstance(s, optax.ScaleByAdamState)]
    assert len(found) == 1, "one ScaleByAdamState expected in the optimizer state"
    return found[0]


def _walk(tree):
    yield tree
    if isinstance(tree, tuple):
        for t in tree:
            yield from _walk(t)


def canonical_tree(tree) -> dict[str, np.ndarray]:
    """A Param-shaped tree (parameters, gradients or Adam moments) -> canonical names and layouts."""
    import jax
    from jax.experimental import multihost_utils

    from jax_gpt.model import TRANSPOSED, canonical_name

    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        name = canonical_name(tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey)))
        if jax.process_count() > 1:
            leaf = multihost_utils.process_allgather(leaf, tiled=True)
        a = np.asarray(leaf, np.float32)
        out[name] = a.T if name in TRANSPOSED else a
    return out


def from_canonical(tree, canonical: dict[str, np.ndarray]):
    """The inverse of `canonical_tree`, filling a Param-shaped `tree` (keeping its dtypes and shardings)."""
    import jax

    from jax_gpt.model import TRANSPOSED, canonical_name

    def fill(path, leaf):
        name = canonical_name(tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey)))
        a = canonical[name]
        return jax.device_put(np.asarray(a.T if name in TRANSPOSED else a, leaf.dtype), leaf.sharding)

    return jax.tree_util.tree_map_with_path(fill, tree)


def to_mesh(tree, sharding_of):
    """Place every leaf (the same value on every process) on the mesh. Going through host memory makes
    this work across processes too, where `device_put` refuses arrays already committed to a local device."""
    import jax

    def put(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:  # already on the mesh (optimizer state)
            return jax.device_put(x, sharding_of(x))
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            data = jax.device_put(np.asarray(jax.random.key_data(x)), sharding_of(x))
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
        return jax.device_put(np.asarray(x), sharding_of(x))

    return jax.tree.map(put, tree)


def agree_to_stop(flag: StopFlag) -> bool:
    """True once any process has been asked to stop: all must leave the loop at the same step."""
    import jax
    from jax.experimental import multihost_utils

    if jax.process_count() > 1:
        flag.requested = bool(np.any(multihost_utils.process_allgather(np.int32(flag.requested))))
    return flag.requested


def rng_leaves(rest) -> list:
    """Dropout RNG state (keys and counters) as JSON-able lists, and back with `set_rng_leaves`."""
    import jax

    return [np.asarray(jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x).tolist()
            for x in jax.tree.leaves(rest)]


def set_rng_leaves(rest, saved: list):
    import jax
    import jax.numpy as jnp

    leaves, treedef = jax.tree.flatten(rest)
    new = [jax.random.wrap_key_data(jnp.asarray(s, jnp.uint32), impl=jax.random.key_impl(x))
           if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else jnp.asarray(s, x.dtype)
           for x, s in zip(leaves, saved, strict=True)]
    return jax.tree.unflatten(treedef, new)


def train(args, config, data, resume, mesh) -> int:
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P
    from tqdm import tqdm

    import jax_gpt
    from gpt_core.tokenizer import encode_text
    from jax_gpt.model import cross_entropy_loss

    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    runtime = dict(dtype=dtype, param_dtype=jnp.float32, attn_impl=args.attn_impl)
    if args.init_from is not None and resume is None:
        model = jax_gpt.GPTModel.from_pretrained(args.init_from, rngs=nnx.Rngs(args.seed), **runtime)
    else:
        model = jax_gpt.GPTModel(config, rngs=nnx.Rngs(args.seed), **runtime)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = make_optimizer(args)
    spec = param_sharding(mesh, args.fsdp)
    params = to_mesh(params, spec)
    opt_state = to_mesh(tx.init(params), spec)
    steps = total_steps(args, len(data.train_x))
    stream = BatchStream(data.train_x, data.train_y, args.batch_size, args.seed)
    start = 0
    if resume is not None:
        _, state, moments, trainer_state = resume
        params = from_canonical(params, state)
        adam = adam_state(opt_state)
        moment = lambda kind: {k.removeprefix(kind + "."): v for k, v in moments.items()  # noqa: E731
                               if k.startswith(kind + ".")}
        new_adam = adam._replace(count=jnp.asarray(trainer_state["step"], adam.count.dtype),
                                 mu=from_canonical(adam.mu, moment("exp_avg")),
                                 nu=from_canonical(adam.nu, moment("exp_avg_sq")))
        opt_state = jax.tree.map(lambda s: new_adam if s is adam else s, opt_state,
                                 is_leaf=lambda s: isinstance(s, optax.ScaleByAdamState))
        if "jax" in trainer_state["rng"]:
            rest = set_rng_leaves(rest, trainer_state["rng"]["jax"])
        elif config.drop_rate > 0:
            print("note: the checkpoint has no JAX RNG state (a torch run?): dropout masks start afresh")
        start = trainer_state["step"]
        stream = BatchStream(data.train_x, data.train_y, args.batch_size, args.seed, **trainer_state["data"])

    replicated = NamedSharding(mesh, P())
    rest = to_mesh(rest, lambda x: replicated)  # dropout RNG state, after any resume replaced it
    accum, micro = args.grad_accum, args.batch_size // args.grad_accum
    batch_sharding = NamedSharding(mesh, P(None, "data", None))  # (accum, micro, T): micro-batches split

    def loss_fn(params, rest, x, y):
        m = nnx.merge(graphdef, params, rest)
        loss = cross_entropy_loss(m(x, deterministic=False), y)
        return loss, nnx.state(m, nnx.Not(nnx.Param))  # dropout RNG counters advanced

    @partial(jax.jit, donate_argnums=(0, 1, 2))
    def train_step(params, opt_state, rest, x, y, lr):
        def micro_step(carry, xy):
            grads, loss, rest = carry
            (micro_loss, rest), g = jax.value_and_grad(loss_fn, has_aux=True)(params, rest, *xy)
            return (jax.tree.map(jnp.add, grads, g), loss + micro_loss, rest), None

        zeros = jax.tree.map(jnp.zeros_like, params)
        (grads, loss, rest), _ = jax.lax.scan(micro_step, (zeros, jnp.float32(0), rest), (x, y))
        grads = jax.tree.map(lambda g: g / accum, grads)
        norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = jax.tree.map(lambda p, u: p - lr * u, params, updates)
        return params, opt_state, rest, loss / accum, norm

    @jax.jit
    def eval_loss(params, rest, x, y):
        return cross_entropy_loss(nnx.merge(graphdef, params, rest)(x), y)

    def place(a: np.ndarray, sharding):
        """A global array from the batch every process holds: each process places its own devices' rows."""
        a = a.astype(np.int32)
        return jax.make_array_from_callback(a.shape, sharding, lambda idx: a[idx])

    def put_batch(a: np.ndarray):
        return place(a.reshape(accum, micro, -1), batch_sharding)

    lead = jax.process_index() == 0
    n_sharded = sum(1 for x in jax.tree.leaves(params) if not x.sharding.is_fully_replicated)
    out = Path(args.out)
    writer = RunWriter(out, enabled=lead, resume_step=start if resume is not None else None)
    val = validation_batches(data, micro, args.eval_batches)
    if lead:
        print(f"jax_gpt: {config.n_params:,} parameters, {len(data.train_x)} windows of {data.train_x.shape[1]} "
              f"tokens, {steps} steps of {args.batch_size} on {mesh.size} x {mesh.devices.flat[0].platform}"
              f"{f' (FSDP: {n_sharded} of {len(jax.tree.leaves(params))} tensors sharded)' if args.fsdp else ''}, "
              f"{args.dtype}")

    def evaluate() -> float:
        vals = [float(eval_loss(params, rest, place(x, replicated), place(y, replicated))) for x, y in val]
        return float(np.mean(vals)) if vals else float("nan")

    def save(step: int) -> None:
        adam = adam_state(opt_state)
        moments = {f"exp_avg.{k}": v for k, v in canonical_tree(adam.mu).items()}
        moments |= {f"exp_avg_sq.{k}": v for k, v in canonical_tree(adam.nu).items()}
        state = canonical_tree(params)  # gathered on every host (a collective), written by the first
        if lead:
            trainer_state = {"step": step, "data": stream.position(), "framework": "jax",
                             "rng": {"jax": rng_leaves(rest)}, "args": vars(args)}
            save_training_checkpoint(out / "checkpoint", config, state, moments, trainer_state)

    stop = steps if args.stop_after is None else min(steps, start + args.stop_after)
    bar = tqdm(total=steps, initial=start, desc="train", unit="step", disable=not lead or args.no_progress)
    interrupted = StopFlag()
    clock = Throughput()
    batches = iter(stream)
    step = start
    with interrupted:
        while step < stop and not agree_to_stop(interrupted):
            lr = lr_at(step, args.lr, args.min_lr, args.warmup_steps, steps)
            x, y = next(batches)
            params, opt_state, rest, loss, norm = train_step(params, opt_state, rest, put_batch(x), put_batch(y),
                                                             jnp.float32(lr))
            step += 1
            loss_value = float(loss)  # waits for the step, so the rate below measures finished work
            rate = clock.tick(args.batch_size * x.shape[1])
            writer.log(kind="train", step=step, loss=loss_value, lr=lr, grad_norm=float(norm),
                       tokens=step * args.batch_size * x.shape[1], tokens_per_s=rate)
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", tok_s=f"{rate:,.0f}")
            bar.update()
            if (args.eval_every and step % args.eval_every == 0) or step == steps:
                val_loss = evaluate()
                writer.log(kind="eval", step=step, val_loss=val_loss)
                if args.no_progress and lead:
                    print(f"step {step}: train loss {loss_value:.4f}, val loss {val_loss:.4f}")
            if args.ckpt_every and step % args.ckpt_every == 0:
                save(step)
    bar.close()
    save(step)
    writer.close()
    if interrupted.requested:
        if lead:
            print(f"interrupted at step {step}: checkpoint written to {out / 'checkpoint'}; continue with --resume")
        return 130
    ids = encode_text(data.tokenizer, args.sample_prompt)
    if ids:  # every process takes part in gathering the parameters; the first samples
        host_params = jax.tree.map(lambda x: x if x.is_fully_addressable else multihost_utils.process_allgather(
            x, tiled=True), params)
    if lead:
        if step < steps:
            print(f"stopped at step {step} of {steps}: continue with --resume")
        if ids:
            nnx.update(model, jax.device_get(host_params))
            sample = jax_gpt.generate(model, np.asarray([ids]), args.sample_tokens)
            print(f"sample: {data.tokenizer.decode(np.asarray(sample[0]).tolist())!r}")
        print(f"wrote {out / 'metrics.jsonl'}, {out / 'loss.png'}, {out / 'checkpoint'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
