"""GPT-2 in PyTorch, reading side by side with jax_gpt/model.py.

Parameter names are those of the Hugging Face GPT-2 checkpoint (`wte`, `wpe`, `h.{i}.ln_1`,
`attn.c_attn`, …), so loading is a loop with shape checks (torch_gpt/convert.py: one transpose for the
Conv1D weights). The init, the sinusoidal table and the layouts are gpt_core's (gpt_core/params.py).
Shapes: B batch, T query positions, S key positions (T plus what a KV cache holds), nh heads, hs head
size, C = emb_dim.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from gpt_core.checkpoint import (
    TORCH_BIN_FILE,
    CheckpointError,
    canonicalize,
    load_config,
    load_raw_safetensors,
    resolve_checkpoint,
    save_checkpoint,
)
from gpt_core.config import GPTConfig
from gpt_core.params import init_rule, sinusoidal_table
from torch_gpt import convert
from torch_gpt.linear import Linear

ATTN_IMPLS = ("math", "sdpa", "triton")
NORM_IMPLS = ("torch", "triton")
REMAT = ("none", "block", "dots")
LOSS_IMPLS = ("plain", "fused")
# What `remat="dots"` keeps, as JAX's dots_with_no_batch_dims_saveable does: the linear layers' matmuls (the
# ops nn.Linear reaches below autograd), not attention's batched ones, nor any elementwise op or norm.
_MATMULS = frozenset({torch.ops.aten.mm.default, torch.ops.aten.addmm.default})


class KVCache:
    """Static-shape key/value buffers, one (B, nh, max_len, hs) pair per layer; the fill level `pos`, a ()
    int64 tensor on the cache's device; and `start`, (B,) int64, each row's first real slot: a batch of prompts of
    different lengths is left-padded (right-aligned, as transformers pads for generation), and row b's keys before
    start[b] are never seen.

    The model writes each layer's new keys/values at slots pos..pos+T-1 and advances `pos` in place after its
    last layer. A fresh cache's first call (the prefill) attends to its own keys, as without a cache; every later
    call attends over all max_len slots under `mask`. The position is data, never a Python int, so every decode
    step has the same shapes and the same graph: it compiles once (torch.compile, CUDA graphs), and `reset` lets
    later calls reuse the buffers where they are. Two host flags say what the graph is: `fresh` (nothing cached
    yet) and `padded` (`start` was given). One buffer per layer, not one stack: torch.compile updates a graph
    input in place, but a slice of one it rebuilds and copies back whole, every step.
    """

    def __init__(self, config: GPTConfig, batch_size: int, max_len: int, *, device=None, dtype=None,
                 start: torch.Tensor | None = None):
        if max_len > config.context_length:
            raise ValueError(f"KV cache max_len {max_len} exceeds context_length {config.context_length}")
        shape = (batch_size, config.n_heads, max_len, config.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        self.pos = torch.zeros((), dtype=torch.long, device=self.k[0].device)
        self.start = torch.zeros(batch_size, dtype=torch.long, device=self.k[0].device)
        self.offsets = torch.arange(max_len, device=self.k[0].device)  # (S,) made once: a decode step is tiny ops
        self.reset(start)
        if self.pos.device.type == "cuda":  # CUDA graphs then read and write them in place instead of copying them
            for t in (*self.k, *self.v, self.pos, self.start, self.offsets):
                torch._dynamo.mark_static_address(t)

    @property
    def batch_size(self) -> int:
        return self.k[0].shape[0]

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]

    def reset(self, start: torch.Tensor | None = None) -> None:
        """Empty the cache (pos 0) for rows whose first real slots are `start` (B,) (default 0), in place."""
        self.pos.zero_()
        if start is None:
            self.start.zero_()
        else:
            self.start.copy_(start)
        self.fresh, self.padded = True, start is not None

    def slots(self, t: int) -> torch.Tensor:
        """(T,) the slots the next T positions go to."""
        return self.pos + self.offsets[:t]

    def positions(self, t: int) -> torch.Tensor:
        """(B, T) position ids of the next T tokens, counted from each row's first real slot (0 on padding)."""
        return (self.slots(t)[None, :] - self.start[:, None]).clamp(min=0)

    def mask(self, t: int) -> torch.Tensor | None:
        """(B, 1, T, S) bool, True where the next T queries may see a key: start[b] <= j <= its own slot. Over all
        S = max_len slots; over its own S = T keys when fresh, None (plain causal) if not padded either. A padding
        query sees itself only, so no row is all -inf; nothing real ever sees it."""
        if self.fresh and not self.padded:
            return None
        i = self.slots(t)[:, None]  # (T, 1)
        j = self.offsets[:t] if self.fresh else self.offsets  # (S,)
        seen = (j <= i) & (j >= self.start[:, None, None])  # (B, T, S)
        return (seen | (j == i))[:, None]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store (B, nh, T, hs) keys/values at slots pos..pos+T-1; return the layer's (B, nh, S, hs) buffers."""
        slots = self.slots(k.shape[2])
        self.k[layer].index_copy_(2, slots, k)
        self.v[layer].index_copy_(2, slots, v)
        return self.k[layer], self.v[layer]


