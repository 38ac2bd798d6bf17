"""Test-session set-up. Environment first: Triton reads TRITON_INTERPRET when it is imported."""

import os

# Triton kernels on CPU tensors run in Triton's interpreter (DESIGN.md §5); must precede any triton import.
os.environ.setdefault("TRITON_INTERPRET", "1")
# Parity tests compare float32 results: keep JAX's matmuls in full precision on every backend.
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
