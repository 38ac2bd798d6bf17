"""The checkpoint format both frameworks read and write: a Hugging Face GPT-2 directory.

A checkpoint is a directory with `config.json` (a GPT-2 config Hugging Face reads) and
`model.safetensors`. The canonical state is a dict of numpy arrays under Hugging Face GPT-2 names
without the `transformer.` prefix, in Hugging Face layouts: the `Conv1D` weights of `c_attn`, `c_proj`
and `c_fc` are stored (in, out); `lm_head.weight` is (vocab, emb) and absent when tied. Each framework
converts to its own layout in one module (torch_gpt/convert.py, jax_gpt/convert.py) by the rules of
gpt_core/params.py.

`resolve_checkpoint` takes a directory or a Hugging Face Hub repository id ("gpt2",
"openai-community/gpt2-medium"), the latter through `huggingface_hub`'s cache. A damaged file (a truncated
safetensors, a broken index or config) raises `CheckpointError` naming the file and the fault.

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
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from gpt_core.config import GPTConfig

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
TORCH_BIN_FILE = "pytorch_model.bin"

# What a Hub repository's snapshot needs of its files: the config and the safetensors weights (maybe sharded).
HUB_FILES = [CONFIG_FILE, WEIGHTS_FILE, WEIGHTS_INDEX_FILE, "model-*-of-*.safetensors"]
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


def resolve_checkpoint(name_or_dir: str | Path) -> Path:
    """The checkpoint directory `name_or_dir` names: a directory, or a Hugging Face Hub repository id ("gpt2",
    "openai-community/gpt2-medium") whose config and safetensors come from `huggingface_hub.snapshot_download`.
    That honours the Hub's environment: HF_HUB_OFFLINE=1 reads only the local cache (HF_HUB_CACHE or HF_HOME),
    and a Hub out of reach falls back to the cache too. Raises FileNotFoundError saying why neither worked."""
    path = Path(name_or_dir)
    if path.is_dir():
        return path
    if path.exists():
        raise FileNotFoundError(f"{path} is a file, not a checkpoint directory")
    name = str(name_or_dir)
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.utils import validate_repo_id
    except ImportError:
        raise FileNotFoundError(f"checkpoint directory {name} does not exist (to load Hugging Face Hub repositories "
                                "by name, install huggingface_hub)") from None
    try:
        validate_repo_id(name)
    except ValueError:
        raise FileNotFoundError(f"checkpoint directory {name} does not exist (nor is it a Hugging Face Hub "
                                "repository id)") from None
    try:
        return Path(snapshot_download(name, allow_patterns=HUB_FILES))
    except Exception as e:  # the Hub's errors are many; each becomes one line here
        raise FileNotFoundError(f"{name} is not a checkpoint directory, and {_hub_failure(name, e)}") from None


def _hub_failure(name: str, e: Exception) -> str:
    from huggingface_hub import constants
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    if isinstance(e, LocalEntryNotFoundError):
        why = ("HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE
               else f"the Hub ({constants.ENDPOINT}) cannot be reached")
        return f"the Hugging Face Hub cache ({constants.HF_HUB_CACHE}) holds no snapshot of {name!r}, while {why}"
    if isinstance(e, GatedRepoError):
        return f"the Hub repository {name!r} is gated: accept its terms and log in (`hf auth login`)"
    if isinstance(e, RepositoryNotFoundError):
        return f"the Hugging Face Hub has no repository {name!r} (or it is private: log in with `hf auth login`)"
    lines = str(e).strip().splitlines()
    return f"fetching {name!r} from the Hugging Face Hub failed ({type(e).__name__}: {lines[0] if lines else ''})"


def load_config(directory: str | Path) -> GPTConfig:
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint directory {directory} does not exist")
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: a checkpoint directory needs {CONFIG_FILE}")
    try:
        return GPTConfig.from_json(path)
    except (ValueError, TypeError) as e:  # not UTF-8, not JSON, or not a GPT-2 config
        raise CheckpointError(str(e) if str(path) in str(e) else f"{path}: {e}") from None


def load_raw_safetensors(directory: str | Path) -> dict[str, np.ndarray] | None:
    """The tensors of `model.safetensors` (or of a sharded index) under their stored names, floating point
    ones as float32 (bf16 and fp16 widen exactly; torch cannot take a numpy bf16 array); None when there are none."""
    directory = Path(directory)
    if (directory / WEIGHTS_FILE).is_file():
        shards = [directory / WEIGHTS_FILE]
    elif (directory / WEIGHTS_INDEX_FILE).is_file():
        index = directory / WEIGHTS_INDEX_FILE
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            shards = [directory / shard for shard in sorted(set(weight_map.values()))]
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index} is not a readable safetensors index ({type(e).__name__}: {e})") from None
        missing = [s.name for s in shards if not s.is_file()]
        if missing:
            raise CheckpointError(f"{index} lists shards that are not there: {missing}")
    else:
        return None
    raw: dict[str, np.ndarray] = {}
    for shard in shards:
        try:
            tensors = load_file(shard)
        except SafetensorError as e:  # a truncated or partly written file, or not safetensors at all
            raise CheckpointError(f"{shard} is damaged: {e} (a truncated or partly written file?)") from None
        raw |= {k: _widen(v) for k, v in tensors.items()}
    return raw


def _widen(a: np.ndarray) -> np.ndarray:
    if a.dtype in (np.float16, ml_dtypes.bfloat16):
        return a.astype(np.float32)
    return a


def load_checkpoint(name_or_dir: str | Path) -> tuple[GPTConfig, dict[str, np.ndarray]]:
    """Read a checkpoint (ours, one `transformers`' `save_pretrained` wrote, or a Hub repository id: see
    `resolve_checkpoint`) -> (config, state)."""
    directory = resolve_checkpoint(name_or_dir)
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