def causal_mask(t: int, s: int, device=None) -> torch.Tensor:
    """(T, S) bool, True where query i may see key j: the diagonal aligned to the end (j <= i + S - T)."""
    i = torch.arange(t, device=device)[:, None]
    j = torch.arange(s, device=device)[None, :]
    return j <= i + (s - t)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, impl: str, dropout_p: float,
              mask: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of (B, nh, T, hs) queries over (B, nh, S, hs) keys/values, S >= T; with `mask` (B, 1, T, S)
    bool (a KV cache's, True where query i may see key j), attention under that mask instead."""
    t, s = q.shape[2], k.shape[2]
    if mask is not None and impl != "math":
        # "triton" too, for what `cached_flash_attention` cannot take: a continuation of T > 1 tokens, whose
        # causal diagonal is not at the end of a static cache's slots.
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
    if impl == "sdpa":
        if t == s or t == 1:  # PyTorch aligns is_causal to the start, so only these need no explicit mask
            causal = t > 1  # a branch, not the value: under dynamic shapes the comparison is symbolic
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True if causal else False)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_mask(t, s, q.device), dropout_p=dropout_p)
    if impl == "triton":
        import kernels  # the kernels package stands alone; only this path needs it

        if dropout_p > 0:
            raise ValueError("attn_impl='triton' has no attention dropout; use drop_rate=0 or eval mode")
        return kernels.flash_attention(q, k, v, causal=True)
    # "math": the readable reference, masked softmax with float32 statistics.
    att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))  # (B, nh, T, S)
    att = att.masked_fill(~(causal_mask(t, s, q.device) if mask is None else mask), float("-inf"))
    att = F.softmax(att.float(), dim=-1).to(q.dtype)
    att = F.dropout(att, p=dropout_p)
    return att @ v  # (B, nh, T, hs)


def cached_flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: KVCache,
                           fresh: bool) -> torch.Tensor:
    """The Triton kernel against a KV cache, rows limited to their real keys: a prefill over its own (B, nh, T, hs)
    keys (fresh), or a decode step's one query over all (B, nh, S, hs) slots up to its own."""
    import kernels

    b, t = q.shape[0], q.shape[2]
    if fresh:
        return kernels.flash_attention(q, k, v, causal=True, kv_start=cache.start.int() if cache.padded else None,
                                       kv_end=torch.full((b,), t, dtype=torch.int32, device=q.device)
                                       if cache.padded else None)
    # repeat, not expand: the kernel reads kv_end[b] at b's offset, and an expanded tensor has stride 0.
    return kernels.flash_attention(q, k, v, causal=True, kv_start=cache.start.int(),
                                   kv_end=(cache.pos + 1).int().repeat(b))


def make_layer_norm(config: GPTConfig, norm_impl: str) -> nn.Module:
    if norm_impl == "triton":
        import kernels

        return kernels.FusedLayerNorm(config.emb_dim, eps=config.ln_eps)
    return nn.LayerNorm(config.emb_dim, eps=config.ln_eps)


