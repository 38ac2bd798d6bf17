"""Launch helpers shared by the kernels: dispatch, path recording, dtype maps, checks, block sizes.

Nothing here touches the GPU driver at import time: Triton's interpreter (TRITON_INTERPRET=1) and machines
without a GPU must be able to import `kernels`.
"""

from __future__ import annotations

import contextlib
import math
from collections import Counter
from collections.abc import Iterator
from typing import Literal

import torch
import triton
import triton.language as tl

DispatchPath = Literal["triton", "interpreter", "reference"]

# The dtypes the kernels accept, and their names in Triton signatures (used by the ahead-of-time build).
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TRITON_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}

# Compile options of every launch: FMA contraction on, as Triton 3.9 defaults to but warns it will stop doing.
LAUNCH_OPTIONS = {"enable_fp_fusion": True}

# Largest shared memory one program may use (bytes), by compute capability: A100 (sm_80), H100 (sm_90), ...
SMEM_LIMIT = {75: 65_536, 80: 166_912, 86: 101_376, 87: 166_912, 89: 101_376, 90: 232_448}


def smem_limit(capability: int) -> int:
    """Shared memory per program on a GPU of compute capability `capability` (80, 90, ...)."""
    return SMEM_LIMIT.get(capability, 101_376)


# ----------------------------------------------------------------------------- dispatch
def interpreting() -> bool:
    """True when Triton was imported with TRITON_INTERPRET=1: `@triton.jit` kernels then run on the CPU."""
    return bool(triton.knobs.runtime.interpret)


