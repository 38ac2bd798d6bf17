"""Build every kernel configuration ahead of time for sm_80 and sm_90 and read its resource usage (no GPU).

`compile_report()` returns one `CompileRow` per (kernel, architecture, dtype, size, configuration):
registers, local-memory (spill) bytes, shared memory against the chip's limit, and which tensor-core
instruction the PTX uses (`wgmma` on Hopper, `mma` on Ampere, none for float32's exact FMA products).
`python -m kernels.compile_report [--quick] [--json]` prints it.

Compilation needs real `JITFunction`s, which Triton's interpreter replaces: under TRITON_INTERPRET=1 the
report runs itself in a child process with the interpreter off.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

ARCHS = (80, 90)
# Integer arguments in CAPS (sizes); every other CAPS argument of a kernel is a pointer.
SIZE_ARGS = {"H", "GROUP", "T_Q", "T_K", "T", "TQ_BUCKET", "TK_BUCKET", "M", "N", "V"}


@dataclass
class CompileRow:
    kernel: str
    arch: int
    dtype: str
    size: str  # what the build is specialised to: "D=64 causal", "BLOCK_N=1024"
    config: str  # tile sizes, warps, stages
    registers: int
    spill_bytes: int  # local memory per thread (spills, stack); must be 0
    smem_bytes: int  # Triton's dynamic plus static shared memory per program
    smem_limit: int
    mma: str  # "wgmma", "mma" or "none"
    seconds: float

    @property
    def ok(self) -> bool:
        """No spills, and shared memory within the chip."""
        return self.spill_bytes == 0 and self.smem_bytes <= self.smem_limit


@dataclass
class _Variant:
    kernel: str
    fn_name: str  # module:function of the @triton.jit kernel
    dtype: str
    size: str
    config: str
    pointer_dtypes: dict  # pointer argument -> Triton dtype name (default: `dtype`); listed ones are pointers
    constexprs: dict
    unit_strides: tuple  # stride arguments specialised to 1, as Triton does at run time
    floats: tuple  # float scalar arguments
    num_warps: int
    num_stages: int
    # False: build without the 16-divisibility hints Triton adds for aligned pointers and strides (a view at an
    # odd offset, odd row lengths), as real launches on such inputs do.
    aligned: bool = True
    size_hints: tuple = ()  # size arguments that are multiples of 16 in the aligned build (N of a 4096-wide row)
    maxnreg: int | None = None  # the register cap the launcher passes, if it passes one


def _variants(arch: int, quick: bool) -> list[_Variant]:
    """Every configuration the launchers can pick on `arch`, in each dtype: attention as `_attention_variants`
    says, norms as `_norm_variants` says. quick: bfloat16 and float32 only."""
    import torch

    from kernels import utils

    out = []
    dtypes = (torch.bfloat16, torch.float32) if quick else (torch.float16, torch.bfloat16, torch.float32)
    for dtype in dtypes:
        out += _attention_variants(arch, dtype, quick)
        out += _norm_variants(utils.TRITON_DTYPE[dtype], quick)
        out += _cross_entropy_variants(utils.TRITON_DTYPE[dtype], quick)
    return out


# Attention builds: (size label, head size, math, constexpr overrides). GROUP (query heads per key/value
# head) is a run-time argument, except that Triton specialises GROUP = 1 (no grouped heads) as a constant.
_PLAIN = dict(GROUP=1, BOUNDED_LEFT=False, BOUNDED_RIGHT=True, SOFTCAP=False, VARLEN=False, KV_RANGE=False)
_FEATURES = dict(BOUNDED_LEFT=True, BOUNDED_RIGHT=True, SOFTCAP=True, VARLEN=False, KV_RANGE=True)
_ATTENTION_CASES = {
    "causal": dict(_PLAIN),
    "full": dict(_PLAIN, BOUNDED_RIGHT=False),
    "causal T_Q=1": dict(_PLAIN, T_Q=1),
    "GQA causal": dict(_PLAIN, GROUP=None),
    "GQA window softcap padded": dict(_FEATURES),
    "GQA varlen window softcap": dict(_FEATURES, VARLEN=True, KV_RANGE=False),
}


def _attention_variants(arch: int, dtype, quick: bool) -> list[_Variant]:
    """Attention (kernels.attention): every autotuning candidate of the three kernels, in builds covering what
    the launchers specialise on.

    Causal builds at head sizes 64, 80 (a masked head tile) and 128. At head size 128: non-causal ("full"),
    decoding (T_Q = 1, which Triton specialises as a constant: only the 16-row query tiles run then), grouped
    heads, every dense feature at once (grouped heads, sliding window, softcap, padded key ranges: the most
    registers) and packed sequences; head size 59 with every dense feature on. float32 twice: exact products,
    and TF32 (its own candidates). Every build has Triton's 16-byte divisibility hints: the launchers copy inputs
    without that alignment (an odd offset, head size 59) into aligned buffers, as builds without the hints spill
    at every tile size. float16 builds as bfloat16 does: causal only. quick: head size 128 (and 59), every
    candidate of the every-feature build and the first of each other build, less the non-causal and the grouped
    causal builds.
    """
    import torch

    from kernels import attention as fa
    from kernels import utils

    name = utils.TRITON_DTYPE[dtype]
    causal_dims = (128,) if quick else (64, 80, 128)
    builds = [(f"D={d} causal", d, "ieee", _ATTENTION_CASES["causal"]) for d in causal_dims]
    if dtype != torch.float16:
        builds += [(f"D=128 {label}", 128, "ieee", case) for label, case in _ATTENTION_CASES.items()
                   if label != "causal"]
        builds += [("D=59 GQA window softcap padded", 59, "ieee", _FEATURES)]
    if dtype == torch.float32:
        builds += [(f"D={d} tf32 {label}", d, "tf32", _ATTENTION_CASES[label])
                   for d in ((128,) if quick else (64, 128)) for label in ("causal", "GQA window softcap padded")]
    if quick:
        builds = [b for b in builds if "full" not in b[0] and "GQA causal" not in b[0]]
    unit_strides = ("stride_qd", "stride_kd", "stride_vd", "stride_od", "stride_dod", "stride_dkd", "stride_dvd",
                    "stride_dqd")
    pointers = {"LSE": "fp32", "DELTA": "fp32", "CU_Q": "i32", "CU_K": "i32", "KV_START": "i32", "KV_END": "i32",
                **{p: name for p in ("Q", "K", "V", "OUT", "DO", "DQ", "DK", "DV")}}  # named: "V" is a size elsewhere
    out = []
    for size, d, precision, case in builds:
        precision = precision if dtype == torch.float32 else "tf32"  # unused by 16-bit operands
        for kind, kernel in (("fwd", "_attn_fwd_kernel"), ("dkdv", "_attn_bwd_dkdv_kernel"),
                             ("dq", "_attn_bwd_dq_kernel")):
            # Decoding: the configurations the launcher keeps for one query against a long cache.
            configs = (fa.configs_for_shape(kind, arch, dtype, d, 1, 4096, precision) if "T_Q=1" in size
                       else fa.configs_for(kind, arch, dtype, d, precision))
            if quick and size != "D=128 GQA window softcap padded":
                configs = configs[:1]
            for cfg in configs:
                bm, bn = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"]
                constexprs = {k: v for k, v in case.items() if v is not None}
                constexprs.update(HEAD_DIM=d, BLOCK_D=utils.head_block(d), BLOCK_M=bm, BLOCK_N=bn, INTERP_BF16=False,
                                  PRECISION=precision)
                out.append(_Variant(
                    f"attn_{kind}", f"kernels.attention:{kernel}", name, size,
                    f"BLOCK_M={bm} BLOCK_N={bn} warps={cfg.num_warps} stages={cfg.num_stages}", pointers,
                    constexprs, unit_strides, ("sm_scale", "softcap"), cfg.num_warps, cfg.num_stages,
                    maxnreg=cfg.maxnreg))
    for d in causal_dims:
        out.append(_Variant(
            "attn_bwd_preprocess", "kernels.attention:_attn_bwd_preprocess_kernel", name, f"D={d}",
            f"BLOCK_M={fa.PREPROCESS_BLOCK_M} warps={fa.PREPROCESS_WARPS}", {"DELTA": "fp32"},
            dict(HEAD_DIM=d, BLOCK_D=utils.head_block(d), BLOCK_M=fa.PREPROCESS_BLOCK_M),
            ("stride_od", "stride_dod"), (), fa.PREPROCESS_WARPS, 3, maxnreg=utils.register_cap(fa.PREPROCESS_WARPS)))
    return out


def _norm_variants(dtype: str, quick: bool) -> list[_Variant]:
    """LayerNorm and RMSNorm (kernels.norm): every (BLOCK_N, warps) the launcher can pick, with the residual, the
    weight (and LayerNorm's bias) on, aligned and unaligned. quick: the smallest and the largest block (single-pass
    and chunked), unaligned only at the largest."""
    from kernels import utils

    largest = utils.LN_MAX_BLOCK
    blocks = (16, largest) if quick else [1 << i for i in range(4, largest.bit_length())]
    # The pointers each kernel gets as None (absent), as the launchers pass them; every other one is on.
    absent = {("ln", "fwd"): {}, ("ln", "bwd"): {}, ("rms", "fwd"): {"B": None, "MEAN": None},
              ("rms", "bwd"): {"MEAN": None, "DB_PART": None}}
    stats = {"MEAN": "fp32", "RSTD": "fp32", "DW_PART": "fp32", "DB_PART": "fp32"}
    out = []
    for block in blocks:
        rows, _, warps = utils.ln_block_config(block)
        cap = utils.register_cap(warps)
        for single in (True, False) if block == largest else (True,):
            for aligned in (True, False) if block == largest or not quick else (True,):
                size = f"BLOCK_N={block}" + ("" if single else " chunked") + ("" if aligned else " unaligned")
                flags = dict(ROWS=rows, BLOCK_N=block, SINGLE_BLOCK=single, INTERP_BF16=False)
                for (name, kind), nones in absent.items():
                    floats = ("eps", "w_offset") if kind == "fwd" else ("w_offset",)
                    out.append(_Variant(f"{name}_{kind}", f"kernels.norm:_norm_{kind}_kernel", dtype, size,
                                        f"ROWS={rows} warps={warps} maxnreg={cap}", stats, dict(flags, **nones), (),
                                        floats, warps, 3, aligned, ("N",), cap))
    return out


# Cross-entropy builds: what each caller asks of the kernel. None pointers are absent, as the launcher passes them.
_CE_MODES = {
    "loss+grad": dict(WRITE_GRAD=True, ROW_SCALE=False),  # "mean"/"sum" with gradients: the training step
    "loss": dict(WRITE_GRAD=False, ROW_SCALE=False),  # no gradients (eval), and the forward of "none"
    "grad row-scale": dict(WRITE_GRAD=True, ROW_SCALE=True, LOSS=None),  # the backward of "none"
}


def _cross_entropy_variants(dtype: str, quick: bool) -> list[_Variant]:
    """The fused linear cross-entropy's per-row kernel (kernels.cross_entropy): every BLOCK_V the launcher can pick
    for training (loss and gradient) with softcap and label smoothing on (the most registers), aligned and
    unaligned (an odd vocabulary such as 50,257 makes every row start unaligned); the other modes and the build
    without softcap or smoothing at the smallest and the largest block. quick: the smallest and the largest
    block in training with every feature, unaligned at the largest, and the backward of "none" there."""
    from kernels import cross_entropy as ce

    largest = ce.CE_MAX_BLOCK
    full = "softcap smoothing"
    if quick:
        builds = [(16, "loss+grad", full, True), (largest, "loss+grad", full, True),
                  (largest, "loss+grad", full, False), (largest, "grad row-scale", full, False)]
    else:
        builds = [(1 << i, "loss+grad", full, aligned) for i in range(4, largest.bit_length())
                  for aligned in (True, False)]
        builds += [(block, mode, features, aligned) for block in (16, largest) for mode in _CE_MODES
                   for features in (full, "plain") for aligned in (True, False)
                   if (mode, features) != ("loss+grad", full)]
    pointers = {"TARGETS": "i64", "SCALE": "fp32", "LOSS": "fp32"}
    out = []
    for block, mode, features, aligned in builds:
        _, warps = ce.ce_block_config(block)
        on = features != "plain"
        constexprs = dict(BLOCK_V=block, SOFTCAP=on, SMOOTHING=on, INTERP_BF16=False, **_CE_MODES[mode])
        out.append(_Variant("ce_rows", "kernels.cross_entropy:_ce_kernel", dtype,
                            f"BLOCK_V={block} {mode} {features}" + ("" if aligned else " unaligned"), f"warps={warps}",
                            pointers, constexprs, (), ("label_smoothing", "softcap"), warps, 3, aligned, ("V",)))
    return out


def _tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def _resource_usage(cubin: bytes) -> dict[str, int]:
    """cuobjdump --dump-resource-usage: REG, STACK, SHARED, LOCAL of the (single) kernel in `cubin`."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", f.name], capture_output=True,
                              text=True, check=True).stdout
    line = next(ln for ln in text.splitlines() if "REG:" in ln)
    return {k: int(v) for k, v in (item.split(":") for item in line.split() if ":" in item and item[-1].isdigit())}


