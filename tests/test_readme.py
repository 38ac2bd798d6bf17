"""The README's Python examples run as written, in order, as one script in a fresh directory, and the values
their comments claim (`expr  # 124439808`) are what the expressions give."""

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"

CHECK = '''
def _claim(value, expected, line):
    import numpy as np
    got = np.asarray(value).tolist() if hasattr(value, "shape") or isinstance(value, tuple) else value
    expected = np.asarray(expected).tolist() if isinstance(expected, tuple) else expected
    assert got == expected, f"README example line {line}: gives {got!r}, its comment says {expected!r}"
'''


def python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def leading_literal(comment: str):
    """The longest prefix of a comment that is a Python literal (`[1, 2]  (note)` -> [1, 2]), or raise."""
    for end in range(len(comment), 0, -1):
        try:
            return ast.literal_eval(comment[:end].strip())
        except (ValueError, SyntaxError):
            continue
    raise ValueError(comment)


def with_claims_checked(source: str) -> tuple[str, int]:
    """The script, each one-line expression statement with a literal comment wrapped in a check."""
    lines = source.split("\n")
    n = 0
    for node in ast.parse(source).body:
        if not (isinstance(node, ast.Expr) and node.lineno == node.end_lineno):
            continue
        line = lines[node.lineno - 1]
        code, _, comment = line.partition("  #")
        try:
            expected = leading_literal(comment)
        except ValueError:
            continue
        lines[node.lineno - 1] = f"_claim(({code.strip()}), {expected!r}, {node.lineno})"
        n += 1
    return CHECK + "\n".join(lines), n


def test_readme_has_examples():
    assert len(python_blocks()) >= 4


@pytest.mark.slow
def test_readme_examples_run_and_their_comments_hold(tmp_path):
    script, claims = with_claims_checked("\n".join(python_blocks()))
    assert claims >= 4  # the parameter count, token ids, first batch, cl100k decode, word ids
    (tmp_path / "readme_examples.py").write_text(script)
    # As a user runs them: no interpreter switch (CPU tensors take the kernels' exact PyTorch reference).
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(README.parent)
    run = subprocess.run([sys.executable, "readme_examples.py"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=600, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (tmp_path / "ckpt" / "model.safetensors").is_file() and (tmp_path / "vocab.json").is_file()


def own_corpus_commands() -> list[str]:
    section = README.read_text().split("## Train GPT-2 on your own corpus", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"^```bash\n(.*?)^```", section, flags=re.S | re.M).group(1)
    return [line for line in block.splitlines() if line.strip() and not line.startswith("#")]


@pytest.mark.slow
def test_own_corpus_commands_run_as_written(tmp_path):
    """The "train on your own corpus" commands, from a copy of the sample at the path they name. The torchrun
    and multi-device lines are run by their own tests (DDP, FSDP2, 4 JAX devices); the rest run here."""
    commands = own_corpus_commands()
    assert len(commands) == 8 and sum("torchrun" in c or "XLA_FLAGS" in c for c in commands) == 3
    (tmp_path / "gpt_core" / "assets").mkdir(parents=True)
    (tmp_path / "gpt_core" / "assets" / "the-verdict.txt").write_text(
        (README.parent / "gpt_core" / "assets" / "the-verdict.txt").read_text())
    env = {**os.environ, "PYTHONPATH": str(README.parent)}
    for command in commands:
        if "torchrun" in command or "XLA_FLAGS" in command:
            continue
        run = subprocess.run(command.replace("python -m", f"{sys.executable} -m", 1), shell=True, cwd=tmp_path,
                             capture_output=True, text=True, timeout=300, env=env)
        assert run.returncode == 0, f"{command}\n{run.stdout[-1500:]}\n{run.stderr[-1500:]}"
    assert (tmp_path / "data" / "verdict" / "manifest.json").is_file()
    assert (tmp_path / "runs" / "own" / "checkpoint" / "trainer_state.json").is_file()
    assert (tmp_path / "runs" / "own_jax" / "metrics.jsonl").is_file()
