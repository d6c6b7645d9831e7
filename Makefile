# The two commands a newcomer needs: `make dev` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: dev test lint bench migrate clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

dev: $(STAMP)
	$(BIN)/taskman dev --demo $(DEV_ARGS)

test: lint
	$(BIN)/pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check worker tests bench scripts
	$(BIN)/mypy

migrate: $(STAMP)
	$(BIN)/taskman migrate

bench: $(STAMP)
	$(BIN)/pip install --quiet -e '.[test,bench]'
	$(BIN)/python -m bench.hot_path
	$(BIN)/python -m bench.many_workers
	$(BIN)/python -m bench.soak
	$(BIN)/python -m bench.retention_waiting
	$(BIN)/python -m bench.claim
	$(BIN)/python -m bench.create
	$(BIN)/python -m bench.worker_throughput
	$(BIN)/python -m bench.outbox_throughput
	$(BIN)/python -m bench.worker_latency
	$(BIN)/python -m bench.prepared
	$(BIN)/python -m bench.worker_memory
	$(BIN)/python -m bench.guards
	$(BIN)/python -m bench.history_scale

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
