PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup catalogs messages run test faults lint format bench histories clean

# Translations (docs/i18n.md): one mapping file per domain, locale/<domain>.cfg, says which
# sources hold its texts; every language has one catalog per domain,
# locale/<lang>/LC_MESSAGES/<domain>.po, compiled to the .mo the app reads.
DOMAINS := $(basename $(notdir $(wildcard locale/*.cfg)))
CATALOGS := $(wildcard locale/*/LC_MESSAGES/*.po)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP) catalogs

catalogs: $(CATALOGS:.po=.mo)  ## compile the translations

locale/%.mo: locale/%.po | $(STAMP)
	$(BIN)/pybabel -q compile -i $< -o $@

messages: $(STAMP)  ## extract the texts to translate into locale/*.pot and update every catalog
	for domain in $(DOMAINS); do \
	  $(BIN)/pybabel -q extract -F locale/$$domain.cfg -o locale/$$domain.pot \
	    --add-location=file --sort-by-file --project="Referral Desk" . && \
	  $(BIN)/pybabel -q update -D $$domain -i locale/$$domain.pot -d locale \
	    --ignore-obsolete || exit 1; \
	done

run: setup  ## start the local stack: Temporal server + UI, worker, mail sink
	$(BIN)/referrals dev

test: setup  ## the whole suite, against real Temporal servers
	$(BIN)/pytest

faults: setup  ## fault injection: referrals through worker kills, restarts, SMTP and DB outages
	$(BIN)/python -m faults

bench: setup  ## the referral lifecycle against a bare Temporal one: bench/results.json (QUICK=1: short)
	BENCH_QUICK=$(QUICK) $(BIN)/python -m bench

histories: setup  ## record this release's referral histories (tests/histories/<version>/)
	$(BIN)/python -m tests.record_histories

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy workflows activities core starter worker.py bench tests faults

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) .data
	rm -f $(CATALOGS:.po=.mo)
