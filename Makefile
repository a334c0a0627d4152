# Two commands do everything on a fresh machine (Python 3.11 + pip, no GPU):
#   make study   set up .venv and run the default study (dvc repro)
#   make test    set up .venv and run the tests
# Both are idempotent: setup reruns only when pyproject.toml or requirements.lock changes, and dvc repro skips
# what is up to date.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
# A local CPU build on the project's machines; a GPU user sets TORCH to their CUDA build, or
# installs torch into the venv first (an importable torch is kept as it is).
TORCH ?= torch==2.13.0
EXTRAS ?= dev,ssh
# The versions of every other library (pip constraints); `make setup CONSTRAINTS=` takes the newest that
# pyproject.toml allows instead.
CONSTRAINTS ?= requirements.lock

export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export DVC_NO_ANALYTICS := 1
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

# --no-compile: Python compiles a module to bytecode when it is first imported instead of pip compiling every
# file of every package. The tests start a few hundred interpreters (dvc, stage scripts), so `make test`
# compiles everything first, on every core: where PYTHONDONTWRITEBYTECODE is set imports never write bytecode,
# and every interpreter would compile what it imports again.

.PHONY: setup study test smoke

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -c "import torch" 2>/dev/null || $(VENV)/bin/pip install -q --no-compile "$(TORCH)"
	$(VENV)/bin/pip install -q --no-compile $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) -e ".[$(EXTRAS)]"
	touch $@

study: setup
	dvc repro

test: setup
	-$(VENV)/bin/python -m compileall -qq -j 0 $(VENV)/lib  # a cache: a file that does not compile is no error
	pytest

# The whole pipeline at smoke size, as an experiment (params.yaml is left as it is).
smoke: setup
	dvc exp run $$(python scripts/apply_profile.py profiles/smoke.yaml)
