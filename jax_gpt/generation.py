"""Autoregressive generation with a static KV cache, one `jax.jit` program per call shape (the CLI is
`python -m jax_gpt.generate`).

The whole loop is compiled once for a (batch, prompt length, max_new_tokens) and the sampling settings
that change the program (greedy or not, top_k, top_p on or off, eos_id): a prefill, then a
`lax.while_loop` over positions that feeds one token at a time through a cache of static shape.

Past the context (torch_gpt's rule, nanoGPT's): the model conditions on at most the last
`context_length` tokens. Without the cache every step runs the window of the last `context_length`
tokens; with it, once the cache is full the window is prefilled again into a fresh cache (positions
shift, so old keys cannot be reused), so cached and uncached generation always agree, and only steps
past the context lose the cache's speed. The cache holds min(context_length, prompt + new tokens) slots.

Prompts of different lengths go in one batch left-padded (right-aligned), as transformers pads them: each row's
positions count from its first real token and its padding is masked (KVCache.start), so each gets the tokens it
gets alone. The prompt is checked on the host (gpt_core.generation.pad_prompts) before anything is traced.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from gpt_core.generation import check_sampling_args, pad_prompts
from jax_gpt.model import GPTModel, KVCache


def sample_next(logits: jax.Array, temperature: float | jax.Array, top_k: int | None,
                top_p: float | jax.Array | None, key: jax.Array | None) -> jax.Array:
    """Next ids (B,) from last-position logits (B, V): argmax at temperature 0, else sampled.

    `temperature` and `top_p` may be traced; a Python 0 temperature means greedy and `top_k` is static.
    """
    if isinstance(temperature, int | float) and temperature == 0.0:
        return jnp.argmax(logits, axis=-1)
    logits = logits.astype(jnp.float32) / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = lax.top_k(logits, top_k)[0][:, -1:]  # (B, 1)
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p is not None:
        order = jnp.argsort(-logits, axis=-1)  # (B, V), descending
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)  # (B, V)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        drop = jnp.cumsum(probs, axis=-1) - probs >= top_p  # keep the smallest set reaching top_p
        logits = jnp.put_along_axis(logits, order, jnp.where(drop, -jnp.inf, sorted_logits), axis=-1,
                                    inplace=False)
    return jax.random.categorical(key, logits, axis=-1)


def generate(model: GPTModel, idx: jax.Array | Sequence[Sequence[int]], max_new_tokens: int, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, eos_id: int | None = None,
             key: jax.Array | None = None, *, use_cache: bool = True, lengths: Sequence[int] | None = None,
             pad_id: int = 0) -> jax.Array:
    """Continue prompts by up to `max_new_tokens`; returns (B, T + n) int32: the T prompt columns (padding as
    `pad_id`), then the new tokens.

    `idx`: (B, T) token ids; or a list of id lists of different lengths, left-padded with `pad_id` to the longest
    (T); or a (B, T) array left-padded already, with `lengths` (B,) saying how many of each row's last columns
    are its prompt. Each row then gets the tokens it gets alone.

    Greedy at temperature 0, else sampling with optional top-k and nucleus (top-p) filtering, drawn
    from `key` (a `jax.random.key`, required then). With `eos_id`, a sequence that produced it is
    padded with `eos_id` and generation stops once all have, so n may be less than `max_new_tokens`.
    Dropout is off. Ids are checked on the host before anything is traced.
    """
    check_sampling_args(temperature, top_k, top_p)
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature > 0 and key is None:
        raise ValueError("sampling (temperature > 0) needs a key, e.g. key=jax.random.key(0)")
    if isinstance(idx, jax.core.Tracer):
        raise ValueError("generate takes concrete prompts (it checks them on the host and jits itself)")
    padded, lens = pad_prompts(idx, model.config.vocab_size, lengths=lengths, pad_id=pad_id)
    idx = jnp.asarray(padded, jnp.int32)
    if max_new_tokens == 0:
        return idx
    T = idx.shape[1]
    start = None if min(lens) == T else jnp.asarray([T - n for n in lens], jnp.int32)  # None: one program less
    greedy = temperature == 0.0
    graphdef, state = nnx.split(model)
    out, n = _generate(graphdef, state, idx, start, None if greedy else key,
                       None if greedy else jnp.float32(temperature),
                       None if greedy or top_p is None or top_p == 1.0 else jnp.float32(top_p),
                       max_new_tokens=max_new_tokens, top_k=None if greedy else top_k, eos_id=eos_id,
                       use_cache=use_cache)
    return out[:, : idx.shape[1] + int(n)]


# `None` for key/temperature/top_p is part of the pytree structure, so greedy and top_p-off programs are
# told apart without static flags; their values, when given, are traced (no recompile per value).
# XLA:CPU copies every loop-carried cache buffer at every step unless copy insertion runs its region
# analysis; with it the cache is updated in place. Other backends ignore the option.
@partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "top_k", "eos_id", "use_cache"),
         compiler_options={"xla_cpu_copy_insertion_use_region_analysis": True})
def _generate(graphdef: nnx.GraphDef, state: nnx.State, idx: jax.Array, start: jax.Array | None,
              key: jax.Array | None,
              temperature: jax.Array | None, top_p: jax.Array | None, *, max_new_tokens: int,
              top_k: int | None, eos_id: int | None, use_cache: bool) -> tuple[jax.Array, jax.Array]:
    """(B, T0 + max_new_tokens) ids, eos_id (or 0) past the n generated, and n."""
    model = nnx.merge(graphdef, state)
    config, (B, T0) = model.config, idx.shape
    ctx, total = config.context_length, T0 + max_new_tokens
    width = min(ctx, total)  # cache slots, or the uncached window: nothing needs more
    out = jnp.full((B, total), 0 if eos_id is None else eos_id, jnp.int32).at[:, :T0].set(idx)  # (B, total)

    def sample(logits: jax.Array, i: jax.Array | int) -> jax.Array:  # (B, V) -> (B,)
        step_key = None if key is None else jax.random.fold_in(key, i)
        return sample_next(logits, 0.0 if temperature is None else temperature, top_k, top_p, step_key)

    def fresh(lo: jax.Array | int) -> KVCache:  # for a window from column lo: each row's padding shifts by lo
        first = None if start is None else jnp.maximum(start - lo, 0)
        return KVCache.create(config, B, width, dtype=model.dtype, stacked=model.scan_layers, start=first)

    def prefill(window: jax.Array, lo: jax.Array | int) -> tuple[jax.Array, KVCache]:  # (B, t), a fresh cache
        logits, cache = model(window, cache=fresh(lo), last_only=True)
        return logits[:, -1], cache  # (B, V)

    def decode(out: jax.Array, cur: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
        logits, cache = model(lax.dynamic_slice_in_dim(out, cur - 1, 1, axis=1), cache=cache)  # newest token
        return logits[:, -1], cache  # (B, V)

    def refill(out: jax.Array, cur: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
        return prefill(lax.dynamic_slice_in_dim(out, cur - ctx, ctx, axis=1), cur - ctx)  # the cache is full

    def uncached(out: jax.Array, cur: jax.Array) -> jax.Array:  # logits (B, V) at position cur - 1
        lo = jnp.maximum(cur - width, 0)
        window = lax.dynamic_slice_in_dim(out, lo, width, axis=1)
        # A fresh cache only for the padding mask, when there is padding: everything is recomputed anyway.
        logits = model(window) if start is None else model(window, cache=fresh(lo))[0]  # (B, width, V)
        # Causal: the not-yet-generated filler after cur - 1 changes nothing before it.
        return lax.dynamic_index_in_dim(logits, cur - 1 - lo, axis=1, keepdims=False)

    # Step 0: condition on the last <= ctx prompt tokens.
    cache = None
    if use_cache:
        logits, cache = prefill(idx[:, -ctx:], max(T0 - ctx, 0))
    else:
        logits = uncached(out, jnp.int32(T0))
    nxt = sample(logits, 0)  # (B,)
    done = jnp.zeros(B, bool) if eos_id is None else nxt == eos_id
    out = out.at[:, T0].set(nxt)
    # The cache can be full at a decode step only if min(T0, ctx) + (max_new_tokens - 2) reaches ctx.
    may_fill = min(T0, ctx) + max_new_tokens - 2 >= ctx

    def cond(carry):
        _, _, done, i = carry
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        out, cache, done, i = carry  # i tokens generated so far
        cur = T0 + i
        if not use_cache:
            logits = uncached(out, cur)
        elif may_fill:
            logits, cache = lax.cond(cache.pos == ctx, refill, decode, out, cur, cache)
        else:
            logits, cache = decode(out, cur, cache)
        nxt = sample(logits, i)  # (B,)
        if eos_id is not None:
            nxt = jnp.where(done, eos_id, nxt)
            done = done | (nxt == eos_id)
        out = lax.dynamic_update_slice_in_dim(out, nxt[:, None].astype(jnp.int32), cur, axis=1)
        return out, cache, done, i + 1

    out, _, _, n = lax.while_loop(cond, body, (out, cache, done, jnp.int32(1)))
    return out, n
