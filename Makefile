# The two commands of the quick start: `make serve` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
ARGS   ?=
GPU    ?=
PYTEST_ARGS ?=

.PHONY: install dev serve test test-fast lint format bench bench-switch

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

## install: the server and its runtime dependencies (llama-cpp-python is pinned, so pip reuses its wheel)
install: $(BIN)/python
	$(BIN)/pip install --quiet -e .

## serve: install, then serve the embedded default model on http://127.0.0.1:5001
## serve GPU=cuda|vulkan|metal: first rebuild the pinned llama-cpp-python for that GPU (once)
serve: install
	@if [ -n "$(GPU)" ]; then ./scripts/gpu-build.sh "$(GPU)" "$(BIN)"; fi
	$(BIN)/innkeeper serve $(ARGS)

## dev: the dev extras plus Debian's chromium for the browser tests
dev: install
	$(BIN)/pip install --quiet -e '.[dev]'
	./scripts/install-browser.sh

## test: install the dev extras and run the whole test suite (what CI runs)
test: dev
	$(BIN)/python -m pytest $(PYTEST_ARGS)

## test-fast: the edit loop (about 2 minutes): everything but real servers and browsers
test-fast: dev
	$(BIN)/python -m pytest -m "not slow" -q $(PYTEST_ARGS)

lint:
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format:
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

## bench: innkeeper against llama.cpp's llama-server, same model, same run
bench: dev
	$(BIN)/python -m bench.run $(ARGS)

## bench-switch: switching models (unload A, load B, first token) against llama-server's router
bench-switch: dev
	$(BIN)/python -m bench.switch $(ARGS)
