"""jax_gpt.train: the same numbers as torch_gpt.train, exact resume, sharding over 4 CPU devices, 2 processes."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from gpt_core import GPTConfig, WordTokenizer, load_text
from jax_gpt.train import main as jax_main
from tests.helpers import free_port
from torch_gpt import GPTModel
from torch_gpt.train import main as torch_main

CFG = GPTConfig(vocab_size=1135, context_length=32, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0,
                qkv_bias=True, tie_embeddings=True)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("jaxtrain")
    vocab = WordTokenizer.from_text(load_text()).save(d / "vocab.json")
    torch.manual_seed(0)
    GPTModel(CFG).save_pretrained(d / "init")
    return d, ["--init-from", str(d / "init"), "--tokenizer", f"word:{vocab}", "--seq-len", "16",
               "--batch-size", "8", "--grad-accum", "2", "--warmup-steps", "3", "--eval-every", "0",
               "--no-progress", "--sample-tokens", "4"]


def losses(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["kind"] == "train"], [r["grad_norm"] for r in rows if r["kind"] == "train"]


def max_rel(a, b):
    assert len(a) == len(b)
    return max(abs(x - y) / abs(x) for x, y in zip(a, b, strict=True))


def test_torch_and_jax_trainers_agree_for_20_steps(setup):
    d, args = setup
    args = args + ["--steps", "20", "--grad-clip", "0.5", "--weight-decay", "0.1"]
    assert torch_main(args + ["--out", str(d / "torch")]) == 0
    assert jax_main(args + ["--out", str(d / "jax")]) == 0
    (tl, tn), (jl, jn) = losses(d / "torch"), losses(d / "jax")
    assert len(tl) == 20
    assert max_rel(tl, jl) <= 1e-4
    assert max_rel(tn, jn) <= 1e-4  # gradient norms too, so clipping acted alike
    assert tl[-1] < tl[0]


def test_jax_resume_is_exact(setup):
    d, args = setup
    args = args + ["--steps", "6"]
    jax_main(args + ["--out", str(d / "full")])
    assert jax_main(args + ["--out", str(d / "split"), "--stop-after", "2"]) == 0
    assert jax_main(args + ["--out", str(d / "split"), "--resume"]) == 0
    assert max_rel(losses(d / "full")[0], losses(d / "split")[0]) <= 1e-6


def test_scan_layers_and_remat_train_the_same_and_resume_unrolled(setup):
    """A scanned, rematerialised run stopped at step 2 and resumed unrolled: the losses of the plain run (the
    checkpoint is per layer whichever way the model ran)."""
    d, args = setup
    args = args + ["--steps", "6"]
    if not (d / "full").exists():
        jax_main(args + ["--out", str(d / "full")])
    assert jax_main(args + ["--out", str(d / "scanned"), "--scan-layers", "--remat", "dots", "--stop-after", "2"]) == 0
    assert jax_main(args + ["--out", str(d / "scanned"), "--resume", "--no-scan-layers"]) == 0
    assert max_rel(losses(d / "full")[0], losses(d / "scanned")[0]) <= 1e-5


def test_jax_resumes_a_torch_checkpoint_format(setup):
    """Training checkpoints are one format: the JAX trainer continues a torch run's step-3 checkpoint."""
    d, args = setup
    args = args + ["--steps", "6"]
    torch_main(args + ["--out", str(d / "t_full")])
    torch_main(args + ["--out", str(d / "mixed"), "--stop-after", "3"])
    assert jax_main(args + ["--out", str(d / "mixed"), "--resume"]) == 0
    assert max_rel(losses(d / "t_full")[0], losses(d / "mixed")[0]) <= 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("fsdp, scan", [(False, False), (True, False), (True, True)],
                         ids=["data-parallel", "fsdp", "fsdp-scanned"])
def test_four_devices_equal_one(setup, fsdp, scan):
    """Sharded (a scanned model's stacked arrays along their first axis after the layer axis) equals one device."""
    d, args = setup
    args = args + ["--steps", "5"]
    tag = ("fsdp" if fsdp else "dp") + ("_scan" if scan else "")
    if not (d / "one").exists():
        assert jax_main(args + ["--out", str(d / "one")]) == 0
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    cmd = [sys.executable, "-m", "jax_gpt.train", *args, "--out", str(d / f"four_{tag}")] + (["--fsdp"] if fsdp else [])
    cmd += ["--scan-layers"] if scan else ["--no-scan-layers"]  # "one" ran scanned, the default
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "on 4 x cpu" in run.stdout
    if fsdp:
        assert "FSDP: 0 of" not in run.stdout and "tensors sharded" in run.stdout
    assert max_rel(losses(d / "one")[0], losses(d / f"four_{tag}")[0]) <= 1e-5


