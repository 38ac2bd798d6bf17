"""`nn.Linear` with a faster CPU path for the few rows of a decode step.

On CPU, PyTorch's GEMM for a thin `x @ W.T` (a handful of rows, W stored (out, in) as nn.Linear holds it) runs
far below the machine's memory bandwidth. Measured on a 2-core AMD EPYC (torch 2.13, medians of repeated calls):
GPT-2's tied lm_head, (50,257 × 768) float32, took 16–18 ms for one row, reading its 154 MB at 9 GB/s (no faster
on two threads than on one) where the machine sums a buffer at 18–21 GB/s, and 42 ms for four rows. The same
product as one `bmm` over 8 row blocks of W, read in place, took 9.3 ms for one row and 13.4 ms for four; streamed
over all of GPT-2's weights, 15 against 8.3 GB/s at one row and 11.2 against 4.0 at four. `python -m bench speed
--phase decode` shows the effect on a whole step. Inference only: under autograd, and on other devices,
`F.linear` as always (cuBLAS has no such gap, and training's aten.mm/addmm are what `remat="dots"` keeps).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

BLOCKS = 8  # row blocks of W: enough for every core here to stream its share; a few more cost nothing
MAX_ROWS = 64  # up to this many rows of x the blocked product was faster at every GPT-2 shape measured


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


class Linear(nn.Linear):
    """nn.Linear (the same parameters, names and init) whose inference on CPU with at most MAX_ROWS rows runs
    `blocked_linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # A wrong input width goes to F.linear too, for its usual error.
        few_rows = x.shape[-1] == self.in_features and x.numel() <= MAX_ROWS * x.shape[-1]
        splits = self.weight.shape[0] >= 64 * BLOCKS and self.weight.is_contiguous()  # blocks of >= 64 rows, as views
        recorded = torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)
        if x.device.type == "cpu" and few_rows and splits and not recorded:
            return blocked_linear(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)
