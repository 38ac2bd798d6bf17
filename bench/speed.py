"""`python -m bench speed`: forward, forward+backward, train step and KV-cache generation, every implementation.

FLOP model (DESIGN.md §7), per token at sequence length T: training 6·N + 12·L·T·d; forward a third of it,
2·N + 4·L·T·d; prefill the same less the output head (2·V·d) at all but the last position, which alone gets
logits (`last_only`); one decode step at context S, 2·N + 4·L·S·d. N counts matmul parameters
(`GPTConfig.flops_per_token`). Compilation and warm-up are never timed; compile time is its own column.

Decode rows also carry the memory-bandwidth floor: a step reads every weight once (the tied head included, one row
of the embeddings), so it takes at least weight bytes / read bandwidth, the bandwidth measured in this run (a sum over
a buffer far larger than the caches). `floor_pct` is that floor as a percentage of the measured step. The
torch.compile decode row counts the decode step's compilations over three calls of up to 200 tokens (dynamo's own
count, `torch_gpt.generation.compiled_graphs`) and times its compilation. `hf/generate` is Hugging Face's
`GPT2LMHeadModel.generate` on the same weights (generation phases only).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from bench import timing, twins
from bench.report import Row
from gpt_core.config import GPTConfig

PHASES = ("forward", "forward+backward", "train step", "prefill", "decode")
GENERATION = ("prefill", "decode")
RECOMPILE_TOKENS, RECOMPILE_CALLS = 200, 3
# float32 matmuls on both sides: exact ("highest"), or TF32 where the GPU has it ("tf32"; DESIGN.md §4, trap 3).
PRECISIONS = ("highest", "tf32")


@dataclasses.dataclass
class Setup:
    config: GPTConfig
    batch: int
    seq_len: int
    dtype: str
    repeats: int
    decode_tokens: int
    prompt_len: int  # generation phases: the prompt, short enough that no step passes the context
    peak: float | None  # FLOP/s the MFU column divides by
    peak_source: str
    read_bw: float | None = None  # bytes/s, measured when a decode phase runs
    weight_bytes: int = 0  # read per decode step


def weight_bytes(config: GPTConfig, dtype: str) -> int:
    """Bytes a decode step reads of the weights: every parameter, but only one row of the position table (and of
    wte when the head is untied)."""
    n = config.n_params
    if config.pos_embedding == "learned":
        n -= (config.context_length - 1) * config.emb_dim
    if not config.tie_embeddings:
        n -= (config.vocab_size - 1) * config.emb_dim
    return n * (2 if dtype in ("bfloat16", "float16") else 4)


def read_bandwidth(device: str, repeats: int = 5) -> float:
    """Bytes/s of reading a float32 buffer far past the caches (256 MiB on a CPU, 1 GiB on a GPU) by a sum."""
    import torch

    n = (1 << 30 if device == "cuda" else 1 << 28) // 4
    x = torch.ones(n, device=device)
    t = timing.measure(lambda: x.sum(), timing.torch_sync, repeats, warmup=2)
    return n * 4 / t.median


def implementations() -> list[str]:
    """Every implementation this machine can run."""
    import jax
    import torch

    impls = ["torch/math", "torch/sdpa"]
    if torch.cuda.is_available():
        impls.append("torch/triton")
    impls += ["torch.compile/sdpa", "jax/xla"]
    if jax.default_backend() == "gpu":
        impls.append("jax/cudnn")
    try:
        import transformers  # noqa: F401

        impls.append("hf/generate")  # generation phases only
    except ImportError:
        pass
    return impls


def device_peak(dtype: str) -> tuple[float | None, str]:
    """The MFU denominator: a GPU's datasheet peak, or a large matmul measured now on this CPU."""
    import torch

    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        tf32 = torch.get_float32_matmul_precision() != "highest"
        peak = timing.gpu_peak(name, dtype, tf32)
        return peak, f"datasheet {name}" if peak else f"unknown GPU {name}: no MFU"
    peaks = timing.cpu_matmul_peak(dtype)
    best = max(peaks, key=peaks.get)
    each = ", ".join(f"{k} {v / 1e9:.0f}" for k, v in peaks.items())
    return peaks[best], f"CPU peak: best 2048^3 {dtype} matmul measured now ({each} GFLOP/s)"


