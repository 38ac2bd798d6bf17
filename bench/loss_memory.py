"""`python -m bench loss`: the memory and time of the loss, plain (whole logits) against fused
(`kernels.linear_cross_entropy`, `jax_gpt.losses.linear_cross_entropy`), on both sides.

Two parts (--part, both by default):

loss   the loss alone, forward and backward, from (B, T, C) hidden states and the (V, C) lm_head weight, both
       requiring gradients: what the loss itself costs, apart from the model.
       - torch: `saved_mb`, the storages autograd's saved-tensor hooks see (the inputs, targets included, left
         out), and `peak_mb`, the peak allocated above the inputs while the forward and the backward run: on CPU
         from the profiler's memory events (every allocation and free of the CPU allocator, inside custom ops
         too: `allocation_peak`), on CUDA `max_memory_allocated`. The peak includes what is saved and the two
         gradients, which every implementation must produce.
       - jax: `temp_mb`, the compiled forward+backward's temporary buffers (`memory_analysis()`: XLA's own buffer
         assignment after fusion and scheduling), and `out_mb`, its outputs (the loss and the two gradients).
step   one training step of the whole model (forward, backward, AdamW), `loss_impl` plain against fused:
       torch `saved_mb` and `peak_mb` as above for the forward and backward; jax the compiled step's `temp_mb`.
Both with the median time (`ms`); a JAX step that compiles but runs out of memory is an OOM row, its memory
without a time. Fused rows carry `mem_vs_plain` (plain's peak_mb or temp_mb over theirs: the
factor the fused loss saves) and `time_vs_plain` (their ms over plain's).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np

from bench import timing
from bench.report import Row
from gpt_core.config import GPTConfig

IMPLS = ("plain", "fused")
SIDES = ("torch", "jax")
PARTS = ("loss", "step")
MB = 2**20


def allocation_peak(fn: Callable[[], object]) -> int:
    """Peak bytes torch allocated on the CPU while `fn()` ran, above what was allocated before it."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == DeviceType.CPU]
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):  # stable: ties keep the recorded order
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def run(config: GPTConfig, *, batch: int, seq_len: int, dtype: str = "float32", repeats: int = 3, seed: int = 0,
        sides: tuple[str, ...] = SIDES, parts: tuple[str, ...] = PARTS,
        progress: Callable[[str], Any] = lambda msg: None) -> list[Row]:
    """Rows for each (side, part, impl); see the module docstring."""
    for name, given, allowed in (("side", sides, SIDES), ("part", parts, PARTS)):
        bad = [g for g in given if g not in allowed]
        if bad:
            raise ValueError(f"unknown {name}(s) {bad}; choose from {allowed}")
    if seq_len > config.context_length:
        raise ValueError(f"seq_len {seq_len} exceeds the config's context_length {config.context_length}")
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype must be float32 or bfloat16, got {dtype!r}")
    config = dataclasses.replace(config, drop_rate=0.0)
    rng = np.random.default_rng(seed)
    x = rng.integers(0, config.vocab_size, (batch, seq_len), dtype=np.int32)
    y = rng.integers(0, config.vocab_size, (batch, seq_len), dtype=np.int32)
    measures = {("torch", "loss"): _torch_loss, ("jax", "loss"): _jax_loss,
                ("torch", "step"): _torch_step, ("jax", "step"): _jax_step}
    rows = []
    for side in sides:
        for part in parts:
            pair = []
            for impl in IMPLS:
                progress(f"loss memory: {side} {part} {impl}")
                pair.append(measures[side, part](config, impl, x, y, dtype, repeats, seed))
            plain, fused = pair
            key = "peak_mb" if side == "torch" else "temp_mb"
            if plain.metrics.get(key) and fused.metrics.get(key):
                fused.metrics["mem_vs_plain"] = plain.metrics[key] / fused.metrics[key]
            if "ms" in plain.metrics and "ms" in fused.metrics:  # not where one ran out of memory
                fused.metrics["time_vs_plain"] = fused.metrics["ms"] / plain.metrics["ms"]
            rows += pair
    return rows


