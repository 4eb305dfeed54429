# `make run` and `make test` set up everything they need on a fresh machine (see README.md).
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PG_URL ?= postgres://postgres@127.0.0.1:5432/billing
REDIS_TEST_URL ?= redis://127.0.0.1:6379/15
PORT ?= 8000
LOAD_SECONDS ?= 300
LOAD_RATE ?= 400

.PHONY: install run test test-sqlite test-postgres lint bench load soak clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q '.[test]'
	touch $@

install: $(VENV)/.installed

run: install
	$(PY) manage.py migrate --noinput -v0
	$(PY) manage.py seed_demo
	PORT=$(PORT) $(PY) -m billing_site.run_all

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test-sqlite: install
	$(PY) -m pytest

# PostgreSQL and Redis: run when they answer; on CI (CI=true) they must.
test-postgres: install
	@if $(PY) -m billing_site.services_check "$(PG_URL)" "$(REDIS_TEST_URL)"; then \
		DATABASE_URL=$(PG_URL) REDIS_URL=$(REDIS_TEST_URL) $(PY) -m pytest; \
	elif [ "$$CI" = "true" ]; then \
		echo "PostgreSQL or Redis does not answer, and CI needs both."; exit 1; \
	else \
		echo "PostgreSQL or Redis does not answer: skipping the PostgreSQL run."; \
	fi

test: lint test-sqlite test-postgres

bench: install
	$(PY) -m bench.run

# The metering API under a steady load with its rate limits in force (bench/load.py); not in `make test`.
load: install
	$(PY) -m bench.load --seconds $(LOAD_SECONDS) --rate $(LOAD_RATE)
# The concurrency soak: 50 threads × 10,000 operations on a PostgreSQL database of its own
# (billing_soak, or SOAK_DATABASE_URL) and a fresh localstripe; exit 1 on any anomaly.
soak: install
	$(PY) -m soak.run

clean:
	rm -rf $(VENV) db.sqlite3* celery-broker.sqlite* localstripe-state.pickle* test-artifacts staticfiles
