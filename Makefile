# `make demo` and `make test` do all the set-up on a fresh machine: they create .venv when
# it is missing and install the project into it (again whenever pyproject.toml changes).
PYTHON ?= python3
VENV ?= .venv
STAMP := $(VENV)/.installed-stamp
RUN_ID := $(shell date +%Y%m%d-%H%M%S)

.PHONY: demo test bench install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[dev,tune]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/codistill train configs/dml_mnist1d.yaml --set name=dml_mnist1d-$(RUN_ID)

test: $(STAMP)
	$(VENV)/bin/python -m pytest

bench: $(STAMP)
	$(VENV)/bin/codistill bench dml

clean:
	rm -rf runs .pytest_cache
