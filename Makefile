# fedshield: `make demo` and `make test` set everything up in .venv and run.
# On a machine whose system Python already has a CUDA torch, reuse it with
#   make test VENV_FLAGS=--system-site-packages
PYTHON ?= python3
VENV ?= .venv
VENV_FLAGS ?=
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fedshield-installed

.PHONY: install demo test test-fast lint typecheck bench-quick clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "fedshield needs Python 3.11+ (Flower 1.40+ does), found " + sys.version.split()[0] + ": set PYTHON=python3.11 or newer")'
	$(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/fedshield demo --out results/demo

test: $(STAMP)
	$(PY) -m pytest

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow and not deploy and not flower"

lint: $(STAMP)
	$(VENV)/bin/ruff check aggregation privacy runconfig server client simulations deploy tests

typecheck: $(STAMP)
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) results build *.egg-info
