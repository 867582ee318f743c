# `make demo` and `make test` work on a fresh machine with only python3: each creates .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-all fetch clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/lowbit fetch smollm2-135m
	$(BIN)/python -m lowbit.ptq.demo

test: $(STAMP)
	$(BIN)/pytest

test-all: $(STAMP)
	$(BIN)/pytest -m ''

fetch: $(STAMP)
	$(BIN)/lowbit fetch smollm2-135m

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
