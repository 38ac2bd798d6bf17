"""`python -m bench kernels` and `python -m bench compile`: the Triton kernels measured and built.

On CUDA: flash attention forward and backward TFLOP/s against `F.scaled_dot_product_attention` (flash, cuDNN
and math backends; one the GPU lacks is a SKIP row), LayerNorm, add-LayerNorm and RMSNorm GB/s against
`F.layer_norm` / `F.rms_norm`, each as a fraction of the GPU's roofline. Elsewhere there is nothing to time, and
the suite says so and runs the correctness sweep in Triton's interpreter instead (in a child process, since
TRITON_INTERPRET must be set before triton loads).

FLOP model: attention forward 4·B·H·T²·D, halved when causal, backward 2.5× the forward. Bytes: LayerNorm
forward reads x and writes y (2·M·N elements), backward reads x and dy and writes dx (3·M·N); the fused
residual add reads one more input and writes the sum.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any

from bench import timing
from bench.report import Row

ATTN_T = (512, 1024, 2048, 4096, 8192, 16384)
ATTN_D = (64, 128)
LN_N = (768, 1024, 2048, 4096, 8192, 16384)


def run(repeats: int = 10, quick: bool = False, progress: Callable[[str], Any] = lambda m: None) -> list[Row]:
    import torch

    if torch.cuda.is_available():
        return cuda_rows(repeats, quick, progress)
    progress("kernels: no CUDA device here, so no kernel timings; running the interpreter correctness sweep")
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "bench.kernel_bench"] + (["--quick"] if quick else [])
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"the interpreter sweep failed:\n{done.stderr[-3000:]}")
    return [Row(**r) for r in json.loads(done.stdout)]


def compile_rows(archs: tuple[int, ...] = (80, 90), quick: bool = False, only: str | None = None,
                 progress: Callable[[str], Any] = lambda m: None) -> list[Row]:
    """The ahead-of-time resource report as rows; FAIL where a configuration spills or overflows shared memory."""
    from kernels.compile_report import compile_report

    progress(f"compile: building every kernel configuration for {', '.join(f'sm_{a}' for a in archs)} (no GPU)")
    rows = []
    for r in compile_report(quick=quick, archs=archs, only=only):
        fast = {80: "mma", 90: "wgmma"}.get(r.arch)
        rows.append(Row("compile", r.kernel, f"sm_{r.arch}", r.dtype, r.size,
                        {"config": r.config, "registers": r.registers, "spill_bytes": r.spill_bytes,
                         "smem_kb": round(r.smem_bytes / 1024, 1), "smem_limit_kb": round(r.smem_limit / 1024, 1),
                         "mma": r.mma, "fast_mma": "n/a" if r.mma == "none" else r.mma == fast,
                         "build_s": r.seconds},
                        "PASS" if r.ok else "FAIL"))
    return rows


# ------------------------------------------------------------------------------------------------ CUDA
def cuda_rows(repeats: int, quick: bool, progress) -> list[Row]:
    """Not exercised on our CPU-only machines: written against the documented APIs, run it where a GPU is."""
    import torch

    name = torch.cuda.get_device_name()
    peak = timing.gpu_peak(name, "bfloat16", tf32=False)
    bandwidth = next((v for k, v in timing.GPU_BANDWIDTH.items() if k in name), None)
    rows = []
    for d in ATTN_D:
        for causal in (True, False):
            for t in ATTN_T[:3] if quick else ATTN_T:
                progress(f"kernels: attention D={d} T={t} causal={causal}")
                rows += _attention_rows(4, 16, t, d, causal, repeats, peak)
    for n in LN_N[:3] if quick else LN_N:
        progress(f"kernels: LayerNorm N={n}")
        rows += _layer_norm_rows(32768, n, repeats, bandwidth)
    return rows


def _fwd_bwd_ms(fn, inputs: tuple, repeats: int) -> tuple[float, float]:
    """Median ms of `fn()` and of the backward of its output with respect to `inputs` (triton's do_bench)."""
    import torch
    from triton.testing import do_bench

    out = fn()
    grad = torch.randn_like(out)
    fwd = do_bench(fn, rep=repeats * 10)
    bwd = do_bench(lambda: torch.autograd.grad(out, inputs, grad, retain_graph=True), rep=repeats * 10)
    return fwd, bwd


def _attention_rows(b: int, h: int, t: int, d: int, causal: bool, repeats: int, peak: float | None) -> list[Row]:
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import kernels

    q, k, v = (torch.randn(b, h, t, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))

    def sdpa(backend):
        def fn():
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return fn

    impls = {"triton": lambda: kernels.flash_attention(q, k, v, causal=causal),
             "sdpa/flash": sdpa(SDPBackend.FLASH_ATTENTION), "sdpa/cudnn": sdpa(SDPBackend.CUDNN_ATTENTION)}
    if t <= 4096:  # the math backend materialises B·H·T² scores
        impls["sdpa/math"] = sdpa(SDPBackend.MATH)
    fwd_flops = 4 * b * h * t * t * d * (0.5 if causal else 1.0)
    shape = f"B={b} H={h} T={t} D={d}" + (" causal" if causal else "")
    rows = []
    for label, fn in impls.items():
        try:
            fwd_ms, bwd_ms = _fwd_bwd_ms(fn, (q, k, v), repeats)
        except RuntimeError as e:  # a backend this GPU or build lacks ("No available kernel"): say so, go on
            rows += [Row("kernels", phase, label, "bfloat16", shape, {}, "SKIP", str(e).splitlines()[0][:200])
                     for phase in ("attention fwd", "attention bwd")]
            continue
        for phase, ms, flops in (("attention fwd", fwd_ms, fwd_flops), ("attention bwd", bwd_ms, 2.5 * fwd_flops)):
            achieved = flops / (ms / 1e3)
            rows.append(Row("kernels", phase, label, "bfloat16", shape,
                            {"ms": ms, "tflops": achieved / 1e12, "roofline": achieved / peak if peak else None}))
    return rows


def _layer_norm_rows(m: int, n: int, repeats: int, bandwidth: float | None) -> list[Row]:
    import torch
    import torch.nn.functional as F

    import kernels

    x = torch.randn(m, n, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    res = torch.randn_like(x)
    w = torch.ones(n, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    bias = torch.zeros(n, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    cases = {  # (op, impl): (fn, elements moved forward / backward per M·N, the inputs differentiated)
        ("layer_norm", "triton"): (lambda: kernels.layer_norm(x, w, bias), 2, 3, (x, w, bias)),
        ("layer_norm", "torch"): (lambda: F.layer_norm(x, (n,), w, bias), 2, 3, (x, w, bias)),
        ("add_layer_norm", "triton"): (lambda: kernels.add_layer_norm(x, res, w, bias)[0], 4, 4, (x, w, bias)),
        ("add_layer_norm", "torch"): (lambda: F.layer_norm(x + res, (n,), w, bias), 4, 4, (x, w, bias)),
        ("rms_norm", "triton"): (lambda: kernels.rms_norm(x, w), 2, 3, (x, w)),
        ("rms_norm", "torch"): (lambda: F.rms_norm(x, (n,), w), 2, 3, (x, w)),
    }
    rows = []
    for (op, label), (fn, fwd_io, bwd_io, inputs) in cases.items():
        fwd_ms, bwd_ms = _fwd_bwd_ms(fn, inputs, repeats)
        for phase, ms, io in ((f"{op} fwd", fwd_ms, fwd_io), (f"{op} bwd", bwd_ms, bwd_io)):
            rate = io * m * n * x.element_size() / (ms / 1e3)
            rows.append(Row("kernels", phase, label, "bfloat16", f"M={m} N={n}",
                            {"ms": ms, "gb_s": rate / 1e9, "roofline": rate / bandwidth if bandwidth else None}))
    return rows


# ------------------------------------------------------------------------------- the interpreter sweep
def sweep(quick: bool) -> list[Row]:
    """Kernel vs float64 reference, next to PyTorch's own error in the same dtype (the 2x rule, DESIGN.md §4).

    Runs in the interpreter. Triton 3.9's interpreter computes `tl.dot` on bfloat16 wrongly and truncates
    float32->bfloat16 casts, so under it the kernels widen bf16 dot operands exactly to float32 and round
    casts by hand (`INTERP_BF16`): bf16 rows check that path, not the GPU's bf16 MMA instructions.
    """
    import torch
    import torch.nn.functional as F

    import kernels
    from kernels import utils

    if not utils.interpreting():
        raise RuntimeError("the sweep needs TRITON_INTERPRET=1 set before triton is imported")
    torch.manual_seed(0)
    rows = []
    attn_cases = [(1, 2, 17, 32, True), (1, 2, 129, 64, False)] if quick else [
        (1, 2, 1, 64, True), (1, 2, 17, 32, True), (2, 2, 64, 16, True), (1, 2, 129, 64, True), (1, 1, 300, 80, True),
        (1, 1, 64, 128, True), (1, 2, 129, 64, False), (1, 1, 300, 80, False)]
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for b, h, t, d, causal in attn_cases:
            q, k, v = (torch.randn(b, h, t, d, dtype=dtype, requires_grad=True) for _ in range(3))
            do = torch.randn(b, h, t, d, dtype=dtype)
            ref = [x.detach().double().requires_grad_() for x in (q, k, v)]
            o64 = F.scaled_dot_product_attention(*ref, is_causal=causal)
            g64 = torch.autograd.grad(o64, ref, do.double())
            with utils.poisoned_outputs():
                o = kernels.flash_attention(q, k, v, causal=causal)
            path = utils.last_path("flash_attn_fwd")
            g = torch.autograd.grad(o, (q, k, v), do)
            ot = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
            gt = torch.autograd.grad(ot, (q, k, v), do)
            scale = max(float(torch.linalg.vector_norm(e)) for e in g64)
            shape = f"B={b} H={h} T={t} D={d}" + (" causal" if causal else "")
            rows.append(_err_row("attention fwd", path, dtype, shape, o, ot, o64, 0.0))
            for n, mine, theirs, exact in zip("qkv", g, gt, g64, strict=True):
                rows.append(_err_row(f"attention d{n}", path, dtype, shape, mine, theirs, exact, scale))
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for n in ((17, 768) if quick else (1, 17, 768, 1000, 4099)):
            x = torch.randn(8, n, dtype=dtype, requires_grad=True)
            w = (1 + 0.1 * torch.randn(n, dtype=dtype)).requires_grad_()
            b = (0.1 * torch.randn(n, dtype=dtype)).requires_grad_()
            dy = torch.randn(8, n, dtype=dtype)
            ref = [t.detach().double().requires_grad_() for t in (x, w, b)]
            y64 = F.layer_norm(ref[0], (n,), ref[1], ref[2])
            g64 = torch.autograd.grad(y64, ref, dy.double())
            with utils.poisoned_outputs():
                y = kernels.layer_norm(x, w, b)
            path = utils.last_path("layer_norm_fwd")
            g = torch.autograd.grad(y, (x, w, b), dy)
            yt = F.layer_norm(x, (n,), w, b)
            gt = torch.autograd.grad(yt, (x, w, b), dy)
            scale = max(float(torch.linalg.vector_norm(e)) for e in g64)
            rows.append(_err_row("layer_norm fwd", path, dtype, f"M=8 N={n}", y, yt, y64, 0.0))
            for name, mine, theirs, exact in zip(("dx", "dw", "db"), g, gt, g64, strict=True):
                rows.append(_err_row(f"layer_norm {name}", path, dtype, f"M=8 N={n}", mine, theirs, exact, scale))
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for n, offset in ([(17, 0.0), (768, 1.0)] if quick else
                          [(n, offset) for n in (1, 17, 768, 4099) for offset in (0.0, 1.0)]):
            rows += _rms_norm_err_rows(8, n, offset, dtype)
    return rows


def _rms_norm_err_rows(m: int, n: int, offset: float, dtype) -> list[Row]:
    """kernels.rms_norm (offset 1: Gemma's 1 + weight) against float64, beside PyTorch's own in `dtype`:
    `F.rms_norm`, or for the offset the float32 formula Gemma's modeling code uses."""
    import torch
    import torch.nn.functional as F

    import kernels
    from kernels import utils

    def torch_rms_norm(x_, w_):
        if offset == 0.0:
            return F.rms_norm(x_, (n,), w_, 1e-6)
        xf = x_.float()
        return (xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + 1e-6) * (offset + w_.float())).to(x_.dtype)

    x = torch.randn(m, n, dtype=dtype, requires_grad=True)
    w = ((1 - offset) + 0.3 * torch.randn(n, dtype=dtype)).requires_grad_()
    dy = torch.randn(m, n, dtype=dtype)
    x64, w64 = (t.detach().double().requires_grad_() for t in (x, w))
    y64 = x64 * torch.rsqrt(x64.square().mean(-1, keepdim=True) + 1e-6) * (offset + w64)
    g64 = torch.autograd.grad(y64, (x64, w64), dy.double())
    with utils.poisoned_outputs():
        y = kernels.rms_norm(x, w, 1e-6, offset=offset)
    path = utils.last_path("rms_norm_fwd")
    g = torch.autograd.grad(y, (x, w), dy)
    yt = torch_rms_norm(x, w)
    gt = torch.autograd.grad(yt, (x, w), dy)
    scale = max(float(torch.linalg.vector_norm(e)) for e in g64)
    shape = f"M={m} N={n}" + (f" offset={offset:g}" if offset else "")
    rows = [_err_row("rms_norm fwd", path, dtype, shape, y, yt, y64, 0.0)]
    for name, mine, theirs, exact in zip(("dx", "dw"), g, gt, g64, strict=True):
        rows.append(_err_row(f"rms_norm {name}", path, dtype, shape, mine, theirs, exact, scale))
    return rows


def _err_row(name: str, path: str | None, dtype, shape: str, mine, theirs, exact, scale: float) -> Row:
    """One verdict of the accuracy rule (`kernels.testing`, DESIGN.md §4). `scale`: the largest exact gradient
    norm of the same call (0 for outputs); a gradient that is zero in exact arithmetic (dq and dk over a single
    key) has only rounding noise, measured relative to that scale."""
    from kernels.testing import accuracy

    v = accuracy(mine, theirs, exact, scale=scale or None)
    return Row("kernels", name, f"triton ({path})", str(dtype).removeprefix("torch."), shape,
               {"rel_err": v.error, "torch_rel_err": v.torch_error, "floor": v.floor, "ratio": v.ratio},
               "PASS" if v.ok and path == "interpreter" else "FAIL",
               "interpreter on CPU; PASS: error vs float64 <= 2x PyTorch's + the rounding of the exact answer")


if __name__ == "__main__":  # the child process of `run` on machines without CUDA
    import dataclasses

    print(json.dumps([dataclasses.asdict(r) for r in sweep(quick="--quick" in sys.argv)]))
