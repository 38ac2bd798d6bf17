"""torch_gpt.train: outputs, exact resume, Ctrl-C, DDP over 2 processes, and errors before any work."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from gpt_core import GPTConfig, WordTokenizer, load_text
from tests.helpers import free_port
from torch_gpt import GPTModel
from torch_gpt.train import main

CFG = GPTConfig(vocab_size=1135, context_length=32, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0,
                qkv_bias=True, tie_embeddings=True)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("train")
    CFG.to_json(d / "config.json")
    vocab = WordTokenizer.from_text(load_text()).save(d / "vocab.json")
    return d, ["--config", str(d / "config.json"), "--tokenizer", f"word:{vocab}", "--seq-len", "16",
               "--batch-size", "4", "--grad-accum", "2", "--steps", "8", "--warmup-steps", "2",
               "--eval-every", "4", "--eval-batches", "2", "--no-progress", "--sample-tokens", "4"]


def losses(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().split("\n")[:-1]]  # whole lines
    return [r["loss"] for r in rows if r["kind"] == "train"], rows


def test_outputs(setup, capsys):
    d, args = setup
    assert main(args + ["--out", str(d / "a")]) == 0
    train, rows = losses(d / "a")
    assert len(train) == 8 and train[-1] < train[0]
    assert set(rows[0]) == {"kind", "step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "data_s", "step_s"}
    assert [r["step"] for r in rows if r["kind"] == "eval"] == [4, 8]
    assert (d / "a" / "loss.png").stat().st_size > 0
    model = GPTModel.from_pretrained(d / "a" / "checkpoint")  # the final checkpoint is a model checkpoint
    assert model.config == CFG
    assert "sample: " in capsys.readouterr().out


def test_resume_is_exact(setup):
    d, args = setup
    main(args + ["--out", str(d / "full")])
    assert main(args + ["--out", str(d / "split"), "--stop-after", "3"]) == 0
    assert len(losses(d / "split")[0]) == 3
    with open(d / "split" / "metrics.jsonl", "a") as f:  # as if the run had gone on past its checkpoint, then died
        f.write(json.dumps({"kind": "train", "step": 4, "loss": 99.0}) + "\n")
    assert main(args + ["--out", str(d / "split"), "--resume"]) == 0
    steps = [r["step"] for r in losses(d / "split")[1] if r["kind"] == "train"]
    assert steps == list(range(1, 9))  # the dead run's step 4 was dropped, not duplicated
    full, split = losses(d / "full")[0], losses(d / "split")[0]
    assert len(split) == 8
    assert max(abs(a - b) / abs(a) for a, b in zip(full, split, strict=True)) <= 1e-6


def test_compile_trains_the_same(setup, monkeypatch):
    import torch

    d, args = setup
    assert main(args + ["--out", str(d / "eager")]) == 0
    compiled_fns = []
    real_compile = torch.compile

    def spy(fn, *a, **k):  # the flag must really compile, not quietly run eagerly
        compiled_fns.append(real_compile(fn, *a, **k))
        return compiled_fns[-1]

    monkeypatch.setattr(torch, "compile", spy)
    assert main(args + ["--out", str(d / "compiled"), "--compile"]) == 0
    assert len(compiled_fns) == 1
    eager, compiled = losses(d / "eager")[0], losses(d / "compiled")[0]
    assert len(compiled) == 8
    assert max(abs(a - b) / abs(a) for a, b in zip(eager, compiled, strict=True)) <= 1e-5


def test_ctrl_c_writes_a_checkpoint(setup):
    d, args = setup
    out = d / "interrupted"
    args = [a if a != "8" else "100000" for a in args]  # a run far too long to finish
    proc = subprocess.Popen([sys.executable, "-m", "torch_gpt.train", *args, "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not ((out / "metrics.jsonl").exists() and len(losses(out)[0]) >= 2):
        assert time.time() < deadline and proc.poll() is None, "the run ended or stalled before step 2"
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    state = json.loads((out / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == len(losses(out)[0]) >= 2 and "continue with --resume" in stdout


@pytest.mark.slow
def test_ddp_two_processes_equal_one(setup):
    d, args = setup
    main(args + ["--out", str(d / "single")])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           "-m", "torch_gpt.train", *args, "--out", str(d / "ddp")]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, f"stdout:\n{run.stdout[-2000:]}\nstderr:\n{run.stderr[-3000:]}"
    single, ddp = losses(d / "single")[0], losses(d / "ddp")[0]
    assert len(ddp) == 8
    assert max(abs(a - b) / abs(a) for a, b in zip(single, ddp, strict=True)) <= 1e-5


@pytest.mark.slow
def test_fsdp_two_processes_equal_one_and_resume_across(setup):
    """FSDP2 over 2 gloo processes: every step's loss as one process's; a sharded run's checkpoint continues in
    one process and one process's in a sharded run (checkpoints are gathered into the one format)."""
    d, args = setup
    if not (d / "single").exists():
        main(args + ["--out", str(d / "single")])
    single = losses(d / "single")[0]
    main(args + ["--out", str(d / "one_then_fsdp"), "--stop-after", "3"])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def torchrun(*extra):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
               str(free_port()), "-m", "torch_gpt.train", *args, "--fsdp", *extra]
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
        assert run.returncode == 0, f"stdout:\n{run.stdout[-2000:]}\nstderr:\n{run.stderr[-3000:]}"
        return run.stdout

    assert "2 x cpu (FSDP2)" in torchrun("--out", str(d / "fsdp_then_one"), "--stop-after", "5")
    assert main(args + ["--out", str(d / "fsdp_then_one"), "--resume"]) == 0
    torchrun("--out", str(d / "one_then_fsdp"), "--resume")
    for out in ("fsdp_then_one", "one_then_fsdp"):
        got = losses(d / out)[0]
        assert len(got) == 8
        assert max(abs(a - b) / abs(a) for a, b in zip(single, got, strict=True)) <= 1e-5, out


