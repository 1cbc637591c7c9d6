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

# zrpc (one broker, a pair) beside a raw pyzmq forwarder, zerorpc, Pyro5 and gRPC, then zrpc's
# scaling with clients and workers, latency against queue depth and the broker's memory, about
# four minutes, with their curves in bench.png; `make bench BENCH_ARGS="--seconds 1 --json
# bench.json"`, `BENCH_ARGS="--sections scaling,queue"`. A peer that did not install is skipped
# with a note.
BENCH_ARGS ?=
BENCH_STAMP := $(VENV)/.installed-bench
$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]' && touch $@ || \
		echo "bench: the bench extra did not install; the peers it lacks are skipped"

bench: $(BENCH_STAMP)
	$(BIN)/python benchmarks/throughput.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis .mypy_cache .ruff_cache
