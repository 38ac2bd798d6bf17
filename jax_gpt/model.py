"""GPT-2 in Flax NNX, reading side by side with torch_gpt/model.py.

Parameter paths are those of the Hugging Face GPT-2 checkpoint (`wte`, `wpe`, `h.{i}.ln_1`,
`attn.c_attn`, …) with Flax's leaf names (`kernel`, `scale`, `embedding`), so loading is a loop over names
with shape checks (jax_gpt/convert.py). The init, the sinusoidal table and the layouts are gpt_core's
(gpt_core/params.py). With `scan_layers=True` the blocks are one module whose arrays carry a leading layer
axis, run by a `lax.scan`. Shapes: B batch, T query positions, S key positions (T, or a KV cache's static
length), nh heads, hs head size, C = emb_dim, L n_layers.
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax import lax

from gpt_core.checkpoint import CheckpointError, canonicalize, expected_shapes, load_checkpoint, save_checkpoint
from gpt_core.config import GPTConfig
from gpt_core.params import init_rule, sinusoidal_table
from jax_gpt import convert
from jax_gpt.losses import linear_cross_entropy

ATTN_IMPLS = ("math", "xla", "cudnn")
LOSS_IMPLS = ("plain", "fused")
# What the backward recomputes (jax.checkpoint's policy): "block" keeps only each block's input, "dots" also the
# matmuls without batch dimensions (the linear layers, not attention's batched ones), as MaxText's remat_policy.
REMAT = {"none": None, "block": jax.checkpoint_policies.nothing_saveable,
         "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Static-shape key/value buffers and the fill level: one (B, nh, max_len, hs) pair per layer, or for a
    scanned model one (L, B, nh, max_len, hs) stack (`stacked=True`), which the scan carries.

    A pytree, so it crosses `jax.jit` and `lax` loops. torch_gpt's cache is written in place; this one is
    immutable: the model returns an updated copy, with `pos` advanced after its last layer. An unrolled model
    keeps one array per layer rather than one stack: slicing a layer out of a stack defeats XLA's in-place update.
    `start`, (B,) int32 or None (all 0): each row's first real slot, for a batch of prompts of different lengths
    left-padded (right-aligned, as transformers pads them); row b's positions count from it, and its keys before it
    are never seen.
    """

    k: tuple[jax.Array, ...] | jax.Array  # L × (B, nh, max_len, hs), or (L, B, nh, max_len, hs)
    v: tuple[jax.Array, ...] | jax.Array
    pos: jax.Array | int  # () int32: positions filled so far; a Python 0 while it is fresh
    start: jax.Array | None = None  # (B,) int32

    @classmethod
    def create(cls, config: GPTConfig, batch_size: int, max_len: int, *, dtype=jnp.float32,
               stacked: bool = False, start: jax.Array | None = None) -> KVCache:
        if max_len > config.context_length:
            raise ValueError(f"KV cache max_len {max_len} exceeds context_length {config.context_length}")
        shape = (batch_size, config.n_heads, max_len, config.head_dim)
        start = None if start is None else jnp.asarray(start, jnp.int32)
        if stacked:
            k, v = jnp.zeros((config.n_layers, *shape), dtype), jnp.zeros((config.n_layers, *shape), dtype)
            return cls(k, v, 0, start)
        k, v = (tuple(jnp.zeros(shape, dtype) for _ in range(config.n_layers)) for _ in range(2))
        return cls(k, v, 0, start)

    @property
    def stacked(self) -> bool:
        return not isinstance(self.k, tuple)

    @property
    def max_len(self) -> int:
        return self.k.shape[3] if self.stacked else self.k[0].shape[2]

    def layer(self, i: int | jax.Array) -> tuple[jax.Array, jax.Array]:
        """Layer i's (B, nh, max_len, hs) keys and values; `i` may be traced when stacked."""
        if self.stacked:
            return (lax.dynamic_index_in_dim(self.k, i, keepdims=False),
                    lax.dynamic_index_in_dim(self.v, i, keepdims=False))
        return self.k[i], self.v[i]

    def update(self, layer: int | jax.Array, k: jax.Array, v: jax.Array) -> KVCache:
        """Store (B, nh, T, hs) keys/values at `pos`, for the calls that follow. The storing call attends to
        them directly and to the cache as it was: read before written, so XLA updates it in place."""
        if self.stacked:
            at = (layer, 0, 0, self.pos, 0)
            return dataclasses.replace(self, k=lax.dynamic_update_slice(self.k, k[None].astype(self.k.dtype), at),
                                       v=lax.dynamic_update_slice(self.v, v[None].astype(self.v.dtype), at))
        ks, vs = list(self.k), list(self.v)
        ks[layer] = lax.dynamic_update_slice(ks[layer], k.astype(ks[layer].dtype), (0, 0, self.pos, 0))
        vs[layer] = lax.dynamic_update_slice(vs[layer], v.astype(vs[layer].dtype), (0, 0, self.pos, 0))
        return dataclasses.replace(self, k=tuple(ks), v=tuple(vs))


