"""DESIGN.md §2: gpt_core imports neither torch nor jax; kernels stands alone (torch and triton only)."""

import subprocess
import sys

import pytest


@pytest.mark.parametrize("modules, forbidden", [
    ("gpt_core, gpt_core.training, gpt_core.batches, gpt_core.shards, gpt_core.prepare, gpt_core.generation, "
     "gpt_core.tokenizer, gpt_core.params, gpt_core.checkpoint", ["torch", "jax", "flax", "datasets"]),
    ("kernels, kernels.patch, kernels.compile_report", ["torch_gpt", "jax_gpt", "bench", "jax", "transformers"]),
])
def test_imports_stay_inside_their_boundary(modules, forbidden):
    code = (f"import sys; import {modules}; "
            f"bad = [m for m in {forbidden!r} if m in sys.modules]; assert not bad, f'imported {{bad}}'")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
