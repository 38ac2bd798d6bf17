"""GPT-2 in JAX/Flax NNX: the model, jit-compiled KV-cache generation, checkpoints in the shared format.

Never imports torch. `python -m jax_gpt.generate --help` is the generation CLI.
"""

from jax_gpt.generate import generate  # through the package the CLI lives in: see jax_gpt/generate/__init__.py
from jax_gpt.model import GPTModel, KVCache, cross_entropy_loss

__all__ = ["GPTModel", "KVCache", "cross_entropy_loss", "generate"]
