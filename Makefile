# Two commands for a fresh machine with only Python: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Off this project's machines, a CPU-only torch: TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
TORCH_PIP_ARGS ?=
export MLFLOW_TRACKING_URI ?= sqlite:///mlflow.db
MLFLOW_RUN = PATH="$(abspath $(BIN)):$$PATH" mlflow run . --env-manager local

.PHONY: install demo test lint mlproject clean

install: $(STAMP)

# torch first and pinned: left to the resolver, an unpinned torch pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0 $(TORCH_PIP_ARGS)
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

# With no datadir, the first command builds the demo corpus in data/demo (ser.data.default_corpus).
demo: $(STAMP)
	$(MLFLOW_RUN) -e ptapt
	@echo
	@echo "Runs are tracked in $(MLFLOW_TRACKING_URI). To browse and compare them:"
	@echo "  $(BIN)/mlflow ui --backend-store-uri $(MLFLOW_TRACKING_URI)"
	@echo "then open http://127.0.0.1:5000 (the ptapt run holds its four stages as child runs)."

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

mlproject: $(STAMP)
	$(BIN)/python -m ser.mlproject

clean:
	rm -rf $(VENV) mlruns mlflow.db .pytest_cache .ruff_cache
