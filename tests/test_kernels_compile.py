"""Ahead-of-time builds of the real (non-interpreted) kernels for sm_80 and sm_90, on a machine without a GPU.

This builds the quick subset of `kernels.compile_report`: every autotuning configuration of the attention
kernels for bfloat16 and float32 at head size 128 with every feature on (the most registers; the first one
of the causal, decoding, packed, head-size-59 and TF32 builds), the backward preprocessing, and
LayerNorm and RMSNorm at their smallest and largest block (single-pass and chunked; the largest also
without Triton's alignment hints), each for sm_80 and sm_90. The full set (float16/bfloat16/float32, head
sizes 64/80/128, every norm block, aligned and unaligned) takes longer; `python -m kernels.compile_report`
builds it and prints the table.
"""

from __future__ import annotations

import pytest
import torch

from kernels import attention as fa
from kernels import compile_report as report
from kernels import utils

FEATURES = "D=128 GQA window softcap padded"  # every dense feature at once: every candidate is built


@pytest.fixture(scope="module")
def rows() -> list[report.CompileRow]:
    return report.compile_report(quick=True)  # in a child process: the interpreter replaces the JIT


@pytest.mark.slow
def test_every_configuration_builds_without_spills_within_shared_memory(rows):
    bad = [r for r in rows if not r.ok]
    assert not bad, "spills or too much shared memory:\n" + report.format_table(bad)
    for arch in report.ARCHS:
        for kind in ("fwd", "dkdv", "dq"):
            for dtype, name in ((torch.bfloat16, "bf16"), (torch.float32, "fp32")):
                mine = [r for r in rows if r.arch == arch and r.kernel == f"attn_{kind}" and r.dtype == name]
                built = {r.config for r in mine if r.size == FEATURES}
                wanted = {f"BLOCK_M={c.kwargs['BLOCK_M']} BLOCK_N={c.kwargs['BLOCK_N']} warps={c.num_warps} "
                          f"stages={c.num_stages}" for c in fa.configs_for(kind, arch, dtype, 128)}
                assert built == wanted
                sizes = {"D=128 causal", "D=128 causal T_Q=1", "D=128 GQA varlen window softcap",
                         "D=59 GQA window softcap padded"}
                if dtype == torch.float32:
                    sizes |= {"D=128 tf32 causal", f"D=128 tf32 {FEATURES.removeprefix('D=128 ')}"}
                assert {r.size for r in mine} >= sizes
        assert {r.kernel for r in rows if r.arch == arch} >= {"attn_bwd_preprocess", "ln_fwd", "ln_bwd", "rms_fwd",
                                                               "rms_bwd"}
        for kernel in ("ln_fwd", "ln_bwd", "rms_fwd", "rms_bwd"):  # inputs without Triton's alignment hints too
            assert {r.size for r in rows if r.arch == arch and r.kernel == kernel} >= {
                f"BLOCK_N={utils.LN_MAX_BLOCK}", f"BLOCK_N={utils.LN_MAX_BLOCK} unaligned",
                f"BLOCK_N={utils.LN_MAX_BLOCK} chunked unaligned"}


@pytest.mark.slow
def test_tensor_core_instructions(rows):
    """16-bit and TF32 attention: Hopper's uses wgmma (tiles of 64 rows and more: one warpgroup's M), Ampere's
    mma.sync. Exact float32 takes FMA products, no tensor cores."""
    attention = [r for r in rows if r.kernel.startswith("attn_") and r.kernel != "attn_bwd_preprocess"]
    for r in attention:
        block_m, block_n = (int(part.split("=")[1]) for part in r.config.split()[:2])
        if r.dtype == "fp32" and "tf32" not in r.size:
            assert r.mma == "none", r
        elif r.arch == 80:
            assert r.mma == "mma", r
        elif r.kernel != "attn_dkdv" and block_m >= 64 or r.kernel == "attn_dkdv" and block_n >= 64:
            assert r.mma == "wgmma", r
    assert any(r.arch == 90 and r.kernel == "attn_fwd" and r.mma == "wgmma" for r in rows)


@pytest.mark.slow
def test_table(rows):
    table = report.format_table(rows)
    assert table.splitlines()[0].split()[:5] == ["kernel", "arch", "dtype", "size", "config"]
    assert len(table.splitlines()) == len(rows) + 2


def test_an_older_triton_may_spill_in_a_candidate_beside_a_clean_one(monkeypatch):
    """The report's rule: on the tuned Triton every build is clean; on an older one a spilling autotuning candidate
    passes only beside a clean candidate of the same build, and too much shared memory fails everywhere."""
    def row(config, spill, size="D=64 causal", smem=1000):
        return report.CompileRow("attn_fwd", 80, "bf16", size, config, 100, spill, smem, 166_912, "mma", 0.1)

    clean, spills, alone, too_big = row("a", 0), row("b", 8), row("c", 8, "D=80 causal"), row("d", 0, smem=10**6)
    rows = [clean, spills, alone, too_big]
    monkeypatch.setattr(utils, "triton_version", lambda: report.TUNED_TRITON)
    assert report.failures(rows) == [spills, alone, too_big]
    monkeypatch.setattr(utils, "triton_version", lambda: (3, 6))
    assert report.failures(rows) == [alone, too_big]
    status = [line.split()[-1] for line in report.format_table(rows).splitlines()[2:]]
    assert status == ["ok", "spills", "FAIL", "FAIL"]
