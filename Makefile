# `make demo` and `make test` work on a fresh machine with only python3: each creates .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-all fetch clean constraints

# constraints.txt pins every package to the versions CI tested; `make constraints` refreshes it.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip -c constraints.txt
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/lowbit fetch smollm2-135m
	$(BIN)/lowbit demo

# Two pytest workers (pytest-xdist), one test file each at a time: the suite's tests are mostly
# single-threaded tracing and compiling, so two workers halve its time on CI's two cores.
TEST_WORKERS ?= 2

test: $(STAMP)
	$(BIN)/pytest -n $(TEST_WORKERS) --dist loadfile

test-all: $(STAMP)
	$(BIN)/pytest -n $(TEST_WORKERS) --dist loadfile -m ''

fetch: $(STAMP)
	$(BIN)/lowbit fetch smollm2-135m

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis

# Resolve the newest versions the pyproject ranges allow in a scratch venv and pin them.
constraints:
	rm -rf .venv-constraints
	$(PYTHON) -m venv .venv-constraints
	.venv-constraints/bin/pip install -q --upgrade pip
	.venv-constraints/bin/pip install -q -e '.[dev]'
	{ sed -n '1,2p' constraints.txt; echo "pip==$$(.venv-constraints/bin/pip --version | cut -d' ' -f2)"; \
	  .venv-constraints/bin/pip freeze --exclude-editable | grep -v '^lowbit'; } > constraints.txt.tmp
	mv constraints.txt.tmp constraints.txt
	rm -rf .venv-constraints
