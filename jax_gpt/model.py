"""GPT-2 in Flax NNX, reading side by side with torch_gpt/model.py.

Parameter paths are those of the Hugging Face GPT-2 checkpoint (`wte`, `wpe`, `h.{i}.ln_1`,
`attn.c_attn`, …) with Flax's leaf names (`kernel`, `scale`, `embedding`), so loading is a loop over one
name table with shape checks. Shapes: B batch, T query positions, S key positions (T, or a KV cache's
static length), nh heads, hs head size, C = emb_dim.
"""

from __future__ import annotations

import contextvars
import dataclasses
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax import lax

from gpt_core.checkpoint import CheckpointError, canonicalize, load_checkpoint, save_checkpoint
from gpt_core.config import GPTConfig

ATTN_IMPLS = ("math", "xla", "cudnn")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Static-shape key/value buffers, one (B, nh, max_len, hs) pair per layer, and the fill level.

    A pytree, so it crosses `jax.jit` and `lax` loops. torch_gpt's cache is written in place; this one is
    immutable: the model returns an updated copy, with `pos` advanced after its last layer. One array per
    layer rather than one stack: slicing a layer out of a stack defeats XLA's in-place update.
    """

    k: tuple[jax.Array, ...]  # n_layers × (B, nh, max_len, hs)
    v: tuple[jax.Array, ...]  # n_layers × (B, nh, max_len, hs)
    pos: jax.Array | int  # () int32: positions filled so far; a Python 0 while it is fresh

    @classmethod
    def create(cls, config: GPTConfig, batch_size: int, max_len: int, *, dtype=jnp.float32) -> KVCache:
        if max_len > config.context_length:
            raise ValueError(f"KV cache max_len {max_len} exceeds context_length {config.context_length}")
        shape = (batch_size, config.n_heads, max_len, config.head_dim)
        k, v = (tuple(jnp.zeros(shape, dtype) for _ in range(config.n_layers)) for _ in range(2))
        return cls(k, v, 0)

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]

    def update(self, layer: int, k: jax.Array, v: jax.Array) -> KVCache:
        """Store (B, nh, T, hs) keys/values at `pos`, for the calls that follow. The storing call attends to
        them directly and to the cache as it was: read before written, so XLA updates it in place."""
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
              past: tuple[jax.Array, jax.Array, jax.Array] | None = None) -> jax.Array:
    """Causal attention of (B, nh, T, hs) queries over their own (B, nh, T, hs) keys/values and, given
    `past` = (keys, values, n), over the first n positions of a cache's (B, nh, S, hs) keys/values too.

    "xla" and "cudnn" take plain causal self-attention. The math path takes the rest: attention dropout,
    which `jax.nn.dot_product_attention` lacks, and a cache, whose every slot it would mask and whose
    (B, S, nh, hs) layout XLA would transpose whole at each step.
    """
    if impl in ("xla", "cudnn") and past is None and dropout is None:
        q, k, v = (x.swapaxes(1, 2) for x in (q, k, v))  # (B, T, nh, hs), the layout it takes
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=impl).swapaxes(1, 2)
    # "math": the readable reference, masked softmax with float32 scores and statistics.
    t, scale = q.shape[2], 1.0 / math.sqrt(q.shape[-1])
    att = jnp.einsum("BNTH,BNUH->BNTU", q, k, preferred_element_type=jnp.float32) * scale  # (B, nh, T, T)
    att = jnp.where(causal_mask(t, t), att, -jnp.inf)
    if past is not None:  # the cache's first n positions precede these T, and all of them are visible
        k_past, v_past, n = past
        att_past = jnp.einsum("BNTH,BNSH->BNTS", q, k_past, preferred_element_type=jnp.float32) * scale
        att_past = jnp.where(jnp.arange(k_past.shape[2]) < n, att_past, -jnp.inf)  # (B, nh, T, S)
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
        pos = np.arange(config.context_length, dtype=np.float64)[:, None]  # (ctx, 1)
        freq = np.exp(-math.log(10000.0) * np.arange(0, config.emb_dim, 2, dtype=np.float64)
                      / config.emb_dim)  # (ceil(C/2),)
        table = np.zeros((config.context_length, config.emb_dim), dtype=np.float64)
        table[:, 0::2] = np.sin(pos * freq)
        table[:, 1::2] = np.cos(pos * freq)[:, : config.emb_dim // 2]
        self.table = Buffer(jnp.asarray(table, jnp.float32))  # float64 maths, then float32 as torch_gpt
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

    def __call__(self, x: jax.Array, cache: KVCache | None = None, layer: int = 0, *,
                 deterministic: bool = True) -> tuple[jax.Array, KVCache | None]:
        B, T, C = x.shape
        q, k, v = jnp.split(self.c_attn(x), 3, axis=2)  # 3 × (B, T, C)
        q = q.reshape(B, T, self.n_heads, C // self.n_heads).swapaxes(1, 2)  # (B, nh, T, hs)
        k = k.reshape(B, T, self.n_heads, C // self.n_heads).swapaxes(1, 2)  # (B, nh, T, hs)
        v = v.reshape(B, T, self.n_heads, C // self.n_heads).swapaxes(1, 2)  # (B, nh, T, hs)
        past = None
        if cache is not None:
            if not (isinstance(cache.pos, int) and cache.pos == 0):  # a fresh cache holds no past
                past = (cache.k[layer], cache.v[layer], cache.pos)  # (B, nh, S, hs) × 2, as earlier calls left them
            cache = cache.update(layer, k, v)
        dropout = None if deterministic or self.drop_rate == 0 else self.attn_dropout
        y = attention(q, k, v, self.attn_impl, dropout, past)  # (B, nh, T, hs)
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

    def __call__(self, x: jax.Array, cache: KVCache | None = None, layer: int = 0, *,
                 deterministic: bool = True) -> tuple[jax.Array, KVCache | None]:
        y, cache = self.attn(self.ln_1(x), cache, layer, deterministic=deterministic)
        x = x + y  # (B, T, C)
        return x + self.mlp(self.ln_2(x), deterministic=deterministic), cache  # (B, T, C)


class GPTModel(nnx.Module):
    """GPT-2: embeddings, `n_layers` pre-LayerNorm blocks, final LayerNorm, output head.

    `attn_impl`: "math" (explicit masked softmax), "xla" (`jax.nn.dot_product_attention`) or "cudnn"
    (its cuDNN flash attention; a GPU and bf16/fp16 `dtype` needed). `dtype` is the compute dtype,
    `param_dtype` the storage dtype; LayerNorm and softmax statistics are float32 whatever they are.
    Matmul precision is JAX's default (`jax_default_matmul_precision`; TF32 on recent GPUs unless set to
    "highest", as the tests do). All are runtime choices, never part of the config.
    """

    def __init__(self, config: GPTConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32,
                 attn_impl: str = "xla"):
        self.config, self.dtype = config, dtype
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.wte = nnx.Embed(config.vocab_size, config.emb_dim, embedding_init=_DEFERRED, **kw)
        self.wpe = (nnx.Embed(config.context_length, config.emb_dim, embedding_init=_DEFERRED, **kw)
                    if config.pos_embedding == "learned" else SinusoidalPositions(config, dtype))
        self.drop = nnx.Dropout(config.drop_rate, rngs=rngs)
        self.h = nnx.List(Block(config, attn_impl, **kw) for _ in range(config.n_layers))
        self.ln_f = make_layer_norm(config, dtype, param_dtype, rngs)
        # Tied: the head is wte itself, so there is no lm_head to hold a copy.
        self.lm_head = (None if config.tie_embeddings else
                        nnx.Linear(config.emb_dim, config.vocab_size, use_bias=False, kernel_init=_DEFERRED, **kw))
        self.attn_impl = attn_impl
        if not _LOADING.get():
            self.reset_parameters(rngs)

    @property
    def attn_impl(self) -> str:
        return self.h[0].attn.attn_impl

    @attn_impl.setter
    def attn_impl(self, impl: str) -> None:
        if impl not in ATTN_IMPLS:
            raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}, got {impl!r}")
        if impl == "cudnn" and jax.default_backend() != "gpu":
            raise ValueError(f"attn_impl='cudnn' needs a GPU; the default JAX backend is {jax.default_backend()}")
        for block in self.h:
            block.attn.attn_impl = impl

    def reset_parameters(self, rngs: nnx.Rngs) -> None:
        """GPT-2 init: N(0, init_std) weights, zero biases, residual projections scaled by 1/sqrt(2·n_layers)."""
        std = self.config.init_std
        for name, p in _named_params(self).items():
            if name.endswith("bias"):
                value = jnp.zeros(p.shape)
            elif ".ln_" in name or name.startswith("ln_f"):
                value = jnp.ones(p.shape)
            elif name.endswith("c_proj.weight"):
                value = std / math.sqrt(2 * self.config.n_layers) * jax.random.normal(rngs.params(), p.shape)
            else:
                value = std * jax.random.normal(rngs.params(), p.shape)
            p.set_value(value.astype(p.dtype))

    def __call__(self, idx: jax.Array, *, deterministic: bool = True,
                 cache: KVCache | None = None) -> jax.Array | tuple[jax.Array, KVCache]:
        """Token ids (B, T) -> logits (B, T, vocab_size). With a cache, `idx` continues what it holds and
        the call returns (logits, updated cache). `deterministic=False` turns dropout on."""
        B, T = self._check_input(idx, cache)
        start = 0 if cache is None else cache.pos
        pos = start + jnp.arange(T)  # (T,)
        x = self.drop(self.wte(idx) + self.wpe(pos), deterministic=deterministic)  # (B, T, C)
        for i, block in enumerate(self.h):
            x, cache = block(x, cache, i, deterministic=deterministic)  # (B, T, C)
        x = self.ln_f(x)  # (B, T, C)
        if self.lm_head is None:  # tied: x @ wte.T as an einsum; Flax's wte.attend makes XLA:CPU copy wte.T per call
            logits = jnp.einsum("BTC,VC->BTV", x, self.wte.embedding[...].astype(self.dtype))  # (B, T, vocab_size)
        else:
            logits = self.lm_head(x)  # (B, T, vocab_size)
        if cache is None:
            return logits
        return logits, dataclasses.replace(cache, pos=cache.pos + T)

    def _check_input(self, idx: jax.Array, cache: KVCache | None) -> tuple[int, int]:
        check_ids(idx, self.config.vocab_size)
        B, T = idx.shape
        limit = self.config.context_length if cache is None else cache.max_len
        start = 0 if cache is None or isinstance(cache.pos, jax.core.Tracer) else int(cache.pos)
        if T == 0 or start + T > limit:
            raise ValueError(f"sequence of {T} tokens (after {start} cached) does not fit the context of "
                             f"{limit} positions")
        return B, T

    # ----------------------------------------------------------------------------- checkpoints
    def canonical_state(self) -> dict[str, np.ndarray]:
        """The parameters under Hugging Face GPT-2 names and layouts, as float32 numpy arrays."""
        return canonicalize(self.config, to_canonical(nnx.state(self, nnx.Param)), "model")  # in model order

    def load_canonical_state(self, state: dict[str, np.ndarray], source: str = "state") -> None:
        """Copy a state in Hugging Face names/layouts into this model, checked by `canonicalize` first."""
        state = canonicalize(self.config, state, source)
        own = _named_params(self)
        if own.keys() != state.keys():  # only if this model and its config disagree
            raise CheckpointError(f"{source}: the model's parameters {sorted(own.keys() ^ state.keys())} "
                                  "have no match in the state, or the other way round")
        for name, a in state.items():
            a = a.T if name in TRANSPOSED else a
            if a.shape != own[name].shape:
                raise CheckpointError(f"{source}: {name} has shape {a.shape} in Flax layout, "
                                      f"the model wants {own[name].shape}")
            own[name].set_value(jnp.asarray(a, dtype=own[name].dtype))

    def save_pretrained(self, directory: str | Path) -> Path:
        return save_checkpoint(directory, self.config, self.canonical_state())

    @classmethod
    def from_pretrained(cls, directory: str | Path, *, rngs: nnx.Rngs | None = None, **runtime) -> GPTModel:
        """Load our checkpoint or a `transformers` GPT-2 directory (safetensors only: no torch here).
        `rngs` seeds dropout (default `nnx.Rngs(0)`); `runtime` goes to the constructor (dtype,
        param_dtype, attn_impl)."""
        config, state = load_checkpoint(directory)
        loading = _LOADING.set(True)
        try:
            model = cls(config, rngs=nnx.Rngs(0) if rngs is None else rngs, **runtime)
        finally:
            _LOADING.reset(loading)
        model.load_canonical_state(state, source=str(directory))  # every parameter, or CheckpointError
        return model


# nnx leaf name -> Hugging Face leaf name; the module path (wte, h.0.attn.c_attn, ln_f, …) is the same.
LEAF_NAMES = {"embedding": "weight", "kernel": "weight", "scale": "weight", "bias": "bias"}
# HF's lm_head is an nn.Linear, (vocab, emb); a Flax kernel is (in, out), as HF's Conv1D weights already are.
TRANSPOSED = frozenset({"lm_head.weight"})


def canonical_name(path: tuple) -> str:
    """An nnx state path, e.g. ('h', 0, 'attn', 'c_attn', 'kernel') -> 'h.0.attn.c_attn.weight'."""
    return ".".join([*map(str, path[:-1]), LEAF_NAMES[path[-1]]])


def _named_params(model: nnx.Module) -> dict[str, nnx.Param]:
    return {canonical_name(path): p for path, p in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def to_canonical(params: nnx.State) -> dict[str, np.ndarray]:
    """A state of Params (the model's, or gradients shaped like it) -> HF names and layouts, float32 numpy."""
    state = {}
    for path, p in nnx.to_flat_state(params):
        name = canonical_name(path)
        a = np.asarray(p[...] if isinstance(p, nnx.Variable) else p, dtype=np.float32)
        state[name] = a.T if name in TRANSPOSED else a
    return state


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
        lo, hi = int(a.min()), int(a.max())
        if lo < 0 or hi >= vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(f"token id {bad} is outside [0, {vocab_size})")


def cross_entropy_loss(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy of (B, T, V) logits against (B, T) targets, in float32."""
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} do not match")
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets).mean()
