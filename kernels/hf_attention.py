"""`kernels.flash_attention` as a Hugging Face `transformers` attention function (registered by `kernels.patch`).

transformers calls an attention function with (B, H, T_Q, D) queries, (B, H_KV, T_K, D) keys and values, a mask
and keyword arguments (`scaling`, `dropout`, `is_causal`, `sliding_window`, `softcap`, ...). We register sdpa's
mask builder under our key, so the mask is None (plain causal, or no mask) or a 4-D boolean mask, and
`attention_forward` recognises in it what the kernel does natively: causal or bidirectional attention, a
sliding window, padding as a key range per sequence (left or right, as `generate` pads), and sequences packed in
rows (position ids that restart) as varlen sequences. Keys and values of grouped-query attention go to the
kernel as they are; `softcap` and the window come from the call's kwargs; a packed batch described by
FlashAttention's `cu_seq_lens_q/k` kwargs runs the varlen kernel directly.

Anything else (another mask, attention dropout, returned attention weights, position biases, attention sinks,
head sizes over 128) runs the implementation the model used before patching (eager for Gemma 2, whose softcap
sdpa lacks), with a warning, once per reason, that says why.
"""

from __future__ import annotations

import sys
import warnings
import weakref
from dataclasses import dataclass

import torch
import torch.nn as nn

from kernels import attention

ATTN_KEY = "kernels_triton"  # our name in transformers' attention registry ("flash" in it would trigger HF checks)

_ORIGINAL: dict[int, tuple[weakref.ref, str]] = {}  # id(config) -> (the config, its implementation before patch)
_WARNED: set[str] = set()  # fallback reasons already reported


def register() -> None:
    """Register `attention_forward` (and sdpa's mask builder) in transformers' registries under ATTN_KEY."""
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register(ATTN_KEY, attention_forward)
    AttentionMaskInterface.register(ATTN_KEY, sdpa_mask)


def remember_implementations(model: nn.Module) -> None:
    """Note the attention implementation of every config in `model`, before `patch` switches them: the fallback."""
    for sub in model.modules():
        config = getattr(sub, "config", None)
        implementation = getattr(config, "_attn_implementation", None)
        if isinstance(implementation, str) and implementation != ATTN_KEY:
            _ORIGINAL[id(config)] = (weakref.ref(config), implementation)


def _original_implementation(config) -> str | None:
    ref, implementation = _ORIGINAL.get(id(config), (None, None))
    return implementation if ref is not None and ref() is config else None


# ----------------------------------------------------------------------------- what the kernel runs
@dataclass(frozen=True)
class _Plan:
    """One kernel call: the mask as FlashAttention defines it, padding as per-sequence key ranges, and several
    sequences packed in each row as varlen sequences."""

    causal: bool
    window: tuple[int, int] = (-1, -1)
    kv_start: torch.Tensor | None = None  # (B,) int32
    kv_end: torch.Tensor | None = None
    keys: int | None = None  # use only the first `keys` keys (the rest are never seen)
    cu_seqlens: torch.Tensor | None = None  # packed rows: (S + 1,) int32 starts of the sequences in B·T rows
    max_seqlen: int = 0


def _window_candidates(causal: bool, sliding_window: int | None) -> list[tuple[int, int]]:
    """The windows transformers' masks mean by `sliding_window`: causal keeps keys j > i - W; bidirectional
    ones |i - j| <= W (and FlashAttention's integration uses W - 1 on both sides)."""
    if not sliding_window:
        return [(-1, -1)]
    w = int(sliding_window)
    return [(w - 1, -1)] if causal else [(w, w), (w - 1, w - 1)]


def _seen_of(mask: torch.Tensor) -> torch.Tensor | str:
    """(B', T_Q, T_K) bool, True where a query sees a key; or why the mask is not one we can read."""
    if mask.dim() != 4 or mask.shape[1] != 1:
        return f"an attention mask of shape {tuple(mask.shape)} (per head, or not 4-D)"
    seen = mask[:, 0]
    if seen.dtype == torch.bool:
        return seen
    if not seen.is_floating_point():
        return f"an attention mask of dtype {seen.dtype}"
    visible = seen == 0
    hidden = seen <= torch.finfo(seen.dtype).min / 2
    if not bool((visible | hidden).all()):
        return "an additive attention mask with biases (values other than 0 and the dtype's minimum)"
    return visible


