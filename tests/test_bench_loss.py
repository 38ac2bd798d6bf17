"""`python -m bench loss` at a tiny size: the rows it writes, and that the fused loss's memory is measured smaller.

The figures of the issue (gpt2, B=8, T=1024) come from the same command at full size; here only its plumbing and
the direction of the effect are checked, at a size where a chunk of logits is a quarter of the whole.
"""

from __future__ import annotations

import json

import pytest

from bench.__main__ import main
from kernels import utils


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    """As `python -m bench loss` runs on a CPU: Triton's interpreter off, so the fused loss's CPU path (the
    PyTorch reference of the per-chunk step, chunked the same way) runs, not the interpreter (minutes here)."""
    out = tmp_path_factory.mktemp("loss") / "rows.json"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(utils, "interpreting", lambda: False)
        assert main(["loss", "--part", "loss", "--batch", "4", "--seq-len", "128", "--repeats", "1",
                     "--json", str(out)]) == 0
    return json.loads(out.read_text())["rows"]


def test_rows(rows):
    assert [(r["impl"], r["name"]) for r in rows] == [
        ("torch/plain", "loss forward+backward"), ("torch/fused (reference path)", "loss forward+backward"),
        ("jax/plain", "loss forward+backward"), ("jax/fused", "loss forward+backward")]
    assert all(r["shape"] == "B=4 T=128 C=64 V=50257" and r["ms"] > 0 for r in rows)


def test_fused_loss_holds_less(rows):
    """512 rows × 50,257 float32 logits are 98 MiB: PyTorch's loss keeps its log-softmax (as large) for the
    backward and peaks at several times that; the fused loss keeps only the two gradients, and peaks at a few chunks
    of 128 rows (the reference path's per-chunk temporaries) besides them."""
    torch_plain, torch_fused, jax_plain, jax_fused = rows
    n, c, v = 512, 64, 50257
    logits_mb, grads_mb, chunk_mb = (x * 4 / 2**20 for x in (n * v, n * c + v * c, 128 * v))
    assert torch_plain["saved_mb"] >= logits_mb and torch_plain["peak_mb"] >= 2 * logits_mb
    assert torch_fused["saved_mb"] == pytest.approx(grads_mb)
    assert torch_fused["peak_mb"] <= 3 * chunk_mb + 2 * grads_mb + 1
    assert torch_fused["mem_vs_plain"] == pytest.approx(torch_plain["peak_mb"] / torch_fused["peak_mb"])
    assert torch_fused["mem_vs_plain"] > 2
    assert jax_plain["temp_mb"] >= logits_mb
    assert jax_fused["mem_vs_plain"] > 2
    assert jax_fused["out_mb"] == pytest.approx(jax_plain["out_mb"])  # the same loss and gradients come out


def test_bad_arguments():
    assert main(["loss", "--seq-len", "4096"]) == 2  # beyond the tiny preset's context


def test_training_step_rows(tmp_path):
    """`--part step`: the whole tiny model's training step with each loss_impl; at this width the logits are most
    of the step's memory, so the fused step (4 chunks of 128 rows) needs several times less."""
    out = tmp_path / "rows.json"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(utils, "interpreting", lambda: False)
        assert main(["loss", "--part", "step", "--batch", "4", "--seq-len", "128", "--repeats", "1",
                     "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["impl"] for r in rows] == ["torch/sdpa loss_impl=plain", "torch/sdpa loss_impl=fused",
                                         "jax/xla loss_impl=plain", "jax/xla loss_impl=fused"]
    assert all(r["name"] == "train step" and r["shape"] == "L=2 B=4 T=128 C=64 V=50257" for r in rows)
    assert rows[1]["mem_vs_plain"] > 2 and rows[3]["mem_vs_plain"] > 2


def test_a_jax_step_that_cannot_fit_is_reported_not_run(tmp_path, monkeypatch):
    """A compiled step larger than the host's available memory (here made 1 MB) is an OOM row with its memory and
    no time, and the run goes on (at gpt2, B=8, T=1024 JAX's step needs 24 GB: running it got the bench killed)."""
    from bench import loss_memory

    monkeypatch.setattr(loss_memory, "_host_available_mb", lambda: 1.0)
    out = tmp_path / "rows.json"
    assert main(["loss", "--side", "jax", "--part", "step", "--batch", "2", "--seq-len", "16", "--repeats", "1",
                 "--json", str(out)]) == 0
    plain, fused = json.loads(out.read_text())["rows"]
    for row in (plain, fused):
        assert row["status"] == "OOM" and "ms" not in row and row["total_mb"] > row["temp_mb"] > 0
        assert "1 MB available: not run" in row["note"]
    assert "time_vs_plain" not in fused and fused["mem_vs_plain"] > 1


def test_host_available_memory_is_read():
    from bench import loss_memory

    assert 0 < loss_memory._host_available_mb() < 2**40
