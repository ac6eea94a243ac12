# The two commands: `make demo` runs the whole loop locally; `make test` runs the checks.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo up test lint bench

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/tracker demo

up: $(VENV)/.installed
	$(VENV)/bin/tracker up

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check tracker tests bench migrations
	$(VENV)/bin/ruff format --check tracker tests bench migrations
	$(VENV)/bin/mypy tracker
	$(VENV)/bin/lint-imports

test: lint
	$(VENV)/bin/pytest

bench: $(VENV)/.installed
	$(PY) -m bench
