# Postroom — the two commands: `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed-$(shell cat pyproject.toml | sha1sum | cut -c1-12)

.PHONY: run test check lint typecheck bench-quick bench clean native

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

# The hottest modules compiled with mypyc (tools/native.py); NATIVE=0 removes them (plain Python).
NATIVE ?= 1
native: $(STAMP)
ifeq ($(NATIVE),0)
	$(BIN)/python tools/native.py clean
else
	$(BIN)/python tools/native.py build
endif

run: native
	$(BIN)/postroom serve $(ARGS)

test: native
	$(BIN)/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check src tests bench tools
	$(BIN)/ruff format --check src tests bench tools

typecheck: $(STAMP)
	$(BIN)/mypy

check: lint typecheck test

# Every benchmark in its short mode, so none of them rots (CI runs this).
bench-quick: native
	@set -e; for b in bench/*.py; do \
	  case $$b in bench/_*) continue;; esac; \
	  echo "== $$b --quick"; $(BIN)/python $$b --quick; done

clean:
	-[ -x $(BIN)/python ] && $(BIN)/python tools/native.py clean
	rm -rf $(VENV) var build .pytest_cache .mypy_cache .ruff_cache
