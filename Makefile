# The two commands of the README: `make demo` and `make test`. Each sets up .venv on first use
# (and again only when a requirements file or pyproject.toml changes), then runs.
#   make demo  installs what the CPU path needs (requirements/base.txt) with torch 2.13.0's CPU build
#              (requirements/torch-cpu.txt); where nvidia-smi sees a GPU or with CUDA=1, torch
#              2.14.1 (requirements/torch.txt) and CuPy (requirements/cuda.txt, dalimix[cuda]);
#   make test  adds the test, benchmark, lint and docs tools, with torch 2.14.1 (torchvision 0.29.1
#              needs it), then runs `make lint`, `make docs` and the test suite (.ci/run is `make test`).
#              A goal that needs the test tools installs torch 2.14.1 from the start, not 2.13.0 first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
CUDA ?= $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1 || echo 0)
CUDA_REQ := $(if $(filter 1,$(CUDA)),-r requirements/cuda.txt,)
TEST_GOALS := test lint docs format test-gpu bench
TORCH_REQ := requirements/$(if $(or $(filter 1,$(CUDA)),$(filter $(TEST_GOALS),$(MAKECMDGOALS))),torch,torch-cpu).txt
DEMO_STAMP := $(VENV)/.installed-demo$(if $(filter 1,$(CUDA)),-cuda,)
TEST_STAMP := $(VENV)/.installed-test$(if $(filter 1,$(CUDA)),-cuda,)

.PHONY: demo test lint docs format test-gpu bench clean-venv

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=24"

$(DEMO_STAMP): requirements/base.txt requirements/torch.txt requirements/torch-cpu.txt requirements/cuda.txt pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -r requirements/base.txt -r $(TORCH_REQ) $(CUDA_REQ)
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

$(TEST_STAMP): $(DEMO_STAMP) requirements/torch.txt requirements/bench.txt requirements/test.txt requirements/dev.txt
	$(PY) -m pip install --quiet -r requirements/test.txt -r requirements/dev.txt $(CUDA_REQ)
	touch $@

demo: $(DEMO_STAMP)
	$(VENV)/bin/dalimix demo

test: lint docs
	$(PY) -m pytest -q

# ruff (lint + format check) over the tree, mypy over the public modules (config: pyproject.toml)
lint: $(TEST_STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# the docs site (mkdocs.yml, docs/), warnings as errors, into build/site
docs: $(TEST_STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir build/site

# rewrite the tree in ruff's format and apply ruff's safe fixes
format: $(TEST_STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

test-gpu: $(TEST_STAMP)
	$(PY) -m pytest -q -m gpu

bench: $(TEST_STAMP)
	$(VENV)/bin/dalimix bench

clean-venv:
	rm -rf $(VENV)
