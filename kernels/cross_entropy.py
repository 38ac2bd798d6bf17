"""Fused linear + cross-entropy: the loss of `hidden @ weight.T (+ bias)` against integer targets, and its
gradients, without ever holding the (N, V) logits.

Rows are taken a chunk at a time (`chunk_rows`: a chunk's (rows, V) logits hold about as many elements as the
(N, C) hidden states, as Liger-Kernel sizes them), so at most one chunk of logits lives at once: for GPT-2 at
B=8, T=1024 that is 128 × 50,257 instead of 8,192 × 50,257 floats (1.6 GB in float32, and as much again for
their gradient). Per chunk:

1. torch computes the logits, `hidden_chunk @ weight.T (+ bias)`, in the inputs' dtype (cuBLAS / oneDNN: a
   Triton GEMM would not beat them, and the matmuls are most of the work);
2. one Triton program per row (`_ce_kernel`) takes the row's float32 log-sum-exp in one online pass (softcap
   and label smoothing folded in), writes the row's loss, and in a second pass overwrites the logits with
   d(loss)/d(logits) in place, so the gradient needs no second buffer;
3. torch turns that gradient into the chunk's rows of d(hidden) (`g @ weight`) and adds `g.T @ hidden_chunk`
   into a float32 accumulator of d(weight) (and `g.sum(0)` into d(bias)).

Gradients are computed in the forward (Liger's approach) for reduction "mean" and "sum": their backward only
scales the saved gradients by the scalar grad_output, in place (a scaled copy of d(weight) would be the loss's
largest allocation; a second backward through a retained graph recomputes them instead). That costs no extra
GEMM (recomputing the logits in the backward, as Apple's Cut Cross-Entropy does, adds a fourth GEMM of 2·N·V·C,
about 10% of a GPT-2 training step), and no peak memory in training: the loss is the forward's last op and its
backward runs next, so the saved d(hidden) (N, C) and d(weight) (V, C) would be allocated at that moment anyway.
Without gradients (`torch.no_grad()`, eval, inputs that need none) only the loss is computed. Reduction "none"
cannot work that way (the per-row grad_output must weigh each row before the rows are summed into d(weight)), so
its forward computes only the losses and its backward recomputes the logits chunk by chunk.

Semantics are `F.cross_entropy(logits.float(), targets, ignore_index=..., reduction=..., label_smoothing=...)`
with logits = softcap·tanh(z / softcap) when `softcap` is given (Gemma 2): rows whose target is `ignore_index`
contribute nothing, "mean" divides by the rows not ignored (NaN when every row is, gradients zero), and the
loss is float32 whatever the inputs' dtype.

Dispatch as for the other kernels: CUDA tensors run `_ce_kernel` compiled, CPU tensors run it in Triton's
interpreter under TRITON_INTERPRET=1 and a float32 PyTorch reference of the same per-chunk step otherwise (the
chunking, and so the memory bound, is the same on every path).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kernels import utils
from kernels.utils import cast_to

REDUCTIONS = ("mean", "sum", "none")
# Rows of one chunk at least this many (or all of them), so the chunk GEMMs stay large enough to be efficient.
MIN_CHUNK_ROWS = 128
# Elements of one row block of `_ce_kernel`, 16 per thread at 8 warps. Blocks of 8192 at 16 warps spilled a
# register in some builds on sm_90 (kernels.compile_report); 4096 builds clean at 4, 8 and 16 warps.
CE_MAX_BLOCK = 4096

# torch.addmm(..., out_dtype=torch.float32) on CUDA (torch >= 2.8): 16-bit operands, float32 accumulator.
_ADDMM_OUT_DTYPE = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 8)


# ============================================================================ Triton kernel
@triton.jit
def _scores(z, softcap, SOFTCAP: tl.constexpr):
    """float32 logits after the optional cap, softcap·tanh(z / softcap), and tanh(z / softcap) for the gradient."""
    z = z.to(tl.float32)
    if SOFTCAP:
        t = utils.tanh(z / softcap)
        return t * softcap, t
    return z, z


@triton.jit
def _ce_kernel(
    LOGITS,  # (R, V) logits of R rows; with WRITE_GRAD overwritten in place by d(loss)/d(logits)
    TARGETS,  # (R,) int: each row's class, or ignore_index
    SCALE,  # float32 (1,), or (R,) with ROW_SCALE: the factor of each row's gradient (1/n for "mean")
    LOSS,  # (R,) float32 out: each row's loss, 0 where ignored; or None
    stride_row,  # LOGITS row stride; unit stride along V
    V, ignore_index,
    label_smoothing,  # ε: the target distribution is (1 - ε)·onehot(y) + ε/V
    softcap,  # c of c·tanh(z / c), read where SOFTCAP
    BLOCK_V: tl.constexpr,  # a row is walked BLOCK_V columns at a time
    SOFTCAP: tl.constexpr, SMOOTHING: tl.constexpr, WRITE_GRAD: tl.constexpr, ROW_SCALE: tl.constexpr,
    INTERP_BF16: tl.constexpr,  # bfloat16 under the interpreter: round by hand (utils.cast_to)
):
    # With s the (capped) logits, p = softmax(s) and lse = log Σ exp(s):
    # loss = lse − (1 − ε)·s_y − (ε/V)·Σ_j s_j, and d(loss)/d(s_j) = p_j − (1 − ε)·[j = y] − ε/V.
    row = tl.program_id(0).to(tl.int64)
    LOGITS += row * stride_row
    cols = tl.arange(0, BLOCK_V)
    y = tl.load(TARGETS + row)
    if y == ignore_index:  # the row contributes nothing: loss 0, gradient 0
        if LOSS is not None:
            tl.store(LOSS + row, 0.0)
        if WRITE_GRAD:
            zero = tl.zeros((BLOCK_V,), tl.float32).to(LOGITS.dtype.element_ty)
            for start in range(0, V, BLOCK_V):
                tl.store(LOGITS + start + cols, zero, mask=start + cols < V)
    else:
        s_y = _scores(tl.load(LOGITS + y), softcap, SOFTCAP)[0]  # read before any thread overwrites it
        # Pass 1: the online max m and sum d of exp(s − m), and the sum of the logits for smoothing.
        m = -float("inf")
        d = 0.0
        total = 0.0
        for start in range(0, V, BLOCK_V):
            ok = start + cols < V
            s = _scores(tl.load(LOGITS + start + cols, mask=ok, other=0.0), softcap, SOFTCAP)[0]
            s = tl.where(ok, s, -float("inf"))
            m_new = tl.maximum(m, tl.max(s, 0))
            d = d * tl.exp(m - m_new) + tl.sum(tl.exp(s - m_new), 0)
            m = m_new
            if SMOOTHING:
                total += tl.sum(tl.where(ok, s, 0.0), 0)
        lse = m + tl.log(d)
        loss = lse - s_y
        if SMOOTHING:
            loss = lse - (1.0 - label_smoothing) * s_y - (label_smoothing / V) * total
        if LOSS is not None:
            tl.store(LOSS + row, loss)
        if WRITE_GRAD:
            if ROW_SCALE:
                scale = tl.load(SCALE + row)
            else:
                scale = tl.load(SCALE)
            tl.debug_barrier()  # every read of pass 1 is done before the row is overwritten
            # Pass 2: the gradient, rounded once to the logits' dtype.
            for start in range(0, V, BLOCK_V):
                ok = start + cols < V
                s, t = _scores(tl.load(LOGITS + start + cols, mask=ok, other=0.0), softcap, SOFTCAP)
                # p = exp(s − m) / d, not exp(s − lse): lse's rounding error, eps·|lse|, would scale every p.
                g = tl.exp(s - m) / d - tl.where(start + cols == y, 1.0 - label_smoothing, 0.0)
                if SMOOTHING:
                    g -= label_smoothing / V
                g = g * scale
                if SOFTCAP:
                    g = g * (1.0 - t * t)  # d(c·tanh(z/c))/dz
                tl.store(LOGITS + start + cols, cast_to(g, LOGITS.dtype.element_ty, INTERP_BF16), mask=ok)


# ============================================================================ launchers
def ce_block_config(v: int) -> tuple[int, int]:
    """(BLOCK_V, num_warps) for rows of `v` logits: up to CE_MAX_BLOCK elements at a time, 16 per thread."""
    block = min(max(16, utils.next_power_of_2(v)), CE_MAX_BLOCK)
    return block, min(max(block // 512, 1), 16)


def chunk_rows(n: int, c: int, v: int) -> int:
    """Rows per chunk for N rows of C hidden features and V classes: the chunk's (rows, V) logits about as large
    as the (N, C) hidden states (a power of two of rows), at least MIN_CHUNK_ROWS rows, at most N."""
    rows = utils.next_power_of_2(triton.cdiv(max(n, 1) * c, max(v, 1)))
    return max(1, min(n, max(MIN_CHUNK_ROWS, rows)))


def ce_chunk(logits: torch.Tensor, targets: torch.Tensor, scale: torch.Tensor, loss: torch.Tensor | None, *,
             ignore_index: int, label_smoothing: float, softcap: float, write_grad: bool, row_scale: bool) -> None:
    """Launch `_ce_kernel` on one chunk: each row's loss into `loss` (R,) float32, and with `write_grad` the
    logits (R, V) replaced by d(loss)/d(logits) times `scale` (one float32, or one per row with `row_scale`)."""
    rows, v = logits.shape
    if rows == 0:
        return
    block, warps = ce_block_config(v)
    with utils.device_guard(logits):
        _ce_kernel[(rows,)](
            LOGITS=logits, TARGETS=targets, SCALE=scale, LOSS=loss, stride_row=logits.stride(0), V=v,
            ignore_index=ignore_index, label_smoothing=label_smoothing, softcap=softcap if softcap else 1.0,
            BLOCK_V=block, SOFTCAP=bool(softcap), SMOOTHING=label_smoothing > 0, WRITE_GRAD=write_grad,
            ROW_SCALE=row_scale, INTERP_BF16=utils.interpreting() and logits.dtype == torch.bfloat16,
            num_warps=warps, **utils.LAUNCH_OPTIONS)


def reference_chunk(logits: torch.Tensor, targets: torch.Tensor, scale: torch.Tensor, loss: torch.Tensor | None, *,
                    ignore_index: int, label_smoothing: float, softcap: float, write_grad: bool,
                    row_scale: bool) -> None:
    """What `ce_chunk` computes, in float32 PyTorch."""
    z = logits.float()
    t = torch.tanh(z / softcap) if softcap else None
    s = t * softcap if softcap else z
    lse = torch.logsumexp(s, -1)  # (R,)
    valid = targets != ignore_index
    y = torch.where(valid, targets, 0).long()
    s_y = s.gather(1, y[:, None])[:, 0]
    if loss is not None:
        eps = label_smoothing
        row = lse - (1 - eps) * s_y - eps * s.mean(-1) if eps > 0 else lse - s_y
        loss.copy_(torch.where(valid, row, 0.0))
    if write_grad:
        g = (s - lse[:, None]).exp_()  # one (R, V) temporary besides the logits
        g.scatter_add_(1, y[:, None], torch.full_like(s_y[:, None], -(1 - label_smoothing)))
        if label_smoothing > 0:
            g -= label_smoothing / s.shape[1]
        g *= torch.where(valid, scale if row_scale else scale.expand_as(lse), 0.0)[:, None]
        if softcap:
            g *= 1 - t * t
        logits.copy_(g)


def _accumulate_mm(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b with float32 `acc`, the products summed in float32 whatever a's and b's dtype."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
    elif acc.is_cuda and _ADDMM_OUT_DTYPE:
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:  # no 16-bit GEMM with a float32 output here (CPU, older torch): widen the operands
        acc.addmm_(a.float(), b.float())


def lce_chunks(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
               scale: torch.Tensor, *, chunk_fn, ignore_index: int, label_smoothing: float, softcap: float, chunk: int,
               want_loss: bool, row_scale: bool, grads: tuple[bool, bool, bool]) -> tuple[torch.Tensor, ...]:
    """The chunk loop of every path: hidden (N, C), weight (V, C), bias (V,) or None, targets (N,).

    `chunk_fn` is `ce_chunk` or `reference_chunk`; `scale` (1,) or (N,) with `row_scale` weighs each row's
    gradient; `grads` says which of d(hidden), d(weight), d(bias) to compute. Returns the per-row losses (N,)
    float32 (or empty), d(hidden) (N, C), d(weight) (V, C) and d(bias) (V,) in the inputs' dtypes (or empty).
    """
    with torch.autocast(hidden.device.type, enabled=False):  # the GEMMs' dtypes are chosen here, not by autocast
        return _lce_chunks(hidden, weight, bias, targets, scale, chunk_fn=chunk_fn, ignore_index=ignore_index,
                           label_smoothing=label_smoothing, softcap=softcap, chunk=chunk, want_loss=want_loss,
                           row_scale=row_scale, grads=grads)


def _lce_chunks(hidden, weight, bias, targets, scale, *, chunk_fn, ignore_index, label_smoothing, softcap, chunk,
                want_loss, row_scale, grads):
    n, c = hidden.shape
    v = weight.shape[0]
    want_dh, want_dw, want_db = grads
    write_grad = any(grads)
    loss = utils.empty(n, dtype=torch.float32, device=hidden.device) if want_loss else None
    dh = utils.empty(n, c, dtype=hidden.dtype, device=hidden.device) if want_dh else None
    dw = torch.zeros(v, c, dtype=torch.float32, device=hidden.device) if want_dw else None
    db = torch.zeros(v, dtype=torch.float32, device=hidden.device) if want_db else None
    for start in range(0, n, chunk):
        end = min(start + chunk, n)
        h = hidden[start:end]  # (R, C)
        logits = torch.addmm(bias, h, weight.t()) if bias is not None else torch.mm(h, weight.t())  # (R, V)
        chunk_fn(logits, targets[start:end], scale[start:end] if row_scale else scale,
                 loss[start:end] if loss is not None else None, ignore_index=ignore_index,
                 label_smoothing=label_smoothing, softcap=softcap, write_grad=write_grad, row_scale=row_scale)
        if dh is not None:
            torch.mm(logits, weight, out=dh[start:end])  # (R, C)
        if dw is not None:
            _accumulate_mm(dw, logits.t(), h)  # (V, C)
        if db is not None:
            db += logits.sum(0, dtype=torch.float32)  # (V,)
        del logits  # before the next chunk's logits are allocated
    empty = lambda: hidden.new_empty(0)  # one tensor each: a custom op's outputs must not alias
    return (loss if loss is not None else hidden.new_empty(0, dtype=torch.float32),
            dh if dh is not None else empty(),
            dw.to(weight.dtype) if dw is not None else empty(),
            db.to(bias.dtype) if db is not None else empty())


def _scale(targets: torch.Tensor, ignore_index: int, reduction: str) -> torch.Tensor:
    """(1,) float32 factor of every row's gradient: 1 / (rows not ignored) for "mean" (inf when none is), else 1."""
    if reduction == "mean":
        return torch.reciprocal((targets != ignore_index).sum().float()).reshape(1)
    return torch.ones(1, dtype=torch.float32, device=targets.device)


