"""torch_gpt's parameters <-> the canonical state (Hugging Face GPT-2 names and layouts, float32 numpy).

torch_gpt's parameter names are the canonical names already; only the layout differs: an `nn.Linear`
weight is (out, in), so the matrices the checkpoint stores (in, out) (`gpt_core.params.HF_IN_OUT`) are
transposed. The model's checkpoints, the trainer's optimizer state, the bench and the tests all go
through these functions.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

from gpt_core.config import GPTConfig
from gpt_core.params import stored_in_out


def to_canonical(name: str, t: torch.Tensor) -> np.ndarray:
    """One tensor (a parameter, its gradient or an AdamW moment) -> its canonical float32 array."""
    a = t.detach().to("cpu", torch.float32).numpy()
    return a.T if stored_in_out(name) else a


def from_canonical(name: str, a: np.ndarray) -> torch.Tensor:
    """One canonical array -> a contiguous CPU tensor in torch_gpt's layout."""
    return torch.from_numpy(np.ascontiguousarray(a.T if stored_in_out(name) else a))


def canonical_dict(config: GPTConfig, named: Iterable[tuple[str, torch.Tensor]]) -> dict[str, np.ndarray]:
    """(name, tensor) pairs -> the canonical state; a tied head is `wte` itself and is left out."""
    return {name: to_canonical(name, t) for name, t in named
            if not (name == "lm_head.weight" and config.tie_embeddings)}


def canonical_grads(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """The gradients of the last backward under canonical names and layouts (a tied head counts once, as wte)."""
    return {name: to_canonical(name, p.grad) for name, p in model.named_parameters()}