def _build(v: _Variant, arch: int) -> CompileRow:
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from kernels import utils

    module, name = v.fn_name.split(":")
    fn = getattr(importlib.import_module(module), name)
    constexprs = dict(v.constexprs, **{s: 1 for s in v.unit_strides if s in fn.arg_names})
    signature, attrs = {}, {}
    for i, arg in enumerate(fn.arg_names):
        if arg in constexprs:
            signature[arg] = "constexpr"
        elif arg in v.pointer_dtypes or arg.isupper() and arg not in SIZE_ARGS:  # pointers, 16-byte aligned
            signature[arg] = "*" + v.pointer_dtypes.get(arg, v.dtype)
            if v.aligned:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif arg in v.floats:
            signature[arg] = "fp32"
        else:
            signature[arg] = "i32"
            # Row strides of aligned tensors are multiples of 16 (and so are the sizes in `size_hints`).
            if v.aligned and (arg.startswith("stride") or arg in v.size_hints):
                attrs[(i,)] = [["tt.divisibility", 16]]
    start = time.perf_counter()
    kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32),
                            options={"num_warps": v.num_warps, "num_stages": v.num_stages, "enable_fp_fusion": True,
                                     **({"maxnreg": v.maxnreg} if v.maxnreg else {})})
    seconds = time.perf_counter() - start
    usage = _resource_usage(kernel.asm["cubin"])
    ptx = kernel.asm["ptx"]
    mma = "wgmma" if "wgmma.mma_async" in ptx else "mma" if "mma.sync" in ptx else "none"
    return CompileRow(v.kernel, arch, v.dtype, v.size, v.config, usage["REG"],
                      usage["LOCAL"] + usage["STACK"], kernel.metadata.shared + usage["SHARED"],
                      utils.smem_limit(arch), mma, round(seconds, 2))