class SinusoidalPositions(nn.Module):
    """Fixed sin/cos position table of the original Transformer; a buffer, never saved or trained."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.register_buffer("table", self.make_table(), persistent=False)

    def make_table(self) -> torch.Tensor:
        return torch.from_numpy(sinusoidal_table(self.config.context_length, self.config.emb_dim))  # (ctx, C)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        return self.table[positions]


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, attn_impl: str):
        super().__init__()
        self.n_heads, self.drop_rate, self.attn_impl = config.n_heads, config.drop_rate, attn_impl
        self.c_attn = Linear(config.emb_dim, 3 * config.emb_dim, bias=config.qkv_bias)
        self.c_proj = Linear(config.emb_dim, config.emb_dim)
        self.resid_dropout = nn.Dropout(config.drop_rate)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)  # 3 × (B, T, C)
        q = q.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2)  # (B, nh, T, hs)
        fresh = cache is not None and cache.fresh
        if cache is not None:
            k_all, v_all = cache.update(layer, k, v)  # (B, nh, S, hs)
            if not fresh:  # earlier calls' keys too: every slot, under the cache's mask
                k, v = k_all, v_all
        dropout_p = self.drop_rate if self.training else 0.0
        if cache is not None and self.attn_impl == "triton" and (fresh or T == 1):
            y = cached_flash_attention(q, k, v, cache, fresh)  # (B, nh, T, hs)
        else:
            y = attention(q, k, v, self.attn_impl, dropout_p, mask)  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = Linear(config.emb_dim, config.hidden_dim)
        self.gelu = nn.GELU(approximate="tanh" if config.gelu == "tanh" else "none")
        self.c_proj = Linear(config.hidden_dim, config.emb_dim)
        self.dropout = nn.Dropout(config.drop_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))  # (B, T, C)


class Block(nn.Module):
    def __init__(self, config: GPTConfig, attn_impl: str, norm_impl: str):
        super().__init__()
        self.ln_1 = make_layer_norm(config, norm_impl)
        self.attn = CausalSelfAttention(config, attn_impl)
        self.ln_2 = make_layer_norm(config, norm_impl)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache, layer, mask)  # (B, T, C)
        return x + self.mlp(self.ln_2(x))  # (B, T, C)


def _save_matmuls(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _MATMULS else CheckpointPolicy.PREFER_RECOMPUTE


_keep_matmuls = functools.partial(create_selective_checkpoint_contexts, _save_matmuls)


class GPTModel(nn.Module):
    """GPT-2: embeddings, `n_layers` pre-LayerNorm blocks, final LayerNorm, output head.

    `attn_impl`: "math" (explicit masked softmax), "sdpa" (`F.scaled_dot_product_attention`) or
    "triton" (the `kernels` package). `norm_impl`: "torch" or "triton". `remat`: what the backward
    recomputes, "none", "block" (each block from its input: `torch.utils.checkpoint`, non-reentrant, which
    replays the RNG so dropout masks match) or "dots" (the same, keeping the linear layers' matmul outputs:
    selective activation checkpointing, JAX's `dots_with_no_batch_dims_saveable`). `loss_impl`: how
    `model(idx, targets=y)` computes its loss, "plain" (from the logits) or "fused"
    (`kernels.linear_cross_entropy` from the final hidden states: the (B, T, V) logits never exist whole). All are
    runtime choices, never part of the config.
    """

    def __init__(self, config: GPTConfig, attn_impl: str = "sdpa", norm_impl: str = "torch", remat: str = "none",
                 loss_impl: str = "plain"):
        super().__init__()
        if norm_impl not in NORM_IMPLS:
            raise ValueError(f"norm_impl must be one of {NORM_IMPLS}, got {norm_impl!r}")
        if loss_impl not in LOSS_IMPLS:
            raise ValueError(f"loss_impl must be one of {LOSS_IMPLS}, got {loss_impl!r}")
        self.loss_impl = loss_impl
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.emb_dim)
        self.wpe = (nn.Embedding(config.context_length, config.emb_dim) if config.pos_embedding == "learned"
                    else SinusoidalPositions(config))
        self.drop = nn.Dropout(config.drop_rate)
        self.h = nn.ModuleList(Block(config, attn_impl, norm_impl) for _ in range(config.n_layers))
        self.ln_f = make_layer_norm(config, norm_impl)
        self.lm_head = Linear(config.emb_dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        self.attn_impl, self.remat = attn_impl, remat
        self.reset_parameters()

    @property
    def attn_impl(self) -> str:
        return self.h[0].attn.attn_impl

    @attn_impl.setter
    def attn_impl(self, impl: str) -> None:
        if impl not in ATTN_IMPLS:
            raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}, got {impl!r}")
        for block in self.h:
            block.attn.attn_impl = impl

    @property
    def remat(self) -> str:
        return self._remat

    @remat.setter
    def remat(self, remat: str) -> None:
        if remat not in REMAT:
            raise ValueError(f"remat must be one of {REMAT}, got {remat!r}")
        self._remat = remat

    def reset_parameters(self) -> None:
        """GPT-2 init by parameter name (gpt_core.params.init_rule)."""
        for name, p in self.named_parameters():
            kind, value = init_rule(name, self.config)
            if kind == "constant":
                nn.init.constant_(p, value)
            else:
                nn.init.normal_(p, 0.0, value)

    def forward(self, idx: torch.Tensor, cache: KVCache | None = None, *,
                targets: torch.Tensor | None = None, last_only: bool = False) -> torch.Tensor:
        """Token ids (B, T) -> logits (B, T, vocab_size). With a cache, `idx` continues what it holds (its rows'
        padding and fill level: see KVCache). With `targets` (B, T), the mean float32 cross-entropy against them
        instead (`loss_impl`; -100 is ignored). `last_only`: the last position's logits alone, (B, 1, vocab_size),
        all that generation needs of a prompt (the output head over one position, not T).

        Shapes and dtypes are always checked. Id values (and a cache's fill level) are checked here only when they
        are on the CPU, in eager mode: elsewhere reading them back would stop the device every call, so they are
        checked where they enter (`generate` its prompt, the trainers their batches, in gpt_core.batches)."""
        if targets is not None and (cache is not None or last_only):
            raise ValueError("targets (a training loss) and a KV cache or last_only (generation) do not go together")
        B, T = self._check_input(idx, cache)
        if cache is None:
            pos, mask = torch.arange(T, device=idx.device), None  # (T,); causal
        else:
            pos, mask = cache.positions(T), cache.mask(T)  # (B, T), (B, 1, T, S)
        x = self.drop(self.wte(idx) + self.wpe(pos))  # (B, T, C)
        remat = self.remat != "none" and cache is None and torch.is_grad_enabled()
        for i, block in enumerate(self.h):
            x = self._recomputed(block, x) if remat else block(x, cache, i, mask)  # (B, T, C)
        if cache is not None:
            cache.pos.add_(T)
            cache.fresh = False
        x = self.ln_f(x[:, -1:] if last_only else x)  # (B, T, C), or (B, 1, C)
        if targets is None:
            return self.lm_head(x)  # (B, T, vocab_size), or (B, 1, vocab_size)
        if self.loss_impl == "fused":
            import kernels

            return kernels.linear_cross_entropy(x, self.lm_head.weight, targets)  # ()
        return cross_entropy_loss(self.lm_head(x), targets)  # ()

    def _recomputed(self, block: Block, x: torch.Tensor) -> torch.Tensor:
        """The block, its activations recomputed in the backward from its input (and, for "dots", its matmuls)."""
        if self.remat == "dots":
            return checkpoint(block, x, use_reentrant=False, context_fn=_keep_matmuls)
        return checkpoint(block, x, use_reentrant=False)

    def _check_input(self, idx: torch.Tensor, cache: KVCache | None) -> tuple[int, int]:
        if idx.dim() != 2:
            raise ValueError(f"idx must be (batch, seq_len) token ids, got shape {tuple(idx.shape)}")
        if idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dtype == torch.bool:
            raise ValueError(f"idx must hold integer token ids, got dtype {idx.dtype}")
        B, T = idx.shape
        limit = self.config.context_length if cache is None else cache.max_len
        if cache is not None and cache.batch_size != B:
            raise ValueError(f"a batch of {B} does not match the KV cache's batch of {cache.batch_size}")
        # Values only where reading them costs no device synchronisation (and torch.compile no graph break).
        host = idx.device.type == "cpu" and not torch.compiler.is_compiling()
        start = int(cache.pos) if host and cache is not None and cache.pos.device.type == "cpu" else 0
        if T == 0 or start + T > limit:
            raise ValueError(f"sequence of {T} tokens (after {start} cached) does not fit the context of "
                             f"{limit} positions")
        if host:
            check_ids(idx, self.config.vocab_size)
        return B, T

    # ----------------------------------------------------------------------------- checkpoints
    def canonical_state(self) -> dict[str, np.ndarray]:
        """The parameters under Hugging Face GPT-2 names and layouts, as float32 numpy arrays."""
        return convert.canonical_dict(self.config, self.state_dict().items())

    def load_canonical_state(self, state: dict[str, np.ndarray], source: str = "state") -> None:
        """Copy a state in Hugging Face names/layouts into this model, checked by `canonicalize` first."""
        state = canonicalize(self.config, state, source)
        own = self.state_dict()
        with torch.no_grad():
            for name, a in state.items():
                own[name].copy_(convert.from_canonical(name, a))

    def save_pretrained(self, directory: str | Path) -> Path:
        return save_checkpoint(directory, self.config, self.canonical_state())

    @classmethod
    def from_pretrained(cls, name_or_dir: str | Path, *, device=None, dtype=None, **runtime) -> GPTModel:
        """Load our checkpoint, a `transformers` GPT-2 directory (safetensors, or a `.bin` read with
        `torch.load(weights_only=True)`) or a Hugging Face Hub repository id ("gpt2",
        "openai-community/gpt2-medium", through the local Hub cache), in eval mode. `runtime` goes to the
        constructor (attn_impl, norm_impl, remat)."""
        directory = resolve_checkpoint(name_or_dir)
        config = load_config(directory)
        raw = load_raw_safetensors(directory)
        if raw is None:
            raw = _load_bin(directory)
        # Built on the meta device and given uninitialised storage: every parameter is overwritten (or the load
        # fails) below, and initialising gpt2-xl's 1.5B parameters first would take longer than reading them.
        with torch.device("meta"):
            model = cls(config, **runtime)
        model.to_empty(device="cpu")
        if config.tie_embeddings:  # to_empty gives each module its own new tensor
            model.lm_head.weight = model.wte.weight
        if isinstance(model.wpe, SinusoidalPositions):  # a computed buffer, not in any checkpoint
            model.wpe.table = model.wpe.make_table()
        model.load_canonical_state(raw, source=str(directory))
        return model.to(device=device, dtype=dtype).eval()  # as transformers does: ready for inference


def _load_bin(directory: Path) -> dict[str, np.ndarray]:
    """The tensors of `pytorch_model.bin`, read with `torch.load(weights_only=True)`, which runs no pickled code."""
    path = directory / TORCH_BIN_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{directory} has neither model.safetensors nor {TORCH_BIN_FILE}")
    try:
        tensors = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError for code or objects, RuntimeError for a damaged archive, ...
        lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [""]
        if "Weights only load failed" in lines[0]:  # torch's own words; the reason is on a later line
            reason = next((line for line in lines if "GLOBAL" in line), lines[-1]).split(". ")[0].rstrip(".")
            raise CheckpointError(f"{path} holds pickled code or objects besides tensors, which are never run "
                                  f"({reason.removeprefix('WeightsUnpickler error: ')})") from None
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({type(e).__name__}: {lines[0]})") from None
    if not (isinstance(tensors, dict) and all(isinstance(v, torch.Tensor) for v in tensors.values())):
        raise CheckpointError(f"{path} does not hold a dict of tensors")
    return {k: v.to(torch.float32).numpy() for k, v in tensors.items()}


def check_ids(idx: torch.Tensor, vocab_size: int) -> None:
    """Raise ValueError unless every id of (B, T) `idx` is in [0, vocab_size), naming the first that is not and where.

    Reads the values back: one synchronisation on a GPU, so callers do it once where ids enter, never per step.
    """
    bad = (idx < 0) | (idx >= vocab_size)
    if bool(bad.any()):
        row, col = (int(i) for i in bad.nonzero()[0])
        raise ValueError(f"token id {int(idx[row, col])} is outside [0, {vocab_size}) (row {row}, position {col})")


def cross_entropy_loss(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean next-token cross-entropy of (B, T, V) logits against (B, T) targets, in float32. Positions whose target
    is `ignore_index` are left out of the mean (NaN when every position is), as `F.cross_entropy` does."""
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} do not match")
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=ignore_index)
