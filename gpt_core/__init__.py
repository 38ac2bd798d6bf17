"""Framework-free pieces shared by torch_gpt and jax_gpt: config, tokenizer, data, checkpoint format.

Imports neither torch nor jax.
"""

from gpt_core.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from gpt_core.config import PRESETS, GPTConfig
from gpt_core.tokenizer import WordTokenizer, get_tokenizer

__all__ = [
    "PRESETS", "CheckpointError", "GPTConfig", "get_tokenizer", "iterate_batches", "load_checkpoint",
    "WordTokenizer", "load_text", "save_checkpoint", "sliding_windows", "train_val_split",
]

# gpt_core.data is imported on first use: imported here, `python -m gpt_core.data` would find it in
# sys.modules before running it as __main__, and runpy warns about that on every run.
_DATA_NAMES = ("iterate_batches", "load_text", "sliding_windows", "train_val_split")


def __getattr__(name: str):
    if name in _DATA_NAMES:
        from gpt_core import data

        return getattr(data, name)
    raise AttributeError(f"module 'gpt_core' has no attribute {name!r}")