def _chunk_fn(op: str, x: torch.Tensor):
    path = utils.dispatch_path(x)
    utils.record(op, path)
    return reference_chunk if path == "reference" else ce_chunk


# ============================================================================ torch.library ops
# softcap travels as a float (0: none), so the schemas stay plain.
@torch.library.custom_op("kernels::linear_cross_entropy_fwd", mutates_args=())
def _lce_fwd(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
             ignore_index: int, label_smoothing: float, softcap: float, reduction: str, chunk: int, grad_hidden: bool,
             grad_weight: bool, grad_bias: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, d(hidden), d(weight), d(bias)): the loss reduced ("mean", "sum": (), "none": (N,)), and for "mean"
    and "sum" the gradients of that loss that the flags ask for (empty otherwise)."""
    chunk_fn = _chunk_fn("linear_cross_entropy_fwd", hidden)
    grads = (False, False, False) if reduction == "none" else (grad_hidden, grad_weight, grad_bias and bias is not None)
    rows, dh, dw, db = lce_chunks(
        hidden, weight, bias, targets, _scale(targets, ignore_index, reduction), chunk_fn=chunk_fn,
        ignore_index=ignore_index, label_smoothing=label_smoothing, softcap=softcap, chunk=chunk, want_loss=True,
        row_scale=False, grads=grads)
    if reduction == "none":
        return rows, dh, dw, db
    total = rows.sum()
    return (total / (targets != ignore_index).sum() if reduction == "mean" else total), dh, dw, db


def _fake_grads(hidden, weight, bias, flags) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    grad_hidden, grad_weight, grad_bias = flags
    return (torch.empty_like(hidden, memory_format=torch.contiguous_format) if grad_hidden else hidden.new_empty(0),
            torch.empty_like(weight, memory_format=torch.contiguous_format) if grad_weight else hidden.new_empty(0),
            torch.empty_like(bias) if grad_bias and bias is not None else hidden.new_empty(0))


@_lce_fwd.register_fake
def _(hidden, weight, bias, targets, ignore_index, label_smoothing, softcap, reduction, chunk, grad_hidden,
      grad_weight, grad_bias):
    loss = hidden.new_empty(targets.shape if reduction == "none" else (), dtype=torch.float32)
    flags = (False, False, False) if reduction == "none" else (grad_hidden, grad_weight, grad_bias)
    return (loss, *_fake_grads(hidden, weight, bias, flags))


@torch.library.custom_op("kernels::linear_cross_entropy_bwd", mutates_args=())
def _lce_bwd(grad_loss: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
             targets: torch.Tensor, ignore_index: int, label_smoothing: float, softcap: float, chunk: int,
             grad_hidden: bool, grad_weight: bool,
             grad_bias: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reduction "none": the gradients of Σ grad_loss · loss, the logits recomputed chunk by chunk."""
    chunk_fn = _chunk_fn("linear_cross_entropy_bwd", hidden)
    _, dh, dw, db = lce_chunks(
        hidden, weight, bias, targets, grad_loss.float().contiguous(), chunk_fn=chunk_fn, ignore_index=ignore_index,
        label_smoothing=label_smoothing, softcap=softcap, chunk=chunk, want_loss=False, row_scale=True,
        grads=(grad_hidden, grad_weight, grad_bias and bias is not None))
    return dh, dw, db


