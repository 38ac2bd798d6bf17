"""The rules both twins follow for their parameters, written once and framework-free.

Every rule is keyed by the canonical parameter name (Hugging Face GPT-2's, without the `transformer.`
prefix: `wte.weight`, `h.3.attn.c_attn.weight`, `ln_f.bias`, `lm_head.weight`), so torch_gpt and jax_gpt
apply it the same way and a framework's own conversion is one loop over names:
- `init_rule`: GPT-2's initialisation;
- `sinusoidal_table`: the fixed position table of `pos_embedding="sinusoidal"`;
- `HF_IN_OUT` / `HF_OUT_IN`: which matrices the checkpoint stores (in, out) (HF's `Conv1D`) and which
  (out, in) (HF's `nn.Linear` head). A framework whose linears are (out, in) (torch) transposes the first
  kind; one whose kernels are (in, out) (Flax) transposes the second;
- `layer_name` / `split_layer`: per-layer names, for models that stack the layers on one axis.
"""

from __future__ import annotations

import math
import re

import numpy as np

from gpt_core.config import GPTConfig

# Matrices stored (in, out) by Hugging Face's Conv1D.
HF_IN_OUT = re.compile(r"h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight")
# Matrices stored (out, in), as nn.Linear does: only the (untied) output head.
HF_OUT_IN = frozenset({"lm_head.weight"})
_LAYER = re.compile(r"h\.(\d+)\.(.+)")


def stored_in_out(name: str) -> bool:
    """True for the matrices the checkpoint stores (in, out)."""
    return HF_IN_OUT.fullmatch(name) is not None


def stored_out_in(name: str) -> bool:
    """True for the matrices the checkpoint stores (out, in)."""
    return name in HF_OUT_IN


def layer_name(i: int, suffix: str) -> str:
    """`layer_name(3, "attn.c_attn.weight")` -> "h.3.attn.c_attn.weight"."""
    return f"h.{i}.{suffix}"


def split_layer(name: str) -> tuple[int, str] | None:
    """"h.3.attn.c_attn.weight" -> (3, "attn.c_attn.weight"); None for names outside the blocks."""
    m = _LAYER.fullmatch(name)
    return (int(m.group(1)), m.group(2)) if m else None


def constant_init(name: str) -> float | None:
    """The constant GPT-2 starts this parameter at (biases 0, LayerNorm scales 1), or None if it is drawn."""
    if name.endswith(".bias"):
        return 0.0
    if ".ln_" in name or name.startswith("ln_f."):
        return 1.0
    return None


def init_rule(name: str, config: GPTConfig) -> tuple[str, float]:
    """GPT-2's initialisation of one parameter: ("constant", value) or ("normal", std).

    Weights N(0, init_std); the residual projections (`attn.c_proj`, `mlp.c_proj`) N(0, init_std /
    sqrt(2 · n_layers)), since each of the 2 · n_layers residual branches adds to the same stream.
    """
    value = constant_init(name)
    if value is not None:
        return "constant", value
    if name.endswith("c_proj.weight"):
        return "normal", config.init_std / math.sqrt(2 * config.n_layers)
    return "normal", config.init_std


def sinusoidal_table(context_length: int, emb_dim: int) -> np.ndarray:
    """(context_length, emb_dim) float32 sin/cos table of the original Transformer, computed in float64:
    even columns sin(p · f_k), odd columns cos(p · f_k), f_k = 10000^(-2k / emb_dim)."""
    pos = np.arange(context_length, dtype=np.float64)[:, None]  # (ctx, 1)
    freq = np.exp(-math.log(10000.0) * np.arange(0, emb_dim, 2, dtype=np.float64) / emb_dim)  # (ceil(C/2),)
    table = np.zeros((context_length, emb_dim), dtype=np.float64)
    table[:, 0::2] = np.sin(pos * freq)
    table[:, 1::2] = np.cos(pos * freq)[:, : emb_dim // 2]
    return table.astype(np.float32)


def off_init(state: dict[str, np.ndarray], seed: int, scale: float = 0.1) -> dict[str, np.ndarray]:
    """A copy of a canonical state with every constant-initialised tensor (biases, LayerNorms) moved off
    its constant by N(0, scale) noise, so that a test or a parity run cannot miss a mapping that swaps or
    drops one of them."""
    rng = np.random.default_rng(seed)
    return {k: (v + scale * rng.standard_normal(v.shape)).astype(v.dtype) if constant_init(k) is not None else v
            for k, v in state.items()}
