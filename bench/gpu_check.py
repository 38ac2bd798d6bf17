"""`python -m bench.gpu_check` (`make gpu-check`): everything a CUDA machine can tell us, in one command.

Stages, each a child process with its own time limit (a hang costs that stage, not the run), all writing
into one folder: a preflight (versions, devices), `pytest -m gpu` beside `python -m bench parity` (full
precision, then each framework's default), then the timed stages one at a time: `python -m bench kernels`
and `python -m bench speed --preset gpt2` in bfloat16 and in float32 (TF32 allowed), each framework's speed
rows in their own process. The run as a whole keeps to `--budget` seconds (under 8 minutes by default):
a stage that no longer fits is reported as not run. `summary.md` says what ran, passed, failed or timed
out, with the key figures; every stage's log, JSON, CSV and PNG sit beside it.

It uses the Python it is started with (a GPU machine's own torch, triton and jax; no installs) and puts
this checkout on the path. Without CUDA it prints one line and exits with status 77 (NO_CUDA), having
imported neither torch nor jax.

Exit status: 0 every stage run passed; 1 a stage failed, timed out or did not fit the budget; 2 bad
arguments; 77 no CUDA device.
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NO_CUDA = 77  # automake's "skipped": nothing was wrong, there was nothing to check
BUDGET_S = 470.0  # the whole run, preflight to summary: under 8 minutes on one H100-class GPU
MIN_STAGE_S = 15.0  # a stage is not started with less than this left of the budget
KILL_GRACE_S = 5.0  # after SIGTERM, then SIGKILL

# The model every timed stage uses: GPT-2 small at a modest shape, few repeats (compilation dominates).
SPEED_ARGS = ["--preset", "gpt2", "--batch", "8", "--seq-len", "512", "--repeats", "5", "--decode-tokens", "16"]
PARITY_ARGS = ["--preset", "gpt2", "--batch", "4", "--seq-len", "256"]
# Environment of every stage. The compiled kernels, never the interpreter. JAX must not take 75% of the GPU at
# first use (its default), which would starve torch in the same process (pytest, parity, speed's twins).
STAGE_ENV = {"TRITON_INTERPRET": "0", "XLA_PYTHON_CLIENT_PREALLOCATE": "false", "PYTHONUNBUFFERED": "1",
             "MPLBACKEND": "Agg", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
MEMORY_POLICY = ("JAX preallocation off (XLA_PYTHON_CLIENT_PREALLOCATE=false) in every stage; torch and JAX speed "
                 "rows run in separate processes")


# ----------------------------------------------------------------------------------------- CUDA detection
def cuda_devices() -> list[str]:
    """NVIDIA GPUs visible to this process, found from device files alone (no torch, no jax: a second or less).

    Honours CUDA_VISIBLE_DEVICES set to "" or "-1" (no device)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return []
    found = sorted(glob.glob("/dev/nvidia[0-9]*"))
    if not found and os.path.isdir("/proc/driver/nvidia/gpus"):
        found = sorted(os.listdir("/proc/driver/nvidia/gpus"))
    return found


# ----------------------------------------------------------------------------------------- the stage runner
@dataclass
class Stage:
    name: str
    cmd: list[str]
    limit_s: float
    what: str  # one line for the summary
    outputs: dict[str, str] = field(default_factory=dict)  # kind ("json", "csv", "png", "junit") -> file name
    informational: bool = False  # exit status 1 (FAIL rows) is a finding, not a failure of the check


@dataclass
class Result:
    name: str
    status: str  # passed | failed | timed out | not run | informational
    seconds: float
    limit_s: float
    returncode: int | None
    log: str  # file name inside the output folder
    note: str = ""


_RUNNING: set[subprocess.Popen] = set()  # stages in flight, ended by Ctrl-C (they run in sessions of their own)


def _stage_env() -> dict[str, str]:
    env = dict(os.environ, **STAGE_ENV)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    return env