def _build_job(job: tuple[_Variant, int]) -> CompileRow:
    return _build(*job)


def _build_all(quick: bool, archs: tuple[int, ...], only: str | None = None,
               match: str | None = None) -> list[CompileRow]:
    jobs = [(v, arch) for arch in archs for v in _variants(arch, quick) if only is None or v.kernel == only]
    jobs = [(v, arch) for v, arch in jobs if match is None or match in f"{v.dtype} {v.size}"]
    if not jobs and match is not None:
        raise ValueError(f"no build matches {match!r}")
    if not jobs:
        raise ValueError(f"no kernel named {only!r}; kernels: {sorted({v.kernel for v in _variants(archs[0], quick)})}")
    # One process per core: ptxas and Triton's passes are single-threaded.
    with ProcessPoolExecutor(os.cpu_count(), mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(_build_job, jobs))


def compile_report(quick: bool = False, archs: tuple[int, ...] = ARCHS, only: str | None = None,
                   match: str | None = None) -> list[CompileRow]:
    """Compile every kernel configuration for each architecture in `archs` (no GPU needed); one row each.

    `quick` builds a subset (see `_variants`): bfloat16 and float32, attention mostly at head size 128.
    `only` keeps one kernel (e.g. "ln_fwd"); `match` the builds whose "dtype size" contains it ("bf16 D=128").
    """
    from kernels import utils

    if not utils.interpreting():
        return _build_all(quick, archs, only, match)
    cmd = [sys.executable, "-m", "kernels.compile_report", "--json", "--archs", *map(str, archs)]
    cmd += (["--quick"] if quick else []) + (["--only", only] if only else []) + (["--match", match] if match else [])
    env = dict(os.environ, TRITON_INTERPRET="0")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode == 2:  # a bad argument, reported by the child
        raise ValueError(done.stderr.strip().removeprefix("error: "))
    if done.returncode != 0:
        raise RuntimeError(f"ahead-of-time build failed:\n{done.stderr[-4000:]}")
    return [CompileRow(**row) for row in json.loads(done.stdout)]


