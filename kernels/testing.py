"""The kernels' accuracy rule (DESIGN.md §4), written once for the tests and the bench.

A kernel's error against a float64 reference must be at most twice the error of PyTorch's own implementation
in the same dtype, plus the error of merely rounding the exact answer to that dtype (the floor: when PyTorch
is itself exact to the last bit, a kernel that rounds once differently must still pass). The rounding of a few
elements is a noisy sample (one value may happen to be almost exact in the dtype), so the floor is never below
eps/sqrt(numel): one unit of the dtype's rounding for a single value, less as the sample grows. Errors are relative:
‖got − exact‖ / ‖exact‖. A gradient that is zero in exact arithmetic has only rounding noise; pass `scale` (the
largest exact gradient norm of the same call) and errors are then measured relative to it wherever ‖exact‖ is
below 1e-3 of it, with one unit of the dtype's rounding (its eps) at that scale as the floor.

Imports only torch: `tests/` and `bench/` both use it, and `kernels` must not import either of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Below this fraction of `scale`, an exact tensor counts as zero and errors are measured against `scale`.
ZERO_FRACTION = 1e-3


@dataclass(frozen=True)
class Accuracy:
    """One verdict of the rule: the kernel's error, PyTorch's, the rounding floor, and where it is worst."""

    error: float  # ‖got − exact‖ / denominator
    torch_error: float  # ‖PyTorch − exact‖ / denominator, PyTorch in the same dtype
    floor: float  # ‖exact rounded to got's dtype − exact‖ / denominator, >= eps/sqrt(numel) (against scale: eps)
    nonfinite: int  # NaN or inf elements in `got` (unwritten outputs are NaN when poisoned)
    worst_index: tuple[int, ...]  # where |got − exact| is largest (the first non-finite element if any)
    worst_got: float
    worst_exact: float

    @property
    def bound(self) -> float:
        return 2 * self.torch_error + self.floor

    @property
    def ok(self) -> bool:
        return self.nonfinite == 0 and self.error <= self.bound

    @property
    def ratio(self) -> float | None:
        """error / torch_error: at most 2 passes outright; None when PyTorch is exact."""
        return self.error / self.torch_error if self.torch_error else None

    def describe(self, name: str) -> str:
        where = f"worst element {list(self.worst_index)}: {self.worst_got!r} vs exact {self.worst_exact!r}"
        if self.nonfinite:
            return f"{name}: {self.nonfinite} non-finite values (unwritten outputs are NaN); first at {where}"
        verdict = "<=" if self.ok else ">"
        return (f"{name}: error {self.error:.3e} {verdict} 2 x PyTorch's {self.torch_error:.3e} + rounding "
                f"{self.floor:.1e}; {where}")


def accuracy(got: torch.Tensor, torch_value: torch.Tensor, exact: torch.Tensor, *,
             scale: float | None = None) -> Accuracy:
    """The rule's verdict on `got` (a kernel's output), beside `torch_value` (PyTorch in the same dtype), against
    `exact` (float64). The floor rounds `exact` to `got`'s dtype."""
    if got.shape != exact.shape or torch_value.shape != exact.shape:
        raise ValueError(f"shapes differ: got {tuple(got.shape)}, PyTorch {tuple(torch_value.shape)}, "
                         f"exact {tuple(exact.shape)}")
    exact = exact.detach().to("cpu", torch.float64)
    g = got.detach().to("cpu", torch.float64)
    norm = float(torch.linalg.vector_norm(exact))
    against_scale = scale is not None and norm < ZERO_FRACTION * scale
    denom = max(float(scale) if against_scale else norm, 1e-30)

    def err(a: torch.Tensor) -> float:
        return float(torch.linalg.vector_norm(a.detach().to("cpu", torch.float64) - exact)) / denom

    bad = ~torch.isfinite(g)
    nonfinite = int(bad.sum())
    diff = torch.where(bad, torch.inf, (g - exact).abs())
    flat = int(diff.argmax()) if diff.numel() else 0
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), exact.shape)) if exact.dim() else ()
    empty = g.numel() == 0
    eps = torch.finfo(got.dtype).eps
    return Accuracy(
        error=err(g) if not nonfinite else float("nan"), torch_error=err(torch_value),
        floor=eps if against_scale else max(err(exact.to(got.dtype)), eps / max(exact.numel(), 1) ** 0.5),
        nonfinite=nonfinite, worst_index=index,
        worst_got=0.0 if empty else float(g.reshape(-1)[flat]),
        worst_exact=0.0 if empty else float(exact.reshape(-1)[flat]))


def assert_accurate(name: str, got: torch.Tensor, torch_value: torch.Tensor, exact: torch.Tensor, *,
                    scale: float | None = None) -> Accuracy:
    """`accuracy(...)`, raising AssertionError (naming `name`, the errors and the worst element) unless it holds."""
    verdict = accuracy(got, torch_value, exact, scale=scale)
    if not verdict.ok:
        raise AssertionError(verdict.describe(name))
    return verdict
