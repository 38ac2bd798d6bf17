"""`python -m bench parity`: prove torch_gpt and jax_gpt compute the same function from one checkpoint."""

from __future__ import annotations

import dataclasses

import numpy as np

from bench import twins
from bench.report import Row
from gpt_core.config import GPTConfig
from gpt_core.training import OptimizerConfig

# DESIGN.md §4: relative error ‖a − b‖/‖b‖.
TOLERANCES = {"float32": {"logits": 1e-5, "grad": 1e-4, "train": 1e-4},
              "bfloat16": {"logits": 1e-2, "grad": 1e-2, "train": 1e-2}}


def rel(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def run(config: GPTConfig, *, batch: int = 2, seq_len: int = 64, dtype: str = "float32", seed: int = 0,
        train_steps: int = 5, gen_tokens: int = 16, precision: str = "highest", perturb: str | None = None,
        progress=lambda msg: None) -> list[Row]:
    """Rows for logits, loss, gradients (worst five named), an N-step training run and greedy generation.

    `perturb` names a canonical weight to nudge on the JAX side after loading: the harness must then FAIL.
    """
    if seq_len > config.context_length:
        raise ValueError(f"seq_len {seq_len} exceeds the config's context_length {config.context_length}")
    config = dataclasses.replace(config, drop_rate=0.0)  # dropout masks cannot agree across frameworks
    twins.set_precision(precision)
    tol = TOLERANCES[dtype]
    shape = f"B={batch} T={seq_len}"
    progress("parity: building both models from one checkpoint")
    import torch

    # torch on the GPU where there is one, as JAX takes its default device (the rows' environment names both).
    tw = twins.build(config, seed=seed, dtype=dtype, device="cuda" if torch.cuda.is_available() else "cpu")
    if perturb is not None:
        state = tw.jax_model.canonical_state()
        if perturb not in state:
            raise ValueError(f"--perturb {perturb!r} is not a parameter; e.g. {list(state)[:4]}")
        state[perturb] = state[perturb] + 1e-2 * np.random.default_rng(seed).standard_normal(state[perturb].shape)
        tw.jax_model.load_canonical_state(state)
    rng = np.random.default_rng(seed + 7)
    x = rng.integers(0, config.vocab_size, (batch, seq_len))
    y = rng.integers(0, config.vocab_size, (batch, seq_len))
    note = "float32 matmuls at full precision on both sides" if precision == "highest" else \
        "each framework's default matmul precision"

    def row(name, metrics, ok, extra=""):
        return Row("parity", name, "torch vs jax", dtype, shape, metrics, "PASS" if ok else "FAIL", extra or note)

    progress("parity: logits, loss and gradients")
    t_logits, t_loss, t_grads = twins.torch_forward_backward(tw.torch_model, x, y)
    j_logits, j_loss, j_grads = twins.jax_forward_backward(tw.jax_model, x, y)
    e = rel(j_logits, t_logits)
    rows = [row("logits", {"max_abs_err": float(np.abs(j_logits - t_logits).max()), "rel_err": e,
                           "tol": tol["logits"]}, e <= tol["logits"])]
    e = abs(j_loss - t_loss) / abs(t_loss)
    rows.append(row("loss", {"torch": t_loss, "jax": j_loss, "rel_err": e, "tol": tol["logits"]}, e <= tol["logits"]))
    if t_grads.keys() != j_grads.keys():
        rows.append(row("gradient names", {}, False, f"differ: {sorted(t_grads.keys() ^ j_grads.keys())}"))
    errs = sorted(((rel(j_grads[k], t_grads[k]), k) for k in t_grads if k in j_grads), reverse=True)
    worst = errs[0][0] if errs else float("nan")
    rows.append(row(f"gradients ({len(errs)} tensors)", {"rel_err": worst, "tol": tol["grad"]}, worst <= tol["grad"],
                    "worst: " + ", ".join(f"{k} {v:.1e}" for v, k in errs[:5])))

    if train_steps:
        progress(f"parity: {train_steps} AdamW steps on both sides")
        batches = [(rng.integers(0, config.vocab_size, (batch, seq_len)),
                    rng.integers(0, config.vocab_size, (batch, seq_len))) for _ in range(train_steps)]
        opt_args = OptimizerConfig(lr=1e-3, weight_decay=0.1, grad_clip=1.0)
        tl = twins.torch_train_losses(tw.torch_model, batches, opt_args)
        jl = twins.jax_train_losses(tw.jax_model, batches, opt_args)
        errs = [abs(a - b) / abs(a) for a, b in zip(tl, jl, strict=True)]
        rows.append(row(f"train losses ({train_steps} steps)", {"torch_last": tl[-1], "jax_last": jl[-1],
                                                                 "rel_err": max(errs), "tol": tol["train"]},
                        max(errs) <= tol["train"], "the trainers' AdamW + clipping, lr 1e-3, dropout off"))
    if gen_tokens:
        progress(f"parity: greedy generation of {gen_tokens} tokens")
        prompt = x[:, : min(8, seq_len)]
        t_ids, j_ids = twins.greedy_tokens(tw, prompt, gen_tokens)
        same = t_ids.shape == j_ids.shape and bool((t_ids == j_ids).all())
        first = "" if same else f"first difference at position {int(np.argmax((t_ids != j_ids).any(0)))}"
        rows.append(Row("parity", f"greedy generation ({gen_tokens} tokens)", "torch vs jax", dtype,
                        f"B={batch} prompt={prompt.shape[1]}", {"identical": same}, "PASS" if same else "FAIL",
                        first or "token-for-token identical"))
    return rows