@pytest.mark.parametrize("extra, match", [
    (["--data", "/nonexistent.txt"], "does not exist"),
    (["--batch-size", "1000"], "larger than the"),
    (["--seq-len", "64"], "exceeds the model's context_length"),
    (["--batch-size", "5"], "not divisible by --grad-accum"),
    (["--tokenizer", "gpt2"], "vocab_size 1135 is smaller"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--fsdp"], "--fsdp shards over the processes of a torchrun job"),
])
def test_errors_before_any_work(setup, tmp_path, capsys, extra, match):
    _, args = setup
    assert main(args + ["--out", str(tmp_path / "o")] + extra) == 2
    assert match in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_short_text_and_mismatched_resume(setup, tmp_path, capsys):
    d, args = setup
    (tmp_path / "short.txt").write_text("I had always thought Jack Gisburn rather a cheap genius")
    assert main(args + ["--data", str(tmp_path / "short.txt"), "--out", str(tmp_path / "o")]) == 2
    assert "too short" in capsys.readouterr().err
    other = GPTConfig(**{**CFG.to_dict(), "n_layers": 3})
    other.to_json(tmp_path / "other.json")
    main(args + ["--out", str(tmp_path / "r"), "--stop-after", "1"])
    config_at = args.index("--config") + 1
    bad = args[:config_at] + [str(tmp_path / "other.json")] + args[config_at + 1:]
    assert main(bad + ["--out", str(tmp_path / "r"), "--resume"]) == 2
    assert "n_layers" in capsys.readouterr().err
    assert main(args + ["--out", str(tmp_path / "nothing"), "--resume"]) == 2


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_reduced_precision_runs_close_to_float32(setup, dtype):
    """Autocast (and, for float16, the gradient scaler) change the numbers a little, not the run."""
    d, args = setup
    args = [a if a != "8" else "3" for a in args]  # 3 steps
    if not (d / "f32_3").exists():
        assert main(args + ["--out", str(d / "f32_3")]) == 0
    assert main(args + ["--out", str(d / dtype), "--dtype", dtype]) == 0
    ref, got = losses(d / "f32_3")[0], losses(d / dtype)[0]
    assert len(got) == 3 and all(x == x for x in got)
    assert got != ref  # reduced precision really ran
    assert max(abs(a - b) / a for a, b in zip(ref, got, strict=True)) < 1e-2
