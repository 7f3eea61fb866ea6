# psgpo — the two commands a newcomer needs: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.psgpo-installed
# CPU build of torch by default; on a GPU machine set TORCH_SPEC to the build you want.
TORCH_SPEC ?= torch==2.13.0
OUT ?= runs/demo

.PHONY: setup test lint demo bench protos clean

NATIVE := services/sandbox/csrc/libpsgpo_runner.so

setup: $(STAMP) $(NATIVE)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[ml,bench,dev]"
	touch $(STAMP)

# The sandbox's runner in C (services/sandbox/native.py); without a C compiler the workers use the
# Python one, and say so.
$(NATIVE): services/sandbox/csrc/runner.c $(STAMP)
	$(BIN)/python -m services.sandbox.native || echo "note: the sandbox's C runner is not built; workers use the Python one"

test: setup
	$(BIN)/python protos/generate.py --check
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check services trainer tests examples protos/generate.py

demo: setup
	$(BIN)/psgpo demo --out $(OUT)

bench: setup
	$(BIN)/psgpo bench prm --out runs/bench
	$(BIN)/psgpo bench sandbox --out runs/bench
	$(BIN)/psgpo bench pipeline --out runs/bench

.PHONY: chaos
chaos: setup  # the fault-injection suite (docs/chaos.md): table in runs/chaos/chaos.md
	$(BIN)/psgpo bench chaos --out runs/chaos

protos: setup
	$(BIN)/python protos/generate.py

clean:
	rm -rf $(VENV) runs .pytest_cache
