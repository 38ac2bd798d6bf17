"""The bench CLI: parity passes and fails when it must, speed rows carry every field, --help, bad flags."""

import json
import subprocess
import sys

import pytest

from bench.__main__ import main
from gpt_core import GPTConfig

SMALL = GPTConfig(vocab_size=211, context_length=32, emb_dim=32, n_heads=4, n_layers=2, qkv_bias=True,
                  tie_embeddings=True)


@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "config.json"
    SMALL.to_json(path)
    return str(path)


def test_parity_passes(config_file, tmp_path, capsys):
    out = tmp_path / "parity.json"
    assert main(["--json", str(out), "parity", "--config", config_file, "--seq-len", "16", "--train-steps", "3",
                 "--gen-tokens", "8"]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {r["name"] for r in rows} >= {"logits", "loss", "train losses (3 steps)", "greedy generation (8 tokens)"}
    assert all(r["status"] == "PASS" for r in rows)
    assert "== parity ==" in capsys.readouterr().out


def test_parity_fails_on_a_perturbed_weight(config_file, capsys):
    code = main(["parity", "--config", config_file, "--seq-len", "16", "--train-steps", "0", "--gen-tokens", "0",
                 "--perturb", "h.1.mlp.c_fc.weight"])
    captured = capsys.readouterr()
    assert code == 1
    assert "FAIL" in captured.out and "gradients" in captured.err


def test_speed_json_has_every_field(config_file, tmp_path):
    out, csv = tmp_path / "speed.json", tmp_path / "speed.csv"
    assert main(["speed", "--config", config_file, "--batch", "2", "--seq-len", "16", "--repeats", "3",
                 "--decode-tokens", "16", "--impl", "torch/sdpa", "--impl", "jax/xla", "--json", str(out),
                 "--csv", str(csv), "--plot", str(tmp_path / "speed.png")]) == 0
    doc = json.loads(out.read_text())
    rows = doc["rows"]
    assert {(r["impl"], r["name"]) for r in rows} == {
        (i, p) for i in ("torch/sdpa", "jax/xla")
        for p in ("forward", "forward+backward", "train step", "prefill", "decode")}
    for r in rows:
        for key in ("ms", "spread", "tokens_per_s", "tflops", "mfu", "compile_s", "peak_mem_mb", "dtype", "shape",
                    "commit", "torch", "jax", "torch_device", "python"):
            assert key in r, f"{key} missing from {r['impl']} {r['name']}"
        if r["name"] == "decode" and "NOT MEASURED" in r["note"]:  # a difference of timings lost in noise
            assert r["ms"] != r["ms"]  # NaN, never a negative time
            continue
        assert r["ms"] > 0 and r["tokens_per_s"] > 0 and 0 < r["mfu"]
    assert all(r["compile_s"] is not None for r in rows if r["impl"] == "jax/xla" and r["name"] != "decode")
    assert csv.read_text().count("\n") == len(rows) + 1
    assert (tmp_path / "speed.png").stat().st_size > 0


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "bench", *args], capture_output=True, text=True, timeout=120)


def test_help_and_bad_flags():
    out = run_cli("--help")
    assert out.returncode == 0 and "parity" in out.stdout and "compile" in out.stdout
    out = run_cli("speed", "--help")
    assert out.returncode == 0 and "--repeats" in out.stdout
    out = run_cli("speed", "--no-such-flag")
    assert out.returncode == 2 and "unrecognized arguments: --no-such-flag" in out.stderr
    out = run_cli("parity", "--preset", "gpt5")
    assert out.returncode == 2 and "unknown preset 'gpt5'" in out.stderr
    out = run_cli("speed", "--preset", "tiny", "--impl", "torch/flash9")
    assert out.returncode == 2 and "cannot run here" in out.stderr
    out = run_cli("parity", "--preset", "tiny", "--seq-len", "0")
    assert out.returncode == 2 and "--seq-len must be >= 1" in out.stderr


def test_compile_report_for_one_kernel(tmp_path):
    out = tmp_path / "compile.json"
    assert main(["compile", "--kernel", "ln_fwd", "--arch", "80", "--quick", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert rows and {r["name"] for r in rows} == {"ln_fwd"} and {r["impl"] for r in rows} == {"sm_80"}
    assert all(r["status"] == "PASS" and r["spill_bytes"] == 0 and r["registers"] > 0 for r in rows)
    assert main(["compile", "--kernel", "no_such_kernel", "--arch", "80", "--quick"]) == 2


@pytest.mark.slow
def test_depth_and_memory_studies(config_file, tmp_path):
    out = tmp_path / "depth.json"
    assert main(["speed", "--config", config_file, "--batch", "1", "--seq-len", "16", "--repeats", "1",
                 "--study", "depth", "--layers", "2", "--layers", "3", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["impl"], r["shape"]) for r in rows] == [(f"jax/xla {layout}", f"L={n} B=1 T=16") for n in (2, 3)
                                                       for layout in ("unrolled", "scanned")]
    assert all(r["compile_s"] > 0 and r["ms"] > 0 and r["hlo_lines"] > 0 for r in rows)
    assert [r["compile_vs_min"] for r in rows[:2]] == [1.0, 1.0]
    scanned = [r["hlo_lines"] for r in rows if "scanned" in r["impl"]]
    unrolled = [r["hlo_lines"] for r in rows if "unrolled" in r["impl"]]
    assert unrolled[1] > unrolled[0] and scanned[1] == scanned[0]  # a scan compiles one block, whatever the depth
    out = tmp_path / "memory.json"
    assert main(["speed", "--config", config_file, "--batch", "2", "--seq-len", "16", "--repeats", "1",
                 "--study", "memory", "--remat", "none", "--remat", "block", "--json", str(out)]) == 0
    rows = {r["impl"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {f"{side} remat={r}" for r in ("none", "block")
                         for side in ("torch/sdpa", "jax/xla unrolled", "jax/xla scanned")}
    assert rows["torch/sdpa remat=block"]["held_mb"] < rows["torch/sdpa remat=none"]["held_mb"]
    for layout in ("unrolled", "scanned"):
        none, block = rows[f"jax/xla {layout} remat=none"], rows[f"jax/xla {layout} remat=block"]
        assert block["residual_mb"] < none["residual_mb"] and none["temp_mb"] > 0


def test_speed_runs_a_scanned_jax_model(config_file, tmp_path):
    out = tmp_path / "scan.json"
    assert main(["speed", "--config", config_file, "--batch", "1", "--seq-len", "16", "--repeats", "1",
                 "--impl", "jax/xla+scan", "--phase", "train step", "--phase", "decode", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {(r["impl"], r["name"]) for r in rows} == {("jax/xla+scan", "train step"), ("jax/xla+scan", "decode")}
    assert main(["speed", "--config", config_file, "--impl", "torch/sdpa+scan"]) == 2
