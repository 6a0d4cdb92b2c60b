# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The CPU build of torch lies on this disk; installing it first keeps pip from pulling a CUDA build.
TORCH := torch==2.13.0

.PHONY: demo test lint clean

$(VENV)/.base:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	touch $@

$(VENV)/.demo: $(VENV)/.base pyproject.toml
	$(PY) -m pip install -q -e '.[demo]'
	touch $@

$(VENV)/.dev: $(VENV)/.base pyproject.toml
	$(PY) -m pip install -q -e '.[dev,demo]'
	touch $@

demo: $(VENV)/.demo
	$(VENV)/bin/leantune demo

test: $(VENV)/.dev
	$(VENV)/bin/ruff check leantune tests
	$(PY) -m pytest -q -ra

lint: $(VENV)/.dev
	$(VENV)/bin/ruff check leantune tests

clean:
	rm -rf $(VENV) leantune-demo