def _kill_group(proc: subprocess.Popen, grace_s: float = KILL_GRACE_S) -> None:
    """End the stage's whole process group (torchrun ranks, compile workers): SIGTERM, then SIGKILL for what is
    left after `grace_s` (the leader, or children that outlived it)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:  # nobody left in the group
            break
        if sig == signal.SIGTERM:
            try:
                proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                pass
    proc.wait()


def run_stage(stage: Stage, out: Path, deadline: float, env: dict[str, str] | None = None) -> Result:
    """Run `stage` as a child process (its own session, so a timeout kills all it started), output to its log,
    within min(its limit, what is left of the budget)."""
    log = f"{stage.name}.log"
    left = deadline - time.monotonic()
    if left < MIN_STAGE_S:
        return Result(stage.name, "not run", 0.0, stage.limit_s, None, "", f"budget spent ({max(left, 0):.0f} s left)")
    limit = min(stage.limit_s, left)
    start = time.monotonic()
    with open(out / log, "w") as fh:
        fh.write(f"$ {' '.join(stage.cmd)}\n# limit {limit:.0f} s\n")
        fh.flush()
        proc = subprocess.Popen(stage.cmd, cwd=ROOT, env=env if env is not None else _stage_env(), stdout=fh,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        _RUNNING.add(proc)
        try:
            rc = proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            seconds = time.monotonic() - start
            return Result(stage.name, "timed out", seconds, limit, None, log, f"killed after {limit:.0f} s")
        finally:
            _RUNNING.discard(proc)
        _kill_group(proc, grace_s=0)  # what it left running must not hold the GPU for the next stage
    seconds = time.monotonic() - start
    if rc == 0:
        status, note = "passed", ""
    elif stage.informational and rc == 1:
        status, note = "informational", "FAIL rows expected: see below"
    else:
        status, note = "failed", f"exit status {rc}"
    return Result(stage.name, status, seconds, limit, rc, log, note)


def run_lanes(lanes: list[list[Stage]], out: Path, deadline: float,
              on_done: Callable[[Result], None] = lambda r: None) -> list[Result]:
    """Run the lanes side by side (threads), each lane's stages one after another; results in stage order."""
    results: dict[str, Result] = {}

    def lane_worker(stages: list[Stage]) -> None:
        for s in stages:
            results[s.name] = run_stage(s, out, deadline)
            on_done(results[s.name])

    threads = [threading.Thread(target=lane_worker, args=(lane,), daemon=True) for lane in lanes]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [results[s.name] for lane in lanes for s in lane]


# ----------------------------------------------------------------------------------------- the plan
def _bench(name: str, suite_args: list[str], *, limit_s: float, what: str, png: bool = True,
           informational: bool = False) -> Stage:
    outputs = {"json": f"{name}.json", "csv": f"{name}.csv"} | ({"png": f"{name}.png"} if png else {})
    files = ["--json", outputs["json"], "--csv", outputs["csv"]] + (["--plot", outputs["png"]] if png else [])
    return Stage(name, [sys.executable, "-m", "bench", *files, *suite_args], limit_s, what, outputs, informational)


def plan(info: dict, out: Path) -> tuple[list[list[Stage]], list[Stage]]:
    """(correctness lanes run side by side, timed stages run alone), from the preflight's `info`.

    Output paths in the commands are relative to the output folder: `finalise_paths` makes them absolute."""
    # The GPU suite in two processes side by side: the kernel tests build ~100 kernels, one after another.
    pytest_args = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rfEs", "-p", "no:cacheprovider",
                   "--continue-on-collection-errors", "-o", "junit_family=xunit1"]
    kernels_tests = Stage("pytest-gpu-kernels", [*pytest_args, "--junitxml", "pytest-gpu-kernels.xml",
                                                 "tests/test_gpu_kernels.py"],
                          150, "pytest -m gpu tests/test_gpu_kernels.py: every kernel vs float64 in every dtype, "
                               "autotuner choices, torch.compile, no T×T memory", {"junit": "pytest-gpu-kernels.xml"})
    other_tests = Stage("pytest-gpu", [*pytest_args, "--junitxml", "pytest-gpu.xml", "--ignore",
                                       "tests/test_gpu_kernels.py", "tests"],
                        150, "pytest -m gpu, the rest: torch_gpt on the kernels, jax_gpt on the GPU, DDP over NCCL",
                        {"junit": "pytest-gpu.xml"})
    # Limits: what each should take cold on one H100 (builds dominate: Triton's, XLA's, Inductor's), with room.
    parity = _bench("parity", ["parity", *PARITY_ARGS], limit_s=75, png=False,
                    what="bench parity, float32 matmuls at full precision on both sides")
    parity_default = _bench("parity-default", ["parity", *PARITY_ARGS, "--precision", "default"], limit_s=70,
                            png=False, informational=True,
                            what="bench parity at each framework's default precision (JAX: TF32; a finding, "
                                 "not a check)")
    kernels = _bench("kernels", ["kernels", "--quick", "--repeats", "5"], limit_s=90, png=False,
                     what="bench kernels: TFLOP/s and GB/s against sdpa (flash, cuDNN, math), F.layer_norm and "
                          "F.rms_norm, fraction of peak")
    timed = [kernels]
    jax_gpu = info.get("jax_backend") == "gpu"
    for dtype, extra in (("bfloat16", []), ("float32", ["--precision", "tf32"])):
        short = "bf16" if dtype == "bfloat16" else "fp32"
        base = ["speed", *SPEED_ARGS, "--dtype", dtype, *extra]
        label = dtype + (" (TF32 matmuls on both sides)" if extra else "")
        fp32 = dtype == "float32"
        # One process per framework (and per JAX attention, each of whose five programs XLA builds anew), so a
        # slow build costs its own rows only; torch.compile, the slowest to build, last.
        groups = [("torch", ["torch/sdpa", "torch/triton", "torch/math"], 60 if fp32 else 70, "torch eager"),
                  ("jax", ["jax/xla"], 75, "JAX, XLA attention")]
        if jax_gpu and not fp32:  # cuDNN attention takes 16-bit inputs only
            groups.append(("cudnn", ["jax/cudnn"], 75, "JAX, cuDNN attention"))
        groups.append(("compile", ["torch.compile/sdpa"], 80 if fp32 else 90, "torch.compile"))
        for name, impls, limit, what in groups:
            timed.append(_bench(f"speed-{short}-{name}", base + _impls(impls), limit_s=limit,
                                what=f"bench speed gpt2 {label}: {what}"))
    # Everything after the correctness lanes keeps to what is left of the budget: on a cold machine the last
    # (float32) stages may not fit; `--stages` runs them again, with Triton's and Inductor's caches warm.
    return [[kernels_tests], [other_tests], [parity, parity_default]], timed


