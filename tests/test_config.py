import json

import pytest

from gpt_core import PRESETS, GPTConfig

SEED_DICT = {  # GPT_CONFIG_124M, verbatim from the seed notebooks
    "vocab_size": 50257, "context_length": 1024, "emb_dim": 768, "n_heads": 12, "n_layers": 12,
    "drop_rate": 0.1, "qkv_bias": False,
}


def test_parameter_count_anchors():
    # DESIGN.md §3: the seed's untied, bias-free model and OpenAI's GPT-2 124M.
    assert GPTConfig.from_dict(SEED_DICT).n_params == 163_009_536
    assert GPTConfig.from_preset("gpt2").n_params == 124_439_808


def test_presets():
    sizes = {n: (c.emb_dim, c.n_heads, c.n_layers) for n, c in PRESETS.items()}
    assert sizes["gpt2-medium"] == (1024, 16, 24)
    assert sizes["gpt2-large"] == (1280, 20, 36)
    assert sizes["gpt2-xl"] == (1600, 25, 48)
    assert GPTConfig.from_preset("gpt2-xl").n_params == 1_557_611_200  # OpenAI's 1.5B
    tiny = GPTConfig.from_preset("tiny", drop_rate=0.2)
    assert tiny.drop_rate == 0.2 and tiny.vocab_size == 50257 and tiny.head_dim == 16


def test_nanogpt_dialect():
    c = GPTConfig.from_dict({"block_size": 1024, "vocab_size": 50257, "n_layer": 12, "n_head": 12,
                             "n_embd": 768, "dropout": 0.0, "bias": True})
    assert c == GPTConfig.from_preset("gpt2", drop_rate=0.0)
    with pytest.raises(ValueError, match="bias=False"):
        GPTConfig.from_dict({"block_size": 8, "n_layer": 1, "n_head": 1, "n_embd": 8, "bias": False})
    with pytest.raises(ValueError, match="flash"):
        GPTConfig.from_dict({"block_size": 8, "n_embd": 8, "flash": True})


def test_hf_dialect():
    hf = {"model_type": "gpt2", "vocab_size": 50257, "n_positions": 1024, "n_ctx": 1024, "n_embd": 768,
          "n_layer": 12, "n_head": 12, "activation_function": "gelu_new", "resid_pdrop": 0.1,
          "embd_pdrop": 0.1, "attn_pdrop": 0.1, "layer_norm_epsilon": 1e-5, "initializer_range": 0.02,
          "summary_type": "cls_index", "task_specific_params": {"text-generation": {"max_length": 50}}}
    assert GPTConfig.from_dict(hf) == GPTConfig.from_preset("gpt2")
    assert GPTConfig.from_dict({**hf, "activation_function": "gelu"}).gelu == "exact"
    for bad, field in [({"activation_function": "relu"}, "activation_function"),
                       ({"model_type": "llama"}, "model_type"),
                       ({"scale_attn_weights": False}, "scale_attn_weights"),
                       ({"attn_pdrop": 0.0}, "attn_pdrop")]:
        with pytest.raises(ValueError, match=field):
            GPTConfig.from_dict({**hf, **bad})


@pytest.mark.parametrize("config", [GPTConfig.from_dict(SEED_DICT), PRESETS["tiny"],
                                    GPTConfig(n_layers=2, gelu="exact", pos_embedding="sinusoidal")])
def test_round_trips(config, tmp_path):
    assert GPTConfig.from_json(config.to_json()) == config
    config.to_json(tmp_path / "c.json")
    assert GPTConfig.from_json(tmp_path / "c.json") == config
    assert GPTConfig.from_dict(json.loads(json.dumps(config.to_hf_dict()))) == config


@pytest.mark.parametrize("changes, field", [
    ({"emb_dim": 100, "n_heads": 12}, "emb_dim"),
    ({"n_layers": 0}, "n_layers"),
    ({"vocab_size": -5}, "vocab_size"),
    ({"context_length": 1.5}, "context_length"),
    ({"drop_rate": 1.0}, "drop_rate"),
    ({"drop_rate": -0.1}, "drop_rate"),
    ({"ln_eps": 0}, "ln_eps"),
    ({"init_std": -1}, "init_std"),
    ({"gelu": "relu"}, "gelu"),
    ({"pos_embedding": "rope"}, "pos_embedding"),
    ({"qkv_bias": "yes"}, "qkv_bias"),
    ({"dropout_rate": 0.1}, "dropout_rate"),
])
def test_invalid_configs_name_the_field(changes, field):
    with pytest.raises(ValueError, match=field):
        GPTConfig.from_dict({**SEED_DICT, **changes})


def test_unknown_preset_and_bad_files(tmp_path):
    with pytest.raises(ValueError, match="gpt3"):
        GPTConfig.from_preset("gpt3")
    with pytest.raises(ValueError, match="does not exist"):
        GPTConfig.from_json(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        GPTConfig.from_json(tmp_path / "bad.json")


def test_config_is_frozen():
    with pytest.raises(AttributeError):
        PRESETS["gpt2"].n_layers = 3  # type: ignore[misc]


def test_flops_per_token():
    c = GPTConfig.from_preset("gpt2")
    n_matmul = c.n_params - c.context_length * c.emb_dim  # tied wte is the head's matmul; wpe is a lookup
    assert c.flops_per_token(256) == 6 * n_matmul + 12 * 12 * 256 * 768
