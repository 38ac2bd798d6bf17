"""Autoregressive generation with a static KV cache (the CLI is `python -m torch_gpt.generate`).

Past the context: the model conditions on at most the last `context_length` tokens (nanoGPT's rule).
Without the cache every step crops to that window; with the cache, once the cache is full the window
is prefilled again (positions shift, so old keys cannot be reused), so cached and uncached generation
always agree, and only steps past the context lose the cache's speed.
"""

from __future__ import annotations

import torch

from gpt_core.generation import check_sampling_args
from torch_gpt.model import GPTModel, KVCache


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
                generator: torch.Generator | None) -> torch.Tensor:
    """Next ids (B,) from last-position logits (B, V): argmax at temperature 0, else sampled."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        drop = cum - torch.softmax(sorted_logits, dim=-1) >= top_p  # keep the smallest set reaching top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def generate(model: GPTModel, idx: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, eos_id: int | None = None,
             use_cache: bool = True, generator: torch.Generator | None = None) -> torch.Tensor:
    """Continue (B, T) token ids by up to `max_new_tokens`; returns (B, T + n).

    Greedy at temperature 0, else sampling with optional top-k and nucleus (top-p) filtering. With
    `eos_id`, a sequence that produced it is padded with `eos_id` and generation stops once all have.
    The model runs in eval mode (no dropout) and is put back in its previous mode afterwards.
    """
    check_sampling_args(temperature, top_k, top_p)
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    ctx = model.config.context_length
    was_training = model.training
    model.eval()
    try:
        out = idx
        done = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
        cache = None
        for _ in range(max_new_tokens):
            if not use_cache:
                logits = model(out[:, -ctx:])
            elif cache is None or cache.pos == cache.max_len:  # first step, or the window is full
                window = out[:, -ctx:]
                slots = min(ctx, out.shape[1] + max_new_tokens)  # never more than this call can fill
                cache = KVCache(model.config, out.shape[0], slots, device=out.device, dtype=model.wte.weight.dtype)
                logits = model(window, cache)
            else:
                logits = model(out[:, -1:], cache)
            nxt = sample_next(logits[:, -1], temperature, top_k, top_p, generator)  # (B,)
            if eos_id is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
                done |= nxt == eos_id
            out = torch.cat([out, nxt[:, None].to(out.dtype)], dim=1)
            if eos_id is not None and bool(done.all()):
                break
        return out
    finally:
        model.train(was_training)
