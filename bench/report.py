"""Result rows and their outputs: terminal table, JSON, CSV, PNG.

Every row carries the environment (device, library versions, git commit) next to what it measured, so
a row copied out of its file still says where it came from.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import platform
import subprocess
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any


@dataclass
class Row:
    """One measurement or check. `metrics` holds the numbers; `status` is PASS/FAIL for checks."""

    suite: str  # parity | speed | kernels | compile
    name: str  # what: "logits", "forward", "train step", "flash_attention fwd", …
    impl: str  # who: "torch/sdpa", "jax/xla", "triton", …
    dtype: str
    shape: str  # e.g. "B=1 T=256"
    metrics: dict[str, Any] = field(default_factory=dict)
    status: str = ""
    note: str = ""

    def flat(self) -> dict[str, Any]:
        d = {k: v for k, v in dataclasses.asdict(self).items() if k != "metrics"}
        return {**d, **self.metrics, **environment()}


@cache
def environment() -> dict[str, str]:
    """Device, library versions and git commit; the same for every row of a run."""
    env = {"python": platform.python_version(), "commit": _git_commit(), "host_cpu": _cpu_name(),
           "jax_gpu_memory": jax_memory_policy()}
    try:
        import torch

        env["torch"] = torch.__version__
        env["torch_device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else env["host_cpu"]
    except ImportError:
        pass
    try:
        import flax
        import jax

        env["jax"], env["flax"] = jax.__version__, flax.__version__
        d = jax.devices()[0]
        env["jax_device"] = f"{d.platform}:{getattr(d, 'device_kind', d.platform)}"
    except ImportError:
        pass
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        pass
    return env


def jax_memory_policy() -> str:
    """How JAX takes GPU memory in this process (XLA_PYTHON_CLIENT_PREALLOCATE / _MEM_FRACTION, read by jax at
    its first use)."""
    fraction = os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION")
    if os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE", "true").lower() in ("false", "0"):
        return "preallocation off (XLA_PYTHON_CLIENT_PREALLOCATE=false): allocates as it goes" + (
            f", at most {fraction} of the GPU" if fraction else "")
    return f"preallocates {fraction or '0.75 (its default)'} of the GPU at first use"


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=5, cwd=Path(__file__).resolve().parent).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def fmt(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, float):
        if v != v:
            return "nan"
        a = abs(v)
        if a == 0:
            return "0"
        if a >= 1e5 or a < 1e-3:
            return f"{v:.2e}"
        return f"{v:,.3f}" if a < 100 else f"{v:,.1f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def table(rows: list[Row], title: str = "") -> str:
    """A plain-text table: the fixed columns, then every metric any row has, in first-seen order."""
    if not rows:
        return f"{title}\n  (no rows)\n" if title else ""
    metric_keys: list[str] = []
    for r in rows:
        metric_keys += [k for k in r.metrics if k not in metric_keys]
    cols = ["name", "impl", "dtype", "shape", *metric_keys, "status", "note"]
    cols = [c for c in cols if any(_cell(r, c) for r in rows)]
    cells = [[_cell(r, c) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    line = "  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True))
    out = ([title] if title else []) + [line, "-" * len(line)]
    out += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(out) + "\n"


def _cell(r: Row, c: str) -> str:
    if c in r.metrics:
        return fmt(r.metrics[c])
    return str(getattr(r, c, "") or "")


def write_json(rows: list[Row], path: str | Path) -> None:
    Path(path).write_text(json.dumps({"environment": environment(), "rows": [r.flat() for r in rows]},
                                     indent=1, default=str) + "\n")


def write_csv(rows: list[Row], path: str | Path) -> None:
    flat = [r.flat() for r in rows]
    keys: list[str] = []
    for f in flat:
        keys += [k for k in f if k not in keys]
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        w.writerows(flat)


def plot(rows: list[Row], path: str | Path, metric: str = "tokens_per_s") -> Path | None:
    """Bar chart of `metric` per implementation, grouped by phase (row name); rows without it are left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if isinstance(r.metrics.get(metric), int | float)]
    if not rows:
        return None
    phases = list(dict.fromkeys(r.name for r in rows))
    impls = list(dict.fromkeys(r.impl for r in rows))
    width = 0.8 / len(impls)
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(phases) * max(1, len(impls) / 3)), 4.5))
    for j, impl in enumerate(impls):
        xs, ys = [], []
        for i, ph in enumerate(phases):
            vals = [r.metrics[metric] for r in rows if r.name == ph and r.impl == impl]
            if vals:
                xs.append(i + (j - (len(impls) - 1) / 2) * width)
                ys.append(vals[0])
        ax.bar(xs, ys, width, label=impl)
    ax.set_xticks(range(len(phases)), phases, rotation=15)
    ax.set_ylabel(metric.replace("_", " "))
    ax.set_yscale("log")
    env = environment()
    ax.set_title(f"{env.get('torch_device', '')} — commit {env['commit']}", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
