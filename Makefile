# One command each: `make run` starts the gateway, `make test` passes the suite.
# Both set themselves up (a virtualenv in .venv) on a fresh machine.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip -q --disable-pip-version-check

.PHONY: run test check lint typecheck bench install install-test system-deps clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml constraints.txt | $(VENV)/bin/python
	$(PIP) install -c constraints.txt -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml constraints.txt | $(VENV)/bin/python
	$(PIP) install -c constraints.txt -e '.[test,dev,postgres]'
	touch $(VENV)/.installed $@

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

## Start the gateway on embedded defaults (SQLite in ./data, CA in ./certs).
run: install
	$(VENV)/bin/gateway serve

## Debian packages the suite talks to (mosquitto clients for interop tests).
system-deps:
	@./.ci/system-deps

## The whole suite.
test: install-test system-deps
	$(PY) -m pytest -q

## Ingest benchmark against stock amqtt 0.12.1 (~15 min; BENCH_ARGS=--quick for ~2 min).
bench: install-test
	bench/ingest $(BENCH_ARGS)

lint: install-test
	$(VENV)/bin/ruff check gateway ca tests bench
	$(VENV)/bin/ruff format --check gateway ca tests bench

typecheck: install-test
	$(VENV)/bin/mypy

check: lint typecheck test

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
