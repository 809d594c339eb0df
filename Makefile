# The README's two commands are `make up` and `make test`; everything else is for developers.
PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: up test install kafka kafka-stop lint typecheck bench bench-gateway bench-streams bench-warehouse bench-lake clean chromium postgresql

$(STAMP): pyproject.toml
	@command -v $(PY) >/dev/null || { echo "$(PY) not found; set PY=python3.11 or newer"; exit 1; }
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

## make up: set up everything (venv, install, Kafka jars) and run the whole stack with simulated calls.
up: $(STAMP)
	$(BIN)/callstream up

## make test: the whole test suite, against a real Kafka broker that the suite starts itself.
test: $(STAMP) chromium postgresql
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

kafka: $(STAMP)
	$(BIN)/callstream kafka start

kafka-stop: $(STAMP)
	$(BIN)/callstream kafka stop

lint: $(STAMP)
	$(BIN)/ruff check callstream gateway streams warehouse tests bench
	$(BIN)/mypy

bench: bench-gateway bench-streams bench-warehouse

bench-gateway: $(STAMP)
	$(BIN)/python -m bench.gateway $(BENCH_GATEWAY_ARGS)

bench-streams: $(STAMP)
	$(BIN)/python -m bench.streams

bench-warehouse: $(STAMP)
	$(BIN)/pip install -q -e '.[dev,bench]'
	$(BIN)/python -m bench.warehouse $(BENCH_ARGS)

bench-lake: $(STAMP)
	$(BIN)/python -m bench.lake $(BENCH_ARGS)

clean:
	rm -rf data .pytest_cache .mypy_cache .ruff_cache
