# Two commands do all the set-up: `make demo` (the local swarm demo) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is pinned in the same pip command as everything else so that pip keeps the CPU build where
# one is available (a plain `torch` requirement would resolve to the multi-GB CUDA build).
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install demo test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$(TORCH)" -e ".[test,bench]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/ddm-swarm demo

# two workers, each taking whole test files (a file's tests share one swarm and run in order): most
# tests wait on peers, so two run side by side in little more than the time of one. Files go out in
# collection order, the longest first (tests/conftest.py), not xdist's most-tests-first
test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations=25

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
