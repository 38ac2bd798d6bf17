"""Both trainers as users run them: dropout on (a GPT-2 preset's settings at a small width), and a token-shard
dataset prepared by `python -m gpt_core.data prepare` or written by llm.c, read lazily."""

import json

import numpy as np
import pytest
import torch

from gpt_core import GPTConfig, WordTokenizer, load_text
from gpt_core.batches import DataConfig, open_training_data
from gpt_core.data import SAMPLE_CORPUS
from gpt_core.prepare import main as data_main
from gpt_core.shards import write_shard
from jax_gpt.train import main as jax_main
from torch_gpt.train import main as torch_main

MAINS = {"torch": torch_main, "jax": jax_main}
# The gpt2 preset (dropout 0.1, tied head, qkv bias, tanh GELU) at a width the tests can afford.
GPT2_SMALL = GPTConfig(**{**GPTConfig.from_preset("gpt2").to_dict(), "vocab_size": 1135, "context_length": 32,
                          "emb_dim": 32, "n_heads": 4, "n_layers": 2})


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("users")
    assert GPT2_SMALL.drop_rate == 0.1
    GPT2_SMALL.to_json(d / "config.json")
    GPTConfig(**{**GPT2_SMALL.to_dict(), "drop_rate": 0.0}).to_json(d / "no_dropout.json")
    vocab = WordTokenizer.from_text(load_text()).save(d / "vocab.json")
    return d, ["--config", str(d / "config.json"), "--tokenizer", f"word:{vocab}", "--seq-len", "16",
               "--batch-size", "4", "--grad-accum", "2", "--steps", "8", "--warmup-steps", "2", "--lr", "1e-3",
               "--eval-every", "0", "--eval-batches", "2", "--no-progress", "--sample-tokens", "4"]


def rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().split("\n")[:-1]]


def losses(out):
    return [r["loss"] for r in rows(out) if r["kind"] == "train"]


def max_rel(a, b):
    assert len(a) == len(b) > 0
    return max(abs(x - y) / abs(x) for x, y in zip(a, b, strict=True))


def loss_of_checkpoint(side: str, checkpoint, batches) -> float:
    """The mean validation loss of a saved model, in eval mode: what the trainer's evaluation must log."""
    if side == "torch":
        from torch_gpt import GPTModel, cross_entropy_loss

        model = GPTModel.from_pretrained(checkpoint)
        with torch.no_grad():
            return float(np.mean([float(cross_entropy_loss(model(torch.from_numpy(x)), torch.from_numpy(y)))
                                  for x, y in batches]))
    import jax_gpt
    from jax_gpt.model import cross_entropy_loss

    model = jax_gpt.GPTModel.from_pretrained(checkpoint)
    return float(np.mean([float(cross_entropy_loss(model(x), y)) for x, y in batches]))


@pytest.mark.parametrize("side", ["torch", "jax"])
def test_dropout_on_trains_evaluates_without_it_and_resumes_exactly(setup, side):
    d, args = setup
    main = MAINS[side]
    out = d / f"{side}_full"
    assert main(args + ["--out", str(out)]) == 0
    full = losses(out)
    assert len(full) == 8 and all(np.isfinite(full)) and full[-1] < full[0]
    # Dropout really ran: the same run without it gives other losses.
    config_at = args.index("--config") + 1
    no_drop = args[:config_at] + [str(d / "no_dropout.json")] + args[config_at + 1:]
    assert main(no_drop + ["--out", str(d / f"{side}_nodrop")]) == 0
    assert max_rel(full, losses(d / f"{side}_nodrop")) > 1e-3
    # Evaluation runs without dropout: its logged loss is the saved model's loss in eval mode.
    data = open_training_data(DataConfig(tokenizer=args[args.index("--tokenizer") + 1], seq_len=16), GPT2_SMALL)
    val = data.validation_batches(2, 2)
    logged = [r["val_loss"] for r in rows(out) if r["kind"] == "eval"]
    assert len(logged) == 1
    assert abs(logged[0] - loss_of_checkpoint(side, out / "checkpoint", val)) <= 1e-5 * logged[0]
    # Stopped and resumed with dropout on: the dropout RNG state travels in the checkpoint, so exactly the same.
    split = d / f"{side}_split"
    assert main(args + ["--out", str(split), "--stop-after", "3"]) == 0
    assert main(args + ["--out", str(split), "--resume"]) == 0
    assert max_rel(full, losses(split)) <= 1e-6


@pytest.mark.parametrize("side, remat", [("torch", "block"), ("torch", "dots"), ("jax", "block")])
def test_remat_trains_the_same_with_dropout_on(setup, side, remat):
    """Rematerialised blocks redraw the dropout masks they drew in the forward: the run is the same run."""
    d, args = setup
    full = d / f"{side}_full"
    if not full.exists():
        assert MAINS[side](args + ["--out", str(full)]) == 0
    assert MAINS[side](args + ["--out", str(d / f"{side}_{remat}"), "--remat", remat]) == 0
    assert max_rel(losses(full), losses(d / f"{side}_{remat}")) <= 1e-6


@pytest.fixture(scope="module")
def prepared(setup):
    """The sample corpus through `python -m gpt_core.data prepare`, in shards small enough that windows
    cross shard boundaries."""
    d, args = setup
    vocab = args[args.index("--tokenizer") + 1]
    out = d / "verdict"
    assert data_main(["prepare", str(SAMPLE_CORPUS), "--out", str(out), "--tokenizer", vocab, "--workers", "1",
                      "--shard-tokens", "1000", "--val-tokens", "400", "--no-progress"]) == 0
    return out


