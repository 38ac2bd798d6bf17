"""Autoregressive generation with a static KV cache (the CLI is `python -m torch_gpt.generate`).

Every step has fixed shapes: the cache holds min(context_length, prompt + new tokens) slots from the start, the
position is a tensor, and attention runs over all slots under a mask (torch_gpt.model.KVCache). So a decode step
is one graph, which `compile=True` hands to `torch.compile` once (with CUDA graphs on a GPU) and reuses for every
token and every later call of the same batch size and cache length.

Prompts of different lengths go in one batch left-padded (right-aligned), as transformers pads them: each row's
positions count from its first real token and its padding is masked, so each gets the tokens it gets alone.

Past the context: the model conditions on at most the last `context_length` tokens (nanoGPT's rule).
Without the cache every step crops to that window; with the cache, once the cache is full the window
is prefilled again (positions shift, so old keys cannot be reused), so cached and uncached generation
always agree, and only steps past the context lose the cache's speed.

What is checked where: the prompt's ids, lengths and shape here, before the model runs (one read-back of a GPU
prompt, none per step); `eos_id` stopping reads one flag back every `eos_check_every` tokens, not every token.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Sequence

import torch

from gpt_core.generation import check_lengths, check_sampling_args, pad_prompts
from torch_gpt.linear import calibrated
from torch_gpt.model import GPTModel, KVCache, check_ids

# torch.compile'd steps and their caches, per model: {(batch, slots, dtype, device): KVCache}, reused across calls
# so the compiled graphs (and CUDA graphs, which read the buffers at fixed addresses) see the same tensors.
_STATIC_CACHES: weakref.WeakKeyDictionary[GPTModel, dict] = weakref.WeakKeyDictionary()
_COMPILED: dict[str, object] = {}
# Compiled, the cache length is rounded up to this (at most the context), so that calls of nearby lengths share a
# decode graph; the extra slots are masked. Dynamo keeps at most `recompile_limit` (8) graphs per step function.
COMPILED_SLOTS_MULTIPLE = 64


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


def prompt_batch(prompts: torch.Tensor | Sequence[Sequence[int]], vocab_size: int, *,
                 lengths: Sequence[int] | torch.Tensor | None = None, device=None,
                 pad_id: int = 0) -> tuple[torch.Tensor, list[int]]:
    """(B, T) left-padded ids and the B prompt lengths, checked (gpt_core.generation.pad_prompts' rules): from a
    list of id lists (padded with `pad_id`, put on `device`), or from a (B, T) tensor, left where it is, whose row
    b holds its prompt in its last lengths[b] columns (all T without `lengths`; what is before becomes `pad_id`).
    A tensor's ids are read back once (one synchronisation on a GPU), never per step."""
    if not isinstance(prompts, torch.Tensor):
        padded, lens = pad_prompts(prompts, vocab_size, lengths=lengths, pad_id=pad_id)
        return torch.from_numpy(padded).to(device), lens
    if prompts.dim() != 2:
        raise ValueError(f"idx must be (batch, seq_len) token ids, got shape {tuple(prompts.shape)}")
    if prompts.dtype.is_floating_point or prompts.dtype.is_complex or prompts.dtype == torch.bool:
        raise ValueError(f"idx must hold integer token ids, got dtype {prompts.dtype}")
    B, T = prompts.shape
    if B == 0 or T == 0:
        raise ValueError(f"the prompt batch {tuple(prompts.shape)} holds no tokens (a prompt of length 0?)")
    if lengths is None:
        check_ids(prompts, vocab_size)
        return prompts, [T] * B
    lens = check_lengths(lengths.tolist() if isinstance(lengths, torch.Tensor) else lengths, B, T)
    pads = torch.tensor([T - n for n in lens], device=prompts.device)
    real = torch.arange(T, device=prompts.device)[None, :] >= pads[:, None]  # (B, T)
    check_ids(torch.where(real, prompts, 0), vocab_size)
    return torch.where(real, prompts, pad_id), lens


def compiled_graphs(step: str | None = None) -> int:
    """Graphs torch.compile has built in this process so far, torch._dynamo's own count: all of them, or only those
    of generate's "prefill" or "decode" step (its compiled entries, one per compilation). A difference across calls
    counts compilations and recompilations."""
    if step is None:
        from torch._dynamo.utils import counters

        return counters["stats"]["unique_graphs"]
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    steps = {"prefill": _prefill_step, "decode": _decode_step}
    if step not in steps:
        raise ValueError(f"step must be one of {tuple(steps)} or None, got {step!r}")
    return len(_debug_get_cache_entry_list(steps[step].__code__))


def _last_logits(model: GPTModel, cache: KVCache, ids: torch.Tensor) -> torch.Tensor:
    return model(ids, cache, last_only=True)[:, -1]  # (B, V)


# Two functions, so that each has its own code object and so its own compiled graphs, never mixed with the other's.
def _prefill_step(model: GPTModel, cache: KVCache, ids: torch.Tensor) -> torch.Tensor:
    return _last_logits(model, cache, ids)


def _decode_step(model: GPTModel, cache: KVCache, ids: torch.Tensor, greedy: bool = False) -> torch.Tensor:
    """The last position's logits (B, V), or with `greedy` their argmax (B,): compiled, the argmax joins the step's
    graph (one call per token, no eager reduction over the vocabulary after it)."""
    logits = _last_logits(model, cache, ids)
    return logits.argmax(dim=-1) if greedy else logits


def _prefill_fn(compile: bool):
    """The prefill: eager, or compiled once with dynamic shapes (any prompt length, cache length or window)."""
    if not compile:
        return _last_logits
    if "prefill" not in _COMPILED:
        _COMPILED["prefill"] = torch.compile(_prefill_step, fullgraph=True, dynamic=True)
    return _COMPILED["prefill"]


def _decode_fn(compile: bool, device: torch.device):
    """The decode step: eager, or one static graph per batch size, cache length and `greedy`; CUDA graphs on a
    GPU."""
    if not compile:
        return _decode_step
    mode = "reduce-overhead" if device.type == "cuda" else None
    if ("decode", mode) not in _COMPILED:
        _COMPILED["decode", mode] = torch.compile(_decode_step, mode=mode, fullgraph=True, dynamic=False)
    step = _COMPILED["decode", mode]
    if mode is None:
        return step

    def cudagraph_step(model, cache, ids, greedy=False):
        torch.compiler.cudagraph_mark_step_begin()  # the last step's outputs are consumed: its buffers may go
        return step(model, cache, ids, greedy)

    return cudagraph_step


@torch.inference_mode()
def generate(model: GPTModel, idx: torch.Tensor | Sequence[Sequence[int]], max_new_tokens: int,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             eos_id: int | None = None, use_cache: bool = True, generator: torch.Generator | None = None, *,
             lengths: Sequence[int] | torch.Tensor | None = None, compile: bool = False, pad_id: int = 0,
             eos_check_every: int = 8) -> torch.Tensor:
    """Continue prompts by up to `max_new_tokens`; returns (B, T + n): the T prompt columns (padding as `pad_id`),
    then the new tokens.

    `idx`: (B, T) token ids; or a list of id lists of different lengths, left-padded with `pad_id` to the longest
    (T); or a (B, T) tensor left-padded already, with `lengths` (B,) saying how many of each row's last columns
    are its prompt. Each row then gets the tokens it gets alone. Ids are checked here, before the model runs.

    Greedy at temperature 0, else sampling with optional top-k and nucleus (top-p) filtering. With
    `eos_id`, a sequence that produced it is padded with `eos_id` and generation stops once all have (checked every
    `eos_check_every` tokens, the output trimmed to where the last one finished). `compile=True` runs the prefill
    (compiled once, with dynamic shapes) and the decode step (compiled once per batch size and cache length, the
    length rounded up to a multiple of COMPILED_SLOTS_MULTIPLE, and once more where greedy and sampled calls both
    come; mode "reduce-overhead", CUDA graphs, on a GPU) through `torch.compile`, reused for every token and later
    call; `compiled_graphs` counts them. The model runs in eval mode (no dropout) and is put back in its previous
    mode afterwards.
    """
    check_sampling_args(temperature, top_k, top_p)
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if eos_check_every < 1:
        raise ValueError(f"eos_check_every must be >= 1, got {eos_check_every}")
    if compile and not use_cache:
        raise ValueError("compile=True compiles the KV-cache steps: it needs use_cache=True")
    idx, lens = prompt_batch(idx, model.config.vocab_size, lengths=lengths, device=model.wte.weight.device,
                             pad_id=pad_id)
    (B, T), ctx = idx.shape, model.config.context_length
    device = idx.device
    start = torch.tensor([T - n for n in lens], device=device)  # (B,) each row's first real column
    padded = any(n < T for n in lens)
    # Eval mode (no dropout) for the call. Compiled, the decode step's Linear paths are chosen and weight copies
    # brought up to date before a step is traced, so compiled and eager steps run the same products on the current
    # weights (eager steps probe and refresh as they go: torch_gpt.linear).
    with _eval_mode(model), (calibrated(model, B) if compile else contextlib.nullcontext()):
        out = torch.empty(B, T + max_new_tokens, dtype=idx.dtype, device=device)
        out[:, :T] = idx
        if max_new_tokens == 0:
            return out
        slots = min(ctx, T + max_new_tokens)  # cache slots: never more than this call can fill
        if compile:
            slots = min(ctx, -(-slots // COMPILED_SLOTS_MULTIPLE) * COMPILED_SLOTS_MULTIPLE)
        prefill, decode = _prefill_fn(compile), _decode_fn(compile, device)
        greedy = temperature == 0.0  # the decode step returns ids, not logits
        done = torch.zeros(B, dtype=torch.bool, device=device)
        n_out = torch.full((), max_new_tokens, device=device)  # tokens to return: fewer once all rows hit eos
        cache, filled = None, 0
        for i in range(max_new_tokens):
            cur = T + i  # tokens so far
            if not use_cache:
                window = out[:, max(0, cur - ctx):cur]
                if padded:  # a fresh cache per step, only for its padding mask: everything is recomputed
                    fresh = KVCache(model.config, B, window.shape[1], device=device, dtype=model.wte.weight.dtype,
                                    start=(start - max(0, cur - ctx)).clamp(min=0))  # each row's padding, shifted
                    logits = _last_logits(model, fresh, window)
                else:
                    logits = model(window, last_only=True)[:, -1]
            elif cache is None or filled == slots:  # first step, or the window is full
                lo = max(0, cur - ctx)
                window = out[:, lo:cur]
                if cache is None:
                    cache = _cache(model, B, slots, compile, device)
                cache.reset((start - lo).clamp(min=0) if padded else None)
                logits, filled = prefill(model, cache, window), window.shape[1]
            else:
                # A fresh (B, 1): the slice's strides follow out's width, and a compiled step is specialised on
                # strides (`.contiguous()` keeps them at B=1, where a (1, 1) view counts as contiguous already).
                ids = out[:, cur - 1:cur].clone(memory_format=torch.contiguous_format)
                logits, filled = decode(model, cache, ids, greedy), filled + 1
            # (B,): greedy decode steps return their argmax already
            nxt = logits if logits.dim() == 1 else sample_next(logits, temperature, top_k, top_p, generator)
            if eos_id is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
                done |= nxt == eos_id
                n_out = torch.where(done.all() & (n_out == max_new_tokens), i + 1, n_out)  # on the device
            out[:, cur] = nxt.to(out.dtype)
            if eos_id is not None and (i + 1) % eos_check_every == 0 and bool(done.all()):
                break
        return out[:, :T + int(n_out)] if eos_id is not None else out


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module):
    """The model in eval mode inside, put back in its previous mode after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _cache(model: GPTModel, batch: int, slots: int, compile: bool, device: torch.device) -> KVCache:
    """A fresh cache, or (compiled) the model's cache of this shape, reused: the graphs were built around it."""
    dtype = model.wte.weight.dtype
    if not compile:
        return KVCache(model.config, batch, slots, device=device, dtype=dtype)
    caches = _STATIC_CACHES.setdefault(model, {})
    key = (batch, slots, dtype, device)
    if key not in caches:
        caches[key] = KVCache(model.config, batch, slots, device=device, dtype=dtype)
    return caches[key]
