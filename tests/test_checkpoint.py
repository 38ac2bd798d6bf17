import json

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from gpt_core import CheckpointError, GPTConfig, load_checkpoint, save_checkpoint
from gpt_core.checkpoint import expected_shapes

CFG = GPTConfig(vocab_size=97, context_length=16, emb_dim=8, n_heads=2, n_layers=2, qkv_bias=True,
                tie_embeddings=True)


def random_state(config: GPTConfig, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in expected_shapes(config).items()}


@pytest.mark.parametrize("config", [CFG, GPTConfig(vocab_size=97, context_length=16, emb_dim=8, n_heads=2,
                                                   n_layers=1, tie_embeddings=False, pos_embedding="sinusoidal")])
def test_round_trip(tmp_path, config):
    state = random_state(config)
    save_checkpoint(tmp_path / "ckpt", config, state)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", "model.safetensors"]
    config2, state2 = load_checkpoint(tmp_path / "ckpt")
    assert config2 == config
    assert list(state2) == list(expected_shapes(config))
    for k in state:
        np.testing.assert_array_equal(state2[k], state[k])
    hf = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert hf["model_type"] == "gpt2" and hf["n_embd"] == 8 and hf["activation_function"] == "gelu_new"


def test_expected_names_follow_hf_gpt2():
    names = list(expected_shapes(CFG))
    assert names[:2] == ["wte.weight", "wpe.weight"]
    assert "h.1.attn.c_attn.weight" in names and expected_shapes(CFG)["h.1.mlp.c_fc.weight"] == (8, 32)
    assert "lm_head.weight" not in names  # tied


def test_accepts_what_transformers_writes(tmp_path):
    """Prefix `transformer.`, the attention-mask buffers and a tied lm_head equal to wte are accepted."""
    state = random_state(CFG)
    raw = {"transformer." + k: v for k, v in state.items()}
    raw["transformer.h.0.attn.bias"] = np.tril(np.ones((1, 1, 16, 16), np.float32))
    raw["transformer.h.0.attn.masked_bias"] = np.array(-1e4, np.float32)
    raw["lm_head.weight"] = state["wte.weight"].copy()
    d = tmp_path / "hf"
    d.mkdir()
    save_file(raw, d / "model.safetensors")
    (d / "config.json").write_text(json.dumps(CFG.to_hf_dict()))
    _, loaded = load_checkpoint(d)
    assert set(loaded) == set(state)
    np.testing.assert_array_equal(loaded["h.1.mlp.c_proj.weight"], state["h.1.mlp.c_proj.weight"])


def test_all_problems_listed_in_one_error(tmp_path):
    state = random_state(CFG)
    del state["h.0.ln_1.weight"]
    state["h.1.mlp.c_fc.weight"] = state["h.1.mlp.c_fc.weight"].T
    state["h.7.extra.weight"] = np.zeros(3, np.float32)
    with pytest.raises(CheckpointError) as e:
        save_checkpoint(tmp_path / "x", CFG, state)
    msg = str(e.value)
    assert "3 problem(s)" in msg
    assert "missing tensor h.0.ln_1.weight" in msg
    assert "unexpected tensor h.7.extra.weight" in msg
    assert "h.1.mlp.c_fc.weight has shape (32, 8), expected (8, 32)" in msg
    assert not (tmp_path / "x").exists()  # nothing written for a bad state


def test_tied_head_that_differs_is_refused(tmp_path):
    state = random_state(CFG)
    state["lm_head.weight"] = state["wte.weight"] + 1
    with pytest.raises(CheckpointError, match="lm_head.weight differs"):
        save_checkpoint(tmp_path / "x", CFG, state)


def test_missing_files_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_checkpoint(tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text(CFG.to_json())
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_checkpoint(tmp_path / "empty")


def test_overwrite_is_atomic_per_file(tmp_path, monkeypatch):
    """A crash while writing the weights leaves the earlier checkpoint intact and no temporary files."""
    save_checkpoint(tmp_path / "c", CFG, random_state(CFG, seed=0))
    before = load_file(tmp_path / "c" / "model.safetensors")
    import gpt_core.checkpoint as ck

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(ck, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path / "c", CFG, random_state(CFG, seed=1))
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["config.json", "model.safetensors"]
    after = load_file(tmp_path / "c" / "model.safetensors")
    assert all(np.array_equal(before[k], after[k]) for k in before)
