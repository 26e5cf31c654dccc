# make setup: idempotent; creates .venv/ at the repo root and installs vit_jax with its test extras.
# make test:  lint + format check + the test suite.
# make quickstart: setup, then train + evaluate the quickstart recipe into workdirs/quickstart.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup test lint format clean quickstart

setup: $(STAMP)

$(STAMP): pyproject.toml setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

test: setup lint
	$(PY) -m pytest -q -n 2 --dist loadfile tests

# Trains the quickstart recipe (small ViT, offline digits) on this machine, then evaluates it.
quickstart: setup
	$(PY) -m vit_jax.main --config configs/quickstart.py --workdir workdirs/quickstart

clean:
	rm -rf $(VENV) build *.egg-info