def causal_mask(t: int, s: int) -> jax.Array:
    """(T, S) bool, True where query i may see key j: the diagonal aligned to the end (j <= i + S - T)."""
    i = jnp.arange(t)[:, None]
    j = jnp.arange(s)[None, :]
    return j <= i + (s - t)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, impl: str, dropout: nnx.Dropout | None,
              past: tuple[jax.Array, jax.Array, jax.Array] | None = None, start: jax.Array | None = None) -> jax.Array:
    """Causal attention of (B, nh, T, hs) queries over their own (B, nh, T, hs) keys/values and, given
    `past` = (keys, values, n), over the first n positions of a cache's (B, nh, S, hs) keys/values too.
    `start` (B,): each row's first real position (left padding, counted from the cache's slot 0); no query sees a
    key before it, and a padding query sees itself only (no row of -inf).

    "xla" takes plain causal self-attention, padded or not, "cudnn" unpadded. The math path takes the rest:
    attention dropout, which `jax.nn.dot_product_attention` lacks, and a cache, whose every slot it would mask
    and whose (B, S, nh, hs) layout XLA would transpose whole at each step.
    """
    t = q.shape[2]
    pad = None
    if start is not None:
        real = ((0 if past is None else past[2]) + jnp.arange(t))[None, :] >= start[:, None]  # (B, T) of these keys
        pad = (real[:, None, :] | jnp.eye(t, dtype=bool))[:, None]  # (B, 1, T, T)
    if impl in ("xla", "cudnn") and past is None and dropout is None and (pad is None or impl == "xla"):
        q, k, v = (x.swapaxes(1, 2) for x in (q, k, v))  # (B, T, nh, hs), the layout it takes
        return jax.nn.dot_product_attention(q, k, v, mask=pad, is_causal=True, implementation=impl).swapaxes(1, 2)
    # "math": the readable reference, masked softmax with float32 scores and statistics.
    scale = 1.0 / math.sqrt(q.shape[-1])
    att = jnp.einsum("BNTH,BNUH->BNTU", q, k, preferred_element_type=jnp.float32) * scale  # (B, nh, T, T)
    att = jnp.where(causal_mask(t, t) if pad is None else causal_mask(t, t) & pad, att, -jnp.inf)
    if past is not None:  # the cache's first n positions precede these T, and all of them (from start) are visible
        k_past, v_past, n = past
        att_past = jnp.einsum("BNTH,BNSH->BNTS", q, k_past, preferred_element_type=jnp.float32) * scale
        seen = jnp.arange(k_past.shape[2]) < n  # (S,)
        if start is not None:
            seen = (seen & (jnp.arange(k_past.shape[2]) >= start[:, None]))[:, None, None, :]  # (B, 1, 1, S)
        att_past = jnp.where(seen, att_past, -jnp.inf)  # (B, nh, T, S)
        att = jnp.concatenate([att_past, att], axis=-1)  # (B, nh, T, S + T)
    att = jax.nn.softmax(att, axis=-1).astype(q.dtype)
    if dropout is not None:
        att = dropout(att, deterministic=False)
    y = jnp.einsum("BNTU,BNUH->BNTH", att[..., -t:], v)  # (B, nh, T, hs)
    if past is not None:
        y = y + jnp.einsum("BNTS,BNSH->BNTH", att[..., :-t], v_past)  # (B, nh, T, hs)
    return y


# Placeholder initialiser: GPTModel.reset_parameters draws every parameter, in one place, as torch_gpt does.
_DEFERRED = nnx.initializers.zeros_init()
# Set by from_pretrained, which overwrites every parameter: drawing them first would be wasted time.
_LOADING = contextvars.ContextVar("jax_gpt_loading", default=False)


