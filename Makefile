# The README's two commands: `make demo` and `make test`. Both create .venv when it is
# missing or pyproject.toml is newer, then run.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test venv clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	RAY_AUTH_MODE=disabled $(BIN)/python -m ganray.orchestrator.demo configs/grid25.yaml

test: $(STAMP)
	RAY_AUTH_MODE=disabled $(BIN)/python -m pytest -q --durations=20 tests

clean:
	rm -rf $(VENV) mlflow.db mlartifacts ray_results .ganray_cache
