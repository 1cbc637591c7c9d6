# Two entry points: `make demo` and `make test`. Both build .venv on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test test-quick check soak bench clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/zrpc demo

# ruff, mypy --strict and the import contract first, then the whole suite
test: check
	$(BIN)/python -m pytest

check: $(STAMP)
	scripts/check

test-quick: $(STAMP)
	$(BIN)/python -m pytest -m "not slow"

# The soak of `make test` for SOAK_SECONDS of load (default 10 minutes); prints its figures.
SOAK_SECONDS ?= 600
soak: $(STAMP)
	ZRPC_SOAK_SECONDS=$(SOAK_SECONDS) $(BIN)/python -m pytest tests/chaos/test_soak.py -s

bench: $(STAMP)
	$(BIN)/python benchmarks/throughput.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis .mypy_cache .ruff_cache
