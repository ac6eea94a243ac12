# The two commands: `make demo` runs the whole loop locally; `make test` runs the checks.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo up test lint bench

# The pinned versions of requirements-dev.lock (regenerate it as its header says when
# pyproject.toml's dependencies change), then the project itself without resolving again.
# A venv from before the rename to acedata-tracker drops the old `tracker` distribution.
$(VENV)/.installed: pyproject.toml requirements-dev.lock
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip uninstall --quiet --yes tracker 2>/dev/null || true
	$(PY) -m pip install --quiet -r requirements-dev.lock
	$(PY) -m pip install --quiet --no-deps -e .
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
