# `make demo` and `make test` do all the set-up on a fresh machine: they create .venv when
# it is missing and install the project into it (again whenever pyproject.toml changes).
PYTHON ?= python3
VENV ?= .venv
STAMP := $(VENV)/.installed-stamp
RUN_ID := $(shell date +%Y%m%d-%H%M%S)

.PHONY: demo test test-fast bench install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[dev,tune,hf]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/codistill train configs/dml_mnist1d.yaml --set name=dml_mnist1d-$(RUN_ID) --set train.steps=3000

# Everything, as CI runs it: the layering contracts, then every test (Ray, Tune, the loopback cluster).
test: $(STAMP)
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
