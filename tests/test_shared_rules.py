"""The rules the twins share (gpt_core/params.py), and both models following them: GPT-2's init by parameter name,
the sinusoidal table, the layouts of the canonical state, the layer stacking of a scanned JAX model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from flax import nnx

import jax_gpt
import torch_gpt
from gpt_core.checkpoint import expected_shapes
from gpt_core.params import HF_IN_OUT, off_init, sinusoidal_table, split_layer
from jax_gpt import convert as jax_convert
from tests.helpers import tiny
from torch_gpt import convert as torch_convert

# Written out by hand from GPT-2's recipe (not derived from gpt_core.params), per block tensor.
ZEROS = {"ln_1.bias", "ln_2.bias", "attn.c_attn.bias", "attn.c_proj.bias", "mlp.c_fc.bias", "mlp.c_proj.bias"}
ONES = {"ln_1.weight", "ln_2.weight"}
RESIDUAL = {"attn.c_proj.weight", "mlp.c_proj.weight"}  # std init_std / sqrt(2 * n_layers)
PLAIN = {"attn.c_attn.weight", "mlp.c_fc.weight"}  # std init_std


def initial_states(config) -> dict[str, dict[str, np.ndarray]]:
    torch.manual_seed(0)
    return {"torch": torch_gpt.GPTModel(config).canonical_state(),
            "jax": jax_gpt.GPTModel(config, rngs=nnx.Rngs(0)).canonical_state(),
            "jax scanned": jax_gpt.GPTModel(config, rngs=nnx.Rngs(0), scan_layers=True).canonical_state()}


def test_gpt2_init_on_both_sides():
    config = tiny(n_layers=3, emb_dim=64, qkv_bias=True, tie_embeddings=False, init_std=0.02)
    states = initial_states(config)
    for side, state in states.items():
        assert state.keys() == expected_shapes(config).keys(), side
        for name, a in state.items():
            layer = split_layer(name)
            suffix = layer[1] if layer else name
            if suffix in ZEROS or suffix == "ln_f.bias":
                assert (a == 0).all(), (side, name)
            elif suffix in ONES or suffix == "ln_f.weight":
                assert (a == 1).all(), (side, name)
            else:
                std = 0.02 / math.sqrt(2 * 3) if suffix in RESIDUAL else 0.02
                assert suffix in PLAIN | RESIDUAL or name in ("wte.weight", "wpe.weight", "lm_head.weight"), name
                assert abs(a.std() / std - 1) < 0.1 and abs(a.mean()) < 0.1 * std, (side, name, a.std())
    # A scanned model draws every layer as the unrolled one does: the same seed, the same weights.
    for name, a in states["jax"].items():
        np.testing.assert_array_equal(states["jax scanned"][name], a, err_msg=name)


def test_sinusoidal_table_is_one_buffer_on_both_sides():
    table = sinusoidal_table(64, 48)
    assert table.shape == (64, 48) and table.dtype == np.float32
    np.testing.assert_allclose(table[5, 0:4], [math.sin(5), math.cos(5), math.sin(5 * 10000 ** (-2 / 48)),
                                               math.cos(5 * 10000 ** (-2 / 48))], rtol=1e-6)
    np.testing.assert_array_equal(table[0, 0::2], 0)
    np.testing.assert_array_equal(table[0, 1::2], 1)
    assert sinusoidal_table(8, 7).shape == (8, 7)  # an odd width: the last column is a sine
    config = tiny(pos_embedding="sinusoidal")
    tm = torch_gpt.GPTModel(config)
    jm = jax_gpt.GPTModel(config, rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(tm.wpe.table.numpy(), table)
    np.testing.assert_array_equal(np.asarray(jm.wpe.table[...]), table)
    assert "wpe.table" not in tm.state_dict() and "wpe.weight" not in jm.canonical_state()


def test_layouts_of_the_canonical_state():
    config = tiny(tie_embeddings=False, qkv_bias=True)
    torch.manual_seed(0)
    tm = torch_gpt.GPTModel(config)
    state = tm.canonical_state()
    # HF's Conv1D matrices are (in, out): nn.Linear holds them transposed; the head is (vocab, emb) on both.
    assert state["h.1.mlp.c_fc.weight"].shape == (48, 192) and tm.h[1].mlp.c_fc.weight.shape == (192, 48)
    np.testing.assert_array_equal(state["h.1.mlp.c_fc.weight"], tm.h[1].mlp.c_fc.weight.detach().numpy().T)
    np.testing.assert_array_equal(state["lm_head.weight"], tm.lm_head.weight.detach().numpy())
    assert {n for n in state if HF_IN_OUT.fullmatch(n)} == {f"h.{i}.{s}.weight" for i in range(2) for s in
                                                             ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    # A Flax kernel is (in, out): the Conv1D matrices as they are, the head transposed.
    jm = jax_gpt.GPTModel(config, rngs=nnx.Rngs(0))
    jm.load_canonical_state(state)
    np.testing.assert_array_equal(np.asarray(jm.h[1].mlp.c_fc.kernel[...]), state["h.1.mlp.c_fc.weight"])
    np.testing.assert_array_equal(np.asarray(jm.lm_head.kernel[...]), state["lm_head.weight"].T)
    # Scanned: the same tensors stacked on a leading layer axis, unstacked again on the way out.
    sm = jax_gpt.GPTModel(config, rngs=nnx.Rngs(1), scan_layers=True)
    sm.load_canonical_state(state)
    assert sm.h.mlp.c_fc.kernel.shape == (2, 48, 192)
    np.testing.assert_array_equal(np.asarray(sm.h.mlp.c_fc.kernel[...][1]), state["h.1.mlp.c_fc.weight"])
    for name, a in sm.canonical_state().items():
        np.testing.assert_array_equal(a, state[name], err_msg=name)
    # The same conversions serve any Param-shaped tree (gradients, Adam moments), both ways.
    params = nnx.state(sm, nnx.Param)
    back = jax_convert.to_canonical(jax_convert.from_canonical(params, state))
    assert all(np.array_equal(back[k], state[k]) for k in state)
    t = torch_convert.from_canonical("h.0.attn.c_attn.weight", state["h.0.attn.c_attn.weight"])
    assert t.is_contiguous() and torch.equal(t, tm.h[0].attn.c_attn.weight.detach())


def test_off_init_moves_exactly_the_constant_tensors():
    config = tiny(qkv_bias=True)
    state = {k: np.zeros(s, np.float32) for k, s in expected_shapes(config).items()}
    moved = off_init(state, seed=3)
    changed = {k for k in state if not np.array_equal(moved[k], state[k])}
    assert changed == {k for k in state if (split_layer(k) or (0, k))[1] in ZEROS | ONES | {"ln_f.weight", "ln_f.bias"}}
    assert all(moved[k].dtype == np.float32 for k in moved)
    with pytest.raises(KeyError, match="h.1.ln_2.bias"):
        jax_convert.from_canonical(nnx.state(jax_gpt.GPTModel(config, rngs=nnx.Rngs(0)), nnx.Param),
                                   {k: v for k, v in state.items() if k != "h.1.ln_2.bias"})