def launch_two_processes(args, out) -> list[subprocess.Popen]:
    """A multi-host job on one machine: 2 processes of 2 CPU devices each, joined by jax.distributed."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    port = free_port()
    return [subprocess.Popen([sys.executable, "-m", "jax_gpt.train", *args, "--out", str(out),
                              "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for i in range(2)]


def finish(procs, expect: int = 0) -> str:
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == expect, err[-3000:]
    return outs[0][0]


@pytest.mark.slow
def test_two_processes_equal_one(setup):
    """Multi-host over jax.distributed: FSDP over 2 × 2 devices, stopped, resumed, equals one device."""
    d, args = setup
    args = args + ["--steps", "5", "--fsdp"]
    assert jax_main(args + ["--out", str(d / "mh_one")]) == 0
    stdout = finish(launch_two_processes(args + ["--stop-after", "2"], d / "mh_two"))
    assert "on 4 x cpu" in stdout and "tensors sharded" in stdout
    finish(launch_two_processes(args + ["--resume"], d / "mh_two"))
    assert max_rel(losses(d / "mh_one")[0], losses(d / "mh_two")[0]) <= 1e-5


@pytest.mark.slow
def test_ctrl_c_on_one_process_stops_both_at_one_step(setup):
    import signal
    import time

    d, args = setup
    out = d / "mh_interrupted"
    procs = launch_two_processes(args + ["--steps", "100000"], out)
    deadline = time.time() + 180
    while not ((out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text().count("\n") >= 2):
        assert time.time() < deadline and all(p.poll() is None for p in procs), "the job ended or stalled"
        time.sleep(0.2)
    procs[1].send_signal(signal.SIGINT)  # only the second process is told: the first must stop with it
    stdout = finish(procs, expect=130)
    state = json.loads((out / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == len(losses(out)[0]) >= 2 and "continue with --resume" in stdout


@pytest.mark.parametrize("extra, match", [
    (["--dtype", "float16"], "float16 needs loss scaling"),
    (["--devices", "9"], "--devices 9"),
    (["--coordinator", "127.0.0.1:1234"], "go together"),
    (["--coordinator", "127.0.0.1:1234", "--num-processes", "2", "--process-id", "2"], "outside 0..1"),
    (["--coordinator", "127.0.0.1:1234", "--num-processes", "0", "--process-id", "0"], "--num-processes must be"),
    (["--batch-size", "6", "--grad-accum", "4"], "not divisible"),
])
def test_errors_before_any_work(setup, tmp_path, capsys, extra, match):
    _, args = setup
    assert jax_main(args + ["--out", str(tmp_path / "o")] + extra) == 2
    assert match in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_bfloat16_compute_runs_close_to_float32(setup):
    d, args = setup
    args = args + ["--steps", "3"]
    assert jax_main(args + ["--out", str(d / "j_f32")]) == 0
    assert jax_main(args + ["--out", str(d / "j_bf16"), "--dtype", "bfloat16"]) == 0
    ref, got = losses(d / "j_f32")[0], losses(d / "j_bf16")[0]
    assert got != ref and max_rel(ref, got) < 1e-2


def test_ctrl_c_writes_an_exact_checkpoint(setup):
    import signal
    import time

    d, args = setup
    out = d / "j_interrupted"
    proc = subprocess.Popen([sys.executable, "-m", "jax_gpt.train", *args, "--steps", "100000", "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    while not ((out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text().count("\n") >= 2):
        assert time.time() < deadline and proc.poll() is None, "the run ended or stalled before step 2"
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-2000:]
    state = json.loads((out / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == len(losses(out)[0]) >= 2 and "continue with --resume" in stdout


def test_weight_decay_spares_biases_and_norms_when_scanned():
    """AdamW decays the same arrays whichever way the blocks run: a scanned model's biases and LayerNorm scales
    are 2-D (a layer axis first) and must not decay. With zero gradients the update is the decay term alone."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from gpt_core.training import OptimizerConfig
    from jax_gpt import GPTModel, convert
    from jax_gpt.train import make_optimizer

    def decayed(scan):
        params = nnx.state(GPTModel(CFG, rngs=nnx.Rngs(0), scan_layers=scan), nnx.Param)
        tx = make_optimizer(OptimizerConfig(weight_decay=0.5, grad_clip=0.0))
        updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
        return {name for name, u in convert.to_canonical(updates).items() if np.any(u != 0)}

    unrolled = decayed(False)
    assert unrolled and not any(".ln_" in n or n.endswith(".bias") or n.startswith("ln_f") for n in unrolled)
    assert decayed(True) == unrolled
