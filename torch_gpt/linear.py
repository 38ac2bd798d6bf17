"""`nn.Linear` with a second CPU path for the few rows of a decode step, taken only where it measures faster.

On some CPUs PyTorch's GEMM for a thin `x @ W.T` (a handful of rows, W stored (out, in) as nn.Linear holds it)
runs far below the machine's memory bandwidth, and the same product as one `bmm` over 8 row blocks of W (read in
place) is much faster; on others it is the reverse. Measured (torch 2.13, medians of repeated calls): on a 2-core
AMD EPYC, GPT-2's tied lm_head (50,257 × 768, float32) took 16–18 ms for one row with F.linear and 9.3 ms blocked,
and a gpt2 B=1 eager decode step 60.4 ms against 44.5; on a 2-core Intel Xeon with a 480 MB L3, F.linear took 5.1
ms and the blocked product 11.2, and the decode step 23.9 ms against 48.8. So which one runs is measured, not
assumed: the first time a layer sees a row count it can take (inference on CPU, at most MAX_ROWS rows), it times
both on that input (PROBE_CALLS calls each, alternating) and keeps the blocked path for that row count only where
it was at least 10% faster (`blocked_faster`, per layer: {rows: bool}). Inside `torch.compile` nothing is timed:
a traced step takes the decision already made for its row count, F.linear where there is none, so
`torch_gpt.generate(compile=True)` makes them (`calibrate`) before it compiles, and eager and compiled steps run
the same products. Under autograd and on other devices it is always `F.linear` (cuBLAS has no such gap, and
training's aten.mm/addmm are what `remat="dots"` keeps). The two paths agree to float32 rounding, not bitwise.
"""

from __future__ import annotations

import time

import torch
import torch.nn as nn
import torch.nn.functional as F

BLOCKS = 8  # row blocks of W: enough for every core here to stream its share; a few more cost nothing
MAX_ROWS = 64  # up to this many rows of x the blocked product can pay (the EPYC: faster at every GPT-2 shape)
PROBE_CALLS = 3  # timed calls of each path in a probe; their minimum is compared
MARGIN = 0.9  # the blocked path must take at most this fraction of F.linear's time to be kept


def blocked_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`F.linear(x, weight, bias)` for x (..., K) and a contiguous weight (N, K), as one bmm over BLOCKS
    row blocks of the weight (views, no copy) plus the N % BLOCKS rows left over."""
    *lead, k = x.shape
    n = weight.shape[0]
    rows = n // BLOCKS
    xt = x.reshape(-1, k).t()  # (K, M)
    y = torch.bmm(weight.as_strided((BLOCKS, rows, k), (rows * k, k, 1)), xt.expand(BLOCKS, *xt.shape))
    y = y.reshape(BLOCKS * rows, xt.shape[1])  # (N - N % BLOCKS, M); M may be 0
    if BLOCKS * rows < n:
        y = torch.cat([y, weight[BLOCKS * rows:] @ xt])
    y = y.t()  # (M, N)
    y = (y + bias if bias is not None else y).contiguous()  # the add may keep y's transposed layout
    return y.reshape(*lead, n)


def _fastest_of(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether `blocked_linear` beat F.linear by MARGIN on this input (after one warm-up call of each)."""
    times = {blocked_linear: [], F.linear: []}
    for _ in range(PROBE_CALLS + 1):
        for fn, ts in times.items():
            t0 = time.perf_counter()
            fn(x, weight, bias)
            ts.append(time.perf_counter() - t0)
    return min(times[blocked_linear][1:]) <= MARGIN * min(times[F.linear][1:])


class Linear(nn.Linear):
    """nn.Linear (the same parameters, names and init) whose inference on CPU with at most MAX_ROWS rows runs
    `blocked_linear` where a probe found it faster for that row count (see the module docstring)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.blocked_faster: dict[int, bool] = {}  # rows -> the probe's verdict; not state_dict, not saved

    def can_block(self, x: torch.Tensor) -> bool:
        """Inference on CPU, the right width (a wrong one goes to F.linear for its usual error), at most MAX_ROWS
        rows, and a contiguous weight of at least 64 rows per block (so the blocks are views)."""
        return (x.device.type == "cpu" and x.shape[-1] == self.in_features
                and x.numel() <= MAX_ROWS * x.shape[-1]
                and self.weight.shape[0] >= 64 * BLOCKS and self.weight.is_contiguous()
                and not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.can_block(x):
            rows = x.numel() // x.shape[-1]
            if torch.compiler.is_compiling():  # no timing in a trace; a symbolic row count is never looked up
                blocked = isinstance(rows, int) and self.blocked_faster.get(rows, False)
            else:
                if rows not in self.blocked_faster:
                    self.blocked_faster[rows] = _fastest_of(x, self.weight, self.bias)
                blocked = self.blocked_faster[rows]
            if blocked:
                return blocked_linear(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


@torch.no_grad()
def calibrate(model: nn.Module, rows: int) -> None:
    """Probe every `Linear` of `model` for inputs of `rows` rows now (on random inputs), so that a step compiled
    after it takes the same paths as an eager one."""
    for module in model.modules():
        if isinstance(module, Linear):
            x = torch.randn(rows, module.in_features, device=module.weight.device, dtype=module.weight.dtype)
            if module.can_block(x) and rows not in module.blocked_faster:
                module.blocked_faster[rows] = _fastest_of(x, module.weight, module.bias)