def _key_ranges(seen: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B',) first and one-past-last key any query of each sequence sees (0, 0 for none)."""
    any_key = seen.any(1)  # (B', T_K)
    t_k = any_key.shape[1]
    positions = torch.arange(t_k, device=seen.device)
    start = torch.where(any_key, positions, t_k).amin(1)
    end = torch.where(any_key, positions + 1, 0).amax(1)
    return start.clamp_max(end), end


def _plan_for_mask(mask: torch.Tensor, t_q: int, t_k: int, causal: bool,
                   sliding_window: int | None) -> _Plan | str:
    """Recognise causal or bidirectional attention, a sliding window and per-sequence key ranges in a 4-D mask:
    the plan whose visibility equals the mask exactly, or the reason there is none."""
    if mask.shape[-2:] != (t_q, t_k):
        return f"an attention mask of shape {tuple(mask.shape)} for {t_q} queries and {t_k} keys"
    seen = _seen_of(mask)
    if isinstance(seen, str):
        return seen
    start, end = _key_ranges(seen)
    used = int(end.max()) if end.numel() else 0
    positions = torch.arange(t_k, device=seen.device)
    in_range = (positions >= start[:, None]) & (positions < end[:, None])  # (B', T_K)
    for is_causal in (causal, not causal):
        for window in _window_candidates(is_causal, sliding_window):
            # The keys a static cache has not filled yet are never seen: drop them, so the diagonal is aligned to
            # the last key in use.
            for keys in dict.fromkeys((t_k, max(used, 1))):
                pattern = attention.visible(t_q, keys, is_causal, window, device=seen.device)
                expected = pattern[None] & in_range[:, None, :keys]
                if torch.equal(expected, seen[..., :keys]) and not seen[..., keys:].any():
                    padded = bool(((start > 0) | (end < keys)).any())
                    return _Plan(is_causal, window, start.to(torch.int32) if padded else None,
                                 end.to(torch.int32) if padded else None, keys if keys < t_k else None)
    packed = _packed_plan(seen, t_q, t_k, causal, sliding_window)
    if packed is not None:
        return packed
    return ("an attention mask that is not causal or bidirectional attention with padding or packed sequences (and "
            "a sliding window)")


def _packed_plan(seen: torch.Tensor, t_q: int, t_k: int, causal: bool, sliding_window: int | None) -> _Plan | None:
    """Several sequences packed in each row (transformers' mask for position ids that restart, as
    DataCollatorWithFlattening makes): a block-diagonal mask, each block causal or bidirectional (and windowed).
    A sequence starts where a query does not see the key before it."""
    if t_q != t_k or t_q < 2:
        return None
    rows = torch.arange(1, t_q, device=seen.device)
    starts = torch.ones(seen.shape[:2], dtype=torch.bool, device=seen.device)  # (B', T)
    starts[:, 1:] = ~seen[:, rows, rows - 1]
    if not bool(starts[:, 1:].any()):
        return None  # one sequence per row: not packed
    segment = starts.cumsum(1)  # (B', T) the sequence of each position
    same = segment[:, :, None] == segment[:, None, :]
    for is_causal in (causal, not causal):
        for window in _window_candidates(is_causal, sliding_window):
            if torch.equal(same & attention.visible(t_q, t_k, is_causal, window, device=seen.device)[None], seen):
                first = starts.flatten().nonzero().flatten()  # rows of B'·T where a sequence starts
                cu = torch.cat([first, first.new_tensor([starts.numel()])]).to(torch.int32)
                return _Plan(is_causal, window, cu_seqlens=cu, max_seqlen=int((cu[1:] - cu[:-1]).max()))
    return None


class _PlanCache:
    """The last few masks' plans: every layer of a forward gets the same mask tensor (two, alternating, in models
    with sliding-window layers), so each is read once."""

    def __init__(self, size: int = 4):
        self.size = size
        self.entries: list[tuple[weakref.ref, tuple, _Plan | str]] = []

    def get(self, mask: torch.Tensor, key: tuple, make) -> _Plan | str:
        key = (mask._version, *key)
        for ref, k, plan in self.entries:
            if ref() is mask and k == key:
                return plan
        plan = make()
        self.entries = [e for e in self.entries if e[0]() is not None][-(self.size - 1):]
        self.entries.append((weakref.ref(mask), key, plan))
        return plan


_PLANS = _PlanCache()


def _plan(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
          mask: torch.Tensor | None, dropout: float, is_causal: bool | None, kwargs: dict) -> _Plan | str:
    """What the kernel runs for this call, or why it cannot."""
    unsupported = {
        "attention dropout": dropout > 0.0,
        "attention weights output": bool(kwargs.get("output_attentions")),
        "position bias": kwargs.get("position_bias") is not None,
        "attention sinks": kwargs.get("s_aux") is not None,
        "paged cache": kwargs.get("cache") is not None,
    }
    reasons = [name for name, asked in unsupported.items() if asked]
    if reasons:
        return ", ".join(reasons)
    d = query.shape[-1]
    dtypes = {query.dtype, key.dtype, value.dtype}
    if query.dtype not in (torch.float16, torch.bfloat16, torch.float32) or len(dtypes) > 1:
        return f"inputs of dtype {query.dtype}/{key.dtype}/{value.dtype}"
    if not 1 <= d <= attention.MAX_HEAD_DIM or key.shape[-1] != d or value.shape[-1] != d:
        return f"head sizes {d}/{key.shape[-1]}/{value.shape[-1]} (the kernel takes equal ones up to 128)"
    if query.shape[1] % key.shape[1]:
        return f"{query.shape[1]} query heads over {key.shape[1]} key/value heads"
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    t_q, t_k = query.shape[2], key.shape[2]
    sliding_window = kwargs.get("sliding_window")
    if mask is None:
        # As sdpa reads it: causal for several queries; a static cache's unfilled keys (T_K > T_Q, no mask,
        # prefill from position 0) are dropped, so causal is aligned to the top left.
        causal = bool(causal) and t_q > 1
        window = (-1, -1)
        if sliding_window:  # as transformers' FlashAttention integration: W - 1 keys back (and forward)
            window = (sliding_window - 1, -1 if causal else sliding_window - 1)
        return _Plan(causal, window, keys=t_q if causal and t_k > t_q else None)
    if not isinstance(mask, torch.Tensor):
        return f"an attention mask of type {type(mask).__name__}"
    return _PLANS.get(mask, (t_q, t_k, bool(causal), sliding_window),
                      lambda: _plan_for_mask(mask, t_q, t_k, bool(causal), sliding_window))


def attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """transformers' attention-function interface: (B, H, T_Q, D) query, (B, H_KV, T_K, D) key/value ->
    ((B, T_Q, H, D) output, None); falls back as the module docstring says."""
    softcap = kwargs.get("softcap") or 0.0
    if kwargs.get("cu_seq_lens_q") is not None and kwargs.get("cu_seq_lens_k") is not None and query.shape[0] == 1:
        return _varlen(module, query, key, value, attention_mask, dropout, scaling, is_causal, softcap, kwargs)
    plan = _plan(module, query, key, value, attention_mask, dropout, is_causal, kwargs)
    if isinstance(plan, str):
        return _fallback(plan, module, query, key, value, attention_mask, dropout, scaling, is_causal, kwargs)
    if plan.cu_seqlens is not None:
        return _packed(query, key, value, plan, scaling, softcap)
    if plan.keys is not None:
        key, value = key[:, :, :plan.keys], value[:, :, :plan.keys]
    kv_start, kv_end = plan.kv_start, plan.kv_end
    if kv_start is not None and kv_start.shape[0] != query.shape[0]:  # a mask broadcast over the batch
        kv_start, kv_end = kv_start.expand(query.shape[0]).contiguous(), kv_end.expand(query.shape[0]).contiguous()
    out = attention.flash_attention(query, key, value, causal=plan.causal, sm_scale=scaling, window=plan.window,
                                    softcap=softcap, kv_start=kv_start, kv_end=kv_end)
    return out.transpose(1, 2), None  # (B, T_Q, H, D)


def _packed(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, plan: _Plan, scaling: float | None,
            softcap: float) -> tuple[torch.Tensor, None]:
    """Rows of packed sequences as one varlen batch: (B, H, T, D) -> (B·T, H, D) rows (a view where the usual
    (B, T, H, D) memory allows), and back."""
    b, h, t, d = query.shape
    cu, longest = plan.cu_seqlens, plan.max_seqlen
    if cu[-1] != b * t:  # a mask shared by the batch: the same sequences in every row
        cu = torch.cat([cu[:-1] + i * t for i in range(b)] + [cu[-1:] * b])
    rows = lambda x: x.transpose(1, 2).reshape(b * t, x.shape[1], d)
    out = attention.flash_attention_varlen(rows(query), rows(key), rows(value), cu, cu, longest, longest,
                                           plan.causal, sm_scale=scaling, window=plan.window, softcap=softcap)
    return out.view(b, t, h, d), None


def _varlen(module, query, key, value, attention_mask, dropout, scaling, is_causal, softcap, kwargs):
    """A packed batch (one row of sequences, FlashAttention's cu_seq_lens kwargs): the varlen kernel."""
    reason = _plan(module, query, key, value, None, dropout, is_causal, kwargs)
    if isinstance(reason, str):
        return _fallback(reason, module, query, key, value, attention_mask, dropout, scaling, is_causal, kwargs)
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    sliding_window = kwargs.get("sliding_window")
    window = (-1, -1) if not sliding_window else (sliding_window - 1, -1 if causal else sliding_window - 1)
    cu_q, cu_k = (kwargs[name].to(device=query.device, dtype=torch.int32) for name in ("cu_seq_lens_q",
                                                                                       "cu_seq_lens_k"))
    max_q = int(kwargs.get("max_length_q") or (cu_q[1:] - cu_q[:-1]).max())
    max_k = int(kwargs.get("max_length_k") or (cu_k[1:] - cu_k[:-1]).max())
    out = attention.flash_attention_varlen(query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1),
                                           cu_q, cu_k, max_q, max_k, bool(causal), sm_scale=scaling, window=window,
                                           softcap=softcap)
    return out.unsqueeze(0), None  # (1, total, H, D)