def _shape(config: GPTConfig, x: np.ndarray) -> str:
    return f"B={x.shape[0]} T={x.shape[1]} C={config.emb_dim} V={config.vocab_size}"


# ------------------------------------------------------------------------------------------------ torch
def _torch_device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _torch_memory(fn: Callable[[], Any], exclude: tuple = ()) -> dict[str, float]:
    """saved_mb (autograd's saved storages, those of `exclude` left out) and peak_mb of fn().backward()."""
    import torch

    device = _torch_device()
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    def forward_backward():
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = fn()
        loss.backward()

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        forward_backward()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = allocation_peak(forward_backward)
    return {"saved_mb": sum(saved.values()) / MB, "peak_mb": peak / MB}


def _torch_dtype(dtype: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]


def _torch_loss(config: GPTConfig, impl: str, x: np.ndarray, y: np.ndarray, dtype: str, repeats: int,
                seed: int) -> Row:
    import torch
    import torch.nn.functional as F

    import kernels
    from kernels import utils
    from torch_gpt.model import cross_entropy_loss

    device = _torch_device()
    gen = torch.Generator().manual_seed(seed)
    b, t = x.shape
    hidden = torch.randn(b, t, config.emb_dim, generator=gen).to(device, _torch_dtype(dtype)).requires_grad_()
    weight = (torch.randn(config.vocab_size, config.emb_dim, generator=gen) * config.init_std).to(
        device, _torch_dtype(dtype)).requires_grad_()
    targets = torch.from_numpy(y.astype(np.int64)).to(device)
    if impl == "plain":  # what torch_gpt computes: the lm_head's logits, the float32 cross-entropy of them
        fn = lambda: cross_entropy_loss(F.linear(hidden, weight), targets)  # noqa: E731
    else:
        fn = lambda: kernels.linear_cross_entropy(hidden, weight, targets)  # noqa: E731
    m = _torch_memory(fn, exclude=(hidden, weight, targets))  # the loss's inputs: both impls keep them

    def step():
        hidden.grad = weight.grad = None
        loss = fn()
        loss.backward()
        return loss

    tm = timing.measure(step, timing.torch_sync, repeats, warmup=1)
    m |= {"ms": tm.median * 1e3, "spread": tm.spread}
    path = f" ({utils.last_path('linear_cross_entropy_fwd')} path)" if impl == "fused" else ""
    return Row("speed", "loss forward+backward", f"torch/{impl}{path}", dtype, _shape(config, x), m, "",
               "peak_mb: allocated above the inputs during forward and backward; saved_mb: autograd's saved tensors")


def _torch_step(config: GPTConfig, impl: str, x: np.ndarray, y: np.ndarray, dtype: str, repeats: int,
                seed: int) -> Row:
    import torch

    import torch_gpt

    device = _torch_device()
    torch.manual_seed(seed)
    model = torch_gpt.GPTModel(config, attn_impl="sdpa", loss_impl=impl).to(device, _torch_dtype(dtype)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    xt, yt = (torch.from_numpy(a.astype(np.int64)).to(device) for a in (x, y))
    m = _torch_memory(lambda: model(xt, targets=yt), exclude=tuple(model.parameters()))

    def step():
        opt.zero_grad(set_to_none=True)
        loss = model(xt, targets=yt)
        loss.backward()
        opt.step()
        return loss

    tm = timing.measure(step, timing.torch_sync, repeats, warmup=1)
    m |= {"ms": tm.median * 1e3, "spread": tm.spread}
    return Row("speed", "train step", f"torch/sdpa loss_impl={impl}", dtype, f"L={config.n_layers} " +
               _shape(config, x), m, "", "peak_mb, saved_mb: the forward and backward (AdamW's state not counted)")


# -------------------------------------------------------------------------------------------------- jax
def _jax_dtype(dtype: str):
    import jax.numpy as jnp

    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype]


