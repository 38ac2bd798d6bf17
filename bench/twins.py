"""The two models built from one config and one set of weights, and the same operations on each.

Weights travel from torch to JAX through the shared checkpoint format, as a user's would. Every function
returns numpy (float32/float64) with canonical parameter names, so the parity suite compares like with like.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from typing import Any

import numpy as np

from gpt_core.config import GPTConfig
from gpt_core.params import off_init
from gpt_core.training import OptimizerConfig

DTYPES = ("float32", "bfloat16")


@dataclass
class Twins:
    config: GPTConfig
    torch_model: Any  # torch_gpt.GPTModel
    jax_model: Any  # jax_gpt.GPTModel
    dtype: str


def set_precision(mode: str) -> None:
    """'highest': full float32 matmuls on both sides (parity); 'tf32': TF32 float32 matmuls on both sides
    (speed on GPUs that have it; elsewhere the same as 'highest'); 'default': each framework's own default."""
    import jax
    import torch

    if mode == "highest":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.set_float32_matmul_precision("highest")
        jax.config.update("jax_default_matmul_precision", "highest")
    elif mode == "tf32":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.set_float32_matmul_precision("high")
        jax.config.update("jax_default_matmul_precision", "tensorfloat32")
    elif mode == "default":
        torch.set_float32_matmul_precision("highest")  # PyTorch's out-of-the-box setting: no TF32 matmuls
        jax.config.update("jax_default_matmul_precision", None)  # JAX's: TF32 on recent GPUs, bf16 on TPU
    else:
        raise ValueError(f"precision must be 'highest', 'tf32' or 'default', got {mode!r}")


def build(config: GPTConfig, seed: int = 0, dtype: str = "float32", torch_attn: str = "sdpa",
          jax_attn: str = "xla", device: str = "cpu", **jax_runtime) -> Twins:
    """A randomly initialised torch_gpt model (biases and LayerNorms moved off their constant init, so no mapping
    hides) and a jax_gpt model loaded from its checkpoint; `jax_runtime`: scan_layers, remat."""
    import jax.numpy as jnp
    import torch

    import jax_gpt
    import torch_gpt

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    torch.manual_seed(seed)
    tm = torch_gpt.GPTModel(config, attn_impl=torch_attn)
    tm.load_canonical_state(off_init(tm.canonical_state(), seed + 1))
    with tempfile.TemporaryDirectory() as d:
        tm.save_pretrained(d)
        jdt = getattr(jnp, dtype)
        jm = jax_gpt.GPTModel.from_pretrained(d, dtype=jdt, param_dtype=jdt, attn_impl=jax_attn, **jax_runtime)
    tm = tm.to(device=device, dtype=getattr(torch, dtype))
    return Twins(config, tm, jm, dtype)


def torch_forward_backward(model, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float, dict[str, np.ndarray]]:
    """(logits, loss, canonical gradients) in eval mode (no dropout)."""
    import torch

    from torch_gpt import cross_entropy_loss
    from torch_gpt.convert import canonical_grads

    model.eval()
    model.zero_grad(set_to_none=True)
    dev = model.wte.weight.device
    logits = model(torch.from_numpy(x).to(dev))
    loss = cross_entropy_loss(logits, torch.from_numpy(y).to(dev))
    loss.backward()
    with torch.no_grad():
        return logits.detach().float().cpu().numpy(), float(loss), canonical_grads(model)


def jax_forward_backward(model, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float, dict[str, np.ndarray]]:
    from flax import nnx

    from jax_gpt.convert import to_canonical
    from jax_gpt.model import cross_entropy_loss

    def loss_fn(m):
        logits = m(x)
        return cross_entropy_loss(logits, y), logits

    (loss, logits), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    return np.asarray(logits, np.float32), float(loss), to_canonical(grads)


def torch_train_losses(model, batches: list[tuple[np.ndarray, np.ndarray]], opt: OptimizerConfig) -> list[float]:
    """Losses of torch_gpt.train's optimizer steps (AdamW, decay on >=2-D weights, global-norm clipping)
    at the constant `opt.lr`, one per batch, dropout off; trains the model in place."""
    import torch

    from torch_gpt import cross_entropy_loss
    from torch_gpt.train import make_optimizer

    model.eval()  # dropout off: the two sides' dropout masks could never agree
    adamw = make_optimizer(model, opt)
    dev = model.wte.weight.device
    losses = []
    for x, y in batches:
        loss = cross_entropy_loss(model(torch.from_numpy(x).to(dev)), torch.from_numpy(y).to(dev))
        adamw.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), opt.grad_clip)
        adamw.step()
        losses.append(float(loss.detach()))
    return losses


def jax_train_losses(model, batches: list[tuple[np.ndarray, np.ndarray]], opt: OptimizerConfig) -> list[float]:
    """The same steps through jax_gpt.train's optimizer (its updates scaled by the learning rate)."""
    import jax
    from flax import nnx

    from jax_gpt.model import cross_entropy_loss
    from jax_gpt.train import make_optimizer

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = make_optimizer(opt)

    @jax.jit
    def step(params, opt_state, x, y):
        loss, grads = jax.value_and_grad(lambda p: cross_entropy_loss(nnx.merge(graphdef, p, rest)(x), y))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return jax.tree.map(lambda p, u: p - opt.lr * u, params, updates), opt_state, loss

    opt_state, losses = tx.init(params), []
    for x, y in batches:
        params, opt_state, loss = step(params, opt_state, x, y)
        losses.append(float(loss))
    nnx.update(model, params)
    return losses


def greedy_tokens(tw: Twins, prompt: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    import torch

    import jax_gpt
    import torch_gpt

    dev = tw.torch_model.wte.weight.device
    t = torch_gpt.generate(tw.torch_model, torch.from_numpy(prompt).to(dev), n).cpu().numpy()
    j = np.asarray(jax_gpt.generate(tw.jax_model, prompt, n))
    return t, j
