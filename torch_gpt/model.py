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

ATTN_IMPLS = ("math", "sdpa", "triton")
NORM_IMPLS = ("torch", "triton")
REMAT = ("none", "block", "dots")
LOSS_IMPLS = ("plain", "fused")
# What `remat="dots"` keeps, as JAX's dots_with_no_batch_dims_saveable does: the linear layers' matmuls (the
# ops nn.Linear reaches below autograd), not attention's batched ones, nor any elementwise op or norm.
_MATMULS = frozenset({torch.ops.aten.mm.default, torch.ops.aten.addmm.default})


class KVCache:
    """Static-shape key/value buffers for every layer, (n_layers, B, nh, max_len, hs), and the fill level.

    The model writes each layer's new keys/values at `pos` and advances `pos` after its last layer.
    """

    def __init__(self, config: GPTConfig, batch_size: int, max_len: int, *, device=None, dtype=None):
        if max_len > config.context_length:
            raise ValueError(f"KV cache max_len {max_len} exceeds context_length {config.context_length}")
        shape = (config.n_layers, batch_size, config.n_heads, max_len, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store (B, nh, T, hs) keys/values at `pos`; return all keys/values so far, (B, nh, S, hs)."""
        end = self.pos + k.shape[2]
        self.k[layer, :, :, self.pos:end] = k
        self.v[layer, :, :, self.pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


def causal_mask(t: int, s: int, device=None) -> torch.Tensor:
    """(T, S) bool, True where query i may see key j: the diagonal aligned to the end (j <= i + S - T)."""
    i = torch.arange(t, device=device)[:, None]
    j = torch.arange(s, device=device)[None, :]
    return j <= i + (s - t)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, impl: str, dropout_p: float) -> torch.Tensor:
    """Causal attention of (B, nh, T, hs) queries over (B, nh, S, hs) keys/values, S >= T."""
    t, s = q.shape[2], k.shape[2]
    if impl == "sdpa":
        if t == s or t == 1:  # PyTorch aligns is_causal to the start, so only these need no explicit mask
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=t > 1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_mask(t, s, q.device), dropout_p=dropout_p)
    if impl == "triton":
        import kernels  # the kernels package stands alone; only this path needs it

        if dropout_p > 0:
            raise ValueError("attn_impl='triton' has no attention dropout; use drop_rate=0 or eval mode")
        return kernels.flash_attention(q, k, v, causal=True)
    # "math": the readable reference, masked softmax with float32 statistics.
    att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))  # (B, nh, T, S)
    att = att.masked_fill(~causal_mask(t, s, q.device), float("-inf"))
    att = F.softmax(att.float(), dim=-1).to(q.dtype)
    att = F.dropout(att, p=dropout_p)
    return att @ v  # (B, nh, T, hs)


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
        self.c_attn = nn.Linear(config.emb_dim, 3 * config.emb_dim, bias=config.qkv_bias)
        self.c_proj = nn.Linear(config.emb_dim, config.emb_dim)
        self.resid_dropout = nn.Dropout(config.drop_rate)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)  # 3 × (B, T, C)
        q = q.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2)  # (B, nh, T, hs)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, nh, S, hs)
        dropout_p = self.drop_rate if self.training else 0.0
        y = attention(q, k, v, self.attn_impl, dropout_p)  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.emb_dim, config.hidden_dim)
        self.gelu = nn.GELU(approximate="tanh" if config.gelu == "tanh" else "none")
        self.c_proj = nn.Linear(config.hidden_dim, config.emb_dim)
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

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache, layer)  # (B, T, C)
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
        self.lm_head = nn.Linear(config.emb_dim, config.vocab_size, bias=False)
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
                targets: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids (B, T) -> logits (B, T, vocab_size). With a cache, `idx` continues what it holds. With
        `targets` (B, T), the mean float32 cross-entropy against them instead (`loss_impl`; -100 is ignored)."""
        if targets is not None and cache is not None:
            raise ValueError("targets (a training loss) and a KV cache (generation) do not go together")
        B, T = self._check_input(idx, cache)
        start = 0 if cache is None else cache.pos
        pos = torch.arange(start, start + T, device=idx.device)  # (T,)
        x = self.drop(self.wte(idx) + self.wpe(pos))  # (B, T, C)
        remat = self.remat != "none" and cache is None and torch.is_grad_enabled()
        for i, block in enumerate(self.h):
            x = self._recomputed(block, x) if remat else block(x, cache, i)  # (B, T, C)
        if cache is not None:
            cache.pos += T
        x = self.ln_f(x)  # (B, T, C)
        if targets is None:
            return self.lm_head(x)  # (B, T, vocab_size)
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
        start = 0 if cache is None else cache.pos
        limit = self.config.context_length if cache is None else cache.max_len
        if T == 0 or start + T > limit:
            raise ValueError(f"sequence of {T} tokens (after {start} cached) does not fit the context of "
                             f"{limit} positions")
        # A data-dependent check: eager mode only (torch.compile would break the graph on it).
        if not torch.compiler.is_compiling():
            lo, hi = int(idx.min()), int(idx.max())
            if lo < 0 or hi >= self.config.vocab_size:
                bad = lo if lo < 0 else hi
                raise ValueError(f"token id {bad} is outside [0, {self.config.vocab_size})")
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


def cross_entropy_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of (B, T, V) logits against (B, T) targets, in float32."""
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} do not match")
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
