"""`python -m bench data`: the figures of data at scale (issue 10 §6).

prepare  tokens/s of `python -m gpt_core.data prepare` with 1 and with 2 workers on a generated corpus
         (default 200 MB of text: documents of random length cut at random places out of the shipped sample
         text, as JSON lines), beside a plain single-process loop over the same files (read each line,
         `json.loads`, `tiktoken.Encoding.encode_ordinary`, count). Each run is a fresh process; its time
         excludes the interpreter start and the tokenizer load, includes reading, worker start-up and writing
         shards. tokens/s counts the documents' tokens (not the end-of-text tokens prepare adds).
         Target: 2 workers >= 1.8x the plain loop.
trainer  each trainer's peak resident memory (ru_maxrss of the process, from wait4) training `tiny` for
         --steps steps on a 10M-token and on a 1B-token dataset of random token shards (written straight
         to disk, deleted afterwards; 1B uint16 tokens are 2 GB), and the time each step waits for its batch:
         the median over steps of data_s / step_s from the trainer's metrics.jsonl.
         Targets: the two peaks differ by < 100 MB; data_s < 2% of a step.

Targets are judged (PASS/FAIL) only at the issue's sizes (>= 200 MB corpus, >= 1B tokens), never in --quick.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bench.report import Row
from gpt_core.data import SAMPLE_CORPUS
from gpt_core.shards import MAX_SHARD_TOKENS, ShardWriter, shard_name

STAGES = ("prepare", "trainer")
TRAINERS = ("torch", "jax")
FULL = dict(corpus_mb=200.0, small_tokens=10**7, large_tokens=10**9, steps=20)
QUICK = dict(corpus_mb=2.0, small_tokens=10**5, large_tokens=10**6, steps=3)
TARGET_RATIO, TARGET_RSS_MB, TARGET_DATA_FRAC = 1.8, 100.0, 0.02
ROOT = Path(__file__).resolve().parent.parent

_PREPARE_CHILD = """
import json, sys, time
from gpt_core.prepare import prepare
from gpt_core.tokenizer import get_tokenizer
a = json.loads(sys.argv[1])
get_tokenizer("gpt2")  # loaded before the clock starts, as the loop's is
t = time.perf_counter()
m = prepare(a["inputs"], a["out"], workers=a["workers"], val_tokens=0, progress=False)
s = time.perf_counter() - t
print(json.dumps({"seconds": s, "tokens": m["tokens"]["total"] - m["documents"], "documents": m["documents"]}))
"""

_LOOP_CHILD = """
import json, sys, time
from gpt_core.tokenizer import get_tokenizer
a = json.loads(sys.argv[1])
enc = get_tokenizer("gpt2")  # a tiktoken.Encoding (r50k_base)
t = time.perf_counter()
tokens = documents = 0
for path in a["inputs"]:
    with open(path, "rb") as f:
        for line in f:
            tokens += len(enc.encode_ordinary(json.loads(line)["text"]))
            documents += 1