def _compiled(fn, *args) -> tuple[Any, dict[str, float]]:
    import jax

    exe = jax.jit(fn).lower(*args).compile()
    stats = exe.memory_analysis()
    m = {"temp_mb": stats.temp_size_in_bytes / MB, "out_mb": stats.output_size_in_bytes / MB,
         "total_mb": (stats.temp_size_in_bytes + stats.argument_size_in_bytes + stats.output_size_in_bytes
                      - stats.alias_size_in_bytes) / MB} if stats else {}
    return exe, m


def _host_available_mb() -> float | None:
    """MemAvailable of /proc/meminfo in MB, or None where there is none (not Linux)."""
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024 / MB
    except (OSError, KeyError, ValueError):
        return None


def _jax_loss(config: GPTConfig, impl: str, x: np.ndarray, y: np.ndarray, dtype: str, repeats: int,
              seed: int) -> Row:
    import jax
    import jax.numpy as jnp

    from jax_gpt.losses import linear_cross_entropy
    from jax_gpt.model import cross_entropy_loss

    rng = np.random.default_rng(seed)
    b, t = x.shape
    hidden = jnp.asarray(rng.standard_normal((b, t, config.emb_dim)), _jax_dtype(dtype))
    weight = jnp.asarray(rng.standard_normal((config.vocab_size, config.emb_dim)) * config.init_std,
                         _jax_dtype(dtype))
    targets = jnp.asarray(y)
    if impl == "plain":  # what jax_gpt computes with tied embeddings: the einsum's logits, optax's loss of them
        loss = lambda h, w: cross_entropy_loss(jnp.einsum("BTC,VC->BTV", h, w), targets)  # noqa: E731
    else:
        loss = lambda h, w: linear_cross_entropy(h, w, targets)  # noqa: E731
    exe, m = _compiled(jax.value_and_grad(loss, argnums=(0, 1)), hidden, weight)
    tm = timing.measure(lambda: exe(hidden, weight), timing.jax_sync, repeats, warmup=1)
    m |= {"ms": tm.median * 1e3, "spread": tm.spread}
    return Row("speed", "loss forward+backward", f"jax/{impl}", dtype, _shape(config, x), m, "",
               "temp_mb: the compiled forward+backward's temporaries; out_mb: the loss and the two gradients")


def _jax_step(config: GPTConfig, impl: str, x: np.ndarray, y: np.ndarray, dtype: str, repeats: int,
              seed: int) -> Row:
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    import jax_gpt

    model = jax_gpt.GPTModel(config, rngs=nnx.Rngs(seed), dtype=_jax_dtype(dtype), loss_impl=impl)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.adamw(1e-4)
    opt_state = tx.init(params)
    xj, yj = jnp.asarray(x), jnp.asarray(y)

    def train_step(params, opt_state):
        loss, grads = jax.value_and_grad(lambda p: nnx.merge(graphdef, p, rest)(xj, targets=yj))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    exe, m = _compiled(train_step, params, opt_state)
    name, label, shape = "train step", f"jax/xla loss_impl={impl}", f"L={config.n_layers} " + _shape(config, x)
    note = "temp_mb: the compiled step's temporaries (parameters and optimizer state are its arguments)"
    # The step is compiled, so its memory is known; one that cannot fit is reported, not run (on CPU the kernel's
    # OOM killer would end the whole bench where XLA's allocator does not fail first).
    available = _host_available_mb() if jax.devices()[0].platform == "cpu" else None
    if available is not None and m.get("total_mb", 0) > available:
        return Row("speed", name, label, dtype, shape, m, "OOM",
                   f"{note}; needs {m['total_mb']:,.0f} MB, {available:,.0f} MB available: not run")
    try:
        tm = timing.measure(lambda: exe(params, opt_state), timing.jax_sync, repeats, warmup=1)
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        return Row("speed", name, label, dtype, shape, m, "OOM", f"{note}; out of memory running it, so not timed: "
                   + str(e).splitlines()[0][:160])
    m |= {"ms": tm.median * 1e3, "spread": tm.spread}
    return Row("speed", name, label, dtype, shape, m, "", note)