@_lce_bwd.register_fake
def _(grad_loss, hidden, weight, bias, targets, ignore_index, label_smoothing, softcap, chunk, grad_hidden,
      grad_weight, grad_bias):
    return _fake_grads(hidden, weight, bias, (grad_hidden, grad_weight, grad_bias))


def _setup_context(ctx, inputs, output) -> None:
    hidden, weight, bias, targets, ignore_index, label_smoothing, softcap, reduction, chunk, *_ = inputs
    _, dh, dw, db = output
    ctx.reduction, ctx.has_bias, ctx.scaled = reduction, bias is not None, False
    ctx.options = (ignore_index, label_smoothing, softcap, chunk)
    # The inputs are for the backward that recomputes ("none", or a second backward through a retained graph): the
    # weight is a parameter, and hidden (N, C) is what a plain lm_head's GEMM saves too. dh, dw, db: the gradients
    # of "mean" / "sum" (empty for "none").
    ctx.save_for_backward(hidden, weight, bias, targets, dh, dw, db)
    ctx.mark_non_differentiable(dh, dw, db)


def _in_place(t: torch.Tensor) -> bool:
    """Whether the backward may scale `t` in place: a plain eager tensor. Traced backwards (torch.compile,
    opcheck's AOT tests: fake and functional tensors) scale out of place, and the compiler plans the memory."""
    return type(t) is torch.Tensor and not torch.compiler.is_compiling()