def _impls(impls: list[str]) -> list[str]:
    return [a for i in impls for a in ("--impl", i)]


def finalise_paths(stage: Stage, out: Path) -> Stage:
    """The stage with its output file arguments made absolute inside `out`."""
    names = set(stage.outputs.values())
    cmd = [str(out / a) if a in names else a for a in stage.cmd]
    return Stage(stage.name, cmd, stage.limit_s, stage.what, stage.outputs, stage.informational)


PREFLIGHT = r"""
import json, os, sys
info = {"python": sys.version.split()[0], "executable": sys.executable}
import torch
info["torch"] = torch.__version__
info["torch_cuda"] = torch.version.cuda
info["cuda_available"] = torch.cuda.is_available()
info["gpus"] = [dict(name=torch.cuda.get_device_name(i), capability="%d.%d" % torch.cuda.get_device_capability(i),
                     memory_gib=round(torch.cuda.get_device_properties(i).total_memory / 2**30, 1))
                for i in range(torch.cuda.device_count())] if info["cuda_available"] else []
try:
    info["cudnn"] = torch.backends.cudnn.version()
    info["nccl"] = ".".join(map(str, torch.cuda.nccl.version())) if info["cuda_available"] else None
except Exception as e:
    info["nccl"] = f"unknown ({type(e).__name__})"
import triton
info["triton"] = triton.__version__
try:
    import jax, flax
    info["jax"], info["flax"] = jax.__version__, flax.__version__
    info["jax_backend"] = jax.default_backend()
    info["jax_devices"] = [str(d) for d in jax.devices()]
except Exception as e:
    info["jax_error"] = f"{type(e).__name__}: {e}"
for mod in ("transformers", "numpy", "optax"):
    try:
        info[mod] = __import__(mod).__version__
    except Exception as e:
        info[mod] = f"not importable ({type(e).__name__})"
print("PREFLIGHT " + json.dumps(info))
"""


def preflight(out: Path, deadline: float) -> tuple[Result, dict]:
    stage = Stage("preflight", [sys.executable, "-c", PREFLIGHT], 60, "versions and devices")
    result = run_stage(stage, out, deadline)
    info: dict = {}
    if result.log:
        for line in (out / result.log).read_text().splitlines():
            if line.startswith("PREFLIGHT "):
                info = json.loads(line.removeprefix("PREFLIGHT "))
    if shutil.which("nvidia-smi"):
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                                  "--format=csv,noheader"], capture_output=True, text=True, timeout=15)
            info["nvidia_smi"] = smi.stdout.strip().splitlines()
        except (OSError, subprocess.SubprocessError) as e:
            info["nvidia_smi"] = [f"failed: {type(e).__name__}"]
    if result.status == "passed" and not info.get("cuda_available"):
        result = Result(result.name, "failed", result.seconds, result.limit_s, result.returncode, result.log,
                        "a GPU is present but torch.cuda.is_available() is False")
    return result, info


