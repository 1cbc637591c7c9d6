# Two entry points: `make demo` and `make test`. Both build .venv on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test test-quick check netdeps soak bench clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/zrpc demo

# ruff, mypy --strict and the import contract first, then the whole suite
test: check netdeps
	$(BIN)/python -m pytest

# The network-namespace scenarios (tests/netchaos) need root, `ip` and `nft`: as root on Debian
# this installs iproute2 and nftables when they are missing; elsewhere those scenarios skip,
# saying why.
netdeps:
	@if [ "$$(id -u)" = 0 ] && ! { command -v ip && command -v nft; } >/dev/null 2>&1; then \
		echo "netdeps: installing iproute2 and nftables for tests/netchaos"; \
		{ apt-get install -y -q iproute2 nftables || { apt-get update -q && apt-get install -y -q iproute2 nftables; }; } \
			>/dev/null 2>&1 || echo "netdeps: could not install them: tests/netchaos will skip"; \
	fi

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
# a little under five minutes, with their curves in bench.png; `make bench BENCH_ARGS="--seconds 1 --json
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