# The Triton the candidate tables are chosen on: every build it makes must be clean.
TUNED_TRITON = (3, 9)


def failures(rows: list[CompileRow]) -> list[CompileRow]:
    """The rows that fail the report. On the tuned Triton (or newer), every row that is not `ok`. On an older one
    (Triton 3.6's ptxas spills a few bytes in some candidates 3.9 builds clean), a build fails only when none of its
    autotuning candidates is clean; a spilling candidate beside a clean one is listed, not failed: the autotuner
    times them all. Shared memory over the chip's limit fails everywhere."""
    from kernels import utils

    if utils.triton_version() >= TUNED_TRITON:
        return [r for r in rows if not r.ok]
    clean = {(r.kernel, r.arch, r.dtype, r.size) for r in rows if r.ok}
    return [r for r in rows if not r.ok and ((r.kernel, r.arch, r.dtype, r.size) not in clean
                                             or r.smem_bytes > r.smem_limit)]


def format_table(rows: list[CompileRow]) -> str:
    """The rows as a fixed-width text table ("spills": tolerated on an older Triton, see `failures`)."""
    failed = {id(r) for r in failures(rows)}
    head = ("kernel", "arch", "dtype", "size", "config", "regs", "spill", "smem", "limit", "mma", "ok")
    body = [(r.kernel, f"sm_{r.arch}", r.dtype, r.size, r.config,
             str(r.registers), str(r.spill_bytes), str(r.smem_bytes), str(r.smem_limit), r.mma,
             "FAIL" if id(r) in failed else "ok" if r.ok else "spills") for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *body, strict=True)]
    lines = ["  ".join(x.ljust(w) for x, w in zip(row, widths, strict=True)) for row in [head, *body]]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a subset: bf16/fp32, attention at D=128")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    parser.add_argument("--archs", type=int, nargs="+", default=list(ARCHS), help="compute capabilities")
    parser.add_argument("--only", default=None, help="build one kernel only, e.g. ln_fwd")
    parser.add_argument("--match", default=None, help='builds whose "dtype size" contains this, e.g. "bf16 D=128"')
    args = parser.parse_args(argv)
    try:
        rows = compile_report(quick=args.quick, archs=tuple(args.archs), only=args.only, match=args.match)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps([dataclasses.asdict(r) for r in rows]) if args.json else format_table(rows))
    return 0 if args.json or not failures(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
