"""Test-session set-up. Environment first: Triton reads TRITON_INTERPRET when it is imported."""

import os
import shutil
import tempfile

# JAX must not take 75% of a GPU's memory at first use: torch shares the GPU in the same test process.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
# Parity tests compare float32 results: keep JAX's matmuls in full precision on every backend.
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
# One XLA compilation cache for the session, in this process and the trainers and CLIs it starts: many tests compile
# the same tiny programs (a resumed run, the other process of a pair). A fresh folder per session, so nothing carries
# over between runs; the bench's compile timings are measured by the bench, never by the tests.
_SESSION_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _SESSION_CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jax-cache-")
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"


def pytest_configure(config):
    # Triton kernels on CPU tensors run in Triton's interpreter (DESIGN.md §5), except under `pytest -m gpu`,
    # which runs the compiled kernels on CUDA. Test modules (and so triton) are imported after this hook.
    gpu_only = (config.getoption("markexpr", "") or "").strip() == "gpu"
    os.environ.setdefault("TRITON_INTERPRET", "0" if gpu_only else "1")


def pytest_unconfigure(config):
    if _SESSION_CACHE is not None:  # the session's own folder only, never one the caller named
        shutil.rmtree(_SESSION_CACHE, ignore_errors=True)
