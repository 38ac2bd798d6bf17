"""Timing that holds up: warm-up excluded, device synchronised, repeats, median with spread; device peaks."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass
class Timing:
    median: float  # seconds
    p10: float
    p90: float
    repeats: int

    @property
    def spread(self) -> float:
        """(p90 − p10) / median: the relative width of the middle 80% of repeats."""
        return (self.p90 - self.p10) / self.median if self.median > 0 else 0.0


def measure(fn: Callable[[], Any], sync: Callable[[Any], Any], repeats: int, warmup: int = 1) -> Timing:
    """Run `fn` `warmup` times untimed, then `repeats` times, each timed up to `sync(result)` returning."""
    for _ in range(warmup):
        sync(fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        sync(fn())
        times.append(time.perf_counter() - t0)
    times.sort()
    q = statistics.quantiles(times, n=10, method="inclusive") if len(times) > 1 else [times[0]] * 9
    return Timing(statistics.median(times), q[0], q[-1], len(times))


def torch_sync(out: Any) -> Any:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out


def jax_sync(out: Any) -> Any:
    import jax

    return jax.block_until_ready(out)


# Dense datasheet peaks in FLOP/s (no sparsity), matched by substring of the device name.
# float32 is the tensor-core TF32 rate when TF32 is allowed, else plain FP32; see `device_peak`.
GPU_PEAKS: dict[str, dict[str, float]] = {
    "H200": {"bfloat16": 989e12, "float16": 989e12, "tf32": 494e12, "float32": 67e12},
    "H100": {"bfloat16": 989e12, "float16": 989e12, "tf32": 494e12, "float32": 67e12},
    "A100": {"bfloat16": 312e12, "float16": 312e12, "tf32": 156e12, "float32": 19.5e12},
    "L40S": {"bfloat16": 362e12, "float16": 362e12, "tf32": 183e12, "float32": 91.6e12},
    "L4": {"bfloat16": 121e12, "float16": 121e12, "tf32": 60e12, "float32": 30.3e12},
    "A10": {"bfloat16": 125e12, "float16": 125e12, "tf32": 62.5e12, "float32": 31.2e12},
    "4090": {"bfloat16": 165e12, "float16": 165e12, "tf32": 82.6e12, "float32": 82.6e12},
}
GPU_BANDWIDTH = {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.0e12, "L40S": 0.864e12, "L4": 0.3e12,
                 "A10": 0.6e12, "4090": 1.0e12}


def gpu_peak(name: str, dtype: str, tf32: bool) -> float | None:
    for key, peaks in GPU_PEAKS.items():
        if key in name:
            return peaks["tf32" if dtype == "float32" and tf32 else dtype]
    return None


def cpu_matmul_peak(dtype: str = "float32", n: int = 2048, repeats: int = 5) -> dict[str, float]:
    """FLOP/s of a large (n×n)·(n×n) matmul on this CPU, by torch and by jax (the peak is their max)."""
    peaks = {}
    try:
        import torch

        tdt = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
        a, b = torch.randn(n, n, dtype=tdt), torch.randn(n, n, dtype=tdt)
        peaks["torch"] = 2 * n**3 / measure(lambda: a @ b, torch_sync, repeats).median
    except ImportError:
        pass
    try:
        import jax
        import jax.numpy as jnp

        ja = jax.random.normal(jax.random.key(0), (n, n), getattr(jnp, dtype))
        mm = jax.jit(lambda x, y: x @ y)
        peaks["jax"] = 2 * n**3 / measure(lambda: mm(ja, ja), jax_sync, repeats).median
    except ImportError:
        pass
    return peaks


def jax_cache_note() -> str:
    """A note for compile timings when JAX's persistent compilation cache is on (JAX_COMPILATION_CACHE_DIR, as the
    test suite sets it): a compile found there is read from disk, so its time is not a compile time."""
    import jax

    path = jax.config.jax_compilation_cache_dir
    on = path and jax.config.jax_enable_compilation_cache
    return f"compile_s may be cache reads: JAX's persistent compilation cache is on ({path}); unset it" if on else ""