# ----------------------------------------------------------------------------------------- reading results
def load_rows(path: Path) -> list[dict]:
    """The flat rows of a bench --json file; [] if it is missing or unreadable."""
    try:
        return json.loads(path.read_text())["rows"]
    except (OSError, ValueError, KeyError, TypeError):
        return []


def junit_counts(path: Path) -> dict:
    """{"tests", "failures", "errors", "skipped", "failed": [names], "properties": {test: {k: v}}} from a junit file."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return {}
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    counts["failed"], counts["properties"] = [], {}
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}".strip(":")
        if case.find("failure") is not None or case.find("error") is not None:
            counts["failed"].append(name)
        props = {p.get("name"): p.get("value") for p in case.iter("property")}
        if props:
            counts["properties"][name] = props
    return counts


def _num(v) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


def _fmt(v: float | None, unit: str = "", digits: int = 3) -> str:
    if v is None:
        return "n/a"
    return f"{v:.{digits}g}{unit}"


def key_figures(stage: Stage, result: Result, out: Path) -> list[str]:
    """Short lines for the summary table; details go in `details`."""
    if stage.name.startswith("pytest"):
        c = junit_counts(out / stage.outputs["junit"])
        if not c:
            return ["no junit report"]
        passed = c["tests"] - c["failures"] - c["errors"] - c["skipped"]
        line = f"{passed} passed, {c['failures']} failed, {c['errors']} errors, {c['skipped']} skipped"
        return [line] + ([f"failed: {', '.join(c['failed'][:4])}" + (" ..." if len(c["failed"]) > 4 else "")]
                         if c["failed"] else [])
    rows = load_rows(out / stage.outputs.get("json", "-"))
    if not rows:
        return ["no rows"]
    if stage.name.startswith("parity"):
        bad = [r for r in rows if r.get("status") == "FAIL"]
        worst = {r["name"].split(" (")[0]: _num(r.get("rel_err")) for r in rows if _num(r.get("rel_err")) is not None}
        errs = ", ".join(f"{k} {_fmt(v)}" for k, v in worst.items())
        return [f"{len(rows) - len(bad)}/{len(rows)} PASS" + (f"; FAIL: {', '.join(r['name'] for r in bad)}" if bad
                                                                else ""), f"rel. errors: {errs}"]
    if stage.name == "kernels":
        return _kernel_figures(rows)
    if stage.name.startswith("speed"):
        lines = []
        for impl in dict.fromkeys(r["impl"] for r in rows):
            by = {r["name"]: r for r in rows if r["impl"] == impl}
            train, dec = by.get("train step", {}), by.get("decode", {})
            if train.get("status") in ("SKIP", "FAIL") or not train:
                lines.append(f"{impl}: {train.get('status', '')} ({train.get('note') or 'no train step row'})")
                continue
            lines.append(f"{impl}: train {_fmt(_num(train.get('tokens_per_s')), ' tok/s')} "
                         f"(MFU {_fmt(_num(train.get('mfu')))}), decode {_fmt(_num(dec.get('ms')), ' ms/token')}")
        return lines
    return []


def _kernel_figures(rows: list[dict]) -> list[str]:
    """Per kernel phase, at its largest shape: the Triton kernel's rate beside the best PyTorch one."""
    lines = []
    for phase in dict.fromkeys(r["name"] for r in rows):
        ph = [r for r in rows if r["name"] == phase]
        unit = "tflops" if any("tflops" in r for r in ph) else "gb_s"
        shape = ph[-1]["shape"]
        at = {r["impl"]: _num(r.get(unit)) for r in ph if r["shape"] == shape}
        ours = at.pop("triton", None)
        best = max(((v, k) for k, v in at.items() if v is not None), default=(None, "-"))
        label = "TFLOP/s" if unit == "tflops" else "GB/s"
        lines.append(f"{phase} [{shape}]: triton {_fmt(ours)} {label} vs {best[1]} {_fmt(best[0])}")
    return lines


