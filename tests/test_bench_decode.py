"""bench speed --phase decode: compiled torch generation runs (no SKIP), Hugging Face generate beside it, the read
bandwidth and its floor, and a real count of the decode step's compilations."""

import json

import pytest

from bench import speed
from bench.__main__ import main
from gpt_core import GPTConfig
from torch_gpt import GPTModel

CFG = GPTConfig(vocab_size=211, context_length=32, emb_dim=32, n_heads=4, n_layers=2, qkv_bias=True,
                tie_embeddings=True)


def test_weight_bytes_are_what_a_decode_step_reads():
    """Every parameter once (the tied head is wte), one row of the position table; untied, one row of wte."""
    for tied in (True, False):
        cfg = GPTConfig(**{**CFG.to_dict(), "tie_embeddings": tied})
        m = GPTModel(cfg)
        n = sum(p.numel() for p in m.parameters()) - m.wpe.weight.numel() + cfg.emb_dim
        if not tied:
            n -= m.wte.weight.numel() - cfg.emb_dim
        assert speed.weight_bytes(cfg, "float32") == 4 * n and speed.weight_bytes(cfg, "bfloat16") == 2 * n


@pytest.mark.slow
def test_compiled_decode_runs_with_hf_and_the_bandwidth_floor(tmp_path):
    config, out = tmp_path / "config.json", tmp_path / "decode.json"
    CFG.to_json(config)
    # seq-len 27 + 1 + 4 tokens fills the 32 slots, as the three recompile-check calls do: one decode graph.
    assert main(["speed", "--config", str(config), "--batch", "2", "--seq-len", "27", "--repeats", "2",
                 "--decode-tokens", "4", "--phase", "prefill", "--phase", "decode", "--impl", "torch.compile/sdpa",
                 "--impl", "hf/generate", "--json", str(out)]) == 0
    rows = {(r["impl"], r["name"]): r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {(i, p) for i in ("torch.compile/sdpa", "hf/generate") for p in ("prefill", "decode")}
    assert all(r["status"] == "" for r in rows.values())  # measured: neither SKIP nor FAIL
    assert rows["torch.compile/sdpa", "prefill"]["ms"] > 0 and rows["torch.compile/sdpa", "prefill"]["compile_s"] > 0
    dec = rows["torch.compile/sdpa", "decode"]
    assert (dec["decode_compiles"], dec["prefill_compiles"], dec["recompile_tokens"]) == (1, 0, 32 - 27)
    assert dec["compile_s"] > 0 and "decode step compiled 1x" in dec["note"]
    for r in (dec, rows["hf/generate", "decode"]):
        assert r["read_gb_s"] > 0 and r["weight_mb"] == speed.weight_bytes(CFG, "float32") / 1e6
        assert r["floor_ms"] == pytest.approx(r["weight_mb"] / r["read_gb_s"])  # MB / (GB/s) = ms
        if r["ms"] == r["ms"]:  # NaN only when the two timings' difference was lost in noise
            assert r["floor_pct"] == pytest.approx(100 * r["floor_ms"] / r["ms"])