def _backward(ctx, dloss: torch.Tensor, _dh, _dw, _db):
    need_h, need_w, need_b = ctx.needs_input_grad[:3]
    need_b = need_b and ctx.has_bias
    hidden, weight, bias, targets, *grads = ctx.saved_tensors
    if ctx.reduction != "none" and not ctx.scaled:  # the forward's gradients, times a 0-dim float32 dloss
        if all(_in_place(g) for g in grads):
            # In place: a scaled copy of d(weight), V × C, would be the loss's largest allocation. Through `.data`,
            # so autograd's version check does not refuse a later backward, which `ctx.scaled` sends to recompute.
            for g, want in zip(grads, (need_h, need_w, need_b), strict=True):
                if want:
                    g.data.mul_(dloss)
            dh, dw, db = grads
            ctx.scaled = True
        else:
            dh, dw, db = (g * dloss if want else None for g, want in zip(grads, (need_h, need_w, need_b), strict=True))
    else:  # "none", or a later backward through a retained graph: recompute from the inputs
        ignore_index = ctx.options[0]
        if ctx.reduction == "mean":  # each row's share of d(mean): dloss / rows not ignored
            dloss = (dloss / (targets != ignore_index).sum()).expand(targets.shape)
        elif ctx.reduction == "sum":
            dloss = dloss.expand(targets.shape)
        dh, dw, db = _lce_bwd(dloss, hidden, weight, bias, targets, *ctx.options, need_h, need_w, need_b)
    return (dh if need_h else None, dw if need_w else None, db if need_b else None) + (None,) * 9


