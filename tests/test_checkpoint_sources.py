"""Where checkpoints come from: a Hugging Face Hub repository id resolved through the Hub's cache (laid out here as
huggingface_hub lays it out, and read offline), and damaged files, which every entry point (both models, both
generate CLIs, both trainers) refuses with one line naming the file and the fault."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import jax_gpt
import torch_gpt
from gpt_core import WordTokenizer, load_text
from gpt_core.checkpoint import CheckpointError, resolve_checkpoint
from jax_gpt.generate.__main__ import main as jax_generate
from jax_gpt.train import main as jax_train
from tests.helpers import assert_rel_close, small_hf_model
from torch_gpt.generate.__main__ import main as torch_generate
from torch_gpt.train import main as torch_train

hub_constants = pytest.importorskip("huggingface_hub.constants")

REPO, REVISION = "test-org/tiny-gpt2", "0123456789abcdef0123456789abcdef01234567"
UNREACHABLE = "http://127.0.0.1:9"  # the discard port: refused at once, never answered


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory):
    """A Hub cache holding one tiny random GPT-2 (written by transformers) at REVISION, `main` pointing to it;
    its vocabulary is GPT-2's, so the CLIs' default tokenizer fits."""
    cache = tmp_path_factory.mktemp("hub")
    repo = cache / f"models--{REPO.replace('/', '--')}"
    hf = small_hf_model(vocab=50257, ctx=32)
    hf.save_pretrained(repo / "snapshots" / REVISION)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    return cache, hf


@pytest.fixture
def offline(hub_cache, monkeypatch):
    """This process's huggingface_hub as HF_HUB_OFFLINE=1 HF_HUB_CACHE=<the cache> would have set it up (it reads
    them once, at import; the subprocess tests below set the real variables)."""
    cache, hf = hub_cache
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    return hf


def test_models_load_by_hub_name_from_the_cache(offline):
    ids = np.random.default_rng(0).integers(0, 50257, (2, 20))
    with torch.no_grad():
        expected = offline(torch.from_numpy(ids)).logits
        assert_rel_close(torch_gpt.GPTModel.from_pretrained(REPO)(torch.from_numpy(ids)), expected, 1e-5, "torch")
    assert_rel_close(jax_gpt.GPTModel.from_pretrained(REPO)(ids), expected, 1e-5, "jax")
    assert_rel_close(jax_gpt.GPTModel.from_pretrained(REPO, scan_layers=True)(ids), expected, 1e-5, "jax scanned")


def test_a_cached_name_loads_with_the_hub_out_of_reach(hub_cache, monkeypatch):
    cache, _ = hub_cache
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub_constants, "ENDPOINT", UNREACHABLE)
    assert resolve_checkpoint(REPO) == cache / f"models--{REPO.replace('/', '--')}" / "snapshots" / REVISION
    with pytest.raises(FileNotFoundError) as e:
        resolve_checkpoint("test-org/not-cached")
    msg = str(e.value)
    assert "test-org/not-cached is not a checkpoint directory" in msg and str(cache) in msg
    assert f"the Hub ({UNREACHABLE}) cannot be reached" in msg


def test_a_name_neither_a_directory_nor_cached_says_both(offline, hub_cache, tmp_path, capsys):
    with pytest.raises(FileNotFoundError) as e:
        torch_gpt.GPTModel.from_pretrained("gpt2-not-cached")
    msg = str(e.value)
    assert msg.startswith("gpt2-not-cached is not a checkpoint directory, and the Hugging Face Hub cache")
    assert str(hub_cache[0]) in msg and "holds no snapshot of 'gpt2-not-cached'" in msg and "HF_HUB_OFFLINE" in msg
    with pytest.raises(FileNotFoundError, match=r"does not exist \(nor is it a Hugging Face Hub repository id\)"):
        jax_gpt.GPTModel.from_pretrained(tmp_path / "no" / "such" / "dir")
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileNotFoundError, match="is a file, not a checkpoint directory"):
        resolve_checkpoint(tmp_path / "file")
    assert jax_generate(["--init-from", "gpt2-not-cached", "--prompt", "Hi"]) == 2
    assert "gpt2-not-cached is not a checkpoint directory" in capsys.readouterr().err


def test_trainer_starts_from_a_hub_name(offline, tmp_path, capsys):
    common = ["--init-from", REPO, "--tokenizer", "gpt2", "--seq-len", "16", "--batch-size", "2",
              "--steps", "1", "--eval-batches", "1", "--no-progress", "--sample-tokens", "2"]
    assert torch_train(common + ["--out", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert f"{offline.num_parameters():,} parameters" in out
    assert torch_gpt.GPTModel.from_pretrained(tmp_path / "run" / "checkpoint").config.vocab_size == 50257


def test_generate_cli_by_hub_name_honours_the_environment(hub_cache):
    cache, _ = hub_cache
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    cmd = [sys.executable, "-m", "torch_gpt.generate", "--init-from", REPO, "--prompt", "Hello",
           "--max-new-tokens", "3"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    assert run.returncode == 0 and run.stdout.startswith("Hello"), run.stderr[-2000:]
    cmd[4] = "test-org/elsewhere"
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr.startswith("error: test-org/elsewhere is not a checkpoint directory, and the Hugging Face Hub "
                                 f"cache ({cache}) holds no snapshot of 'test-org/elsewhere', while HF_HUB_OFFLINE")


# ------------------------------------------------------------------------------------------- damaged files
@pytest.fixture
def damaged(hub_cache, tmp_path):
    """A copy of the cached checkpoint with its model.safetensors cut in half, as a crashed copy leaves it."""
    _, hf = hub_cache
    hf.save_pretrained(tmp_path / "cut")
    weights = tmp_path / "cut" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    return tmp_path / "cut"


def test_truncated_safetensors_is_named_in_every_entry_point(damaged, tmp_path, capsys):
    fault = f"{damaged / 'model.safetensors'} is damaged: Error while deserializing header: incomplete metadata"
    for load in (torch_gpt.GPTModel.from_pretrained, jax_gpt.GPTModel.from_pretrained):
        with pytest.raises(CheckpointError) as e:
            load(damaged)
        assert str(e.value).startswith(fault)
    vocab = WordTokenizer.from_text(load_text()).save(tmp_path / "vocab.json")
    for main in (torch_generate, jax_generate):
        assert main(["--checkpoint", str(damaged), "--prompt", "Hi"]) == 2
        assert capsys.readouterr().err.startswith(f"error: {fault}")
    for main in (torch_train, jax_train):
        assert main(["--init-from", str(damaged), "--tokenizer", f"word:{vocab}", "--steps", "1",
                     "--out", str(tmp_path / "o"), "--no-progress"]) == 2
        assert capsys.readouterr().err.startswith(f"error: {fault}")
        assert not (tmp_path / "o").exists()


def test_damaged_cli_prints_one_line_not_a_traceback(damaged):
    run = subprocess.run([sys.executable, "-m", "jax_gpt.generate", "--checkpoint", str(damaged), "--prompt", "Hi"],
                         capture_output=True, text=True, timeout=180)
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and "Traceback" not in run.stderr, run.stderr


def test_pickled_code_and_broken_archives_in_a_bin_are_refused(hub_cache, tmp_path, capsys):
    _, hf = hub_cache
    config = hf.config.to_dict()

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    cases = {"evil": {"wte.weight": Evil()}, "cut": None, "notensors": {"wte.weight": [1, 2]}}
    for name, content in cases.items():
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text(json.dumps(config))
        if content is None:
            torch.save(hf.state_dict(), d / "pytorch_model.bin")
            (d / "pytorch_model.bin").write_bytes((d / "pytorch_model.bin").read_bytes()[:1000])
        else:
            torch.save(content, d / "pytorch_model.bin")
    assert torch_generate(["--checkpoint", str(tmp_path / "evil"), "--prompt", "Hi"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path / 'evil' / 'pytorch_model.bin'} holds pickled code or objects besides "
                          "tensors, which are never run (") and "GLOBAL posix.system" in err and err.count("\n") == 1
    with pytest.raises(CheckpointError, match=r"cut/pytorch_model.bin is not a readable PyTorch checkpoint \("):
        torch_gpt.GPTModel.from_pretrained(tmp_path / "cut")
    with pytest.raises(CheckpointError, match="pytorch_model.bin does not hold a dict of tensors"):
        torch_gpt.GPTModel.from_pretrained(tmp_path / "notensors")


def test_broken_config_and_index_name_their_file(hub_cache, tmp_path):
    _, hf = hub_cache
    hf.save_pretrained(tmp_path / "cfg")
    (tmp_path / "cfg" / "config.json").write_bytes(b"\xff\xfe not json")
    with pytest.raises(CheckpointError, match=f"{tmp_path / 'cfg' / 'config.json'}"):
        jax_gpt.GPTModel.from_pretrained(tmp_path / "cfg")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="2MB")
    index = tmp_path / "sharded" / "model.safetensors.index.json"
    shard = sorted((tmp_path / "sharded").glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"{index} lists shards that are not there: \\['{shard.name}'\\]"):
        torch_gpt.GPTModel.from_pretrained(tmp_path / "sharded")
    index.write_text("{")
    with pytest.raises(CheckpointError, match="is not a readable safetensors index"):
        jax_gpt.GPTModel.from_pretrained(tmp_path / "sharded")
