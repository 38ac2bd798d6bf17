"""`python -m jax_gpt.train`: train a GPT under `jax.jit`, resumable, over every visible device.

The flags, batches, schedule, outputs and the loop itself are shared with `torch_gpt.train`
(gpt_core/training.py), so the two trainers' runs compare step by step; this file holds only what is JAX's:
`JaxBackend`. Devices: a `Mesh` with one `data` axis over every visible
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

import numpy as np

from gpt_core.training import (
    OptimizerConfig,
    StepResult,
    TrainingCheckpoint,
    args_record,
    build_parser,
    prepare_run,
    run_training,
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = build_parser("python -m jax_gpt.train", __doc__.split("\n\n")[0])
    j = p.add_argument_group("jax only")
    j.add_argument("--attn-impl", default="xla", choices=["math", "xla", "cudnn"],
                   help="math: explicit softmax; xla: jax.nn.dot_product_attention; cudnn: its GPU flash path")
    j.add_argument("--scan-layers", action=argparse.BooleanOptionalAction, default=True,
                   help="stack the blocks on a layer axis and run them with one lax.scan (the default): compile time "
                        "independent of depth, and faster steps than unrolled at gpt2 size (README); checkpoints are "
                        "the same either way")
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
        if args.dtype == "float16":
            raise ValueError("--dtype float16 needs loss scaling, which only torch_gpt.train has; use bfloat16")
        join_job(args)
        config, data, run, opt, resume = prepare_run(args)
        mesh = make_mesh(args.devices)
        run.check_split(mesh.size, "devices")
        backend = JaxBackend(args, config, opt, mesh, resume)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return run_training(backend, config, data, run, opt, resume, args_record(args))


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
    """Replicated, or (FSDP) split along the first dimension where it divides evenly over the data axis; a
    scanned model's stacked arrays along their first dimension after the layer axis."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from jax_gpt.convert import is_stacked

    def spec(path, x):
        axis = 1 if is_stacked(path) else 0
        if fsdp and x.ndim > axis and x.shape[axis] % mesh.size == 0:
            return NamedSharding(mesh, P(*[None] * axis, "data"))
        return NamedSharding(mesh, P())

    return spec


def make_optimizer(args: OptimizerConfig):
    """AdamW as optax composes it, with the learning rate applied in the step: the same schedule as torch."""
    import jax
    import optax

    from jax_gpt.convert import is_stacked

    # Matrices decay, biases and norms do not: by each array's own rank, less a scanned model's layer axis.
    decay_mask = lambda params: jax.tree_util.tree_map_with_path(  # noqa: E731
        lambda path, p: p.ndim - is_stacked(path) >= 2, params)
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
    """A Param-shaped tree (parameters, gradients or Adam moments) -> canonical names and layouts, gathered from
    every process."""
    import jax
    from jax.experimental import multihost_utils

    from jax_gpt import convert

    def gather(leaf):
        return multihost_utils.process_allgather(leaf, tiled=True) if jax.process_count() > 1 else leaf

    return convert.to_canonical(tree, gather)


def from_canonical(tree, canonical: dict[str, np.ndarray]):
    """The inverse of `canonical_tree`, filling a Param-shaped `tree` (keeping its dtypes and shardings)."""
    import jax

    from jax_gpt import convert

    return convert.from_canonical(tree, canonical, lambda a, leaf: jax.device_put(np.asarray(a, leaf.dtype),
                                                                                  leaf.sharding))


