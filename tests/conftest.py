"""Test-session set-up. Environment first: Triton reads TRITON_INTERPRET when it is imported."""

import os

# JAX must not take 75% of a GPU's memory at first use: torch shares the GPU in the same test process.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
# Parity tests compare float32 results: keep JAX's matmuls in full precision on every backend.
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")


def pytest_configure(config):
    # Triton kernels on CPU tensors run in Triton's interpreter (DESIGN.md §5), except under `pytest -m gpu`,
    # which runs the compiled kernels on CUDA. Test modules (and so triton) are imported after this hook.
    gpu_only = (config.getoption("markexpr", "") or "").strip() == "gpu"
    os.environ.setdefault("TRITON_INTERPRET", "0" if gpu_only else "1")