def make_layer_norm(config: GPTConfig, dtype, param_dtype, rngs: nnx.Rngs) -> nnx.LayerNorm:
    # epsilon from the config (Flax's default is 1e-6); two-pass variance, as torch computes it.
    return nnx.LayerNorm(config.emb_dim, epsilon=config.ln_eps, use_fast_variance=False, dtype=dtype,
                         param_dtype=param_dtype, scale_init=_DEFERRED, bias_init=_DEFERRED, rngs=rngs)


class Buffer(nnx.Variable):
    """A fixed array of the model: not a Param, so never trained, and not in the checkpoint."""


class SinusoidalPositions(nnx.Module):
    """Fixed sin/cos position table of the original Transformer; a buffer, never saved or trained."""

    def __init__(self, config: GPTConfig, dtype=jnp.float32):
        self.table = Buffer(jnp.asarray(sinusoidal_table(config.context_length, config.emb_dim)))  # (ctx, C)
        self.dtype = dtype

    def __call__(self, positions: jax.Array) -> jax.Array:
        return self.table[...][positions].astype(self.dtype)


class CausalSelfAttention(nnx.Module):
    def __init__(self, config: GPTConfig, attn_impl: str, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.n_heads, self.drop_rate, self.attn_impl = config.n_heads, config.drop_rate, attn_impl
        linear = dict(dtype=dtype, param_dtype=param_dtype, kernel_init=_DEFERRED, bias_init=_DEFERRED, rngs=rngs)
        self.c_attn = nnx.Linear(config.emb_dim, 3 * config.emb_dim, use_bias=config.qkv_bias, **linear)
        self.c_proj = nnx.Linear(config.emb_dim, config.emb_dim, **linear)
        self.attn_dropout = nnx.Dropout(config.drop_rate, rngs=rngs)
        self.resid_dropout = nnx.Dropout(config.drop_rate, rngs=rngs)

    def __call__(self, x: jax.Array, cache: KVCache | None = None, layer: int | jax.Array = 0, *,
                 deterministic: bool = True) -> tuple[jax.Array, KVCache | None]:
        B, T, C = x.shape
        q, k, v = jnp.split(self.c_attn(x), 3, axis=2)  # 3 × (B, T, C)
        q = q.reshape(B, T, self.n_heads, C // self.n_heads).swapaxes(1, 2)  # (B, nh, T, hs)
        k = k.reshape(B, T, self.n_heads, C // self.n_heads).swapaxes(1, 2)  # (B, nh, T, hs)
        v = v.reshape(B, T, self.n_heads, C // self.n_heads).swapaxes(1, 2)  # (B, nh, T, hs)
        past = start = None
        if cache is not None:
            if not (isinstance(cache.pos, int) and cache.pos == 0):  # a fresh cache holds no past
                past = (*cache.layer(layer), cache.pos)  # (B, nh, S, hs) × 2, as earlier calls left them
            start = cache.start
            cache = cache.update(layer, k, v)
        dropout = None if deterministic or self.drop_rate == 0 else self.attn_dropout
        y = attention(q, k, v, self.attn_impl, dropout, past, start)  # (B, nh, T, hs)
        y = y.swapaxes(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y), deterministic=deterministic), cache


class MLP(nnx.Module):
    def __init__(self, config: GPTConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        linear = dict(dtype=dtype, param_dtype=param_dtype, kernel_init=_DEFERRED, bias_init=_DEFERRED, rngs=rngs)
        self.c_fc = nnx.Linear(config.emb_dim, config.hidden_dim, **linear)
        self.approximate = config.gelu == "tanh"  # GPT-2's tanh GELU; "exact" is erf
        self.c_proj = nnx.Linear(config.hidden_dim, config.emb_dim, **linear)
        self.dropout = nnx.Dropout(config.drop_rate, rngs=rngs)

    def __call__(self, x: jax.Array, *, deterministic: bool = True) -> jax.Array:
        h = jax.nn.gelu(self.c_fc(x), approximate=self.approximate)  # (B, T, 4C)
        return self.dropout(self.c_proj(h), deterministic=deterministic)  # (B, T, C)


class Block(nnx.Module):
    def __init__(self, config: GPTConfig, attn_impl: str, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.ln_1 = make_layer_norm(config, dtype, param_dtype, rngs)
        self.attn = CausalSelfAttention(config, attn_impl, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.ln_2 = make_layer_norm(config, dtype, param_dtype, rngs)
        self.mlp = MLP(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array, cache: KVCache | None = None, layer: int | jax.Array = 0, *,
                 deterministic: bool = True) -> tuple[jax.Array, KVCache | None]:
        y, cache = self.attn(self.ln_1(x), cache, layer, deterministic=deterministic)
        x = x + y  # (B, T, C)
        return x + self.mlp(self.ln_2(x), deterministic=deterministic), cache  # (B, T, C)


class GPTModel(nnx.Module):
    """GPT-2: embeddings, `n_layers` pre-LayerNorm blocks, final LayerNorm, output head.

    `attn_impl`: "math" (explicit masked softmax), "xla" (`jax.nn.dot_product_attention`) or "cudnn"
    (its cuDNN flash attention; a GPU and bf16/fp16 `dtype` needed). `dtype` is the compute dtype,
    `param_dtype` the storage dtype; LayerNorm and softmax statistics are float32 whatever they are.
    `scan_layers`: the blocks' arrays stacked on a leading layer axis and run by one `lax.scan` (one block
    traced and compiled, whatever the depth) instead of a Python loop. `remat`: what the backward recomputes
    ("none", "block", "dots": see REMAT). Matmul precision is JAX's default (`jax_default_matmul_precision`;
    TF32 on recent GPUs unless set to "highest", as the tests do). `loss_impl`: how `model(idx, targets=y)`
    computes its loss, "plain" (from the logits) or "fused" (`jax_gpt.losses.linear_cross_entropy` from the final
    hidden states: the (B, T, V) logits never exist whole). All are runtime choices, never part of the
    config: scanned and unrolled models read and write the same checkpoints.
    """

    def __init__(self, config: GPTConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32,
                 attn_impl: str = "xla", scan_layers: bool = False, remat: str = "none", loss_impl: str = "plain"):
        if remat not in REMAT:
            raise ValueError(f"remat must be one of {tuple(REMAT)}, got {remat!r}")
        if loss_impl not in LOSS_IMPLS:
            raise ValueError(f"loss_impl must be one of {LOSS_IMPLS}, got {loss_impl!r}")
        self.loss_impl = loss_impl
        self.config, self.dtype, self.scan_layers, self.remat = config, dtype, scan_layers, remat
        init_key = rngs.params()  # drawn first: the weights do not depend on how the blocks are built
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.wte = nnx.Embed(config.vocab_size, config.emb_dim, embedding_init=_DEFERRED, **kw)
        self.wpe = (nnx.Embed(config.context_length, config.emb_dim, embedding_init=_DEFERRED, **kw)
                    if config.pos_embedding == "learned" else SinusoidalPositions(config, dtype))
        self.drop = nnx.Dropout(config.drop_rate, rngs=rngs)
        block = functools.partial(Block, config, attn_impl, dtype=dtype, param_dtype=param_dtype)
        if scan_layers:  # one Block, every array with a leading layer axis; each layer its own dropout keys
            self.h = nnx.split_rngs(splits=config.n_layers)(nnx.vmap(lambda r: block(rngs=r)))(rngs)
        else:
            self.h = nnx.List(block(rngs=rngs) for _ in range(config.n_layers))
        self.ln_f = make_layer_norm(config, dtype, param_dtype, rngs)
        # Tied: the head is wte itself, so there is no lm_head to hold a copy.
        self.lm_head = (None if config.tie_embeddings else
                        nnx.Linear(config.emb_dim, config.vocab_size, use_bias=False, kernel_init=_DEFERRED, **kw))
        self.attn_impl = attn_impl
        if not _LOADING.get():
            self.reset_parameters(init_key)

    @property
    def attn_impl(self) -> str:
        return self._blocks()[0].attn.attn_impl

    @attn_impl.setter
    def attn_impl(self, impl: str) -> None:
        if impl not in ATTN_IMPLS:
            raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}, got {impl!r}")
        if impl == "cudnn" and jax.default_backend() != "gpu":
            raise ValueError(f"attn_impl='cudnn' needs a GPU; the default JAX backend is {jax.default_backend()}")
        for block in self._blocks():
            block.attn.attn_impl = impl

    def _blocks(self) -> list[Block]:
        return [self.h] if self.scan_layers else list(self.h)

    def reset_parameters(self, key: jax.Array) -> None:
        """GPT-2 init by parameter name (gpt_core.params.init_rule), each tensor drawn from `key` folded with its
        name's position, so a scanned model (each layer of a stack drawn apart) starts where an unrolled one does."""
        order = {name: i for i, name in enumerate(expected_shapes(self.config))}
        for path, p in nnx.to_flat_state(nnx.state(self, nnx.Param)):
            names = convert.canonical_names(path, self.config.n_layers)
            values = []
            for name in names:
                kind, value = init_rule(name, self.config)
                shape = p.shape[1:] if convert.is_stacked(path) else p.shape
                values.append(jnp.full(shape, value) if kind == "constant" else
                              value * jax.random.normal(jax.random.fold_in(key, order[name]), shape))
            p.set_value((jnp.stack(values) if convert.is_stacked(path) else values[0]).astype(p.dtype))

    def __call__(self, idx: jax.Array, *, deterministic: bool = True, cache: KVCache | None = None,
                 targets: jax.Array | None = None, last_only: bool = False) -> jax.Array | tuple[jax.Array, KVCache]:
        """Token ids (B, T) -> logits (B, T, vocab_size). With a cache, `idx` continues what it holds and
        the call returns (logits, updated cache). `deterministic=False` turns dropout on. With `targets` (B, T),
        the mean float32 cross-entropy against them instead (`loss_impl`; -100 is ignored). `last_only`: the last
        position's logits alone, (B, 1, vocab_size), all that generation needs of a prompt (the output head over
        one position, not T)."""
        if targets is not None and (cache is not None or last_only):
            raise ValueError("targets (a training loss) and a KV cache or last_only (generation) do not go together")
        B, T = self._check_input(idx, cache)
        start = 0 if cache is None else cache.pos
        pos = start + jnp.arange(T)  # (T,)
        if cache is not None and cache.start is not None:  # left padding: positions from each row's first token
            pos = jnp.maximum(pos[None, :] - cache.start[:, None], 0)  # (B, T)
        x = self.drop(self.wte(idx) + self.wpe(pos), deterministic=deterministic)  # (B, T, C)
        x, cache = self._run_blocks(x, cache, deterministic)  # (B, T, C)
        x = self.ln_f(x[:, -1:] if last_only else x)  # (B, T, C), or (B, 1, C)
        if targets is not None and self.loss_impl == "fused":
            head = self.wte.embedding[...] if self.lm_head is None else self.lm_head.kernel[...].T  # (V, C)
            return linear_cross_entropy(x, head.astype(self.dtype), targets)  # ()
        if self.lm_head is None:  # tied: x @ wte.T as an einsum; Flax's wte.attend makes XLA:CPU copy wte.T per call
            logits = jnp.einsum("BTC,VC->BTV", x, self.wte.embedding[...].astype(self.dtype))  # (B, T, vocab_size)
        else:
            logits = self.lm_head(x)  # (B, T, vocab_size)
        if targets is not None:
            return cross_entropy_loss(logits, targets)  # ()
        if cache is None:
            return logits
        return logits, dataclasses.replace(cache, pos=cache.pos + T)

    def _run_blocks(self, x: jax.Array, cache: KVCache | None, deterministic: bool) -> tuple[jax.Array, KVCache | None]:
        """The blocks over x (B, T, C): a Python loop, or one `lax.scan` over the stack carrying (x, cache, layer).
        Each block is a pure function of its state (weights, dropout RNG) here, so `jax.checkpoint` can wrap it."""
        def apply(graphdef, state, x, cache, layer):
            block = nnx.merge(graphdef, state)
            x, cache = block(x, cache, layer, deterministic=deterministic)
            return x, cache, nnx.state(block, nnx.Not(nnx.Param))  # dropout's RNG state, its counters advanced

        if self.remat != "none" and cache is None:  # the layer index is traced in the scan, a Python int outside
            apply = jax.checkpoint(apply, policy=REMAT[self.remat], static_argnums=(0,) if self.scan_layers else (0, 4),
                                   prevent_cse=not self.scan_layers)  # a scan already keeps XLA from merging it away
        # Without dropout nothing changes: no write-back, which also lets generation call this inside its loops.
        update = (lambda module, state: None) if deterministic else nnx.update
        if not self.scan_layers:
            for i, block in enumerate(self.h):
                graphdef, state = nnx.split(block)
                x, cache, state = apply(graphdef, state, x, cache, i)
                update(block, state)
            return x, cache
        graphdef, state = nnx.split(self.h)

        def body(carry, layer_state):
            x, cache, i = carry
            x, cache, layer_state = apply(graphdef, layer_state, x, cache, i)
            return (x, cache, i + 1), layer_state

        (x, cache, _), state = lax.scan(body, (x, cache, jnp.int32(0)), state)
        update(self.h, state)
        return x, cache

    def _check_input(self, idx: jax.Array, cache: KVCache | None) -> tuple[int, int]:
        check_ids(idx, self.config.vocab_size)
        B, T = idx.shape
        if cache is not None and cache.stacked != self.scan_layers:
            raise ValueError(f"a {'scanned' if self.scan_layers else 'unrolled'} model needs a KVCache made with "
                             f"stacked={self.scan_layers}")
        limit = self.config.context_length if cache is None else cache.max_len
        start = 0 if cache is None or isinstance(cache.pos, jax.core.Tracer) else int(cache.pos)
        if T == 0 or start + T > limit:
            raise ValueError(f"sequence of {T} tokens (after {start} cached) does not fit the context of "
                             f"{limit} positions")
        return B, T

    # ----------------------------------------------------------------------------- checkpoints
    def canonical_state(self) -> dict[str, np.ndarray]:
        """The parameters under Hugging Face GPT-2 names and layouts, as float32 numpy arrays (per layer, also
        when scanned)."""
        return canonicalize(self.config, convert.to_canonical(nnx.state(self, nnx.Param)), "model")  # model order

    def load_canonical_state(self, state: dict[str, np.ndarray], source: str = "state") -> None:
        """Copy a state in Hugging Face names/layouts into this model, checked by `canonicalize` first."""
        state = canonicalize(self.config, state, source)
        try:
            nnx.update(self, convert.from_canonical(nnx.state(self, nnx.Param), state))
        except (KeyError, ValueError) as e:  # only if this model and its config disagree
            raise CheckpointError(f"{source}: {e.args[0]}") from None

    def save_pretrained(self, directory: str | Path) -> Path:
        return save_checkpoint(directory, self.config, self.canonical_state())

    @classmethod
    def from_pretrained(cls, name_or_dir: str | Path, *, rngs: nnx.Rngs | None = None, **runtime) -> GPTModel:
        """Load our checkpoint, a `transformers` GPT-2 directory (safetensors only: no torch here) or a Hugging
        Face Hub repository id ("gpt2", "openai-community/gpt2-medium", through the local Hub cache). `rngs` seeds
        dropout (default `nnx.Rngs(0)`); `runtime` goes to the constructor (dtype, param_dtype, attn_impl,
        scan_layers, remat)."""
        config, state = load_checkpoint(name_or_dir)
        loading = _LOADING.set(True)
        try:
            model = cls(config, rngs=nnx.Rngs(0) if rngs is None else rngs, **runtime)
        finally:
            _LOADING.reset(loading)
        model.load_canonical_state(state, source=str(name_or_dir))  # every parameter, or CheckpointError
        return model


def check_ids(idx: jax.Array, vocab_size: int) -> None:
    """Raise ValueError unless `idx` is (B, T) integer ids in [0, vocab_size).

    JAX clamps out-of-range gathers silently, so values are checked on the host whenever they are
    concrete; under a trace only shape and dtype can be (jitted callers check before tracing).
    """
    if not hasattr(idx, "ndim"):
        raise ValueError(f"idx must be a numpy or JAX array of (batch, seq_len) token ids, got {type(idx).__name__}")
    if idx.ndim != 2:
        raise ValueError(f"idx must be (batch, seq_len) token ids, got shape {tuple(np.shape(idx))}")
    if not jnp.issubdtype(idx.dtype, jnp.integer):
        raise ValueError(f"idx must hold integer token ids, got dtype {idx.dtype}")
    if not isinstance(idx, jax.core.Tracer) and idx.size:
        a = np.asarray(idx)
        bad = np.argwhere((a < 0) | (a >= vocab_size))
        if len(bad):
            row, col = bad[0]
            raise ValueError(f"token id {int(a[row, col])} is outside [0, {vocab_size}) (row {row}, position {col})")


def cross_entropy_loss(logits: jax.Array, targets: jax.Array, ignore_index: int = -100) -> jax.Array:
    """Mean next-token cross-entropy of (B, T, V) logits against (B, T) targets, in float32. Positions whose target
    is `ignore_index` are left out of the mean, as `F.cross_entropy` does (NaN when every position is)."""
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} do not match")
    valid = targets != ignore_index
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), jnp.where(valid, targets, 0))
    return jnp.where(valid, losses, 0.0).sum() / valid.sum()
