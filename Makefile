# The two commands of the quick start: `make serve` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
ARGS   ?=
MODEL  ?=
GPU    ?=
PYTEST_ARGS ?=
LLAMA_CPP_PYTHON := $(shell sed -n 's/.*"llama-cpp-python==\([^"]*\)".*/\1/p' pyproject.toml | head -n1)

.PHONY: install dev serve test test-fast lint format bench bench-fast bench-overhead bench-switch bench-gpu \
	bench-rpc

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

## install: the server and its runtime dependencies. llama-cpp-python (pinned) is built once with
## llama.cpp's RPC backend (`innkeeper worker`, `serve --rpc`) into $(RPC_WHEELS) and reused from
## there: pip's own cache would hand back a wheel without RPC (its key ignores CMAKE_ARGS).
## The first install compiles llama.cpp: it says so, and shows pip's progress instead of nothing.
RPC_WHEELS ?= $(HOME)/.cache/innkeeper/wheels/rpc
install: $(BIN)/python
	@if $(BIN)/python -c 'import importlib.metadata as m, pathlib, sys, llama_cpp; \
	    sys.exit(m.version("llama_cpp_python") != sys.argv[1] or \
	    not (pathlib.Path(llama_cpp.__file__).parent / "lib" / "libggml-rpc.so").is_file())' \
	    "$(LLAMA_CPP_PYTHON)" 2>/dev/null; then \
	    $(BIN)/pip install --quiet -e .; \
	else \
	    if ! $(BIN)/pip download --quiet --no-deps --only-binary :all: --no-index --find-links "$(RPC_WHEELS)" \
	        -d "$(RPC_WHEELS)" "llama-cpp-python==$(LLAMA_CPP_PYTHON)" 2>/dev/null; then \
	        echo "installing innkeeper: the first install builds llama.cpp (llama-cpp-python $(LLAMA_CPP_PYTHON)) from source,"; \
	        echo "with RPC, into $(RPC_WHEELS): about 7 minutes on 2 cores, while pip shows 'Building wheel for"; \
	        echo "llama-cpp-python'; later installs reuse it"; \
	        mkdir -p "$(RPC_WHEELS)"; \
	        CMAKE_ARGS="-DGGML_RPC=ON $(CMAKE_ARGS)" $(BIN)/pip wheel --progress-bar on --no-deps \
	            --no-cache-dir --no-binary llama-cpp-python -w "$(RPC_WHEELS)" \
	            "llama-cpp-python==$(LLAMA_CPP_PYTHON)" || exit 1; \
	    fi; \
	    $(BIN)/pip install --quiet --force-reinstall --no-deps --no-index --find-links "$(RPC_WHEELS)" \
	        "llama-cpp-python==$(LLAMA_CPP_PYTHON)" || exit 1; \
	    $(BIN)/pip install --progress-bar on -e .; \
	fi

## serve: install, then serve the embedded default model on http://127.0.0.1:5001
## serve MODEL=owner/repo[:QUANT]: the same, pulling that hub model first (once; then from the store)
## serve ARGS="--port 8080 ...": the same, with more arguments for `innkeeper serve`
## serve GPU=cuda|vulkan|metal: first rebuild the pinned llama-cpp-python for that GPU (once)
serve: install
	@if [ -n "$(GPU)" ]; then ./scripts/gpu-build.sh "$(GPU)" "$(BIN)"; fi
	$(BIN)/innkeeper serve $(MODEL) $(ARGS)

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

## bench-fast: the overhead regime (a tiny model, ~0.3 ms a token, as a small model on a GPU)
bench-fast: dev
	$(BIN)/python -m bench.run --models fast --scenarios single,concurrency --gen-tokens 1024 \
	    --ctx-size 16384 $(ARGS)

## bench-overhead: per-token CPU outside llama_decode, innkeeper and llama-server in the same rounds
bench-overhead: dev
	$(BIN)/python -m bench.overhead --peer --wake-floor $(ARGS)

## bench-switch: switching models (unload A, load B, first token) against llama-server's router
bench-switch: dev
	$(BIN)/python -m bench.switch $(ARGS)

## bench-rpc: serve --rpc against llama-server --rpc, the same split over two loopback workers
bench-rpc: dev
	$(BIN)/python -m bench.rpc $(ARGS)

## bench-gpu: on an NVIDIA GPU, innkeeper against llama-server built with CUDA (see bench/README.md)
bench-gpu: dev
	$(BIN)/python -m bench.gpu $(ARGS)
