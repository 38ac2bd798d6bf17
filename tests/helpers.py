"""Shared assertions and fixtures-as-functions for the test suite."""

from __future__ import annotations

import numpy as np


def to_numpy(x) -> np.ndarray:
    """A float64 numpy copy of a torch tensor, jax array or array-like."""
    if hasattr(x, "detach"):  # torch
        x = x.detach().to("cpu")
        x = x.double() if x.dtype.is_floating_point else x
        return x.numpy().astype(np.float64)
    return np.asarray(x, dtype=np.float64)


def rel_error(actual, expected) -> float:
    """‖a − b‖ / ‖b‖ (DESIGN.md §4), in float64."""
    a, b = to_numpy(actual), to_numpy(expected)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def assert_rel_close(actual, expected, tol: float, name: str = "tensor") -> float:
    """Fail unless shapes match, all values are finite and ‖a − b‖/‖b‖ <= tol; report the worst element."""
    a, b = to_numpy(actual), to_numpy(expected)
    assert a.shape == b.shape, f"{name}: shape {a.shape} != expected {b.shape}"
    bad = ~np.isfinite(a)
    assert not bad.any(), f"{name}: {int(bad.sum())} non-finite values, first at {np.argwhere(bad)[0].tolist()}"
    err = rel_error(a, b)
    if err > tol:
        diff = np.abs(a - b)
        worst = np.unravel_index(int(diff.argmax()), diff.shape)
        raise AssertionError(
            f"{name}: relative error {err:.3e} > {tol:.1e}; worst element {list(worst)}: "
            f"{a[worst]!r} vs expected {b[worst]!r}"
        )
    return err


def free_port() -> int:
    """A TCP port free on this machine now, for a test's rendezvous (torchrun, jax.distributed)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
