PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Python keeps the checkout's bytecode, as the image has its own (pip compiles the wheel it
# installs). Some machines set PYTHONDONTWRITEBYTECODE: every process, and the workflow sandbox
# for every referral it loads, then compiled the project's modules from source (7 % of the
# bench worker's CPU).
unexport PYTHONDONTWRITEBYTECODE

.PHONY: setup catalogs messages run test faults lint format bench histories clean lock lock-check \
	image image-test

# Translations (docs/i18n.md): one mapping file per domain, core/locale/<domain>.cfg, says
# which sources hold its texts; every language has one catalog per domain,
# core/locale/<lang>/LC_MESSAGES/<domain>.po, compiled to the .mo the app reads (a wheel
# compiles its own: setup.py).
LOCALE := core/locale
DOMAINS := $(basename $(notdir $(wildcard $(LOCALE)/*.cfg)))
CATALOGS := $(wildcard $(LOCALE)/*/LC_MESSAGES/*.po)

# Every dependency pinned, with its hashes: requirements.lock (what runs: the web, worker and
# codec-server images), requirements-toolbox.lock (and the `temporal` CLI: the toolbox image),
# requirements-dev.lock (and what make installs to develop and test), requirements-build.lock
# (what builds the wheel: pyproject.toml's build-system). `make lock` writes them, keeping the
# pins it can; `make lint` fails while one is out of date.
COMPILE = $(BIN)/uv pip compile --quiet --generate-hashes --python-version 3.11 \
	--python-platform linux --no-header
# Each lock file and the extras it holds.
LOCKS := requirements.lock: requirements-toolbox.lock:temporal-cli requirements-dev.lock:dev
BUILD_REQUIRES = $(BIN)/python -c "import tomllib; \
	print(*tomllib.load(open('pyproject.toml', 'rb'))['build-system']['requires'], sep='\n')"

$(STAMP): pyproject.toml requirements-dev.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet --require-hashes -r requirements-dev.lock
	$(BIN)/pip install --quiet --no-deps -e .
	touch $(STAMP)

lock: $(STAMP)  ## pin every dependency (with hashes) from pyproject.toml into requirements*.lock
	@for spec in $(LOCKS); do file=$${spec%%:*}; extra=$${spec#*:}; \
	  $(COMPILE) pyproject.toml $${extra:+--extra $$extra} -o $$file || exit 1; done
	@$(BUILD_REQUIRES) | $(COMPILE) - -o requirements-build.lock

lock-check: $(STAMP)  ## fail when a requirements*.lock no longer matches pyproject.toml
	@for spec in $(LOCKS); do file=$${spec%%:*}; extra=$${spec#*:}; \
	  cp $$file $(VENV)/check.lock && \
	  $(COMPILE) pyproject.toml $${extra:+--extra $$extra} -o $(VENV)/check.lock || exit 1; \
	  cmp -s $$file $(VENV)/check.lock || { echo "$$file is out of date: run make lock"; exit 1; }; \
	done
	@cp requirements-build.lock $(VENV)/check.lock && \
	  $(BUILD_REQUIRES) | $(COMPILE) - -o $(VENV)/check.lock && \
	  cmp -s requirements-build.lock $(VENV)/check.lock || \
	  { echo "requirements-build.lock is out of date: run make lock"; exit 1; }

# The images (Dockerfile): one target per role, tagged referral-desk-<role>:$(TAG), built with
# podman (or docker) from a wheelhouse of exactly the locked files, so the build fetches nothing.
CONTAINER ?= $(shell command -v podman || command -v docker)
TAG ?= dev
ROLES := worker web codec-server toolbox
# This machine's podman needs runc and explicit limits (docs/deploy.md#the-image).
PODMAN_OPTIONS := $(if $(findstring podman,$(CONTAINER)),--runtime runc --ulimit nofile=20000:20000 \
	--ulimit nproc=4096:4096)

image: $(STAMP)  ## build the four images (TAG=dev): worker, web, codec-server, toolbox
	PIP_CONFIG_FILE=/dev/null $(BIN)/pip wheel --quiet --require-hashes -w .wheelhouse \
	  -r requirements-toolbox.lock
	PIP_CONFIG_FILE=/dev/null $(BIN)/pip download --quiet --no-deps --only-binary=:all: \
	  --require-hashes -r requirements-build.lock -d .wheelhouse
	for role in $(ROLES); do \
	  $(CONTAINER) build $(PODMAN_OPTIONS) --network host --build-context wheelhouse=.wheelhouse \
	    $(IMAGE_BUILD_OPTIONS) --target $$role -t referral-desk-$$role:$(TAG) . || exit 1; \
	done

image-test: $(STAMP)  ## build the images on a stand-in base (no registry here) and run each role
	deploy/image/test.sh

setup: $(STAMP) catalogs

catalogs: $(CATALOGS:.po=.mo)  ## compile the translations

$(LOCALE)/%.mo: $(LOCALE)/%.po | $(STAMP)
	$(BIN)/pybabel -q compile -i $< -o $@

messages: $(STAMP)  ## extract the texts to translate into core/locale/*.pot, update every catalog
	for domain in $(DOMAINS); do \
	  $(BIN)/pybabel -q extract -F $(LOCALE)/$$domain.cfg -o $(LOCALE)/$$domain.pot \
	    --add-location=file --sort-by-file --project="Referral Desk" . && \
	  $(BIN)/pybabel -q update -D $$domain -i $(LOCALE)/$$domain.pot -d $(LOCALE) \
	    --ignore-obsolete || exit 1; \
	done

run: setup  ## start the local stack: Temporal server + UI, worker, mail sink
	$(BIN)/referrals dev

# Four test processes (pytest-xdist): most tests wait on servers, so four keep two cores busy;
# a process that runs out of tests takes some of another's (worksteal), so none idles at the end.
TEST_PROCESSES ?= 4
test: setup  ## the whole suite, against real Temporal servers
	$(BIN)/pytest -n $(TEST_PROCESSES) --dist worksteal

faults: setup  ## fault injection: referrals through worker kills, restarts, outages, a rolling deploy
	$(BIN)/python -m faults

bench: setup  ## the referral lifecycle against a bare Temporal one: bench/results.json (QUICK=1: short)
	BENCH_QUICK=$(QUICK) $(BIN)/python -m bench

histories: setup  ## record this release's referral histories (tests/histories/<version>/)
	$(BIN)/python -m tests.record_histories

# The oldest Kubernetes the manifests must suit (each release's schemas ship with the tool).
KUBERNETES ?= 1.30.0

lint: setup lock-check
	$(BIN)/kubernetes-validate --strict --quiet -k $(KUBERNETES) \
	  $(filter-out deploy/k8s/kustomization.yaml,$(wildcard deploy/k8s/*.yaml))
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy workflows activities core starter worker.py setup.py bench tests faults

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) .data
	rm -f $(CATALOGS:.po=.mo)
