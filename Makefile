# Two entry points: `make quickstart` (train the tiny model on generated videos) and `make test`.
# Each creates .venv when missing; torch 2.13.0 (CPU) is installed first where no torch is present.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION ?= 2.13.0

.PHONY: setup quickstart test bench clean

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	@$(PIP) install -q --upgrade pip
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q torch==$(TORCH_VERSION)
	@$(PIP) install -q -e ".[dev]"
	@touch $@

setup: $(VENV)/.installed

quickstart: setup
	$(PY) -m lmms_engine.launch.cli --config examples/quickstart.yaml

test: setup
	$(PY) -m pytest -q

bench: setup
	@$(PIP) install -q -e ".[bench]"

clean:
	rm -rf $(VENV) output