def to_mesh(tree, sharding_of):
    """Place every leaf (the same value on every process) on the mesh, `sharding_of(path, leaf)` saying how.
    Going through host memory makes this work across processes too, where `device_put` refuses arrays already
    committed to a local device."""
    import jax

    def put(path, x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:  # already on the mesh (optimizer state)
            return jax.device_put(x, sharding_of(path, x))
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            data = jax.device_put(np.asarray(jax.random.key_data(x)), sharding_of(path, x))
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
        return jax.device_put(np.asarray(x), sharding_of(path, x))

    return jax.tree_util.tree_map_with_path(put, tree)


def rng_leaves(rest) -> list:
    """Dropout RNG state (keys and counters) as JSON-able lists, and back with `set_rng_leaves`."""
    import jax

    return [np.asarray(jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x).tolist()
            for x in jax.tree.leaves(rest)]


def rng_matches(rest, saved: list) -> bool:
    """True if `saved` (from `rng_leaves`) has the leaves of `rest`: not so across --scan-layers, whose dropout
    keys are laid out per layer or stacked."""
    import jax

    leaves = jax.tree.leaves(rest)
    return len(leaves) == len(saved) and all(np.shape(s) == np.shape(jax.random.key_data(x) if jax.dtypes.issubdtype(
        x.dtype, jax.dtypes.prng_key) else x) for x, s in zip(leaves, saved, strict=True))


def set_rng_leaves(rest, saved: list):
    import jax
    import jax.numpy as jnp

    leaves, treedef = jax.tree.flatten(rest)
    new = [jax.random.wrap_key_data(jnp.asarray(s, jnp.uint32), impl=jax.random.key_impl(x))
           if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else jnp.asarray(s, x.dtype)
           for x, s in zip(leaves, saved, strict=True)]
    return jax.tree.unflatten(treedef, new)


class JaxBackend:
    """One process of a run: parameters, optimizer state and dropout RNG state as global arrays on the mesh,
    and the jitted step (a scan over micro-batches, buffers donated)."""

    name = "jax_gpt"

    def __init__(self, args: argparse.Namespace, config, opt: OptimizerConfig, mesh, resume):
        import jax
        import jax.numpy as jnp
        import optax
        from flax import nnx
        from jax.sharding import NamedSharding
        from jax.sharding import PartitionSpec as P

        import jax_gpt

        self.config, self.mesh, self.is_lead = config, mesh, jax.process_index() == 0
        dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
        runtime = dict(dtype=dtype, param_dtype=jnp.float32, attn_impl=args.attn_impl, scan_layers=args.scan_layers,
                       remat=args.remat, loss_impl=args.loss_impl)
        if args.init_from is not None and resume is None:
            model = jax_gpt.GPTModel.from_pretrained(args.init_from, rngs=nnx.Rngs(args.seed), **runtime)
        else:
            model = jax_gpt.GPTModel(config, rngs=nnx.Rngs(args.seed), **runtime)
        self.model = model
        self.graphdef, params, self.rest = nnx.split(model, nnx.Param, ...)
        self.tx = tx = make_optimizer(opt)
        self.spec = param_sharding(mesh, args.fsdp)
        self.params = to_mesh(params, self.spec)
        self.opt_state = to_mesh(tx.init(self.params), self.spec)
        self.replicated = NamedSharding(mesh, P())
        self.rest = to_mesh(self.rest, lambda path, x: self.replicated)  # dropout RNG state
        self.accum = accum = args.grad_accum
        self.batch_sharding = NamedSharding(mesh, P(None, "data", None))  # (accum, micro, T): micro-batches split
        graphdef = self.graphdef
        n_sharded = sum(1 for x in jax.tree.leaves(self.params) if not x.sharding.is_fully_replicated)
        fsdp = f" (FSDP: {n_sharded} of {len(jax.tree.leaves(self.params))} tensors sharded)" if args.fsdp else ""
        self.devices = f"{mesh.size} x {mesh.devices.flat[0].platform}{fsdp}"

        def loss_fn(params, rest, x, y):
            # copy=True: fresh Variables at this trace level. Reusing the carried ones (created at the scan's
            # level) makes dropout's RNG counter raise "Cannot mutate RngCount from a different trace level".
            m = nnx.merge(graphdef, params, rest, copy=True)
            loss = m(x, deterministic=False, targets=y)
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
            return nnx.merge(graphdef, params, rest)(x, targets=y)

        self._train_step, self._eval_loss = train_step, eval_loss
        self._batch_size = args.batch_size
        self._local_rows = self.rows(args.batch_size)

    def rows(self, batch_size: int) -> np.ndarray | None:
        """The rows of the global batch that this process's devices hold (all of them on one host)."""
        import jax

        if jax.process_count() == 1:
            return None
        micro = batch_size // self.accum
        shape = (self.accum, micro, 1)
        local = set()
        for idx in self.batch_sharding.addressable_devices_indices_map(shape).values():
            local.update(range(*idx[1].indices(micro)))
        return np.array([m * micro + r for m in range(self.accum) for r in sorted(local)])

    def _place(self, a: np.ndarray, sharding, rows: np.ndarray | None = None, n: int | None = None):
        """A global array from this process's rows of it: each process places its own devices' part."""
        import jax

        if rows is not None:  # scatter the rows this process read into a global-shaped host buffer
            full = np.zeros((n, a.shape[1]), np.int32)
            full[rows] = a
            a = full
        a = a.astype(np.int32)
        if sharding is self.batch_sharding:
            a = a.reshape(self.accum, -1, a.shape[-1])
        return jax.make_array_from_callback(a.shape, sharding, lambda idx: a[idx])

    def restore(self, ckpt: TrainingCheckpoint) -> None:
        import jax
        import jax.numpy as jnp
        import optax

        self.params = from_canonical(self.params, ckpt.model)
        adam = adam_state(self.opt_state)
        new_adam = adam._replace(count=jnp.asarray(ckpt.step, adam.count.dtype),
                                 mu=from_canonical(adam.mu, ckpt.moments("exp_avg")),
                                 nu=from_canonical(adam.nu, ckpt.moments("exp_avg_sq")))
        self.opt_state = jax.tree.map(lambda s: new_adam if s is adam else s, self.opt_state,
                                      is_leaf=lambda s: isinstance(s, optax.ScaleByAdamState))
        if "jax" in ckpt.rng and rng_matches(self.rest, ckpt.rng["jax"]):
            self.rest = to_mesh(set_rng_leaves(self.rest, ckpt.rng["jax"]), lambda path, x: self.replicated)
        elif self.config.drop_rate > 0 and self.is_lead:
            why = "is laid out for the other --scan-layers" if "jax" in ckpt.rng else "is missing (a torch run?)"
            print(f"note: the checkpoint's JAX RNG state {why}: dropout masks start afresh")

    def train_step(self, x: np.ndarray, y: np.ndarray, lr: float) -> StepResult:
        import jax.numpy as jnp

        rows, n = self._local_rows, self._batch_size
        self.params, self.opt_state, self.rest, loss, norm = self._train_step(
            self.params, self.opt_state, self.rest, self._place(x, self.batch_sharding, rows, n),
            self._place(y, self.batch_sharding, rows, n), jnp.float32(lr))
        return StepResult(float(loss), float(norm))

    def evaluate(self, batches) -> float:
        vals = [float(self._eval_loss(self.params, self.rest, self._place(x, self.replicated),
                                      self._place(y, self.replicated))) for x, y in batches]
        return float(np.mean(vals)) if vals else float("nan")

    def state(self):
        adam = adam_state(self.opt_state)
        moments = {f"exp_avg.{k}": v for k, v in canonical_tree(adam.mu).items()}
        moments |= {f"exp_avg_sq.{k}": v for k, v in canonical_tree(adam.nu).items()}
        return canonical_tree(self.params), moments, {"jax": rng_leaves(self.rest)}  # gathered on every host

    def should_stop(self, requested: bool) -> bool:
        import jax
        from jax.experimental import multihost_utils

        if jax.process_count() > 1:
            requested = bool(np.any(multihost_utils.process_allgather(np.int32(requested))))
        return requested

    def sample(self, ids: list[int], n: int) -> list[int] | None:
        import jax
        from flax import nnx
        from jax.experimental import multihost_utils

        import jax_gpt

        # every process takes part in gathering the parameters; the first samples
        host = jax.tree.map(lambda x: x if x.is_fully_addressable else multihost_utils.process_allgather(
            x, tiled=True), self.params)
        if not self.is_lead:
            return None
        nnx.update(self.model, jax.device_get(host))
        return np.asarray(jax_gpt.generate(self.model, np.asarray([ids]), n)[0]).tolist()


if __name__ == "__main__":
    sys.exit(main())