_lce_fwd.register_autograd(_backward, setup_context=_setup_context)


# ============================================================================ public API
def _check(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, bias: torch.Tensor | None,
           reduction: str, label_smoothing: float, softcap: float | None, chunk_size: int | None) -> None:
    utils.check_float_tensor("hidden", hidden)
    utils.check_float_tensor("weight", weight, ndim=2)
    if hidden.dim() == 0 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden (..., C) must end in weight's C = {weight.shape[1]} (weight is (V, C) = "
                         f"{tuple(weight.shape)}), got shape {tuple(hidden.shape)}")
    if weight.shape[0] == 0:
        raise ValueError("weight has no rows: a vocabulary needs at least one class")
    utils.check_same(("hidden", "weight"), (hidden, weight))
    if bias is not None:
        utils.check_float_tensor("bias", bias, ndim=1)
        utils.check_same(("hidden", "bias"), (hidden, bias))
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias must have shape ({weight.shape[0]},) for weight {tuple(weight.shape)}, "
                             f"got {tuple(bias.shape)}")
    if not isinstance(targets, torch.Tensor) or targets.dtype.is_floating_point or targets.dtype.is_complex \
            or targets.dtype == torch.bool:
        got = targets.dtype if isinstance(targets, torch.Tensor) else type(targets).__name__
        raise TypeError(f"targets must be an integer tensor of class indices, got {got}")
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(f"targets {tuple(targets.shape)} must have hidden's leading shape {tuple(hidden.shape[:-1])}")
    if targets.device != hidden.device:
        raise ValueError(f"hidden is on {hidden.device} but targets is on {targets.device}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if softcap is not None and not (softcap > 0 and math.isfinite(softcap)):
        raise ValueError(f"softcap must be a positive finite number or None, got {softcap}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")


def _check_targets(targets: torch.Tensor, ignore_index: int, v: int) -> None:
    """Targets outside [0, V) that are not ignore_index would be read out of bounds: eager mode checks them (a
    data-dependent check, which torch.compile would break the graph on)."""
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= v))
    if bool(bad.any()):
        value = int(targets[bad][0])
        raise ValueError(f"target {value} is outside [0, {v}) and is not ignore_index ({ignore_index})")


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                         bias: torch.Tensor | None = None, ignore_index: int = -100, reduction: str = "mean",
                         label_smoothing: float = 0.0, softcap: float | None = None,
                         chunk_size: int | None = None) -> torch.Tensor:
    """Cross-entropy of the logits `hidden @ weight.T + bias` against `targets`, never holding the logits whole.

    hidden (..., C) and weight (V, C) as an `nn.Linear(C, V)` (an `lm_head`) holds it, bias (V,) or None, all
    float16, bfloat16 or float32 of one dtype; targets (...) integer class indices. The same value as
    `F.cross_entropy((hidden @ weight.T + bias).flatten(0, -2).float(), targets.flatten(), ignore_index=...,
    reduction=..., label_smoothing=...)`, with the logits capped to softcap·tanh(logits / softcap) first when
    `softcap` is given. The loss is float32: a scalar for "mean" and "sum", targets' shape for "none".
    Differentiable in hidden, weight and bias. `chunk_size` rows of logits at a time (default: `chunk_rows`).
    Under `torch.autocast` the inputs are cast to its dtype first, as the lm_head's `F.linear` would be.
    """
    device_type = hidden.device.type if isinstance(hidden, torch.Tensor) else "cpu"
    if torch.is_autocast_enabled(device_type):
        cast = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(cast), weight.to(cast)
        bias = bias.to(cast) if bias is not None else None
    _check(hidden, weight, targets, bias, reduction, label_smoothing, softcap, chunk_size)
    c, v = weight.shape[1], weight.shape[0]
    h2, t1 = hidden.reshape(-1, c), targets.reshape(-1)
    if not torch.compiler.is_compiling():
        _check_targets(t1, ignore_index, v)
    chunk = int(chunk_size) if chunk_size is not None else chunk_rows(h2.shape[0], c, v)
    grad = torch.is_grad_enabled()
    flags = (grad and hidden.requires_grad, grad and weight.requires_grad,
             grad and bias is not None and bias.requires_grad)
    loss = _lce_fwd(h2, weight, bias, t1, int(ignore_index), float(label_smoothing), float(softcap or 0.0),
                    reduction, chunk, *flags)[0]
    return loss.view(targets.shape) if reduction == "none" else loss