s = time.perf_counter() - t
print(json.dumps({"seconds": s, "tokens": tokens, "documents": documents}))
"""


# -------------------------------------------------------------------------------------------- children
# Runs the command as its child and writes that child's ru_maxrss (from wait4) to argv[1]. Linux carries the
# high-water RSS of the address space a process execs from into its ru_maxrss, and subprocess launches
# children from the caller's address space (vfork), so a child of the bench would report at least the bench's
# own peak. From this launcher (a bare interpreter, -S, about 10 MB) the floor is the launcher's size.
_LAUNCHER = """
import os, sys
pid = os.fork()
if pid == 0:
    try:
        os.execvp(sys.argv[2], sys.argv[2:])
    finally:
        os._exit(127)
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status) % 256)
"""


def run_child(cmd: list[str], timeout: float, cwd: Path = ROOT) -> tuple[int, float, str, str]:
    """Run `cmd`; (exit code, its peak resident memory in MB (ru_maxrss), stdout, stderr)."""
    with tempfile.TemporaryDirectory() as d:
        rss, out_path, err_path = Path(d) / "rss", Path(d) / "out", Path(d) / "err"
        env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            p = subprocess.Popen([sys.executable, "-S", "-c", _LAUNCHER, str(rss), *cmd], stdout=out, stderr=err,
                                 cwd=cwd, env=env, start_new_session=True)
            try:
                rc = p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                rc = p.wait()
        peak = int(rss.read_text()) / 1024 if rss.is_file() else float("nan")
        return rc, peak, out_path.read_text(errors="replace"), err_path.read_text(errors="replace")


def _last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1][-300:] if lines else "(no output)"


# ------------------------------------------------------------------------------------------------ corpus
def write_corpus(root: Path, mb: float, seed: int = 0, file_mb: float = 32.0) -> tuple[list[Path], int, int]:
    """JSON-lines files holding `mb` MB (10^6 bytes) of document text; (files, documents, text bytes).

    Documents have log-normal lengths (median about 2 KB) and start at random places of the shipped sample
    text, wrapping around it."""
    text = SAMPLE_CORPUS.read_text(encoding="utf-8")
    ring = text * (1 + 64 * 1024 // len(text))
    rng = np.random.default_rng(seed)
    target, per_file = int(mb * 1e6), int(file_mb * 1e6)
    files, docs, written = [], 0, 0
    root.mkdir(parents=True, exist_ok=True)
    f, in_file = None, per_file
    try:
        while written < target:
            if in_file >= per_file:
                if f is not None:
                    f.close()
                files.append(root / f"corpus_{len(files):03d}.jsonl")
                f, in_file = open(files[-1], "w", encoding="utf-8"), 0
            n = int(min(len(text), max(1, rng.lognormal(np.log(2000), 1.0)), target - written))
            a = int(rng.integers(0, len(text)))
            doc = ring[a:a + n]
            size = len(doc.encode("utf-8"))
            line = json.dumps({"text": doc}) + "\n"
            f.write(line)
            in_file += len(line)
            written += size
            docs += 1
    finally:
        if f is not None:
            f.close()
    return files, docs, written


def prepare_rows(tmp: Path, corpus_mb: float, workers: list[int], judge: bool, progress: Callable) -> list[Row]:
    progress(f"data: writing a {corpus_mb:g} MB corpus")
    files, n_docs, n_bytes = write_corpus(tmp / "corpus", corpus_mb)
    arg = {"inputs": [str(p) for p in files]}
    shape = f"{n_bytes / 1e6:,.0f} MB, {n_docs:,} docs"
    timeout = max(600.0, corpus_mb * 10)
    runs: list[tuple[str, str, dict | None, float, str]] = []
    progress("data: plain tiktoken loop (encode_ordinary)")
    rc, rss, out, err = run_child([sys.executable, "-c", _LOOP_CHILD, json.dumps(arg)], timeout)
    runs.append(("tiktoken loop", "encode_ordinary, 1 process", json.loads(out) if rc == 0 else None, rss, err))
    for w in workers:
        progress(f"data: prepare --workers {w}")
        out_dir = tmp / f"shards_w{w}"
        rc, rss, out, err = run_child([sys.executable, "-c", _PREPARE_CHILD,
                                       json.dumps({**arg, "out": str(out_dir), "workers": w})], timeout)
        shutil.rmtree(out_dir, ignore_errors=True)
        runs.append(("prepare", f"gpt_core workers={w}", json.loads(out) if rc == 0 else None, rss, err))
    shutil.rmtree(tmp / "corpus", ignore_errors=True)
    loop = runs[0][2]
    rows = []
    for name, impl, res, rss, err in runs:
        if res is None:
            rows.append(Row("data", name, impl, "uint16", shape, {}, "FAIL", f"failed: {_last_line(err)}"))
            continue
        m = {"tokens": res["tokens"], "seconds": res["seconds"], "tokens_per_s": res["tokens"] / res["seconds"],
             "mb_per_s": n_bytes / 1e6 / res["seconds"], "peak_rss_mb": rss}
        status, note = "", ""
        if loop is not None:
            m["vs_loop"] = loop["seconds"] / res["seconds"]
            if res["tokens"] != loop["tokens"]:
                status, note = "FAIL", f"{res['tokens']:,} tokens, the loop counted {loop['tokens']:,}"
            elif impl.endswith("workers=2") and judge:
                status = "PASS" if m["vs_loop"] >= TARGET_RATIO else "FAIL"
                note = f"target >= {TARGET_RATIO}x the plain loop"
        if not note and impl.startswith("gpt_core"):
            note = "incl. worker start-up, JSON parsing, writing shards; peak RSS of the largest process"
        rows.append(Row("data", name, impl, "uint16", shape, m, status, note))
    return rows


# ------------------------------------------------------------------------------------------------ trainer
def write_random_dataset(root: Path, n_train: int, n_val: int = 100_000, shard_tokens: int = 10**8,
                         vocab_size: int = 50257, seed: int = 0) -> Path:
    """A folder of llm.c shards (no manifest: it opens with gpt2) of uniformly random token ids."""
    if not 1 <= shard_tokens <= MAX_SHARD_TOKENS:
        raise ValueError(f"shard_tokens must be in [1, {MAX_SHARD_TOKENS}], got {shard_tokens}")
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    chunk = 10**7

    def shard(split: str, index: int, n: int) -> None:
        with ShardWriter(root / shard_name("random", split, index), vocab_size=vocab_size) as w:
            for i in range(0, n, chunk):
                w.write(rng.integers(0, vocab_size, min(chunk, n - i), dtype=np.uint16))

    shard("val", 0, n_val)
    for i, start in enumerate(range(0, n_train, shard_tokens), 1):
        shard("train", i, min(shard_tokens, n_train - start))
    return root


def _tokens_label(n: int) -> str:
    for unit, div in (("B", 10**9), ("M", 10**6), ("k", 10**3)):
        if n >= div:
            return f"{n / div:g}{unit} tokens"
    return f"{n} tokens"


def trainer_rows(tmp: Path, sizes: tuple[int, int], trainers: list[str], steps: int, judge: bool,
                 progress: Callable) -> list[Row]:
    results: dict[tuple[str, int], dict[str, Any]] = {}
    rows = []
    for n in sizes:
        progress(f"data: writing a random dataset of {_tokens_label(n)}")
        data = write_random_dataset(tmp / f"random_{n}", n)
        try:
            for trainer in trainers:
                progress(f"data: {trainer}_gpt.train on {_tokens_label(n)}")
                out = tmp / f"run_{trainer}_{n}"
                cmd = [sys.executable, "-m", f"{trainer}_gpt.train", "--data", str(data), "--preset", "tiny",
                       "--steps", str(steps), "--no-progress", "--out", str(out), "--eval-every", "0"]
                t0 = time.perf_counter()
                rc, rss, _, err = run_child(cmd, timeout=1800)
                wall = time.perf_counter() - t0
                impl, shape = f"{trainer}_gpt.train", _tokens_label(n)
                if rc != 0:  # e.g. a trainer that does not take a folder for --data
                    rows.append(Row("data", "peak RSS", impl, "float32", shape, {}, "FAIL",
                                    f"exit {rc} with --data {data}: {_last_line(err)}"))
                    continue
                steps_rows = _train_rows(out / "metrics.jsonl")
                m: dict[str, Any] = {"peak_rss_mb": rss, "wall_s": wall}
                note = ""
                if steps_rows and all("data_s" in r and "step_s" in r for r in steps_rows):
                    m["data_ms"] = 1e3 * statistics.median(r["data_s"] for r in steps_rows)
                    m["step_ms"] = 1e3 * statistics.median(r["step_s"] for r in steps_rows)
                    m["data_frac"] = statistics.median(r["data_s"] / r["step_s"] for r in steps_rows)
                else:
                    note = "metrics.jsonl has no data_s / step_s per train step"
                results[(trainer, n)] = m
                rows.append(Row("data", "peak RSS", impl, "float32", shape, m, "", note))
                shutil.rmtree(out, ignore_errors=True)
        finally:
            shutil.rmtree(data, ignore_errors=True)
    small, large = sizes
    for trainer in trainers:
        a, b = results.get((trainer, small)), results.get((trainer, large))
        if a is None or b is None:
            continue
        diff = b["peak_rss_mb"] - a["peak_rss_mb"]
        ok = "PASS" if diff < TARGET_RSS_MB else "FAIL"
        rows.append(Row("data", "peak RSS growth", f"{trainer}_gpt.train", "float32",
                        f"{_tokens_label(small)} -> {_tokens_label(large)}", {"rss_diff_mb": diff},
                        ok if judge else "", f"target < {TARGET_RSS_MB:g} MB"))
        if "data_frac" in b:
            ok = "PASS" if b["data_frac"] < TARGET_DATA_FRAC else "FAIL"
            rows.append(Row("data", "data wait", f"{trainer}_gpt.train", "float32", _tokens_label(large),
                            {"data_ms": b["data_ms"], "step_ms": b["step_ms"], "data_frac": b["data_frac"]},
                            ok if judge else "", f"median data_s / step_s; target < {TARGET_DATA_FRAC:.0%}"))
    return rows


def _train_rows(metrics: Path) -> list[dict[str, Any]]:
    if not metrics.is_file():
        return []
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("kind") == "train"]


# ---------------------------------------------------------------------------------------------------- run
def run(*, quick: bool = False, stages: tuple[str, ...] = STAGES, trainers: tuple[str, ...] = TRAINERS,
        corpus_mb: float | None = None, workers: tuple[int, ...] = (1, 2), small_tokens: int | None = None,
        large_tokens: int | None = None, steps: int | None = None, tmp: str | Path | None = None,
        progress: Callable[[str], Any] = lambda msg: None) -> list[Row]:
    sizes = dict(QUICK if quick else FULL)
    for k, v in (("corpus_mb", corpus_mb), ("small_tokens", small_tokens), ("large_tokens", large_tokens),
                 ("steps", steps)):
        if v is not None:
            sizes[k] = v
    bad = [s for s in stages if s not in STAGES] + [t for t in trainers if t not in TRAINERS]
    if bad:
        raise ValueError(f"unknown stage/trainer {bad}; stages: {STAGES}, trainers: {TRAINERS}")
    if sizes["corpus_mb"] <= 0:
        raise ValueError(f"--corpus-mb must be > 0, got {sizes['corpus_mb']}")
    if not 1 <= sizes["small_tokens"] < sizes["large_tokens"]:
        raise ValueError(f"need 1 <= --small-tokens < --large-tokens, got {sizes['small_tokens']}, "
                         f"{sizes['large_tokens']}")
    if sizes["steps"] < 1 or any(w < 1 for w in workers):
        raise ValueError("--steps and --workers must be >= 1")
    if tmp is not None and not Path(tmp).is_dir():
        raise FileNotFoundError(f"--tmp {tmp} is not a folder")
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="bench_data_", dir=tmp) as d:
        if "prepare" in stages:
            rows += prepare_rows(Path(d), sizes["corpus_mb"], list(workers),
                                 judge=not quick and sizes["corpus_mb"] >= FULL["corpus_mb"], progress=progress)
        if "trainer" in stages:
            rows += trainer_rows(Path(d), (int(sizes["small_tokens"]), int(sizes["large_tokens"])), list(trainers),
                                 int(sizes["steps"]), judge=not quick and sizes["large_tokens"] >= FULL["large_tokens"],
                                 progress=progress)
    return rows