def run(config: GPTConfig, *, batch: int = 4, seq_len: int = 128, dtype: str = "float32", repeats: int = 5,
        decode_tokens: int = 16, impls: list[str] | None = None, phases: tuple[str, ...] = PHASES,
        precision: str = "highest", progress: Callable[[str], Any] = lambda msg: None) -> list[Row]:
    """Rows per (implementation, phase). An implementation that raises gets FAIL rows naming the error, and the
    others still run."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if seq_len > config.context_length:
        raise ValueError(f"seq_len {seq_len} exceeds the config's context_length {config.context_length}")
    if dtype not in twins.DTYPES:
        raise ValueError(f"dtype must be one of {twins.DTYPES}, got {dtype!r}")
    available = implementations()
    impls = impls or available
    # "+scan": a JAX implementation with scan_layers=True (not in the default list: ask for it, e.g. jax/xla+scan).
    unknown = [i for i in impls if i.removesuffix("+scan") not in available or (i.endswith("+scan") and
                                                                               not i.startswith("jax"))]
    if unknown:
        raise ValueError(f"implementation(s) {unknown} cannot run here; available: {available} "
                         "(and jax/...+scan for a scanned JAX model)")
    bad = [p for p in phases if p not in PHASES]
    if bad:
        raise ValueError(f"unknown phase(s) {bad}; choose from {PHASES}")
    if decode_tokens + 2 > config.context_length:
        raise ValueError(f"decode_tokens {decode_tokens} leaves no room for a prompt in the context of "
                         f"{config.context_length}")
    # Past the context every step would prefill the window again: time generation inside it.
    prompt_len = min(seq_len, config.context_length - decode_tokens - 1)
    config = dataclasses.replace(config, drop_rate=0.0)
    twins.set_precision(precision)
    progress("speed: measuring the device peak")
    peak, source = device_peak(dtype)
    if dtype == "float32":
        source += "; float32 matmuls " + ("TF32 where the GPU has it" if precision == "tf32" else "exact")
    s = Setup(config, batch, seq_len, dtype, repeats, decode_tokens, prompt_len, peak, source)
    if "decode" in phases:
        import torch

        progress("speed: measuring the read bandwidth")
        s.read_bw = read_bandwidth("cuda" if torch.cuda.is_available() else "cpu")
        s.weight_bytes = weight_bytes(config, dtype)
    rows = []
    for impl in impls:
        own = [p for p in phases if p in GENERATION] if impl.startswith("hf/") else phases
        if not own:
            continue
        progress(f"speed: {impl}")
        runner = _jax_rows if impl.startswith("jax") else _hf_rows if impl.startswith("hf/") else _torch_rows
        try:
            rows += runner(s, impl, own, progress)
        except Exception as e:  # one implementation failing (a missing cuDNN, out of memory) must not lose the rest
            note = f"failed: {type(e).__name__}: {e}"[:300]
            progress(f"speed: {impl} {note}")
            rows += [Row("speed", phase, impl, dtype, f"B={batch} T={seq_len}", {}, "FAIL", note) for phase in own]
        _release_memory()
    return rows


def _release_memory() -> None:
    """Hand cached device memory back between implementations: torch's caching allocator would keep it from JAX."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _row(s: Setup, impl: str, phase: str, tm: timing.Timing | None, tokens: int, flops_per_token: float,
         compile_s: float | None, mem: float | None, note: str = "") -> Row:
    t = s.prompt_len if phase in ("prefill", "decode") else s.seq_len
    shape = f"B={s.batch} T={t}" + (f" +{s.decode_tokens}" if phase == "decode" else "")
    if tm is None:
        return Row("speed", phase, impl, s.dtype, shape, {}, "SKIP", note)
    achieved = tokens * flops_per_token / tm.median
    m = {"ms": tm.median * 1e3, "spread": tm.spread, "tokens_per_s": tokens / tm.median, "tflops": achieved / 1e12,
         "mfu": achieved / s.peak if s.peak else None, "compile_s": compile_s, "peak_mem_mb": mem}
    return Row("speed", phase, impl, s.dtype, shape, m, "", note or f"MFU vs {s.peak_source}")


def _flops(s: Setup, phase: str) -> float:
    c = s.config
    if phase == "forward":
        return c.flops_per_token(s.seq_len) / 3
    if phase == "prefill":  # the output head runs over the last position only
        return c.flops_per_token(s.prompt_len) / 3 - 2 * c.vocab_size * c.emb_dim * (1 - 1 / s.prompt_len)
    if phase == "decode":  # one token attending to the prompt and, on average, half the generated ones
        ctx = s.prompt_len + s.decode_tokens / 2
        return (c.flops_per_token(0) + 12 * c.n_layers * ctx * c.emb_dim) / 3
    return c.flops_per_token(s.seq_len)


def _compile_time(first_call_s: float, steady: timing.Timing) -> float:
    return max(0.0, first_call_s - steady.median)


