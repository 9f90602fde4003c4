# `make demo` and `make test` do all set-up themselves: a virtual environment in .venv, torch
# (a CPU build on machines without an NVIDIA driver), then this project with its test extras.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.flux-mesh-installed
PYTEST_ARGS ?=

.PHONY: all test demo demo-headless bench-codec clean

all: test

$(STAMP): pyproject.toml scripts/install-torch.sh
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	sh scripts/install-torch.sh $(BIN)/pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

demo: $(STAMP)
	$(BIN)/meshtui demo

demo-headless: $(STAMP)
	$(BIN)/meshtui demo --headless

bench-codec: $(STAMP)
	$(BIN)/python bench/codec_bench.py --device cpu --json

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