def details(stage: Stage, result: Result, out: Path) -> list[str]:
    """Markdown lines below the table: tables of speed rows, autotuning choices, failing rows, log tails."""
    lines: list[str] = []
    if stage.name.startswith("pytest"):
        c = junit_counts(out / stage.outputs["junit"])
        chosen = {t: p for t, p in c.get("properties", {}).items() if any(k.startswith("autotune") for k in p)}
        if chosen:
            lines += ["Autotuner choices (per configuration class):", ""]
            for props in chosen.values():
                lines += [f"- {k.removeprefix('autotune ')}: {v}" for k, v in props.items() if k.startswith("autotune")]
            lines.append("")
    rows = load_rows(out / stage.outputs["json"]) if "json" in stage.outputs else []
    if stage.name.startswith("speed") and rows:
        phases = list(dict.fromkeys(r["name"] for r in rows))
        lines += ["| impl | " + " | ".join(phases) + " |", "|---" * (len(phases) + 1) + "|"]
        for impl in dict.fromkeys(r["impl"] for r in rows):
            cells = []
            for ph in phases:
                r = next((r for r in rows if r["impl"] == impl and r["name"] == ph), None)
                if r is None or r.get("status") in ("SKIP", "FAIL"):
                    cells.append(r["status"] if r else "")
                else:
                    cells.append(f"{_fmt(_num(r.get('tokens_per_s')))} tok/s, MFU {_fmt(_num(r.get('mfu')), digits=2)}")
            lines.append(f"| {impl} | " + " | ".join(cells) + " |")
        lines += ["", "(tokens/s, median of the repeats; decode counts every sequence of the batch)", ""]
    bad = [r for r in rows if r.get("status") == "FAIL"]
    if bad:
        lines += ["FAIL rows:", ""] + [f"- {r['name']} ({r['impl']}, {r['dtype']}, {r['shape']}): "
                                       f"{r.get('note', '')}" for r in bad] + [""]
    if result.status in ("failed", "timed out") and result.log:
        tail = (out / result.log).read_text(errors="replace").splitlines()[-15:]
        lines += [f"Last lines of {result.log}:", "", "```", *tail, "```", ""]
    return lines


def summary(results: list[Result], stages: dict[str, Stage], info: dict, out: Path, started: str,
            elapsed: float, budget: float) -> str:
    gpus = ", ".join(f"{g['name']} (sm_{g['capability'].replace('.', '')}, {g['memory_gib']} GiB)"
                     for g in info.get("gpus", [])) or "none seen by torch"
    counts: dict[str, int] = {}
    for r in results:
        counts[r.status] = counts.get(r.status, 0) + 1
    verdict = ", ".join(f"{n} {s}" for s, n in counts.items())
    versions = ", ".join(f"{k} {info[k]}" for k in ("torch", "torch_cuda", "triton", "jax", "flax", "transformers",
                                                    "numpy", "python") if info.get(k))
    lines = [f"# gpu-check {started}", "",
             f"**{verdict}** in {elapsed:.0f} s (budget {budget:.0f} s); exit status {exit_status(results)}.", "",
             f"- GPUs: {gpus}" + (f"; nvidia-smi: {'; '.join(info['nvidia_smi'])}" if info.get("nvidia_smi") else ""),
             f"- Versions: {versions or 'unknown (preflight failed)'}",
             f"- JAX: backend {info.get('jax_backend', 'n/a')}" + (f" ({info['jax_error']})" if info.get("jax_error")
                                                                  else ""),
             f"- Memory: {MEMORY_POLICY}",
             f"- Commit: {_git_commit()}", "",
             "| stage | status | time | limit | key figures |", "|---|---|---|---|---|"]
    for r in results:
        st = stages.get(r.name)
        figs = _safely(key_figures, st, r, out) if st is not None and r.status != "not run" else []
        cell = "<br>".join([*(figs or []), *([r.note] if r.note else [])])
        lines.append(f"| {r.name} | {r.status} | {r.seconds:.0f} s | {r.limit_s:.0f} s | {cell} |")
    lines += ["", "Stages:", ""] + [f"- {n}: {s.what}" for n, s in stages.items()] + [""]
    for r in results:
        st = stages.get(r.name)
        more = _safely(details, st, r, out) if st is not None and r.status != "not run" else []
        if more:
            lines += [f"## {r.name}", "", *more]
    lines += ["## Files", "", *[f"- {p.name}" for p in sorted(out.iterdir()) if p.name != "summary.md"], ""]
    return "\n".join(lines)


