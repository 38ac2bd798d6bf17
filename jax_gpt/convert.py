"""jax_gpt's parameters <-> the canonical state (Hugging Face GPT-2 names and layouts, float32 numpy).

An nnx path is the canonical module path with Flax's leaf names: ('h', 0, 'attn', 'c_attn', 'kernel') is
`h.0.attn.c_attn.weight`. A Flax kernel is (in, out), as the checkpoint's Conv1D weights already are, so only
the matrices stored (out, in) (`gpt_core.params.HF_OUT_IN`: the untied head) are transposed. A scanned model
(`scan_layers=True`) has one block whose arrays carry a leading layer axis, at paths without the layer index
(('h', 'attn', 'c_attn', 'kernel'), shape (n_layers, in, out)): unstacked into `h.{i}.…` on the way out and
stacked on the way in, so scanned and unrolled models read and write the same checkpoints. The model, the
trainer's optimizer state, the bench and the tests all go through these functions.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from gpt_core.params import layer_name, stored_out_in

# nnx leaf name -> Hugging Face leaf name.
LEAF_NAMES = {"embedding": "weight", "kernel": "weight", "scale": "weight", "bias": "bias"}


def _keys(path: tuple) -> tuple:
    """An nnx path, or a jax tree path into an nnx State (DictKeys, then the Variable's `.value`) -> plain keys."""
    return tuple(k.key if isinstance(k, jax.tree_util.DictKey) else k for k in path
                 if isinstance(k, jax.tree_util.DictKey | str | int))


def is_stacked(path: tuple) -> bool:
    """True for a scanned model's block arrays: under `h` with no layer index."""
    keys = _keys(path)
    return len(keys) > 1 and keys[0] == "h" and not isinstance(keys[1], int)


def canonical_names(path: tuple, n_layers: int | None = None) -> list[str]:
    """The canonical name(s) an nnx path holds: one, or for a stacked array one per layer (n_layers of them)."""
    keys = _keys(path)
    if is_stacked(keys):
        suffix = ".".join([*map(str, keys[1:-1]), LEAF_NAMES[keys[-1]]])
        return [layer_name(i, suffix) for i in range(n_layers)]
    return [".".join([*map(str, keys[:-1]), LEAF_NAMES[keys[-1]]])]


def _layout(name: str, a: np.ndarray) -> np.ndarray:
    return a.T if stored_out_in(name) else a  # the same swap both ways


def to_canonical(tree, gather: Callable = np.asarray) -> dict[str, np.ndarray]:
    """A Param-shaped tree (the model's Params, gradients or Adam moments; nnx.State or its pure-dict form) ->
    canonical names and layouts, float32 numpy. `gather` fetches one leaf to the host (multi-process: an allgather)."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        a = np.asarray(gather(leaf), np.float32)
        names = canonical_names(path, a.shape[0] if is_stacked(path) else None)
        for i, name in enumerate(names):
            out[name] = _layout(name, a[i] if is_stacked(path) else a)
    return out


def from_canonical(tree, canonical: dict[str, np.ndarray], place: Callable | None = None):
    """The inverse of `to_canonical`: `tree` with every leaf replaced by its canonical value(s), in Flax layout,
    stacked where the leaf is, shapes checked. `place(array, old_leaf)` makes the new leaf (default: a jax array
    of the old leaf's dtype)."""
    place = place or _same_dtype

    def fill(path, leaf):
        names = canonical_names(path, leaf.shape[0] if is_stacked(path) else None)
        missing = [n for n in names if n not in canonical]
        if missing:
            raise KeyError(f"no {missing[0]} in the state for the model's {'.'.join(map(str, _keys(path)))}")
        arrays = [_layout(n, canonical[n]) for n in names]
        a = np.stack(arrays) if is_stacked(path) else arrays[0]
        if a.shape != leaf.shape:  # only where the model and its config disagree: canonicalize checked the rest
            raise ValueError(f"{' '.join(names) if len(names) < 3 else names[0] + ' …'} has shape {a.shape} in "
                             f"Flax layout, the model wants {leaf.shape}")
        return place(a, leaf)

    return jax.tree_util.tree_map_with_path(fill, tree)


def _same_dtype(a: np.ndarray, leaf: jax.Array) -> jax.Array:
    return jnp.asarray(a, dtype=leaf.dtype)
