"""The checkpoint format both frameworks read and write: a Hugging Face GPT-2 directory.

A checkpoint is a directory with `config.json` (a GPT-2 config Hugging Face reads) and
`model.safetensors`. The canonical state is a dict of numpy arrays under Hugging Face GPT-2 names
without the `transformer.` prefix, in Hugging Face layouts: the `Conv1D` weights of `c_attn`, `c_proj`
and `c_fc` are stored (in, out); `lm_head.weight` is (vocab, emb) and absent when tied. Each framework
converts to its own layout with `CONV1D_WEIGHTS`, one loop with shape checks.

Never unpickles: `.bin` files are the torch side's business, through `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path

import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy, so safetensors can read bf16 checkpoints)
import numpy as np
from safetensors.numpy import load_file, save_file

from gpt_core.config import GPTConfig

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
TORCH_BIN_FILE = "pytorch_model.bin"

# Matrices stored (in, out) by Hugging Face's Conv1D: frameworks with (out, in) linears transpose these.
CONV1D_WEIGHTS = re.compile(r"h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight")
# Buffers Hugging Face GPT-2 checkpoints may carry: the causal mask and its fill value, not weights.
_HF_BUFFERS = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")


class CheckpointError(ValueError):
    """A checkpoint's tensors do not match its config: lists every missing, unexpected or mis-shaped one."""


def expected_shapes(config: GPTConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of the canonical state for `config`, with its Hugging Face shape, in model order."""
    d, h, v = config.emb_dim, config.hidden_dim, config.vocab_size
    shapes: dict[str, tuple[int, ...]] = {"wte.weight": (v, d)}
    if config.pos_embedding == "learned":
        shapes["wpe.weight"] = (config.context_length, d)
    for i in range(config.n_layers):
        p = f"h.{i}."
        shapes |= {p + "ln_1.weight": (d,), p + "ln_1.bias": (d,), p + "attn.c_attn.weight": (d, 3 * d)}
        if config.qkv_bias:
            shapes[p + "attn.c_attn.bias"] = (3 * d,)
        shapes |= {
            p + "attn.c_proj.weight": (d, d), p + "attn.c_proj.bias": (d,),
            p + "ln_2.weight": (d,), p + "ln_2.bias": (d,),
            p + "mlp.c_fc.weight": (d, h), p + "mlp.c_fc.bias": (h,),
            p + "mlp.c_proj.weight": (h, d), p + "mlp.c_proj.bias": (d,),
        }
    shapes |= {"ln_f.weight": (d,), "ln_f.bias": (d,)}
    if not config.tie_embeddings:
        shapes["lm_head.weight"] = (v, d)
    return shapes


def canonicalize(config: GPTConfig, raw: dict[str, np.ndarray], source: str = "state") -> dict[str, np.ndarray]:
    """Bring a state as `transformers` writes it to canonical names; check it against `config`.

    Strips the `transformer.` prefix, drops the attention-mask buffers and a tied `lm_head` (it must
    equal `wte`), then raises one `CheckpointError` listing every missing, unexpected or mis-shaped tensor.
    """
    state: dict[str, np.ndarray] = {}
    for name, value in raw.items():
        name = name.removeprefix("transformer.")
        if _HF_BUFFERS.fullmatch(name):
            continue
        state[name] = np.asarray(value)
    if config.tie_embeddings and "lm_head.weight" in state and "wte.weight" in state:
        head = state.pop("lm_head.weight")
        if head.shape != state["wte.weight"].shape or not np.array_equal(head, state["wte.weight"]):
            raise CheckpointError(f"{source}: config ties the head to wte, but lm_head.weight differs from wte.weight")
    expected = expected_shapes(config)
    problems = [f"missing tensor {k} {expected[k]}" for k in expected if k not in state]
    problems += [f"unexpected tensor {k} {tuple(state[k].shape)}" for k in state if k not in expected]
    problems += [
        f"tensor {k} has shape {tuple(state[k].shape)}, expected {expected[k]}"
        for k in expected if k in state and tuple(state[k].shape) != expected[k]
    ]
    if problems:
        raise CheckpointError(f"{source} does not match its config ({len(problems)} problem(s)):\n  "
                              + "\n  ".join(problems))
    return {k: state[k] for k in expected}


def save_checkpoint(directory: str | Path, config: GPTConfig, state: dict[str, np.ndarray]) -> Path:
    """Write `config.json` + `model.safetensors`; each file goes to a temporary name first, then is renamed.

    `state` is canonical (see module docstring); it is checked against `config` before anything is written.
    """
    directory = Path(directory)
    state = canonicalize(config, state, source="state to save")
    directory.mkdir(parents=True, exist_ok=True)
    arrays = {k: np.ascontiguousarray(v) for k, v in state.items()}
    _atomic_write(directory / WEIGHTS_FILE, lambda tmp: save_file(arrays, tmp, metadata={"format": "np"}))
    text = json.dumps(config.to_hf_dict(), indent=2) + "\n"
    _atomic_write(directory / CONFIG_FILE, lambda tmp: Path(tmp).write_text(text))
    return directory


def load_config(directory: str | Path) -> GPTConfig:
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint directory {directory} does not exist")
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: a checkpoint directory needs {CONFIG_FILE}")
    return GPTConfig.from_json(path)


def load_raw_safetensors(directory: str | Path) -> dict[str, np.ndarray] | None:
    """The tensors of `model.safetensors` (or of a sharded index) under their stored names, floating point
    ones as float32 (bf16 and fp16 widen exactly; torch cannot take a numpy bf16 array); None when there are none."""
    directory = Path(directory)
    if (directory / WEIGHTS_FILE).is_file():
        shards = [directory / WEIGHTS_FILE]
    elif (directory / WEIGHTS_INDEX_FILE).is_file():
        weight_map = json.loads((directory / WEIGHTS_INDEX_FILE).read_text())["weight_map"]
        shards = [directory / shard for shard in sorted(set(weight_map.values()))]
    else:
        return None
    raw: dict[str, np.ndarray] = {}
    for shard in shards:
        raw |= {k: _widen(v) for k, v in load_file(shard).items()}
    return raw


def _widen(a: np.ndarray) -> np.ndarray:
    if a.dtype in (np.float16, ml_dtypes.bfloat16):
        return a.astype(np.float32)
    return a


def load_checkpoint(directory: str | Path) -> tuple[GPTConfig, dict[str, np.ndarray]]:
    """Read a checkpoint directory (ours, or one `transformers`' `save_pretrained` wrote) -> (config, state)."""
    directory = Path(directory)
    config = load_config(directory)
    raw = load_raw_safetensors(directory)
    if raw is None:
        hint = (f" It has {TORCH_BIN_FILE}: load it with torch_gpt.GPTModel.from_pretrained, which reads it "
                "with torch.load(weights_only=True).") if (directory / TORCH_BIN_FILE).is_file() else ""
        raise FileNotFoundError(f"{directory} has no {WEIGHTS_FILE}.{hint}")
    return config, canonicalize(config, raw, source=str(directory))


def _atomic_write(path: Path, write: Callable[[str], object]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
