# `make test` and `make bench` set everything up on a fresh machine, then run.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# The CPU build of torch on these machines; a bare `torch` requirement would pull a multi-GB CUDA build.
TORCH_PIN ?= torch==2.13.0

.PHONY: setup test lint bench clean test-compat gpu-check

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_PIN)"
	$(PY) -m pip install --quiet -e ".[all]"
	touch $(STAMP)

lint: $(STAMP)
	$(PY) -m ruff check .

test: $(STAMP) lint
	$(PY) -m pytest -q

bench: $(STAMP)
	mkdir -p bench_results
	$(PY) -m bench --json bench_results/bench.json --csv bench_results/bench.csv --plot bench_results/bench.png

# The oldest versions we support (pyproject.toml's floors), in a second environment: the kernels' numerics tests in
# that Triton's interpreter (the patching and model tests add no Triton of their own, and run in `make test`), and the
# quick compile report for sm_80/sm_90 under that Triton (see kernels.compile_report.failures for its rule there).
COMPAT_VENV   := .venv-compat
COMPAT_PY     := $(COMPAT_VENV)/bin/python
COMPAT_STAMP  := $(COMPAT_VENV)/.installed
TRITON_OLDEST ?= 3.6.0
KERNEL_TESTS  := $(addprefix tests/test_kernels_,attention.py layer_norm.py rms_norm.py cross_entropy.py accuracy_rule.py)

$(COMPAT_STAMP): pyproject.toml
	$(PYTHON) -m venv $(COMPAT_VENV)
	$(COMPAT_PY) -m pip install --quiet --upgrade pip
	$(COMPAT_PY) -m pip install --quiet "$(TORCH_PIN)"
	$(COMPAT_PY) -m pip install --quiet "triton==$(TRITON_OLDEST)"
	$(COMPAT_PY) -m pip install --quiet -e ".[torch,dev]"
	$(COMPAT_PY) -c "import triton; v = triton.__version__; assert v == '$(TRITON_OLDEST)', v"
	touch $(COMPAT_STAMP)

# The compile report replaces tests/test_kernels_compile.py here: the same builds, with the whole table printed.
test-compat: $(COMPAT_STAMP)
	$(COMPAT_PY) -m pytest -q $(KERNEL_TESTS)
	$(COMPAT_PY) -m kernels.compile_report --quick

# On a machine with CUDA: the Python it is run with (its own torch, triton, jax), this checkout on the path,
# no virtual environment and no installs. Exit status 77 without CUDA. GPU_CHECK_ARGS="--stages pytest-gpu" etc.
gpu-check:
	PYTHONPATH="$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH}" $(PYTHON) -m bench.gpu_check $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) $(COMPAT_VENV) .pytest_cache .ruff_cache *.egg-info
