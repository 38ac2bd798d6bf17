"""Framework-free pieces shared by torch_gpt and jax_gpt: config, tokenizer, data, checkpoint format.

Imports neither torch nor jax.
"""

from gpt_core.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from gpt_core.config import PRESETS, GPTConfig
from gpt_core.data import iterate_batches, load_text, sliding_windows, train_val_split
from gpt_core.tokenizer import WordTokenizer, get_tokenizer

__all__ = [
    "PRESETS", "CheckpointError", "GPTConfig", "get_tokenizer", "iterate_batches", "load_checkpoint",
    "WordTokenizer", "load_text", "save_checkpoint", "sliding_windows", "train_val_split",
]
