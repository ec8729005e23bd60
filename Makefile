# The two commands of a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: demo test lint typecheck unit bench bench-quick bench-pillars bench-peers clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Stamps re-install only when the project's dependencies change.
$(VENV)/.demo-installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[all]'
	$(BIN)/pip install --quiet numpy joblib scikit-learn 'torch==2.13.0'
	touch $@

$(VENV)/.test-installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@ $(VENV)/.demo-installed

demo: $(VENV)/.demo-installed
	$(BIN)/trainguard demo

lint: $(VENV)/.test-installed
	$(BIN)/ruff check
	$(BIN)/ruff format --check

typecheck: $(VENV)/.test-installed
	$(BIN)/mypy

unit: $(VENV)/.test-installed
	$(BIN)/pytest -q --durations=20

test: lint typecheck unit

# Side-by-side benchmark against picklescan, modelscan, fickling and modelaudit
# (installed in their own venvs so they never touch trainguard's; see bench/README.md).
bench-peers:
	$(PYTHON) -m venv bench/.venv-peers
	bench/.venv-peers/bin/pip install --quiet 'picklescan[7z]' fickling \
	    'modelaudit[pytorch,joblib,sevenzip,h5,onnx,safetensors]' lz4 gguf 'torch==2.13.0'
	$(PYTHON) -m venv bench/.venv-peers/modelscan
	bench/.venv-peers/modelscan/bin/pip install --quiet 'modelscan[h5py]' 'numpy<2.3'

bench: $(VENV)/.test-installed
	$(BIN)/python bench/compare_scanners.py --json bench-results.json

bench-quick: $(VENV)/.test-installed
	$(BIN)/python bench/compare_scanners.py --quick

bench-pillars: $(VENV)/.test-installed
	$(BIN)/python bench/scan_scaling.py
	$(BIN)/python bench/load_bench.py
	$(BIN)/python bench/watch_bench.py
	$(BIN)/python bench/seal_bench.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info .mypy_cache .ruff_cache .pytest_cache
