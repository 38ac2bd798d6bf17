"""GPT-2 in PyTorch: the model, KV-cache generation, checkpoints in the shared format.

`python -m torch_gpt.generate --help` is the generation CLI.
"""

from torch_gpt.generate import generate  # through the package the CLI lives in: see torch_gpt/generate/__init__.py
from torch_gpt.model import GPTModel, KVCache, cross_entropy_loss

__all__ = ["GPTModel", "KVCache", "cross_entropy_loss", "generate"]