# ------------------------------------------------------------------------------------------------- torch
def _torch_rows(s: Setup, impl: str, phases, progress) -> list[Row]:
    import torch

    import torch_gpt
    from torch_gpt import cross_entropy_loss

    framework, attn = impl.split("/")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tw = twins.build(s.config, dtype=s.dtype, torch_attn=attn, device=device)
    model = tw.torch_model.train()
    compiled = framework == "torch.compile"
    fwd = torch.compile(model) if compiled else model
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.integers(0, s.config.vocab_size, (s.batch, s.seq_len))).to(device)
    y = torch.from_numpy(rng.integers(0, s.config.vocab_size, (s.batch, s.seq_len))).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def forward():
        with torch.no_grad():
            return fwd(x)

    def fwd_bwd():
        model.zero_grad(set_to_none=True)
        loss = cross_entropy_loss(fwd(x), y)
        loss.backward()
        return loss

    def train_step():
        loss = fwd_bwd()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss

    prompt = x[:, : s.prompt_len]

    def gen(n, p=prompt):
        return lambda: torch_gpt.generate(model, p, n, compile=compiled)

    fns = {"forward": forward, "forward+backward": fwd_bwd, "train step": train_step}
    rows = []
    for phase in phases:
        if phase in fns:
            rows.append(_timed(s, impl, phase, fns[phase], timing.torch_sync, device, s.batch * s.seq_len))
        elif phase == "prefill":
            rows.append(_timed(s, impl, phase, gen(1), timing.torch_sync, device, s.batch * s.prompt_len))
        elif phase == "decode":
            counts, compile_s = _recompiles(s, gen, progress) if compiled else ({}, None)
            row = _decode(s, impl, gen(1), gen(1 + s.decode_tokens), timing.torch_sync, device, compile_s)
            row.metrics.update(counts)
            if compiled:
                row.note += (f"; decode step compiled {counts['decode_compiles']}x, prefill "
                             f"{counts['prefill_compiles']}x over {RECOMPILE_CALLS} calls of "
                             f"{counts['recompile_tokens']} tokens (compile_s: the decode step's)")
            rows.append(row)
    return rows


def _recompiles(s: Setup, gen, progress) -> tuple[dict[str, int], float]:
    """Three generate(compile=True) calls of up to 200 new tokens (inside the context): the decode step's and the
    prefill's compilations over them (dynamo's count), and the decode step's compile time, the first call's time
    less the second's (the prefill, dynamic, is compiled before by a call of one token, which has no decode step)."""
    from torch_gpt.generation import compiled_graphs

    n = min(RECOMPILE_TOKENS, s.config.context_length - s.prompt_len)
    progress(f"speed: torch.compile decode, {RECOMPILE_CALLS} calls of {n} tokens")
    timing.torch_sync(gen(1)())
    before = {step: compiled_graphs(step) for step in ("prefill", "decode")}
    times = []
    for _ in range(RECOMPILE_CALLS):
        t0 = time.perf_counter()
        timing.torch_sync(gen(n)())
        times.append(time.perf_counter() - t0)
    counts = {f"{step}_compiles": compiled_graphs(step) - k for step, k in before.items()}
    return {**counts, "recompile_tokens": n}, max(0.0, times[0] - times[1])


def _torch_mem(device: str) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None


def _timed(s: Setup, impl: str, phase: str, fn, sync, device: str, tokens: int, compile_s: float | None = None):
    import torch

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    sync(fn())  # first call: compilation (torch.compile, jit) and warm-up
    first = time.perf_counter() - t0
    t = timing.measure(fn, sync, s.repeats, warmup=1)
    if compile_s is None and (impl.startswith("torch.compile") or impl.startswith("jax")):
        compile_s = _compile_time(first, t)
    mem = _jax_mem() if impl.startswith("jax") else _torch_mem(device)
    return _row(s, impl, phase, t, tokens, _flops(s, phase), compile_s, mem)


def _decode(s: Setup, impl: str, prefill_fn, full_fn, sync, device: str, compile_s: float | None = None) -> Row:
    """Per-token decode time: (prefill + n decode steps − prefill) / n, both through `generate`. A difference
    of two timings: taken between their fastest tenths (load only ever adds time), as the median difference
    went negative on a loaded machine."""
    p = timing.measure(prefill_fn, sync, s.repeats, warmup=1)
    f = timing.measure(full_fn, sync, s.repeats, warmup=1)
    n = s.decode_tokens
    med = (f.p10 - p.p10) / n
    note = "per generated token (all sequences of the batch), KV cache"
    if med <= 0:  # the n steps hid inside the prefill's noise: say so rather than print a negative time
        med, note = float("nan"), note + "; NOT MEASURED: below the timing noise (a loaded machine?)"
    per = timing.Timing(med, med * f.p10 / f.median, med * f.p90 / f.median, s.repeats)  # the full call's spread
    mem = _jax_mem() if impl.startswith("jax") else _torch_mem(device)
    row = _row(s, impl, "decode", per, s.batch, _flops(s, "decode"), compile_s, mem, note)
    if s.read_bw:
        floor = s.weight_bytes / s.read_bw
        row.metrics.update(read_gb_s=s.read_bw / 1e9, weight_mb=s.weight_bytes / 1e6, floor_ms=floor * 1e3,
                           floor_pct=100 * floor / med if med == med else float("nan"))
    return row


