"""Interop with real Hugging Face `transformers` GPT-2 models (a test-only dependency)."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from gpt_core import CheckpointError, GPTConfig, load_checkpoint  # noqa: E402
from tests.helpers import assert_rel_close, off_init_, small_hf_model  # noqa: E402
from torch_gpt import GPTModel  # noqa: E402


@pytest.mark.parametrize("tie, act", [(True, "gelu_new"), (False, "gelu")])
def test_hf_checkpoint_loads_with_equal_logits(tmp_path, tie, act):
    hf = small_hf_model(tie, act)
    hf.save_pretrained(tmp_path / "hf")
    model = GPTModel.from_pretrained(tmp_path / "hf")
    assert model.config.tie_embeddings == tie and model.config.gelu == ("tanh" if act == "gelu_new" else "exact")
    idx = torch.randint(0, 203, (2, 33))
    with torch.no_grad():
        assert_rel_close(model(idx), hf(idx).logits, 1e-5, "logits vs transformers")


def test_hf_pytorch_model_bin_loads_with_weights_only(tmp_path):
    hf = small_hf_model()
    d = tmp_path / "bin"
    d.mkdir()
    torch.save(hf.state_dict(), d / "pytorch_model.bin")  # the legacy format: with the transformer. prefix
    (d / "config.json").write_text(json.dumps(hf.config.to_dict()))
    with pytest.raises(FileNotFoundError, match="pytorch_model.bin"):
        load_checkpoint(d)  # gpt_core never unpickles; it points to the torch loader
    model = GPTModel.from_pretrained(d)
    idx = torch.randint(0, 203, (1, 17))
    with torch.no_grad():
        assert_rel_close(model(idx), hf(idx).logits, 1e-5, "logits from .bin")


def test_pickled_code_in_bin_is_refused(tmp_path):
    d = tmp_path / "evil"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(small_hf_model().config.to_dict()))

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"wte.weight": Evil()}, d / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model.bin holds pickled code .*GLOBAL print"):
        GPTModel.from_pretrained(d)


@pytest.mark.parametrize("tie, qkv_bias", [(True, True), (False, True), (True, False)])
def test_our_checkpoint_loads_into_transformers(tmp_path, tie, qkv_bias):
    # Without a qkv bias the file has no c_attn.bias: transformers reports it missing and zero-initialises
    # it (GPT-2's init), which computes the same function.
    torch.manual_seed(1)
    cfg = GPTConfig(vocab_size=203, context_length=40, emb_dim=48, n_heads=4, n_layers=2, drop_rate=0.0,
                    qkv_bias=qkv_bias, tie_embeddings=tie)
    model = GPTModel(cfg).eval()
    off_init_(model, seed=2)
    model.save_pretrained(tmp_path / "ours")
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "ours").eval()
    idx = torch.randint(0, 203, (2, 40))
    with torch.no_grad():
        assert_rel_close(hf(idx).logits, model(idx), 1e-5, "transformers logits vs ours")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_hf_checkpoint_loads_on_both_sides(tmp_path, dtype):
    # bf16 tensors need ml_dtypes for numpy to hold them; both loaders widen them to float32, exactly.
    hf = small_hf_model().to(dtype)
    hf.save_pretrained(tmp_path / "hf")
    reference = hf.float()  # the same bf16/fp16 values, widened
    idx = torch.randint(0, 203, (2, 17))
    with torch.no_grad():
        want = reference(idx).logits
        assert_rel_close(GPTModel.from_pretrained(tmp_path / "hf")(idx), want, 1e-5, "torch_gpt logits")
    jax_gpt = pytest.importorskip("jax_gpt")
    assert_rel_close(jax_gpt.GPTModel.from_pretrained(tmp_path / "hf")(idx.numpy()), want, 1e-5, "jax_gpt logits")


def test_mis_shaped_hf_checkpoint_lists_problems(tmp_path):
    hf = small_hf_model()
    hf.save_pretrained(tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg["n_layer"] = 3  # the weights hold 2 layers
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="missing tensor h.2.ln_1.weight"):
        GPTModel.from_pretrained(tmp_path / "hf")


def test_sharded_hf_checkpoint_loads(tmp_path):
    hf = small_hf_model()
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="50KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) > 1
    model = GPTModel.from_pretrained(tmp_path / "sharded")
    idx = torch.randint(0, 203, (1, 9))
    with torch.no_grad():
        assert_rel_close(model(idx), hf(idx).logits, 1e-5, "logits from a sharded checkpoint")
