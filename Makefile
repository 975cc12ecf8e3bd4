# Two commands on a fresh clone: `make demo` and `make test`. Both create .venv if missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel of torch 2.13.0 (on this workplace it lies on disk; elsewhere pip downloads it).
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed-stamp
# The demo and the tests never download from a model hub.
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1

.PHONY: install demo lint test test-slow test-all bench clean-work ui-check drills

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e '.[dev,dask]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/cptflow run configs/demo.yaml

# pytest's own script, not `python -m pytest`: that would put the checkout root on sys.path, where
# kernels/ shadows Hugging Face's `kernels`. The tests import the installed cptflow.
# `make test` skips the tests marked slow (minutes each: the wheel built and installed into a fresh
# venv); `make test-slow` runs just those, `make test-all` everything. CI runs lint, test, test-slow.
test: $(STAMP)
	$(VENV)/bin/pytest -q -m "not slow"

test-slow: $(STAMP)
	$(VENV)/bin/pytest -q -m slow

test-all: $(STAMP)
	$(VENV)/bin/pytest -q

# ruff (pyproject.toml [tool.ruff]): lint and formatting, line length 120.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: $(STAMP)
	$(PY) -m pip install --quiet -e '.[bench]'
	$(PY) benchmarks/bench_clean_quality.py
	$(PY) benchmarks/bench_language.py
	$(PY) benchmarks/bench_perplexity.py

# Not part of `test`: starts a Prefect server, runs the demo against it in a fresh work directory
# (about 8 minutes on 2 cores) and checks its artifacts in the UI with headless Chromium (the system's:
# `apt-get install chromium`); full-page screenshots in work/ui-check/ (docs/ui-check*.png: a curated copy).
ui-check: $(STAMP)
	$(PY) -m pip install --quiet -e '.[ui-check]'
	$(PY) scripts/ui_check.py

# Not part of `test` (a quick subset of each is): the reliability drills of docs/reliability.md —
# SIGKILL every stage at random moments, concurrent runs, a hostile-input corpus, planted secrets.
# About 75 minutes on 2 cores; JSON reports in work/drills/.
drills: $(STAMP)
	$(PY) drills/run.py kill --trials 20 --crash-points 10 --out work/drills/kill.json
	$(PY) drills/run.py kill --via prefect --trials 3 --stages clean tokenize cpt --out work/drills/kill-prefect.json
	$(PY) drills/run.py concurrency --out work/drills/concurrency.json
	$(PY) drills/run.py hostile_input --size full --out work/drills/hostile-input.json
	$(PY) drills/run.py security --out work/drills/security.json

clean-work:
	rm -rf work

# Not part of `test`: the GPU figures in one call (docs/benchmarks.md, "GPU check"). `make gpu-wheels`, here
# (PyPI reachable), downloads into gpu_wheels/ the wheels the GPU image lacks (scripts/gpu_wheels.txt, about
# 44 MiB); `make gpu-check` on the GPU machine installs them, runs the kernel tests compiled and the kernel,
# training and perplexity benchmarks under a 9-minute cap, and writes $(GPU_CHECK_OUT)/summary.json and a log
# per step. `make gpu-check GPU_CHECK_ARGS=--dry-run PYTHON=.venv/bin/python`: the same on a CPU, tiny sizes.
GPU_CHECK_OUT ?= work/gpu-check
GPU_CHECK_ARGS ?=
GPU_PLATFORMS := $(foreach n,manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1,--platform $(n)_x86_64)

.PHONY: gpu-wheels gpu-check

gpu-wheels:
	rm -rf gpu_wheels
	$(PYTHON) -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		$(GPU_PLATFORMS) -d gpu_wheels -r scripts/gpu_wheels.txt
	@du -ch gpu_wheels/*.whl | tail -1

gpu-check:
	PYTHON=$(PYTHON) scripts/gpu_check.sh $(GPU_CHECK_ARGS) $(GPU_CHECK_OUT)
