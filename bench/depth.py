"""`python -m bench speed --study depth|memory`: what scanning over layers and rematerialisation change.

depth   the JAX train step (the `speed` suite's: AdamW after global-norm clipping) at several depths of one width,
        with the blocks unrolled and scanned (`scan_layers=True`): the time to trace and lower it, to compile it,
        its steady step time, and the size of the compiled program (lines of optimised HLO). The target of
        scanning: compile time that does not grow with depth.
memory  the activation memory of one forward+backward with remat none, block and dots, on both sides:
        - torch: `held_mb`, what the forward leaves allocated for the backward (CPU: the allocations PyTorch's
          profiler sees still live when the forward returns; CUDA: `memory_allocated` after minus before), and
          `saved_mb`, the tensors autograd's saved-tensor hooks see (unique storages). The hooks do not see inside
          `torch.utils.checkpoint`: with remat its block inputs (and for dots the kept matmul outputs) are held
          by the checkpoint, so there held_mb is the measure. On a GPU also `peak_mb`, the CUDA peak of the step.
        - jax: `residual_mb`, the arrays the VJP keeps (what the forward saves for the backward, the weights left
          out), and `temp_mb`, the compiled forward+backward's temporary buffers (`memory_analysis()`), which is
          what XLA's buffer assignment really needs after its own fusion and scheduling.
        Both with the time of the forward+backward, the price of the recomputation.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from bench import timing
from bench.report import Row
from gpt_core.config import GPTConfig

STUDIES = ("depth", "memory")
REMATS = ("none", "block", "dots")
MB = 2**20


def _inputs(config: GPTConfig, batch: int, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return (rng.integers(0, config.vocab_size, (batch, seq_len), dtype=np.int32),
            rng.integers(0, config.vocab_size, (batch, seq_len), dtype=np.int32))


def _check(config: GPTConfig, seq_len: int) -> GPTConfig:
    if seq_len > config.context_length:
        raise ValueError(f"seq_len {seq_len} exceeds the config's context_length {config.context_length}")
    return dataclasses.replace(config, drop_rate=0.0)


# ------------------------------------------------------------------------------------------------- depth
def depth_rows(config: GPTConfig, layers: list[int], *, batch: int = 1, seq_len: int = 128, repeats: int = 3,
               progress: Callable[[str], Any] = lambda msg: None) -> list[Row]:
    """One row per (depth, unrolled or scanned): lower_s, compile_s, hlo_lines, ms, tokens_per_s, and
    compile_vs_min: compile_s over the same layout's compile at the smallest depth."""
    import jax
    import optax
    from flax import nnx

    import jax_gpt
    from jax_gpt.model import cross_entropy_loss

    if not layers or min(layers) < 1:
        raise ValueError(f"--layers must be positive depths, got {layers}")
    config = _check(config, seq_len)
    x, y = (jax.numpy.asarray(a) for a in _inputs(config, batch, seq_len))
    rows, first = [], {}
    for n_layers in sorted(layers):
        for scan in (False, True):
            layout = "scanned" if scan else "unrolled"
            progress(f"depth: {n_layers} layers, {layout}")
            model = jax_gpt.GPTModel(dataclasses.replace(config, n_layers=n_layers), rngs=nnx.Rngs(0),
                                     scan_layers=scan)
            graphdef, params, rest = nnx.split(model, nnx.Param, ...)
            tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-4))
            opt_state = tx.init(params)

            def train_step(params, opt_state, x, y, graphdef=graphdef, rest=rest, tx=tx):
                loss_fn = lambda p: cross_entropy_loss(nnx.merge(graphdef, p, rest)(x), y)  # noqa: E731
                loss, grads = jax.value_and_grad(loss_fn)(params)
                updates, opt_state = tx.update(grads, opt_state, params)
                return optax.apply_updates(params, updates), opt_state, loss

            t0 = time.perf_counter()
            lowered = jax.jit(train_step).lower(params, opt_state, x, y)
            t1 = time.perf_counter()
            exe = lowered.compile()
            t2 = time.perf_counter()
            args = (params, opt_state, x, y)
            t = timing.measure(lambda exe=exe, args=args: exe(*args), timing.jax_sync, repeats, warmup=1)
            first.setdefault(layout, t2 - t1)
            m = {"lower_s": t1 - t0, "compile_s": t2 - t1, "compile_vs_min": (t2 - t1) / first[layout],
                 "hlo_lines": exe.as_text().count("\n"), "ms": t.median * 1e3, "spread": t.spread,
                 "tokens_per_s": batch * seq_len / t.median}
            rows.append(Row("speed", "train step by depth", f"jax/xla {layout}", "float32",
                            f"L={n_layers} B={batch} T={seq_len}", m, "",
                            "; ".join(filter(None, (f"compile_vs_min: against {layout} at {min(layers)} layers",
                                                    timing.jax_cache_note())))))
            del model, params, opt_state, exe, lowered, args
    return rows


