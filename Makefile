# The two set-up commands in the README are `make demo` and `make test`; both create .venv if needed.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# glibc's default malloc thresholds make CPU training and big-array work spend most of its time in
# the kernel (mmap/munmap churn); raising them is 2-2.5x faster on this machine.
export MALLOC_MMAP_THRESHOLD_ := 4294967296
export MALLOC_TRIM_THRESHOLD_ := 4294967296
# dvc.yaml stage commands call `xcryonet`; put the venv first on PATH for them.
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: demo test lint install clean-demo mlflow-ui prefect-server retrain-serve

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

install: $(BIN)/.installed

## The main job on the embedded defaults: simulate the demo grids (once), record them in the DVC
## cache (data.dvc must not change), then `dvc repro`: extract, dataset, train, evaluate, register.
demo: $(BIN)/.installed
	test -f data/labels.csv || $(BIN)/xcryonet simulate
	$(BIN)/dvc commit -f -q data.dvc
	git diff --quiet -- data.dvc || { echo "data.dvc changed: the demo data is not the committed one" >&2; exit 1; }
	$(BIN)/dvc repro

## Every test (CI runs this through .ci/run).
test: $(BIN)/.installed
	$(BIN)/python -m pytest

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

## Browse the runs and the registry of the project's store (127.0.0.1 only).
mlflow-ui: $(BIN)/.installed
	$(BIN)/mlflow server --backend-store-uri sqlite:///$(CURDIR)/mlruns.db --host 127.0.0.1 --port 5000

## A local Prefect server (127.0.0.1:4200), and the nightly retraining served against it.
prefect-server: $(BIN)/.installed
	$(BIN)/prefect server start --host 127.0.0.1 --port 4200

retrain-serve: $(BIN)/.installed
	PREFECT_API_URL=http://127.0.0.1:4200/api $(BIN)/python -m pipelines.serve --repo $(CURDIR)

clean-demo:
	rm -rf data squares dataset models eval registry.json
