"""Standalone reproducer: XLA:CPU's float32 GEMMs against PyTorch's (oneDNN/MKL) at GPT-2's training shapes.

Why it is here (issue 13, "the CPU gap"): on 2-core CPUs jax_gpt's gpt2 training step (B=4, T=256, float32) runs
at 0.84-0.92x torch_gpt's tokens/s, scanned or not. A GPT-2 step is mostly GEMMs, and this script shows XLA:CPU
computing the very same products, one at a time, in more time than PyTorch does: each linear layer's forward
(x @ W), input gradient (g @ W.T) and weight gradient (x.T @ g) at B*T = 1024 rows, and the tied lm_head's. It
needs only numpy and jax (torch, if installed, gives the comparison column), and prints the optimized HLO of one
dot so that the report can be filed with XLA as it stands:

    python docs/xla_cpu_gemm_repro.py            # medians of 20 calls per product
    python docs/xla_cpu_gemm_repro.py --hlo      # also print the compiled HLO of the first product

Float32 at "highest" precision on both sides (JAX's default on CPU is already full float32; set explicitly so a
changed default cannot hide the comparison). The XLA flags that name another matmul library
(--xla_cpu_use_onednn, --xla_cpu_experimental_onednn_fusion_type=dot, --xla_cpu_use_xnnpack,
--xla_cpu_experimental_xnn_fusion_type=dot, --xla_cpu_experimental_ynn_fusion_type=dot) did not change the time
of a (1024, 768) @ (768, 3072) product with jaxlib 0.10.2 on the machine measured (17.3-18.8 ms, default 17.9).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

ROWS = 1024  # B=4 x T=256
# (K, N) of GPT-2 small's four linear layers per block (c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj), then lm_head
SHAPES = [("c_attn", 768, 2304), ("attn.c_proj", 768, 768), ("mlp.c_fc", 768, 3072), ("mlp.c_proj", 3072, 768),
          ("lm_head", 768, 50257)]
# Each product as a function of (x, W, g) that both frameworks run as written; and its contraction length.
PRODUCTS = {"forward x@W": (lambda a, w, g: a @ w, lambda k, n: k),
            "d(x) g@W.T": (lambda a, w, g: g @ w.T, lambda k, n: n),
            "d(W) x.T@g": (lambda a, w, g: a.T @ g, lambda k, n: ROWS)}


def median_ms(fn, calls: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times)) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20, help="timed calls per product (median reported)")
    parser.add_argument("--hlo", action="store_true", help="print the optimized HLO of the first product")
    args = parser.parse_args()
    jax.config.update("jax_default_matmul_precision", "highest")
    try:
        import torch
    except ImportError:
        torch = None
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}" + (f"; torch {torch.__version__} "
          f"({torch.get_num_threads()} threads)" if torch else "; torch not installed"))
    rng = np.random.default_rng(0)
    total = {"jax": 0.0, "torch": 0.0}
    block = {"jax": 0.0, "torch": 0.0}
    print(f"{'layer':<12} {'product':<12} {'M x K x N':>20} {'jax ms':>8} {'torch ms':>9} {'torch/jax':>9}")
    for name, k, n in SHAPES:
        a = rng.standard_normal((ROWS, k), dtype=np.float32)
        w = rng.standard_normal((k, n), dtype=np.float32) * 0.02
        g = rng.standard_normal((ROWS, n), dtype=np.float32)
        jargs = tuple(jnp.asarray(v) for v in (a, w, g))
        targs = tuple(torch.from_numpy(v) for v in (a, w, g)) if torch is not None else None
        for product, (fn, contraction) in PRODUCTS.items():
            f = jax.jit(fn)  # the transposes inside the jitted function, as in a real backward: XLA picks layouts
            if args.hlo and name == SHAPES[0][0] and product == "forward x@W":
                print(f.lower(*jargs).compile().as_text())
            t_jax = median_ms(lambda f=f, a=jargs: f(*a).block_until_ready(), args.calls)
            m_out, n_out = jax.eval_shape(fn, *jargs).shape
            mkn = f"{m_out}x{contraction(k, n)}x{n_out}"
            t_torch = median_ms(lambda fn=fn, a=targs: fn(*a), args.calls) if targs is not None else float("nan")
            print(f"{name:<12} {product:<12} {mkn:>20} {t_jax:8.2f} {t_torch:9.2f} {t_torch / t_jax:9.2f}")
            total["jax"] += t_jax
            total["torch"] += t_torch
            if name != "lm_head":
                block["jax"] += t_jax
                block["torch"] += t_torch
    print(f"one block's 12 GEMMs: jax {block['jax']:.1f} ms, torch {block['torch']:.1f} ms "
          f"(torch/jax {block['torch'] / block['jax']:.2f})")
    steps = 12 * block["jax"] + total["jax"] - block["jax"], 12 * block["torch"] + total["torch"] - block["torch"]
    print(f"a gpt2 step's GEMMs (12 blocks + lm_head): jax {steps[0]:.0f} ms, torch {steps[1]:.0f} ms "
          f"(torch/jax {steps[1] / steps[0]:.2f})")


if __name__ == "__main__":
    main()
