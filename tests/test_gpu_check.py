"""bench.gpu_check (`make gpu-check`) without a GPU: the no-CUDA exit, the stage runner on real child processes
(passing, failing, timing out with a child of its own, side by side, out of budget), the plan's commands against
the bench's own parser, and the summary read back from real bench JSON and pytest junit files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from bench import gpu_check as gc
from bench import report
from bench.__main__ import parser as bench_parser

NO_GPU = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # gpu-check then sees no device, on any machine


def stage(name: str, code: str, limit: float = 30.0, **kw) -> gc.Stage:
    return gc.Stage(name, [sys.executable, "-c", code], limit, f"test stage {name}", **kw)


def test_without_cuda_one_line_its_own_status_and_no_framework_imported(tmp_path):
    done = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--out", str(tmp_path / "out")], env=NO_GPU,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == gc.NO_CUDA == 77
    assert len(done.stdout.splitlines()) == 1 and "no CUDA device" in done.stdout and not done.stderr
    assert not (tmp_path / "out").exists()
    code = ("import sys; from bench import gpu_check; rc = gpu_check.main([]); "
            "print(sorted(m for m in ('torch', 'jax', 'triton', 'numpy') if m in sys.modules)); sys.exit(rc)")
    done = subprocess.run([sys.executable, "-c", code], env=NO_GPU, capture_output=True, text=True, timeout=60)
    assert done.returncode == 77 and done.stdout.splitlines()[-1] == "[]"


def test_bad_arguments_exit_2_before_looking_for_a_gpu():
    for argv in (["--stages", "pytest-gpu,nonsense"], ["--budget", "1"]):
        done = subprocess.run([sys.executable, "-m", "bench.gpu_check", *argv], env=NO_GPU, capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 2 and "error:" in done.stderr


def test_stage_passes_and_fails_with_its_log(tmp_path):
    deadline = time.monotonic() + 60
    ok = gc.run_stage(stage("ok", "print('hello from the stage')"), tmp_path, deadline)
    assert (ok.status, ok.returncode) == ("passed", 0)
    assert "hello from the stage" in (tmp_path / ok.log).read_text()
    bad = gc.run_stage(stage("bad", "import sys; print('boom', file=sys.stderr); sys.exit(3)"), tmp_path, deadline)
    assert (bad.status, bad.returncode) == ("failed", 3) and "boom" in (tmp_path / bad.log).read_text()
    finding = gc.run_stage(stage("finding", "import sys; sys.exit(1)", informational=True), tmp_path, deadline)
    assert finding.status == "informational"


def test_a_hang_costs_its_limit_and_takes_its_children_with_it(tmp_path):
    """A stage that never ends, with a child process of its own (as torchrun has), is killed at its limit, the
    child included."""
    pid_file = tmp_path / "child.pid"
    code = ("import subprocess, sys, time; "
            "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
            f"open({str(pid_file)!r}, 'w').write(str(c.pid)); time.sleep(60)")
    t0 = time.monotonic()
    r = gc.run_stage(stage("hang", code, limit=3.0), tmp_path, time.monotonic() + 60)
    assert r.status == "timed out" and r.returncode is None and "killed after 3 s" in r.note
    assert time.monotonic() - t0 < 3.0 + gc.KILL_GRACE_S + 10
    child = int(pid_file.read_text())
    for _ in range(50):  # the child is reaped by init once killed; give it a moment
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        os.kill(child, 9)
        pytest.fail("the stage's child outlived the timeout")


def test_budget_limits_a_stage_and_skips_what_no_longer_fits(tmp_path):
    r = gc.run_stage(stage("long", "import time; time.sleep(60)", limit=600.0), tmp_path, time.monotonic() + 18)
    assert r.status == "timed out" and r.limit_s < 20
    late = gc.run_stage(stage("late", "print(1)"), tmp_path, time.monotonic() + gc.MIN_STAGE_S - 1)
    assert late.status == "not run" and "budget" in late.note and late.returncode is None


def test_lanes_run_side_by_side(tmp_path):
    """Lane one's first stage waits for a file lane two's stage writes: it can only pass if both run at once."""
    flag = tmp_path / "flag"
    wait = (f"import os, sys, time; t = time.time()\nwhile not os.path.exists({str(flag)!r}):\n"
            "    time.sleep(0.05)\n    if time.time() - t > 25: sys.exit(9)")
    lanes = [[stage("waits", wait), stage("after", "print('second in lane one')")],
             [stage("writes", f"open({str(flag)!r}, 'w').write('x')")]]
    seen = []
    results = gc.run_lanes(lanes, tmp_path, time.monotonic() + 60, seen.append)
    assert [r.name for r in results] == ["waits", "after", "writes"]
    assert all(r.status == "passed" for r in results), results
    assert sorted(r.name for r in seen) == ["after", "waits", "writes"]


def test_plan_commands_parse_with_the_bench_and_pytest(tmp_path):
    for backend in ("gpu", "cpu"):
        lanes, timed = gc.plan({"jax_backend": backend}, tmp_path)
        stages = [gc.finalise_paths(s, tmp_path) for lane in lanes for s in lane] + \
                 [gc.finalise_paths(s, tmp_path) for s in timed]
        assert len({s.name for s in stages}) == len(stages)
        for s in stages:
            for name in s.outputs.values():
                assert str(tmp_path / name) in s.cmd, (s.name, name)
        timed_impls = set()
        for s in stages:
            if s.cmd[1:3] == ["-m", "bench"]:
                args = bench_parser().parse_args(s.cmd[3:])  # a typo in a flag fails here, not on the GPU
                if args.command == "speed":
                    assert args.precision == ("tf32" if args.dtype == "float32" else "highest")
                    assert len({i.split("/")[0] for i in args.impl}) == 1, "one framework per process"
                    timed_impls |= {(args.dtype, i) for i in args.impl}
            else:
                assert s.cmd[1:3] == ["-m", "pytest"] and "gpu" in s.cmd
        for dtype in ("bfloat16", "float32"):
            assert {i for d, i in timed_impls if d == dtype} >= {"torch/sdpa", "torch/triton", "torch/math",
                                                                 "torch.compile/sdpa", "jax/xla"}
        # cuDNN attention: where JAX has a GPU, in 16-bit only.
        assert {d for d, i in timed_impls if i == "jax/cudnn"} == ({"bfloat16"} if backend == "gpu" else set())


def test_gpu_tests_are_collected_under_the_marker():
    done = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "gpu", "-p",
                           "no:cacheprovider", "tests/test_gpu_kernels.py", "tests/test_gpu_models.py"],
                          cwd=gc.ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    collected = [line for line in done.stdout.splitlines() if "::test_" in line]
    assert len(collected) >= 20
    assert any("autotunes_each_configuration_class" in c for c in collected)
    assert any("ddp_over_nccl" in c for c in collected)


def _junit(tmp_path) -> str:
    """A real junit file: pytest on a small suite with a pass, a failure, a skip and a recorded property."""
    (tmp_path / "test_tiny.py").write_text(
        "import pytest\n"
        "def test_ok(record_property):\n    record_property('autotune fwd bfloat16 D=64 sm_90', 'BLOCK_M=128')\n"
        "def test_bad():\n    assert 1 == 2\n"
        "@pytest.mark.skip(reason='no')\ndef test_skipped():\n    pass\n")
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "junit_family=xunit1",
                    "--junitxml", str(tmp_path / "junit.xml"), str(tmp_path / "test_tiny.py")],
                   capture_output=True, text=True, timeout=120, cwd=tmp_path)
    return "junit.xml"


def test_summary_from_real_files(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    junit = _junit(out)
    rows = [report.Row("speed", "train step", "torch/sdpa", "bfloat16", "B=8 T=512",
                       {"ms": 40.0, "tokens_per_s": 102400.0, "mfu": 0.41}),
            report.Row("speed", "decode", "torch/sdpa", "bfloat16", "B=8 T=512 +16", {"ms": 9.5}),
            report.Row("speed", "train step", "jax/cudnn", "bfloat16", "B=8 T=512", {}, "FAIL", "failed: XlaError")]
    report.write_json(rows, out / "speed-bf16-torch.json")
    parity = [report.Row("parity", "logits", "torch vs jax", "float32", "B=4 T=256", {"rel_err": 3e-7}, "PASS"),
              report.Row("parity", "gradients (148 tensors)", "torch vs jax", "float32", "B=4 T=256",
                         {"rel_err": 2e-3}, "FAIL", "worst: wte")]
    report.write_json(parity, out / "parity.json")
    (out / "speed-bf16-compile.log").write_text("$ cmd\n" + "\n".join(f"line {i}" for i in range(40)))
    stages = {"pytest-gpu": gc.Stage("pytest-gpu", [], 150, "pytest", {"junit": junit})}
    for name, limit in (("parity", 60), ("speed-bf16-torch", 50), ("speed-bf16-compile", 75), ("speed-fp32-jax", 55)):
        stages[name] = gc.Stage(name, [], limit, name, {"json": f"{name}.json"})
    results = [gc.Result("pytest-gpu", "failed", 80.0, 150, 1, "pytest-gpu.log", "exit status 1"),
               gc.Result("parity", "failed", 30.0, 60, 1, "parity.log", "exit status 1"),
               gc.Result("speed-bf16-torch", "passed", 40.0, 50, 0, "speed-bf16-torch.log"),
               gc.Result("speed-bf16-compile", "timed out", 75.0, 75, None, "speed-bf16-compile.log", "killed"),
               gc.Result("speed-fp32-jax", "not run", 0.0, 55, None, "", "budget spent (3 s left)")]
    (out / "pytest-gpu.log").write_text("x")
    (out / "parity.log").write_text("x")
    info = {"torch": "2.11.0", "triton": "3.6.0", "jax": "0.11.2", "jax_backend": "gpu",
            "gpus": [{"name": "NVIDIA H200", "capability": "9.0", "memory_gib": 139.8}]}
    text = gc.summary(results, stages, info, out, "now", 300.0, 470.0)
    assert "2 failed, 1 passed, 1 timed out, 1 not run" in text
    assert "exit status 1" in text and "NVIDIA H200 (sm_90, 139.8 GiB)" in text and "triton 3.6.0" in text
    assert "1 passed, 1 failed, 0 errors, 1 skipped" in text and "test_bad" in text
    assert "fwd bfloat16 D=64 sm_90: BLOCK_M=128" in text
    assert "1/2 PASS; FAIL: gradients (148 tensors)" in text
    assert "torch/sdpa: train 1.02e+05 tok/s (MFU 0.41), decode 9.5 ms/token" in text
    assert "jax/cudnn: FAIL (failed: XlaError)" in text and "| jax/cudnn | FAIL |" in text
    assert "Last lines of speed-bf16-compile.log" in text and "line 39" in text and "line 20" not in text
    assert "budget spent" in text and gc.MEMORY_POLICY in text
    assert gc.exit_status(results) == 1 and gc.exit_status(results[2:3]) == 0
    gc.write_all_rows(stages, out)
    assert (out / "all_rows.csv").read_text().count("\n") == len(rows) + len(parity) + 1


def test_junit_counts_of_a_missing_file(tmp_path):
    assert gc.junit_counts(tmp_path / "none.xml") == {}
    assert gc.load_rows(tmp_path / "none.json") == []
    (tmp_path / "bad.json").write_text(json.dumps({"no": "rows"}))
    assert gc.load_rows(tmp_path / "bad.json") == []


def test_main_end_to_end_with_harmless_stages(tmp_path, monkeypatch, capsys):
    """main() from preflight to summary.md, with the GPU's place taken by harmless stages (real child processes):
    one passes and writes real bench rows, one fails, one hangs past its limit; all files land in --out."""
    info = {"cuda_available": True, "torch": "2.11.0", "triton": "3.6.0", "jax_backend": "gpu",
            "gpus": [{"name": "NVIDIA H100 80GB HBM3", "capability": "9.0", "memory_gib": 79.2}]}
    monkeypatch.setattr(gc, "cuda_devices", lambda: ["/dev/nvidia0"])
    monkeypatch.setattr(gc, "PREFLIGHT", f"print('PREFLIGHT ' + {json.dumps(json.dumps(info))})")
    rows_json = tmp_path / "out" / "kernels.json"
    write_rows = ("from bench import report; report.write_json([report.Row('kernels', 'attention fwd', impl, "
                  "'bfloat16', 'B=4 H=16 T=2048 D=64', {'tflops': v}) for impl, v in (('triton', 410.0), "
                  f"('sdpa/flash', 450.0))], {str(rows_json)!r})")

    def fake_plan(info_, out):
        return ([[stage("pytest-gpu", "import sys; sys.exit(1)")], [stage("parity", "print('ok')")]],
                [stage("kernels", write_rows, outputs={"json": "kernels.json"}),
                 stage("speed-bf16-torch", "import time; time.sleep(60)", limit=2.0)])

    monkeypatch.setattr(gc, "plan", fake_plan)
    code = gc.main(["--out", str(tmp_path / "out"), "--budget", "120"])
    assert code == 1
    out = tmp_path / "out"
    summary = (out / "summary.md").read_text()
    assert "3 passed, 1 failed, 1 timed out" in summary.splitlines()[2]  # preflight, parity, kernels passed
    assert "NVIDIA H100 80GB HBM3 (sm_90, 79.2 GiB)" in summary
    assert "attention fwd [B=4 H=16 T=2048 D=64]: triton 410 TFLOP/s vs sdpa/flash 450" in summary
    results = json.loads((out / "results.json").read_text())
    assert [r["status"] for r in results["results"]] == ["passed", "failed", "passed", "passed", "timed out"]
    assert json.loads((out / "preflight.json").read_text())["torch"] == "2.11.0"
    assert {p.name for p in out.iterdir()} >= {"preflight.log", "pytest-gpu.log", "parity.log", "kernels.log",
                                              "speed-bf16-torch.log", "all_rows.csv", "summary.md"}
    printed = capsys.readouterr().out
    assert "speed-bf16-torch: timed out" in printed and "summary in" in printed
