# Two commands for a newcomer:  `make demo`  and  `make test`.
PYTHON ?= python3
VENV ?= .venv
# torch 2.13.0: the CPU wheel is what CI and laptops use; set TORCH_SPEC for another build.
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: demo test setup clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

demo: setup
	$(BIN)/python examples/quickstart.py

test: setup
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) outputs
