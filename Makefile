# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Both create .venv from a Python 3.12 interpreter when it is missing and install the pinned
# dependencies of requirements.txt (re-installed whenever that file or setup.py changes).
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export JAX_PLATFORMS ?= cpu

.PHONY: demo test test-fast bench parity-refresh clean-venv

$(PY):
	@py312=$$(tools/python312.sh) && echo "creating $(VENV) from $$py312" && $$py312 -m venv $(VENV)

$(STAMP): $(PY) requirements.txt setup.py
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	@touch $@

demo: $(STAMP)
	$(PY) -m experiments.demo

# Two workers (one per core), whole files per worker so module-level fixtures are built once.
test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile --durations=20 tests

test-fast: $(STAMP)
	$(PY) -m pytest -q -x -m "not slow" tests

parity-refresh:
	bash tools/parity/refresh.sh

clean-venv:
	rm -rf $(VENV)
