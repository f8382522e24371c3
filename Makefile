# loraq: the two commands a newcomer needs are `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH  ?= torch==2.13.0

.PHONY: install install-test lint test test-fast demo bench clean

# Runtime install: torch is pinned first so pip never swaps in a multi-GB CUDA build.
$(VENV)/.runtime: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check $(TORCH)
	$(BIN)/pip install -q --disable-pip-version-check -e .
	touch $@

$(VENV)/.test: $(VENV)/.runtime
	$(BIN)/pip install -q --disable-pip-version-check -e '.[test]'
	touch $@

install: $(VENV)/.runtime
install-test: $(VENV)/.test

# ruff with pyproject.toml's rules; `make test` (and so CI) runs it first and stops on a finding.
lint: $(VENV)/.test
	$(BIN)/ruff check .

# The linter, then the whole suite, slow tests included (CI runs exactly this).
test: $(VENV)/.test lint
	$(BIN)/python -m pytest -q

test-fast: $(VENV)/.test
	$(BIN)/python -m pytest -q -m "not slow"

# QLoRA on the default model and the bundled demo data; prints base vs tuned accuracy.
demo: $(VENV)/.runtime
	$(BIN)/loraq train

# Side-by-side benchmarks against PEFT(+bitsandbytes); ~50 minutes on 2 cores in all.
bench: $(VENV)/.test
	$(BIN)/python bench/throughput.py --grad-checkpointing
	$(BIN)/python bench/interleaved.py
	$(BIN)/python bench/epoch.py
	$(BIN)/python bench/kernel_bench.py
	$(BIN)/python bench/load_memory.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
