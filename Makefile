# `make demo` and `make test` do all the set-up on a fresh machine: they create .venv when
# it is missing and install the project into it (again whenever pyproject.toml changes).
PYTHON ?= python3
VENV ?= .venv
STAMP := $(VENV)/.installed-stamp
MLFLOW_VENV ?= .venv-mlflow
MLFLOW_SERVER := $(MLFLOW_VENV)/bin/mlflow
RUN_ID := $(shell date +%Y%m%d-%H%M%S)

.PHONY: demo test test-fast bench install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[dev,tune,hf,track]'
	touch $(STAMP)

# A real MLflow tracking server for the tracking tests, in a venv of its own: the full `mlflow`
# pins pyarrow below the version the project runs with (the project itself needs only mlflow-skinny).
$(MLFLOW_SERVER):
	test -x $(MLFLOW_VENV)/bin/python || $(PYTHON) -m venv $(MLFLOW_VENV)
	$(MLFLOW_VENV)/bin/pip install --quiet mlflow

demo: $(STAMP)
	$(VENV)/bin/codistill train configs/dml_mnist1d.yaml --set name=dml_mnist1d-$(RUN_ID) --set train.steps=3000

# Everything, as CI runs it: the layering contracts, then every test (Ray, Tune, the loopback cluster).
test: $(STAMP) $(MLFLOW_SERVER)
	$(VENV)/bin/lint-imports
	$(VENV)/bin/python -m pytest

# Everyday work: the contracts and every test that starts no Ray instance and is not slow (< 90 s).
test-fast: $(STAMP)
	$(VENV)/bin/lint-imports
	$(VENV)/bin/python -m pytest -m "not ray and not cluster and not slow"

bench: $(STAMP)
	$(VENV)/bin/codistill bench dml

clean:
	rm -rf runs .pytest_cache