# ----------------------------------------------------------------------------- the fallback
def _fallback(reason: str, module: nn.Module, query, key, value, attention_mask, dropout, scaling, is_causal,
              kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The implementation the model used before patching (eager when the call needs softcap or attention
    weights, which sdpa lacks), warning once per reason."""
    original = _original_implementation(getattr(module, "config", None)) or "sdpa"
    eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    needs_eager = kwargs.get("softcap") is not None or bool(kwargs.get("output_attentions"))
    use_eager = eager is not None and (original == "eager" or needs_eager)
    name = "eager" if use_eager else "sdpa"
    if reason not in _WARNED:
        _WARNED.add(reason)
        warnings.warn(f"kernels.flash_attention does not handle {reason}: transformers' {name} attention runs "
                      f"instead", stacklevel=3)
    if use_eager:
        return eager(module, query, key, value, _additive_mask(attention_mask, query, key, module, is_causal),
                     dropout=dropout, scaling=scaling, **kwargs)
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  is_causal=is_causal, **kwargs)


def _additive_mask(mask: torch.Tensor | None, query: torch.Tensor, key: torch.Tensor, module: nn.Module,
                   is_causal: bool | None) -> torch.Tensor | None:
    """The mask eager attention wants (added to the scores) from the one sdpa's builder made for us: boolean
    masks become 0 / the dtype's minimum, and no mask on a causal call becomes the causal mask sdpa would apply."""
    lowest = torch.finfo(query.dtype).min
    if mask is None:
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        t_q, t_k = query.shape[2], key.shape[2]
        if not causal or t_q == 1:
            return None
        seen = torch.arange(t_k, device=query.device)[None, :] <= torch.arange(t_q, device=query.device)[:, None]
        mask = seen[None, None]
    if mask.dtype == torch.bool:
        return torch.zeros((), dtype=query.dtype, device=query.device).masked_fill(~mask, lowest)
    return mask
