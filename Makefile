PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup run test faults lint format bench histories clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

run: setup  ## start the local stack: Temporal server + UI, worker, mail sink
	$(BIN)/referrals dev

test: setup  ## the whole suite, against real Temporal servers
	$(BIN)/pytest

faults: setup  ## fault injection: referrals through worker kills, restarts, SMTP and DB outages
	$(BIN)/python -m faults

bench: setup  ## referrals walked end to end on a real dev server: latency and throughput
	$(BIN)/python -m bench.lifecycle

histories: setup  ## record this release's referral histories (tests/histories/<version>/)
	$(BIN)/python -m tests.record_histories

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy workflows activities starter worker.py bench tests faults

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) .data
