# `make demo` and `make test` do all set-up themselves: a virtual environment in .venv, torch
# (a CPU build on machines without an NVIDIA driver), then this project with its test extras.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.flux-mesh-installed
PYTEST_ARGS ?=

.PHONY: all test demo demo-headless bench-codec systemd-tools clean

all: test

$(STAMP): pyproject.toml scripts/install-torch.sh
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	sh scripts/install-torch.sh $(BIN)/pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

test: $(STAMP) systemd-tools
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# tests/test_systemd_unit.py runs `systemd-analyze verify`. Install it (Debian package systemd) when it
# is missing and we may: as root with apt-get. Otherwise those tests skip and say why.
systemd-tools:
	@if ! command -v systemd-analyze >/dev/null 2>&1; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			echo "installing systemd (systemd-analyze, for the unit verify test)"; \
			DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends systemd >/dev/null 2>&1 || \
			{ apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends systemd >/dev/null; } || \
			echo "could not install systemd: the unit verify tests will skip"; \
		else \
			echo "systemd-analyze not found (needs root and apt-get to install): the unit verify tests will skip"; \
		fi; \
	fi

demo: $(STAMP)
	$(BIN)/meshtui demo

demo-headless: $(STAMP)
	$(BIN)/meshtui demo --headless

bench-codec: $(STAMP)
	$(BIN)/python bench/codec_bench.py --device cpu --json

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
