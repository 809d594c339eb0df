# The README's two commands are `make up` and `make test`; everything else is for developers.
PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The pinned versions: the product's own (the Docker image installs these) and with the dev tools.
LOCK := requirements.lock
DEV_LOCK := requirements-dev.lock

.PHONY: up test install lock kafka kafka-stop lint bench bench-gateway bench-streams bench-history bench-warehouse bench-simulate bench-lake bench-cluster soak bench-ops clean chromium postgresql prometheus netns

$(STAMP): pyproject.toml $(LOCK) $(DEV_LOCK)
	@command -v $(PY) >/dev/null || { echo "$(PY) not found; set PY=python3.11 or newer"; exit 1; }
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r $(DEV_LOCK)
	$(BIN)/pip install -q -e . --no-deps
	touch $(STAMP)

install: $(STAMP)

## make lock: resolve pyproject.toml's dependencies again (the newest within its bounds) into the lock files.
lock:
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q 'uv>=0.5,<1'
	$(BIN)/uv pip compile -q --upgrade --universal --python-version 3.11 pyproject.toml -o $(LOCK)
	$(BIN)/uv pip compile -q --upgrade --universal --python-version 3.11 pyproject.toml --extra dev \
		--constraint $(LOCK) -o $(DEV_LOCK)

## make up: set up everything (venv, install, Kafka jars) and run the whole stack with simulated calls.
up: $(STAMP)
	$(BIN)/callstream up

## make test: lint, format and type checks, then the whole test suite against a real Kafka broker
## that the suite starts itself (and PostgreSQL, S3Proxy for the lake tests, Prometheus for prometheus/,
## iproute2 and iptables for the cluster tests).
test: lint chromium postgresql prometheus netns
	$(BIN)/callstream kafka start --help >/dev/null
	$(BIN)/python -m pytest $(PYTEST_ARGS)

## Debian's chromium for the dashboard's browser test (Playwright drives it; never `playwright install`).
chromium:
	@test -x /usr/bin/chromium || { apt-get update -qq && apt-get install -y -qq chromium; } \
		|| echo "WARNING: could not install Debian's chromium (apt-get as root); the browser tests will be skipped"

## Debian's PostgreSQL server for the lake's catalog tests (the tests start their own server with it).
postgresql:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq postgresql; } \
		|| echo "WARNING: could not install Debian's postgresql (apt-get as root); the shared-lake tests will be skipped"

## Debian's Prometheus (and promtool) for the tests of prometheus/: the tests run the binary with a config
## of their own on a free loopback port, never the Debian service.
prometheus:
	@command -v prometheus >/dev/null && command -v promtool >/dev/null || { apt-get update -qq && apt-get install -y -qq prometheus; } \
		|| echo "WARNING: could not install Debian's prometheus (apt-get as root); the Prometheus tests will be skipped"

## iproute2 and iptables for the cluster tests: each broker and service on a host of its own (a network
## namespace), partitions and a slow, lossy link.
netns:
	@{ command -v ip && command -v iptables; } >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq iproute2 iptables; } \
		|| echo "WARNING: could not install iproute2 and iptables (apt-get as root); the cluster tests run on loopback ports and skip the partition and latency faults"

kafka: $(STAMP)
	$(BIN)/callstream kafka start

kafka-stop: $(STAMP)
	$(BIN)/callstream kafka stop

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

bench: bench-gateway bench-streams bench-warehouse bench-simulate

bench-gateway: $(STAMP)
	$(BIN)/python -m bench.gateway $(BENCH_GATEWAY_ARGS)

bench-streams: $(STAMP)
	$(BIN)/python -m bench.streams

## make bench-history: a month of traffic in simulated time (BENCH_HISTORY_ARGS='--calls-per-day 5000' for a quick one).
bench-history: $(STAMP)
	$(BIN)/python -m bench.history $(BENCH_HISTORY_ARGS)

bench-warehouse: $(STAMP)
	$(BIN)/pip install -q -e '.[dev,bench]'
	$(BIN)/python -m bench.warehouse $(BENCH_ARGS)

bench-simulate: $(STAMP)
	$(BIN)/python -m bench.simulate $(BENCH_SIMULATE_ARGS)

bench-lake: $(STAMP)
	$(BIN)/python -m bench.lake $(BENCH_ARGS)

bench-ops: $(STAMP)
	$(BIN)/python -m bench.ops $(BENCH_ARGS)

bench-cluster: $(STAMP)
	$(BIN)/python -m bench.cluster $(BENCH_ARGS)

## make soak: 500 events/s of the simulator's mix through gateway, two workers and sink for 60 minutes, a
## fault every 5 minutes, then the audit; the report goes to bench/out/soak.md and, for a full hour, to
## bench/RESULTS.md. SOAK_ARGS="--minutes 5 --fault-every 60" for a short run (`--help` for the rest).
soak: $(STAMP)
	$(BIN)/python -m tests.stress.soak --results --report bench/out/soak.md $(SOAK_ARGS)

clean:
	rm -rf data .pytest_cache .mypy_cache .ruff_cache
