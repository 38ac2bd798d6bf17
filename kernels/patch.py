"""Load the kernels into an existing model: one generic module walker and a small registry of rules.

`patch(model)` walks every submodule once and applies the first rule that matches it:
- `nn.LayerNorm` (exactly that class) is replaced by a `FusedLayerNorm` sharing its parameters;
- a module that behaves as an RMSNorm (found by probing its forward, not by its class name: `is_rms_norm`),
  Gemma's `(1 + weight)` included, is replaced by a `FusedRMSNorm` sharing its weight;
- a module whose class has a settable `attn_impl` property (a `torch_gpt.GPTModel`, found by duck typing,
  never imported) gets `attn_impl = "triton"`;
- a Hugging Face `transformers` model (it has `set_attn_implementation` and a config with an
  `_attn_implementation`) is switched to `flash_attention`, registered in transformers' own
  `AttentionInterface` under `ATTN_KEY` (`kernels.hf_attention`: grouped heads, padding, sliding windows and
  softcap run the kernel; anything else the model's own implementation, with a warning).
Other model families need one more `Rule`, registered with `register_rule`, not another walker.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from kernels import hf_attention
from kernels.hf_attention import ATTN_KEY
from kernels.norm import FusedLayerNorm, FusedRMSNorm


@dataclass
class Replacement:
    """One change `patch` made: at module `path` ("" is the root), `old` became `new`.

    kind "module": `old`/`new` are modules (the child at `path` was swapped).
    kind "attribute": `old`/`new` are the values of `target`'s attention setting.
    """

    path: str
    rule: str
    kind: str
    old: Any
    new: Any
    target: nn.Module | None = None


@dataclass(frozen=True)
class Rule:
    """`matches(module)` selects modules; `apply(module, path)` changes one and returns what it did, or None."""

    name: str
    group: str  # "layer_norm", "rms_norm" or "attention": `patch` can switch groups off
    matches: Callable[[nn.Module], bool]
    apply: Callable[[nn.Module, str], Replacement | None]


RULES: list[Rule] = []


def register_rule(rule: Rule, *, first: bool = False) -> None:
    """Add a rule to the registry `patch` consults (before the built-in ones with `first=True`)."""
    if first:
        RULES.insert(0, rule)
    else:
        RULES.append(rule)


# ----------------------------------------------------------------------------- built-in rules
def _swap_layer_norm(module: nn.LayerNorm, path: str) -> Replacement:
    return Replacement(path, "layer_norm", "module", module, FusedLayerNorm.from_layer_norm(module))


# Where RMSNorm modules keep their epsilon: transformers (`variance_epsilon`, `eps`, ...), nn.RMSNorm (`eps`).
EPS_NAMES = ("eps", "variance_epsilon", "epsilon", "rms_norm_eps", "norm_eps")
_MISSING = object()


def rms_norm_signature(module: nn.Module) -> tuple[float | None, float] | None:
    """(eps, offset) if `module` computes an RMSNorm over the last dimension with its 1-D `weight`, else None.

    Candidates are leaf modules whose only parameter is a 1-D floating `weight` and which hold an epsilon under
    one of EPS_NAMES (None: the input dtype's machine epsilon, as `nn.RMSNorm`). The forward is then probed in
    float32 on rows of very different scales (one where eps dominates, so its place in the formula shows) with a
    non-zero mean (a LayerNorm would centre them), with a random weight swapped in for the probe (Gemma's weights
    start at zero, which hides the offset), against x / sqrt(mean(x²) + eps) · (offset + weight) for offsets 0
    and 1. The probe calls `forward` directly (no hooks fire) and puts the module's own weight back.
    """
    weight = module._parameters.get("weight")
    if (isinstance(module, (FusedRMSNorm, FusedLayerNorm)) or weight is None or weight.dim() != 1
            or not weight.is_floating_point() or weight.is_meta or next(module.children(), None) is not None
            or any(p is not weight for p in module.parameters()) or next(module.buffers(), None) is not None):
        return None
    eps = next((v for v in (getattr(module, name, _MISSING) for name in EPS_NAMES)
                if v is None or isinstance(v, float | int) and not isinstance(v, bool)), _MISSING)
    if eps is _MISSING:
        return None
    n = weight.shape[0]
    probe_eps = float(eps) if eps is not None else torch.finfo(torch.float32).eps
    gen = torch.Generator().manual_seed(0)
    scales = torch.tensor([1.0, probe_eps ** 0.5, 3.0])[:, None]
    x = ((torch.randn(3, n, generator=gen) + 1.0) * scales).to(weight.device)
    w = torch.randn(n, generator=gen).to(weight.device)
    try:
        module._parameters["weight"] = nn.Parameter(w, requires_grad=False)
        with torch.no_grad():
            y = module.forward(x)
    except Exception:  # a forward that does not take one (..., N) tensor is not a norm
        return None
    finally:
        module._parameters["weight"] = weight
    if not isinstance(y, torch.Tensor) or y.shape != x.shape or not y.is_floating_point():
        return None
    xhat = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + probe_eps)
    for offset in (0.0, 1.0):
        expected = xhat * (offset + w)
        if torch.linalg.vector_norm(y.float() - expected) <= 1e-4 * torch.linalg.vector_norm(expected):
            return eps, offset
    return None


def is_rms_norm(module: nn.Module) -> bool:
    """True if `module` behaves as an RMSNorm `patch` can replace (see `rms_norm_signature`)."""
    return rms_norm_signature(module) is not None


def _swap_rms_norm(module: nn.Module, path: str) -> Replacement | None:
    signature = rms_norm_signature(module)
    if signature is None:
        return None
    eps, offset = signature
    new = FusedRMSNorm.from_weight(module.weight, eps, offset=offset, training=module.training)
    return Replacement(path, "rms_norm", "module", module, new)


def _has_attn_impl_setter(module: nn.Module) -> bool:
    prop = getattr(type(module), "attn_impl", None)
    return isinstance(prop, property) and prop.fset is not None


def _set_attn_impl(module: nn.Module, path: str) -> Replacement | None:
    old = module.attn_impl
    if old == "triton":
        return None
    module.attn_impl = "triton"
    return Replacement(path, "attn_impl", "attribute", old, "triton", target=module)


def _is_hf_model(module: nn.Module) -> bool:
    config = getattr(module, "config", None)
    return hasattr(module, "set_attn_implementation") and hasattr(config, "_attn_implementation")


def _set_hf_attention(module: nn.Module, path: str) -> Replacement | None:
    old = module.config._attn_implementation
    if old == ATTN_KEY:
        return None  # already switched (an outer model shares this config)
    register_hf_attention()
    hf_attention.remember_implementations(module)  # each config's fallback
    module.set_attn_implementation(ATTN_KEY)
    return Replacement(path, "hf_attention", "attribute", old, ATTN_KEY, target=module)


register_rule(Rule("layer_norm", "layer_norm", lambda m: type(m) is nn.LayerNorm, _swap_layer_norm))
register_rule(Rule("rms_norm", "rms_norm", is_rms_norm, _swap_rms_norm))
register_rule(Rule("attn_impl", "attention", _has_attn_impl_setter, _set_attn_impl))
register_rule(Rule("hf_attention", "attention", _is_hf_model, _set_hf_attention))


# ----------------------------------------------------------------------------- transformers
hf_attention_forward = hf_attention.attention_forward  # what the registry runs under ATTN_KEY
register_hf_attention = hf_attention.register


# ----------------------------------------------------------------------------- the walker
def patch(model: nn.Module, *, layer_norm: bool = True, rms_norm: bool = True,
          attention: bool = True) -> list[Replacement]:
    """Load the kernels into `model` in place; return what was replaced (empty if nothing matched).

    Every `nn.LayerNorm` becomes a `FusedLayerNorm` and every module that behaves as an RMSNorm a `FusedRMSNorm`,
    sharing the same parameters; attention switches where a rule knows how (torch_gpt's `attn_impl`,
    transformers' attention registry). `unpatch` undoes it.
    """
    groups = {name for name, on in (("layer_norm", layer_norm), ("rms_norm", rms_norm), ("attention", attention))
              if on}
    done: list[Replacement] = []
    swapped: dict[int, Replacement] = {}  # a module shared by several parents is swapped for one new module
    for path, module in list(model.named_modules(remove_duplicate=False)):
        if id(module) in swapped:
            first = swapped[id(module)]
            _set_child(model, path, first.new)
            done.append(Replacement(path, first.rule, "module", module, first.new))
            continue
        for rule in RULES:
            if rule.group in groups and rule.matches(module):
                change = rule.apply(module, path)
                if change is not None:
                    if change.kind == "module":
                        _set_child(model, path, change.new)
                        swapped[id(module)] = change
                    done.append(change)
                break
    return done


def unpatch(model: nn.Module, replacements: list[Replacement]) -> None:
    """Undo `patch(model)` given what it returned."""
    for change in reversed(replacements):
        if change.kind == "module":
            _set_child(model, change.path, change.old)
        elif change.rule == "hf_attention":
            change.target.set_attn_implementation(change.old)
        else:
            change.target.attn_impl = change.old


def _set_child(model: nn.Module, path: str, new: nn.Module) -> None:
    if not path:
        raise ValueError(f"cannot replace the root module {type(model).__name__} in place; patch its parent")
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent), name, new)