# ---------------------------------------------------------------------------------------------------- hf
def _hf_rows(s: Setup, impl: str, phases, progress) -> list[Row]:
    """transformers' GPT2LMHeadModel.generate, greedy, on the twins' weights (its own KV cache and loop)."""
    import tempfile

    import torch
    import transformers

    c = s.config
    if not (c.pos_embedding == "learned" and c.tie_embeddings and c.qkv_bias):
        return [_row(s, impl, phase, None, 0, 0, None, None, "GPT2LMHeadModel needs learned positions, a tied "
                     "head and qkv biases") for phase in phases]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tw = twins.build(c, dtype=s.dtype, device=device)
    with tempfile.TemporaryDirectory() as d:
        tw.torch_model.save_pretrained(d)
        hf = transformers.GPT2LMHeadModel.from_pretrained(d, dtype=getattr(torch, s.dtype)).to(device).eval()
    del tw
    rng = np.random.default_rng(0)
    prompt = torch.from_numpy(rng.integers(0, c.vocab_size, (s.batch, s.prompt_len))).to(device)
    ones = torch.ones_like(prompt)

    def gen(n):
        def run():
            with torch.inference_mode():
                return hf.generate(prompt, attention_mask=ones, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                   pad_token_id=0)
        return run

    rows = []
    for phase in phases:
        if phase == "prefill":
            rows.append(_timed(s, impl, phase, gen(1), timing.torch_sync, device, s.batch * s.prompt_len))
        else:
            rows.append(_decode(s, impl, gen(1), gen(1 + s.decode_tokens), timing.torch_sync, device))
    return rows


# --------------------------------------------------------------------------------------------------- jax
def _jax_mem() -> float | None:
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    return stats["peak_bytes_in_use"] / 2**20 if "peak_bytes_in_use" in stats else None


def _jax_rows(s: Setup, impl: str, phases, progress) -> list[Row]:
    import jax
    import optax
    from flax import nnx

    import jax_gpt
    from jax_gpt.model import cross_entropy_loss

    attn, _, variant = impl.split("/")[1].partition("+")
    if attn == "cudnn" and s.dtype == "float32":
        return [_row(s, impl, phase, None, 0, 0, None, None, "cuDNN attention takes float16/bfloat16 only")
                for phase in phases]
    tw = twins.build(s.config, dtype=s.dtype, jax_attn=attn, scan_layers=variant == "scan")
    model = tw.jax_model
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)  # differentiate the Params only
    rng = np.random.default_rng(0)
    x = jax.numpy.asarray(rng.integers(0, s.config.vocab_size, (s.batch, s.seq_len)))
    y = jax.numpy.asarray(rng.integers(0, s.config.vocab_size, (s.batch, s.seq_len)))

    def loss_fn(params, x, y):
        return cross_entropy_loss(nnx.merge(graphdef, params, rest)(x), y)

    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-4))
    opt_state = tx.init(params)

    def train_step(params, opt_state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    prompt = x[:, : s.prompt_len]
    programs = {"forward": (lambda p, x: nnx.merge(graphdef, p, rest)(x), (params, x)),
                "forward+backward": (jax.value_and_grad(loss_fn), (params, x, y)),
                "train step": (train_step, (params, opt_state, x, y))}
    rows = []
    for phase in phases:
        if phase in programs:
            f, args = programs[phase]
            t0 = time.perf_counter()
            exe = jax.jit(f).lower(*args).compile()  # compile time measured apart from execution
            compile_s = time.perf_counter() - t0
            rows.append(_timed(s, impl, phase, lambda exe=exe, args=args: exe(*args), timing.jax_sync, "jax",
                               s.batch * s.seq_len, compile_s))
        elif phase == "prefill":
            rows.append(_timed(s, impl, phase, lambda: jax_gpt.generate(model, prompt, 1), timing.jax_sync, "jax",
                               s.batch * s.prompt_len))
        elif phase == "decode":
            rows.append(_decode(s, impl, lambda: jax_gpt.generate(model, prompt, 1),
                                lambda: jax_gpt.generate(model, prompt, 1 + s.decode_tokens), timing.jax_sync, "jax"))
    return rows
