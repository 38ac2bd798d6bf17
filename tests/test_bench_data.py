"""`python -m bench data`: its rows at --quick sizes, its corpus and random datasets, its per-run peak memory."""

import json
import sys

import numpy as np
import pytest

from bench import data as bench_data
from bench.__main__ import main
from gpt_core.shards import open_dataset


def test_quick_prepare_stage(tmp_path):
    out = tmp_path / "data.json"
    assert main(["data", "--quick", "--stage", "prepare", "--corpus-mb", "0.5", "--tmp", str(tmp_path),
                 "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["name"], r["impl"]) for r in rows] == [
        ("tiktoken loop", "encode_ordinary, 1 process"), ("prepare", "gpt_core workers=1"),
        ("prepare", "gpt_core workers=2")]
    assert len({r["tokens"] for r in rows}) == 1 and rows[0]["tokens"] > 100_000  # every run counts the same
    for r in rows:
        assert r["tokens_per_s"] > 0 and r["peak_rss_mb"] > 10 and r["vs_loop"] > 0 and r["status"] == ""
    assert rows[0]["vs_loop"] == 1.0
    assert list(tmp_path.iterdir()) == [out]  # corpus and shards deleted


def test_corpus_has_the_size_asked(tmp_path):
    files, docs, size = bench_data.write_corpus(tmp_path, 0.3, file_mb=0.1)
    assert len(files) >= 3 and size >= 300_000 and size < 300_000 + 21_000  # overshoot < one document
    lines = [json.loads(line)["text"] for f in files for line in f.read_text(encoding="utf-8").splitlines()]
    assert len(lines) == docs and sum(len(t.encode()) for t in lines) == size
    assert len(set(lines)) > docs * 0.9  # random cuts, not one document repeated


def test_random_dataset_opens_as_llmc_shards(tmp_path):
    root = bench_data.write_random_dataset(tmp_path / "r", 250, n_val=30, shard_tokens=100)
    ds = open_dataset(root, "gpt2")
    assert ds.train.counts.tolist() == [100, 100, 50] and len(ds.val) == 30
    toks = ds.train.read(0, 250)
    assert toks.min() >= 0 and toks.max() < 50257 and len(np.unique(toks)) > 200


def test_peak_memory_is_per_run(tmp_path):
    """wait4 gives each child's own peak: a small run after a large one must not report the large peak
    (RUSAGE_CHILDREN would: it keeps the maximum over all children)."""
    def alloc(mb):
        return [sys.executable, "-c", f"import numpy as np; a = np.ones({mb} * 2**20 // 8); a += 1"]

    rc, big, _, _ = bench_data.run_child(alloc(400), timeout=120)
    assert rc == 0
    rc, small, _, _ = bench_data.run_child(alloc(50), timeout=120)
    assert rc == 0
    assert 330 < big - small < 400, (big, small)
    rc, _, _, err = bench_data.run_child([sys.executable, "-c", "import sys; sys.exit('boom')"], timeout=60)
    assert rc == 1 and "boom" in err


@pytest.mark.slow
def test_quick_trainer_stage_with_the_torch_trainer(tmp_path):
    out = tmp_path / "data.json"
    assert main(["data", "--quick", "--stage", "trainer", "--trainer", "torch", "--steps", "2",
                 "--tmp", str(tmp_path), "--json", str(out)]) == 0
    rows = {(r["name"], r["shape"]): r for r in json.loads(out.read_text())["rows"]}
    small, large = rows[("peak RSS", "100k tokens")], rows[("peak RSS", "1M tokens")]
    for r in (small, large):
        assert r["impl"] == "torch_gpt.train" and r["peak_rss_mb"] > 100 and r["status"] == ""
        assert 0 < r["data_ms"] < r["step_ms"] and 0 < r["data_frac"] < 1
    growth = rows[("peak RSS growth", "100k tokens -> 1M tokens")]
    assert growth["rss_diff_mb"] == pytest.approx(large["peak_rss_mb"] - small["peak_rss_mb"])
    assert rows[("data wait", "1M tokens")]["data_frac"] == large["data_frac"]
    assert list(tmp_path.iterdir()) == [out]