def test_trainers_agree_on_a_prepared_dataset(setup, prepared):
    from torch_gpt import GPTModel

    d, args = setup
    torch.manual_seed(0)  # one initial model for both sides (their random inits differ)
    GPTModel(GPTConfig(**{**GPT2_SMALL.to_dict(), "drop_rate": 0.0})).save_pretrained(d / "init")
    config_at = args.index("--config")
    args = args[:config_at] + args[config_at + 2:] + ["--init-from", str(d / "init"), "--data", str(prepared),
                                                     "--eval-every", "4"]
    assert torch_main(args + ["--out", str(d / "shards_torch")]) == 0
    assert jax_main(args + ["--out", str(d / "shards_jax")]) == 0
    t, j = losses(d / "shards_torch"), losses(d / "shards_jax")
    assert len(t) == 8 and max_rel(t, j) <= 1e-4
    evals = [r["val_loss"] for r in rows(d / "shards_torch") if r["kind"] == "eval"]
    assert len(evals) == 2 and all(np.isfinite(evals))  # from the validation shard
    assert all(r["data_s"] >= 0 and r["step_s"] >= r["data_s"] for r in rows(d / "shards_torch")
               if r["kind"] == "train")


def test_shard_batches_are_fixed_by_seed_and_step_and_rows(setup, prepared):
    d, args = setup
    vocab = args[args.index("--tokenizer") + 1]
    data = open_training_data(DataConfig(path=str(prepared), tokenizer=vocab, seq_len=16), GPT2_SMALL, seed=5)
    assert len(data.train.paths) >= 4  # several shards: windows cross their boundaries
    x, y = data.batch(7, 8)
    x2, y2 = data.batch(7, 8)
    assert x.shape == y.shape == (8, 16) and (x == x2).all() and (y == y2).all()
    assert (x[:, 1:] == y[:, :-1]).all()  # targets are the inputs shifted by one
    rows_ = np.array([1, 6])
    xr, yr = data.batch(7, 8, rows_)
    assert (xr == x[rows_]).all() and (yr == y[rows_]).all()  # a rank reads only its rows, the same ones
    assert not (data.batch(8, 8)[0] == x).all()
    # A window is the tokens of the stream at its start: check one against the whole stream read directly.
    stream = np.concatenate([np.asarray(data.train.read(0, len(data.train)))])
    start = int(data.starts(7, 8)[3])
    assert (x[3] == stream[start:start + 16]).all()


def test_resume_is_exact_on_shards(setup, prepared):
    d, args = setup
    args = args + ["--data", str(prepared)]
    assert torch_main(args + ["--out", str(d / "sh_full")]) == 0
    assert torch_main(args + ["--out", str(d / "sh_split"), "--stop-after", "5"]) == 0
    assert torch_main(args + ["--out", str(d / "sh_split"), "--resume"]) == 0
    assert max_rel(losses(d / "sh_full"), losses(d / "sh_split")) <= 1e-6


def test_llmc_shards_load_as_they_are(tmp_path, capsys):
    """A folder as llm.c / modded-nanogpt write it (no manifest; *_train_* and *_val_* side by side)."""
    rng = np.random.default_rng(0)
    write_shard(tmp_path / "fineweb_val_000000.bin", rng.integers(0, 50257, 3000), vocab_size=50257)
    write_shard(tmp_path / "fineweb_train_000001.bin", rng.integers(0, 50257, 5000), vocab_size=50257)
    write_shard(tmp_path / "fineweb_train_000002.bin", rng.integers(0, 50257, 5000), vocab_size=50257)
    cfg = GPTConfig(vocab_size=50257, context_length=32, emb_dim=16, n_heads=2, n_layers=1, drop_rate=0.0)
    cfg.to_json(tmp_path / "cfg.json")
    common = ["--config", str(tmp_path / "cfg.json"), "--data", str(tmp_path), "--tokenizer", "gpt2",
              "--batch-size", "2", "--steps", "2", "--eval-batches", "1", "--no-progress", "--sample-tokens", "2"]
    assert torch_main(common + ["--out", str(tmp_path / "run")]) == 0
    assert "10,000 training tokens in 2 shard(s)" in capsys.readouterr().out
    # A shard holding ids the model cannot embed (another tokenizer's): the error names the file and offset.
    bad = tmp_path / "bad"
    bad.mkdir()
    ids = rng.integers(0, 50257, 4000)
    ids[::20] = 60000  # in every window
    write_shard(bad / "x_train_000001.bin", ids, vocab_size=65536)
    common[common.index("--data") + 1] = str(bad)
    assert torch_main(common + ["--out", str(tmp_path / "bad_run")]) == 2
    err = capsys.readouterr().err
    assert "x_train_000001.bin" in err and "60000" in err and ">= the model's vocab_size 50257" in err
    assert not (tmp_path / "bad_run").exists()  # found before anything was written


def test_a_sample_with_ids_past_the_tokenizer_is_shown_not_fatal():
    """A model vocabulary padded past the tokenizer's (GPT-2's 50,304) can sample ids the tokenizer lacks."""
    from gpt_core.tokenizer import get_tokenizer
    from gpt_core.training import decode_sample

    tok = get_tokenizer("gpt2")
    ids = tok.encode("Every effort") + [50300] + tok.encode(" moves you")
    assert decode_sample(tok, ids) == "Every effort<|id 50300|> moves you"
