"""`nn.Linear` with two more CPU paths for the few rows of a decode step, taken only where they measure faster.

On CPU, PyTorch's GEMM for a thin `x @ W.T` (a handful of rows against W stored (out, in), as nn.Linear holds it)
can run well below what the machine allows, and what helps depends on the CPU. Two alternatives:
- "blocked": one `bmm` over BLOCKS row blocks of W, read in place (no memory). On a 2-core AMD EPYC, GPT-2's tied
  lm_head (50,257 × 768, float32) took 16–18 ms for one row with F.linear and 9.3 ms blocked, and a gpt2 B=1
  eager decode step 60.4 ms against 44.5; on a 2-core Intel Xeon with a 480 MB L3 it was the reverse (5.1 against
  11.2 ms; the step 23.9 against 48.8).
- "transposed": `x @ W_t` from a (in, out) copy of W, which PyTorch's GEMM reads faster for a few rows: on that
  Xeon the tiny preset's lm_head (50,257 × 64) took 0.58 ms for four rows with F.linear and 0.28 from the copy,
  gpt2's 11.5 against 7.8 ms. It costs a copy of the weight, held while a row count uses it.
So which runs is measured, not assumed: the first time a layer sees a row count it can take (inference on CPU, at
most MAX_ROWS rows), it times the three on that input and keeps an alternative only where it took at most MARGIN
(blocked) or COPY_MARGIN (transposed, for its memory) of F.linear's time (`paths`, per layer: {rows: path}).
Inside `torch.compile` nothing is timed: a traced step takes the verdict already made for its row count (F.linear
where there is none), and reads a copy only inside `torch_gpt.generate`, which first (`calibrated`) makes the
verdicts and brings every copy up to date with its weight, so compiled steps compute with the current weights.
A compiled product is not always the eager one, though: at one row Inductor turns the blocked `bmm` into its own
fused reduction kernel, which on the EPYC ran each of a gpt2 block's products at one row 2.4-3.8x faster than `addmm`
(c_attn 84 against 222 us, each compiled alone, weights in cache). And a third product exists only compiled:
"reduced", `(x[..., None, :] * W).sum(-1)`, which Inductor makes one vectorized loop over W's rows, each dot product
accumulated in vector registers (eagerly it would materialise an (M, N, K) tensor); its input is realized first, or
Inductor would recompute the producer (the final LayerNorm) inside that loop for every row of W. The tiny preset's
lm_head and greedy argmax at four rows took 0.6-0.9 ms against 1.2-1.6 blocked (both compiled, the EPYC), and its
decode step 1.54 against 2.20 ms. So `calibrated` also times the compiled products (compiled once per shape by
Inductor, without dynamo) and records which one traced steps take (`compiled_paths`). Under autograd and on other
devices it is always `F.linear` (cuBLAS has no such gap, and training's aten.mm/addmm are what `remat="dots"`
keeps). The paths agree to float32 rounding, not bitwise, and so do compiled and eager steps where their paths differ.
The probes cost time once per layer and row count (1.6 s for gpt2 at B=4, its prefill included, on 2 cores), the
compiled ones three Inductor compilations per weight shape and batch size.
`COPY_MARGIN = 0` never holds a copy; `MARGIN = 0` never blocks nor reduces; `MAX_ROWS = 0` always runs F.linear.
"""

from __future__ import annotations

import contextlib
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

BLOCKS = 8  # row blocks of W: enough for every core here to stream its share; a few more cost nothing
MAX_ROWS = 64  # up to this many rows of x the blocked product can pay (the EPYC: faster at every GPT-2 shape)
PROBE_CALLS = 3  # rounds of an eager probe, each timing every path once; each path's minimum is compared
COMPILED_PROBE_CALLS = 10  # and of a compiled one (made once per shape, so it can afford steadier figures)
MARGIN = 0.9  # blocked (eager: of F.linear's time) or reduced (compiled: of the eager verdict's) must take at most this
COPY_MARGIN = 0.8  # the transposed path, which holds a copy of the weight, at most this fraction


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


PATHS = ("linear", "blocked", "transposed")  # eager steps' paths; compiled ones may also take "reduced"
COMPILED_ALTERNATIVES = ("blocked", "reduced")  # what a compiled probe weighs against the eager verdict