def _safely(fn: Callable[[Stage, Result, Path], list[str]], stage: Stage, result: Result, out: Path) -> list[str]:
    """fn's lines, or one line saying why not: outputs of a machine never seen before must not cost the summary."""
    try:
        return fn(stage, result, out)
    except Exception as e:
        return [f"(could not read this stage's outputs: {type(e).__name__}: {e})"]


def _git_commit() -> str:
    try:
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=5)
        return done.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def exit_status(results: list[Result]) -> int:
    return 0 if all(r.status in ("passed", "informational") for r in results) else 1


def write_all_rows(stages: dict[str, Stage], out: Path) -> None:
    """Every bench row of the run in one CSV (all_rows.csv), with the stage it came from."""
    rows = [{"stage": name, **r} for name, s in stages.items() if "json" in s.outputs
            for r in load_rows(out / s.outputs["json"])]
    if not rows:
        return
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(out / "all_rows.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


# ----------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Exit status: 0 all passed, 1 a stage failed / timed out / did not fit, "
                                       f"2 bad arguments, {NO_CUDA} no CUDA device.")
    p.add_argument("--out", default=None, help="output folder (default: bench_results/gpu-check-<time>)")
    p.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for the whole run")
    p.add_argument("--stages", default=None,
                   help="comma-separated stage names to run (default: all); see --list")
    p.add_argument("--list", action="store_true", help="print the stages and their commands, run nothing")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.budget < MIN_STAGE_S:
        print(f"error: --budget must be at least {MIN_STAGE_S:.0f} s, got {args.budget}", file=sys.stderr)
        return 2
    out = Path(args.out or ROOT / "bench_results" / f"gpu-check-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    lanes, timed = plan({"jax_backend": "gpu"}, out)  # the stage names, to check --stages before anything runs
    every = [s.name for lane in lanes for s in lane] + [s.name for s in timed]
    wanted = set(every) if args.stages is None else {s.strip() for s in args.stages.split(",") if s.strip()}
    unknown = sorted(wanted - set(every))
    if unknown:
        print(f"error: unknown stage(s) {unknown}; stages: {', '.join(every)}", file=sys.stderr)
        return 2
    if args.list:
        for s in [st for lane in lanes for st in lane] + timed:
            print(f"{s.name:22} {s.limit_s:4.0f} s  {' '.join(finalise_paths(s, out).cmd[1:])}")
        return 0
    devices = cuda_devices()
    if not devices:
        print(f"gpu-check: no CUDA device here (no /dev/nvidia*), nothing to check; exit status {NO_CUDA}")
        return NO_CUDA
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    deadline = t0 + args.budget

    def progress(r: Result) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {r.name}: {r.status} in {r.seconds:.0f} s"
              + (f" ({r.note})" if r.note else ""), flush=True)

    print(f"gpu-check: {len(devices)} GPU device(s); output in {out}; budget {args.budget:.0f} s", flush=True)
    try:
        pre, info = preflight(out, deadline)
        progress(pre)
        results = [pre]
        stages = {"preflight": Stage("preflight", [], 60, "versions and devices (torch, triton, jax, nvidia-smi)")}
        if pre.status == "passed":
            lanes, timed = plan(info, out)
            lanes = [[finalise_paths(s, out) for s in lane if s.name in wanted] for lane in lanes]
            timed = [finalise_paths(s, out) for s in timed if s.name in wanted]
            stages |= {s.name: s for lane in lanes for s in lane} | {s.name: s for s in timed}
            results += run_lanes([lane for lane in lanes if lane], out, deadline, progress)
            for s in timed:  # one at a time: nothing else on the GPU while it is timed
                results.append(run_stage(s, out, deadline))
                progress(results[-1])
    except KeyboardInterrupt:
        for proc in list(_RUNNING):
            _kill_group(proc, grace_s=2)
        print(f"gpu-check: interrupted; what ran is in {out}", file=sys.stderr)
        return 130
    (out / "preflight.json").write_text(json.dumps(info, indent=1) + "\n")
    (out / "results.json").write_text(json.dumps({"info": info, "memory_policy": MEMORY_POLICY,
                                                  "results": [asdict(r) for r in results]}, indent=1) + "\n")
    write_all_rows(stages, out)
    text = summary(results, stages, info, out, started, time.monotonic() - t0, args.budget)
    (out / "summary.md").write_text(text)
    print(text)
    print(f"gpu-check: summary in {out / 'summary.md'}")
    return exit_status(results)


if __name__ == "__main__":
    sys.exit(main())