def triton_version() -> tuple[int, int]:
    """(major, minor) of the installed Triton."""
    major, minor = triton.__version__.split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def _patch_old_interpreter() -> None:
    """Triton < 3.8's interpreter holds scalars as shape-(1,) arrays and makes ints of them with `int(array)`,
    which NumPy >= 2.4 refuses ("only 0-dimensional arrays can be converted to Python scalars"): every loop
    with run-time bounds failed. Read the one element instead, as Triton 3.8 does (`int(data.squeeze())`)."""
    from triton.runtime import interpreter

    patch_tensor = getattr(interpreter, "_patch_lang_tensor", None)
    if patch_tensor is None or getattr(patch_tensor, "_kernels_index_fix", False):
        return

    def patched(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._kernels_index_fix = True
    interpreter._patch_lang_tensor = patched


if interpreting() and triton_version() < (3, 8):
    _patch_old_interpreter()


def dispatch_path(x: torch.Tensor) -> DispatchPath:
    """Which implementation runs for a tensor on `x.device` (DESIGN.md §5).

    Under the interpreter every launch is interpreted (it copies CUDA storages to the host, too); otherwise
    CUDA tensors run the compiled Triton kernels and anything else runs the exact PyTorch reference.
    """
    if interpreting():
        return "interpreter"
    return "triton" if x.is_cuda else "reference"


_COUNTS: Counter[tuple[str, str]] = Counter()
_LAST: dict[str, str] = {}


def record(op: str, path: DispatchPath) -> None:
    """Note that `op` ran through `path`; read back with `dispatch_counts()` / `last_path()`."""
    _COUNTS[(op, path)] += 1
    _LAST[op] = path


def dispatch_counts() -> dict[tuple[str, str], int]:
    """How often each (op, path) ran since `reset_dispatch_counts()`: {("layer_norm_fwd", "interpreter"): 3, ...}."""
    return dict(_COUNTS)


def reset_dispatch_counts() -> None:
    _COUNTS.clear()
    _LAST.clear()


def last_path(op: str) -> str | None:
    """The path the last call of `op` took ("triton", "interpreter", "reference"), or None if it never ran."""
    return _LAST.get(op)


# ----------------------------------------------------------------------------- allocation
_POISON = False


@contextlib.contextmanager
def poisoned_outputs() -> Iterator[None]:
    """Within this context every kernel output is NaN-filled before the kernel runs, so unwritten elements show."""
    global _POISON
    previous, _POISON = _POISON, True
    try:
        yield
    finally:
        _POISON = previous


def empty(*shape: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """`torch.empty`, NaN-filled inside `poisoned_outputs()`."""
    out = torch.empty(shape, dtype=dtype, device=device)
    return out.fill_(math.nan) if _POISON else out


def empty_like(x: torch.Tensor) -> torch.Tensor:
    """`torch.empty_like` (keeps a dense tensor's strides), NaN-filled inside `poisoned_outputs()`."""
    out = torch.empty_like(x)
    return out.fill_(math.nan) if _POISON else out


# ----------------------------------------------------------------------------- checks
def check_float_tensor(name: str, x: object, ndim: int | None = None) -> None:
    """Raise TypeError/ValueError unless `x` is a float16/bfloat16/float32 tensor (of `ndim` dimensions)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16 or float32, got {x.dtype}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")


def check_same(names: tuple[str, ...], tensors: tuple[torch.Tensor, ...], *, dtype: bool = True) -> None:
    """Raise unless all `tensors` share a device (and a dtype)."""
    first = tensors[0]
    for name, t in zip(names[1:], tensors[1:], strict=True):
        if t.device != first.device:
            raise ValueError(f"{names[0]} is on {first.device} but {name} is on {t.device}")
        if dtype and t.dtype != first.dtype:
            raise TypeError(f"{names[0]} is {first.dtype} but {name} is {t.dtype}")


def rows_view(x: torch.Tensor) -> torch.Tensor:
    """`x` as (M, N) rows over its last dimension, unit stride along N; a copy only when no view exists."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 or x2.shape[-1] == 1 else x2.contiguous()


# ----------------------------------------------------------------------------- launch configuration
def next_power_of_2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def head_block(d: int) -> int:
    """Head-size tile: the next power of two, at least 16 (the smallest `tl.dot` operand)."""
    return max(16, next_power_of_2(d))


# Elements of one LayerNorm tile: (ROWS, BLOCK_N) with several short rows, or one chunk of a longer row.
# 8 per thread at 16 warps; tiles of 8192 spilled in the backward on sm_90 (kernels.compile_report).
LN_MAX_BLOCK = 4096


def ln_block_config(n: int) -> tuple[int, int, int]:
    """(ROWS, BLOCK_N, num_warps) for LayerNorm rows of `n` elements: tiles of LN_MAX_BLOCK elements, 8 per
    thread, holding LN_MAX_BLOCK // BLOCK_N whole rows; longer rows are walked in chunks, one row at a time."""
    block = min(max(16, next_power_of_2(n)), LN_MAX_BLOCK)
    rows = LN_MAX_BLOCK // block
    return rows, block, min(max(rows * block // 256, 1), 16)


def device_guard(x: torch.Tensor) -> contextlib.AbstractContextManager:
    """Make `x`'s GPU current for a launch (Triton launches on the current device)."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def cuda_capability(x: torch.Tensor) -> int:
    """Compute capability of `x`'s GPU as an int (80, 90, ...)."""
    major, minor = torch.cuda.get_device_capability(x.device)
    return 10 * major + minor


def num_sms(x: torch.Tensor) -> int:
    return torch.cuda.get_device_properties(x.device).multi_processor_count


# ----------------------------------------------------------------------------- device helpers
@triton.jit
def cast_to(x, DTYPE: tl.constexpr, INTERP_BF16: tl.constexpr):
    """x cast to DTYPE, rounding to nearest even.

    INTERP_BF16 is set only for bfloat16 under Triton 3.9's interpreter, whose float32 -> bfloat16 cast
    truncates: round to nearest even by hand first (then the cast is exact), as a GPU's cvt.rn does.
    """
    if INTERP_BF16:
        u = x.to(tl.float32).to(tl.uint32, bitcast=True)
        u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
        x = u.to(tl.float32, bitcast=True)
    return x.to(DTYPE)


@triton.jit
def tanh(x):
    """float32 tanh to a few ulps (Cephes' tanhf) from operations every Triton backend and its interpreter have:
    an odd polynomial near 0, where 1 - 2/(e^2x + 1) would cancel, and that formula elsewhere."""
    z = x * x
    poly = ((((-5.70498872745e-3 * z + 2.06390887954e-2) * z - 5.37397155531e-2) * z + 1.33314422036e-1) * z
            - 3.33332819422e-1) * z * x + x
    far = 1.0 - 2.0 / (tl.math.exp2(tl.minimum(tl.abs(x), 15.0) * 2.8853900817779268) + 1.0)  # 2·log2(e)
    return tl.where(tl.abs(x) < 0.625, poly, tl.where(x < 0, -far, far))


def register_cap(num_warps: int) -> int:
    """Registers a thread of a `num_warps` program may use: the SM's 65536 over the program's threads (at most 255).

    The norm launches pass it as `maxnreg`: left implicit, Triton 3.6's ptxas aims at half of it for 512-thread
    programs and spills a few bytes rather than use more (`python -m kernels.compile_report`). Attention does not:
    there it made ptxas spill where it did not before.
    """
    return min(255, 65536 // (32 * num_warps))