def transposed_linear(x: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`F.linear(x, weight, bias)` from a contiguous (K, N) copy of the weight: `x @ weight_t (+ bias)`, one
    addmm with a bias (as Inductor would fuse it, so eager and compiled round alike)."""
    x2 = x.reshape(-1, x.shape[-1])
    y = torch.addmm(bias, x2, weight_t) if bias is not None else x2 @ weight_t
    return y.reshape(*x.shape[:-1], weight_t.shape[1])


def reduced_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`F.linear(x, weight, bias)` as a product and a sum over K, for compiled steps only: Inductor makes it one
    reduction kernel over W's rows (eagerly it would materialise (..., N, K)). x is realized first (a no-op
    eagerly, a buffer in Inductor), so that what produced it is computed once, not inside the loop for every row."""
    import torch._inductor.inductor_prims  # noqa: F401  (registers the prim; `_can_realize` checked it is there)

    x = torch.ops.prims.inductor_force_stride_order(x, x.stride())
    y = (x[..., None, :].float() * weight.float()).sum(-1)  # float32 products and sum, as a GEMM accumulates
    return (y + bias.float() if bias is not None else y).to(x.dtype)


def _can_realize() -> bool:
    """Whether this torch has the Inductor prim `reduced_linear` realizes its input with (private to Inductor: where
    it is gone, compiled steps keep the blocked product and F.linear, as before the reduced one existed)."""
    try:
        import torch._inductor.inductor_prims  # noqa: F401  (registers the prim)

        return hasattr(torch.ops.prims, "inductor_force_stride_order")
    except ImportError:
        return False


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


_PRODUCTS = {"linear": F.linear, "blocked": blocked_linear, "transposed": transposed_linear,
             "reduced": reduced_linear}
_COMPILED_VERDICTS: dict[tuple, str] = {}  # Linear.probe_compiled's, by shape: gpt2's 12 c_attn layers share one


def _compiled_product(path: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    """One path's product as Inductor compiles it for exactly these shapes, as a call of no arguments (called once
    already: warm). Traced by make_fx on fake tensors (nothing computed, so the reduced product's eager (M, N, K)
    never exists) and compiled by `torch._inductor.compile`: no dynamo, so no cache of compiled graphs per Python
    function fills up across shapes."""
    from torch.fx.experimental.proxy_tensor import make_fx

    product = _PRODUCTS[path]
    fn = (lambda x, w: product(x, w, None)) if bias is None else product
    with torch.inference_mode(False), torch.no_grad():  # make_fx traces normal tensors (copies of inference ones)
        inputs = (x, weight) if bias is None else (x, weight, bias)
        args = [t.clone() if t.is_inference() else t.detach() for t in inputs]
        compiled = torch._inductor.compile(make_fx(fn, tracing_mode="fake")(*args), args)
        compiled(*args)
    return lambda: compiled(*args)


def _fastest(calls: dict, rounds: int) -> dict[str, float]:
    """Each call's minimum time over `rounds` rounds, every round calling each once in turn, so that a slow spell of
    a shared machine falls on all alike (timed back to back, one path's calls could all land in one and lose a
    verdict they should win: seen on the EPYC, a compiled probe's reduced product at 0.998 against 1.017 ms, where
    it measures 0.40-0.46 against 0.63-0.91 in turns). Every path reads the same weight, so each finds it as warm."""
    times = dict.fromkeys(calls, float("inf"))
    for _ in range(rounds):
        for name, call in calls.items():
            times[name] = min(times[name], _time(call))
    return times


class Linear(nn.Linear):
    """nn.Linear (the same parameters, names and init) whose inference on CPU with at most MAX_ROWS rows may run
    `blocked_linear` or `transposed_linear`, where a probe found it faster for that row count (see the module
    docstring)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.paths: dict[int, str] = {}  # rows -> the probe's verdict, one of PATHS; not state_dict, not saved
        self.compiled_paths: dict[int, str] = {}  # rows -> the path traced steps take, where `calibrated` timed it
        self.weight_t: torch.Tensor | None = None  # the (K, N) copy, only while a verdict is "transposed"
        self._weight_t_of: tuple | None = None  # (version, data_ptr, dtype, device) of the weight it copies

    def may_switch(self, x: torch.Tensor) -> bool:
        """Whether x may take a path other than F.linear: inference on CPU, the right width (a wrong one goes to
        F.linear for its usual error), at most MAX_ROWS rows, and a contiguous weight of at least 64 rows per block
        (so the blocks are views)."""
        return (x.device.type == "cpu" and x.shape[-1] == self.in_features
                and x.numel() <= MAX_ROWS * x.shape[-1]
                and self.weight.shape[0] >= 64 * BLOCKS and self.weight.is_contiguous()
                and not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)))

    def fresh_weight_t(self) -> torch.Tensor:
        """The (K, N) copy, made or brought up to date with the weight (in place where it can be, so a compiled
        step holding it sees the new values)."""
        w = self.weight
        of = (w._version, w.data_ptr(), w.dtype, w.device)
        if self.weight_t is None or self.weight_t.shape != w.shape[::-1] or of[2:] != self._weight_t_of[2:]:
            with torch.inference_mode(False), torch.no_grad():  # a normal tensor: later refreshes may write it
                self.weight_t = w.detach().t().contiguous()
        elif of != self._weight_t_of:
            with torch.no_grad():
                self.weight_t.copy_(w.detach().t())
        self._weight_t_of = of
        return self.weight_t

    def probe(self, x: torch.Tensor) -> str:
        """Time the three paths on x (a warm-up call each, then PROBE_CALLS rounds in turns) and record the fastest
        for its row count, counting the blocked path (views of the weight) only if it takes at most MARGIN of
        F.linear's time and the transposed one (a copy of the weight, held while a row count uses it) COPY_MARGIN."""
        w, b = self.weight, self.bias
        calls = {"linear": lambda: F.linear(x, w, b), "blocked": lambda: blocked_linear(x, w, b),
                 "transposed": lambda: transposed_linear(x, self.fresh_weight_t(), b)}
        limit = {"linear": 1.0, "blocked": MARGIN, "transposed": COPY_MARGIN}
        calls = {name: fn for name, fn in calls.items() if limit[name] > 0}  # a margin of 0: not timed, no copy
        for fn in calls.values():
            fn()  # warm-up (the copy is made here)
        best = {name: t / limit[name] for name, t in _fastest(calls, PROBE_CALLS).items()}
        path = min(best, key=best.get)
        self.paths[x.numel() // x.shape[-1]] = path
        if "transposed" not in self.paths.values():
            self.weight_t = self._weight_t_of = None  # the copy's memory back
        return path

    def probe_compiled(self, x: torch.Tensor) -> str:
        """For steps traced by `torch.compile`: time the eager verdict's product and COMPILED_ALTERNATIVES, each as
        Inductor compiles it, and record which traced steps take for x's row count (an alternative only where it
        takes at most MARGIN of the eager verdict's time; the fastest of those). Decided once per input and weight
        shape, bias, dtype and eager verdict."""
        rows = x.numel() // x.shape[-1]
        eager = self.paths[rows]
        key = (tuple(x.shape), tuple(self.weight.shape), self.bias is not None, x.dtype, eager)
        if key not in _COMPILED_VERDICTS:
            verdict = eager
            if MARGIN > 0:  # a margin of 0 keeps the eager verdict: nothing compiled
                w = self.fresh_weight_t() if eager == "transposed" else self.weight
                calls = {eager: _compiled_product(eager, x, w, self.bias)}
                for path in COMPILED_ALTERNATIVES:
                    if path != eager and (path != "reduced" or _can_realize()):
                        calls[path] = _compiled_product(path, x, self.weight, self.bias)
                with torch.inference_mode(False), torch.no_grad():
                    times = _fastest(calls, COMPILED_PROBE_CALLS)
                times = {path: t / (1.0 if path == eager else MARGIN) for path, t in times.items()}
                verdict = min(times, key=times.get)  # a tie: the eager verdict (first)
            _COMPILED_VERDICTS[key] = verdict
        self.compiled_paths[rows] = _COMPILED_VERDICTS[key]
        return self.compiled_paths[rows]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.may_switch(x):
            rows = x.numel() // x.shape[-1]
            if torch.compiler.is_compiling():  # no timing in a trace; a symbolic row count is never looked up
                path = (self.compiled_paths.get(rows, self.paths.get(rows, "linear")) if isinstance(rows, int)
                        else "linear")
                if path == "transposed" and not (_COPIES_CHECKED and self.weight_t is not None):
                    path = "linear"  # outside generate nothing vouches that the copy is the weight's
            else:
                path = self.paths[rows] if rows in self.paths else self.probe(x)
            if path == "blocked":
                return blocked_linear(x, self.weight, self.bias)
            if path == "reduced":  # only ever a compiled verdict
                return reduced_linear(x, self.weight, self.bias)
            if path == "transposed":
                w_t = self.weight_t if torch.compiler.is_compiling() else self.fresh_weight_t()
                return transposed_linear(x, w_t, self.bias)
        return F.linear(x, self.weight, self.bias)


# True while torch_gpt.generate runs, after `calibrated` brought every copy up to date: only then may a compiled
# step read a (K, N) copy (dynamo guards on this value, so graphs traced outside generate never do).
_COPIES_CHECKED = False


@contextlib.contextmanager
def calibrated(model: nn.Module, rows: int):
    """Probe every CPU `Linear` of `model` for inputs of `rows` rows where it has no verdict yet, eager and
    compiled (`probe_compiled`), and bring every (K, N) copy up to date with its weight, so that a step compiled
    inside takes measured paths and reads the current weights. The probes' random inputs come from their own
    generator: a caller's seeded sampling draws what it drew without them."""
    global _COPIES_CHECKED
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, Linear) and module.weight.device.type == "cpu":
                x = torch.randn(rows, module.in_features, generator=gen).to(module.weight.dtype)
                if module.may_switch(x):
                    if rows not in module.paths:
                        module.probe(x)
                    if rows not in module.compiled_paths:
                        module.probe_compiled(x)
                if "transposed" in module.paths.values():
                    module.fresh_weight_t()
    previous, _COPIES_CHECKED = _COPIES_CHECKED, True
    try:
        yield
    finally:
        _COPIES_CHECKED = previous