# ------------------------------------------------------------------------------------------------ memory
def memory_rows(config: GPTConfig, remats: tuple[str, ...] = REMATS, *, batch: int = 4, seq_len: int = 128,
                repeats: int = 3, progress: Callable[[str], Any] = lambda msg: None) -> list[Row]:
    bad = [r for r in remats if r not in REMATS]
    if bad:
        raise ValueError(f"unknown remat mode(s) {bad}; choose from {REMATS}")
    config = _check(config, seq_len)
    x, y = _inputs(config, batch, seq_len)
    rows = []
    for remat in remats:
        progress(f"memory: torch, remat={remat}")
        rows.append(_torch_memory(config, remat, x, y, repeats))
        for scan in (False, True):
            progress(f"memory: jax {'scanned' if scan else 'unrolled'}, remat={remat}")
            rows.append(_jax_memory(config, remat, scan, x, y, repeats))
    return rows


def _shape(x: np.ndarray, config: GPTConfig) -> str:
    return f"L={config.n_layers} B={x.shape[0]} T={x.shape[1]}"


def _torch_memory(config: GPTConfig, remat: str, x: np.ndarray, y: np.ndarray, repeats: int) -> Row:
    import torch

    import torch_gpt

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = torch_gpt.GPTModel(config, attn_impl="sdpa", remat=remat).to(device).train()
    xt, yt = (torch.from_numpy(a.astype(np.int64)).to(device) for a in (x, y))

    def forward():
        return torch_gpt.cross_entropy_loss(model(xt), yt)

    saved: dict[tuple[int, int], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.device.type != "meta":
            storage = t.untyped_storage()
            saved[(storage.data_ptr(), storage.nbytes())] = storage.nbytes()
        return t

    m: dict[str, Any] = {}
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = forward()
        torch.cuda.synchronize()
        m["held_mb"] = (torch.cuda.memory_allocated() - before) / MB
        loss.backward()
        torch.cuda.synchronize()
        m["peak_mb"] = (torch.cuda.max_memory_allocated() - before) / MB
    else:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                loss = forward()
        # Top-level events' memory includes their children's; what the forward allocated and did not free.
        m["held_mb"] = sum(e.cpu_memory_usage for e in prof.events() if e.cpu_parent is None) / MB
        loss.backward()
    m["saved_mb"] = sum(saved.values()) / MB
    model.zero_grad(set_to_none=True)

    def step():
        model.zero_grad(set_to_none=True)
        loss = forward()
        loss.backward()
        return loss

    t = timing.measure(step, timing.torch_sync, repeats, warmup=1)
    m |= {"ms": t.median * 1e3, "spread": t.spread}
    note = ("held_mb: allocated when the forward returns; saved_mb misses what torch.utils.checkpoint holds"
            if remat != "none" else "held_mb: allocated when the forward returns; saved_mb: autograd's saved tensors")
    return Row("speed", "activation memory", f"torch/sdpa remat={remat}", "float32", _shape(x, config), m, "", note)


def _jax_memory(config: GPTConfig, remat: str, scan: bool, x: np.ndarray, y: np.ndarray, repeats: int) -> Row:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import jax_gpt
    from jax_gpt.model import cross_entropy_loss

    model = jax_gpt.GPTModel(config, rngs=nnx.Rngs(0), scan_layers=scan, remat=remat)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    xj, yj = jnp.asarray(x), jnp.asarray(y)

    def loss_fn(p):
        return cross_entropy_loss(nnx.merge(graphdef, p, rest)(xj), yj)

    found = {}

    def residuals(p):
        _, vjp = jax.vjp(loss_fn, p)
        weights = {id(a) for a in jax.tree.leaves(p)}
        found["bytes"] = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(vjp) if id(a) not in weights)
        return jnp.zeros(())

    jax.eval_shape(residuals, params)
    exe = jax.jit(jax.value_and_grad(loss_fn)).lower(params).compile()
    stats = exe.memory_analysis()
    t = timing.measure(lambda: exe(params), timing.jax_sync, repeats, warmup=1)
    m = {"residual_mb": found["bytes"] / MB, "temp_mb": stats.temp_size_in_bytes / MB if stats else None,
         "ms": t.median * 1e3, "spread": t.spread}
    layout = "scanned" if scan else "unrolled"
    return Row("speed", "activation memory", f"jax/xla {layout} remat={remat}", "float32", _shape(x, config), m, "",
               "residual_mb: what the VJP keeps; temp_mb: the compiled forward+backward's temporaries")
