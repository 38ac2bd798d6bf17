"""The one architecture description shared by torch_gpt and jax_gpt.

`GPTConfig` says what the network is, never how it runs: dtype, attention implementation, compile and
remat are runtime arguments of the models. It reads three dialects (the seed notebooks' dict,
nanoGPT's `GPTConfig` names, a Hugging Face GPT-2 `config.json`) and writes a `config.json` that
Hugging Face `transformers` loads as a GPT-2.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GELU_KINDS = ("tanh", "exact")
POS_EMBEDDINGS = ("learned", "sinusoidal")


@dataclass(frozen=True)
class GPTConfig:
    """GPT-2 architecture. Field names and defaults follow the seed notebooks' `GPT_CONFIG_124M`.

    The defaults describe the seed's model (untied head, no qkv bias); `from_preset("gpt2")` gives
    OpenAI's GPT-2 (tied head, qkv bias).
    """

    vocab_size: int = 50257
    context_length: int = 1024
    emb_dim: int = 768
    n_heads: int = 12
    n_layers: int = 12
    drop_rate: float = 0.1
    qkv_bias: bool = False
    tie_embeddings: bool = False
    ln_eps: float = 1e-5
    gelu: str = "tanh"  # "tanh": GPT-2's approximation; "exact": erf
    pos_embedding: str = "learned"  # or "sinusoidal" (fixed, as in the original Transformer)
    init_std: float = 0.02

    def __post_init__(self) -> None:
        for name in ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"GPTConfig.{name} must be an int, got {value!r}")
            if value < 1:
                raise ValueError(f"GPTConfig.{name} must be positive, got {value}")
        if self.emb_dim % self.n_heads:
            raise ValueError(
                f"GPTConfig.emb_dim ({self.emb_dim}) must be divisible by n_heads ({self.n_heads})"
            )
        for name in ("qkv_bias", "tie_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"GPTConfig.{name} must be a bool, got {getattr(self, name)!r}")
        if not (isinstance(self.drop_rate, (int, float)) and 0.0 <= self.drop_rate < 1.0):
            raise ValueError(f"GPTConfig.drop_rate must be in [0, 1), got {self.drop_rate!r}")
        if not (isinstance(self.ln_eps, (int, float)) and self.ln_eps > 0):
            raise ValueError(f"GPTConfig.ln_eps must be a positive number, got {self.ln_eps!r}")
        if not (isinstance(self.init_std, (int, float)) and self.init_std > 0):
            raise ValueError(f"GPTConfig.init_std must be a positive number, got {self.init_std!r}")
        if self.gelu not in GELU_KINDS:
            raise ValueError(f"GPTConfig.gelu must be one of {GELU_KINDS}, got {self.gelu!r}")
        if self.pos_embedding not in POS_EMBEDDINGS:
            raise ValueError(
                f"GPTConfig.pos_embedding must be one of {POS_EMBEDDINGS}, got {self.pos_embedding!r}"
            )

    # ----------------------------------------------------------------------------- derived values
    @property
    def head_dim(self) -> int:
        return self.emb_dim // self.n_heads

    @property
    def hidden_dim(self) -> int:
        """Width of the MLP's hidden layer (4 × emb_dim, as in GPT-2)."""
        return 4 * self.emb_dim

    @property
    def n_params(self) -> int:
        """Number of trainable parameters (a tied head counted once, sinusoidal positions not at all)."""
        d, h = self.emb_dim, self.hidden_dim
        per_layer = (
            2 * d  # ln_1
            + d * 3 * d + (3 * d if self.qkv_bias else 0)  # attn.c_attn
            + d * d + d  # attn.c_proj
            + 2 * d  # ln_2
            + d * h + h  # mlp.c_fc
            + h * d + d  # mlp.c_proj
        )
        total = self.vocab_size * d + self.n_layers * per_layer + 2 * d  # wte, blocks, ln_f
        if self.pos_embedding == "learned":
            total += self.context_length * d
        if not self.tie_embeddings:
            total += self.vocab_size * d
        return total

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token, DESIGN.md §7: 6·N + 12·L·T·d.

        N counts the parameters that take part in a matmul: embedding lookups cost nothing, so the
        position table and an untied token table are left out (a tied one is the head's matmul).
        """
        t = self.context_length if seq_len is None else seq_len
        n = self.n_params
        if self.pos_embedding == "learned":
            n -= self.context_length * self.emb_dim
        if not self.tie_embeddings:
            n -= self.vocab_size * self.emb_dim
        return 6 * n + 12 * self.n_layers * t * self.emb_dim

    # ----------------------------------------------------------------------------- constructors
    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> GPTConfig:
        """`gpt2`, `gpt2-medium`, `gpt2-large`, `gpt2-xl` (OpenAI's sizes) or `tiny` (fast CPU work)."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GPTConfig:
        """Read any of the three dialects: ours/the seed's, nanoGPT's, or a Hugging Face config.json."""
        if not isinstance(d, dict):
            raise ValueError(f"config must be a dict, got {type(d).__name__}")
        if "model_type" in d or "n_positions" in d or "n_ctx" in d:
            return cls._from_hf(d)
        if "block_size" in d or "n_embd" in d or "n_layer" in d:
            return cls._from_nanogpt(d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown GPTConfig field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**d)

    @classmethod
    def _from_nanogpt(cls, d: dict[str, Any]) -> GPTConfig:
        names = {"block_size": "context_length", "vocab_size": "vocab_size", "n_layer": "n_layers",
                 "n_head": "n_heads", "n_embd": "emb_dim", "dropout": "drop_rate"}
        unknown = sorted(set(d) - set(names) - {"bias"})
        if unknown:
            raise ValueError(f"unknown nanoGPT config field(s) {unknown}; known: {sorted(names) + ['bias']}")
        if d.get("bias", True) is not True:
            raise ValueError(
                "nanoGPT bias=False drops the bias of every Linear and LayerNorm, which GPTConfig "
                "cannot describe (its qkv_bias covers the attention projection only)"
            )
        # nanoGPT always ties the head to the token embedding and uses GPT-2's tanh GELU.
        return cls(**{names[k]: v for k, v in d.items() if k in names}, qkv_bias=True, tie_embeddings=True)

    @classmethod
    def _from_hf(cls, d: dict[str, Any]) -> GPTConfig:
        if d.get("model_type", "gpt2") != "gpt2":
            raise ValueError(f"config.json has model_type {d['model_type']!r}; only 'gpt2' is supported")
        # Keys that would change the function computed; anything else in an HF config is bookkeeping.
        for key, ok in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                        ("add_cross_attention", False)):
            if key in d and d[key] != ok:
                raise ValueError(f"config.json sets {key}={d[key]!r}; only {ok!r} is supported")
        if d.get("n_inner") not in (None, 4 * d.get("n_embd", 768)):
            raise ValueError(f"config.json sets n_inner={d['n_inner']}; only 4 * n_embd is supported")
        act = d.get("activation_function", "gelu_new")
        gelu = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "exact"}.get(act)
        if gelu is None:
            raise ValueError(f"config.json has activation_function {act!r}; supported: gelu_new, gelu")
        drops = {d.get(k, 0.1) for k in ("embd_pdrop", "resid_pdrop", "attn_pdrop")}
        if len(drops) != 1:
            raise ValueError(f"embd_pdrop, resid_pdrop and attn_pdrop differ ({sorted(drops)}); "
                             "GPTConfig has one drop_rate")
        return cls(
            vocab_size=d.get("vocab_size", 50257),
            context_length=d.get("n_positions", d.get("n_ctx", 1024)),
            emb_dim=d.get("n_embd", 768),
            n_heads=d.get("n_head", 12),
            n_layers=d.get("n_layer", 12),
            drop_rate=drops.pop(),
            qkv_bias=d.get("qkv_bias", True),
            tie_embeddings=d.get("tie_word_embeddings", True),
            ln_eps=d.get("layer_norm_epsilon", 1e-5),
            gelu=gelu,
            pos_embedding=d.get("pos_embedding", "learned"),
            init_std=d.get("initializer_range", 0.02),
        )

    # ----------------------------------------------------------------------------- serialisation
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_hf_dict(self) -> dict[str, Any]:
        """A Hugging Face GPT-2 `config.json` (plus our `qkv_bias`/`pos_embedding`, which HF ignores)."""
        return {
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "vocab_size": self.vocab_size,
            "n_positions": self.context_length,
            "n_ctx": self.context_length,
            "n_embd": self.emb_dim,
            "n_head": self.n_heads,
            "n_layer": self.n_layers,
            "n_inner": None,
            "activation_function": "gelu_new" if self.gelu == "tanh" else "gelu",
            "embd_pdrop": self.drop_rate,
            "resid_pdrop": self.drop_rate,
            "attn_pdrop": self.drop_rate,
            "layer_norm_epsilon": self.ln_eps,
            "initializer_range": self.init_std,
            "tie_word_embeddings": self.tie_embeddings,
            "qkv_bias": self.qkv_bias,
            "pos_embedding": self.pos_embedding,
            "bos_token_id": min(50256, self.vocab_size - 1),  # GPT-2's <|endoftext|>, when the vocabulary has it
            "eos_token_id": min(50256, self.vocab_size - 1),
        }

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2) + "\n"
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_json(cls, path_or_text: str | Path) -> GPTConfig:
        """Read a JSON file (any dialect), or a JSON string."""
        s = str(path_or_text)
        if s.lstrip().startswith("{"):
            return cls.from_dict(json.loads(s))
        path = Path(path_or_text)
        if not path.is_file():
            raise ValueError(f"config file {path} does not exist")
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except json.JSONDecodeError as e:
            raise ValueError(f"config file {path} is not valid JSON: {e}") from None


PRESETS: dict[str, GPTConfig] = {
    name: GPTConfig(emb_dim=d, n_heads=h, n_layers=n, qkv_bias=True, tie_embeddings=True)
    for name, (d, h, n) in {
        "gpt2": (768, 12, 12),
        "gpt2-medium": (1024, 16, 24),
        "gpt2-large": (1280, 20, 36),
        "gpt2-xl": (1600, 25, 48),
    }.items()
}
# Small enough to train for a few steps on a laptop CPU, GPT-2's tokenizer and shape otherwise.
PRESETS["tiny"] = GPTConfig(context_length=128, emb_dim=64, n_heads=4, n_layers=2, drop_rate=0.0,
                            qkv_bias=True, tie_embeddings=True)
