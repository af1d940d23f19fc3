# fedmq: `make demo` and `make test` work on a fresh Debian machine with only Python.
VENV := .venv
PY := $(VENV)/bin/python
FEDMQ := $(VENV)/bin/fedmq
PYTEST_ARGS ?=

.PHONY: demo test lint bench setup broker clean

setup:
	@bash scripts/bootstrap.sh

broker:
	@bash scripts/ensure-broker.sh

demo: setup broker
	$(FEDMQ) demo $(DEMO_ARGS)

test: setup broker
	$(PY) -m pytest $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check shared coordinator worker aggregator fedmq tests bench
	$(VENV)/bin/mypy

bench: setup broker
	$(PY) -m bench.run_all

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info fedmq-out
