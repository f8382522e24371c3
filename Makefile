# loraq: the two commands a newcomer needs are `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH  ?= torch==2.13.0
# Every package's exact version, as pip resolved `.[test]` on the day the suite was last green here (x86-64
# Linux, Python 3.11, torch's CPU build). `make install*`, `make demo`, `make test` and so CI install from it;
# `make lock` writes it anew; `make test-latest` runs the suite on the newest versions pyproject.toml allows.
LOCK   := constraints.txt
PIP    := pip install -q --disable-pip-version-check

.PHONY: install install-test lint test test-fast test-latest lock demo bench clean

# Runtime install: torch is pinned first so pip never swaps in a multi-GB CUDA build.
$(VENV)/.runtime: pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/$(PIP) $(TORCH)
	$(BIN)/$(PIP) -c $(LOCK) -e .
	touch $@

$(VENV)/.test: $(VENV)/.runtime
	$(BIN)/$(PIP) -c $(LOCK) -e '.[test]'
	touch $@

install: $(VENV)/.runtime
install-test: $(VENV)/.test

# ruff with pyproject.toml's rules; `make test` (and so CI) runs it first and stops on a finding.
lint: $(VENV)/.test
	$(BIN)/ruff check .

# The linter, then the whole suite, slow tests included (CI runs exactly this), on two pytest-xdist workers of
# one thread each (tests/conftest.py); the 25 slowest tests are listed at the end, so every CI log says where
# the suite's time goes.
test: $(VENV)/.test lint
	$(BIN)/python -m pytest -q -n 2 --durations=25

test-fast: $(VENV)/.test
	$(BIN)/python -m pytest -q -n 2 -m "not slow"

# The suite in a fresh venv of the newest releases pyproject.toml's ranges allow (torch stays the pinned CPU
# build: a newer one is a multi-GB CUDA download): what `pip install loraq` gives a user today.
test-latest:
	rm -rf .venv-latest
	$(PYTHON) -m venv .venv-latest
	.venv-latest/bin/$(PIP) $(TORCH)
	echo '$(TORCH)' > .venv-latest/torch-pin.txt
	.venv-latest/bin/$(PIP) --upgrade --upgrade-strategy eager -c .venv-latest/torch-pin.txt -e '.[test]'
	.venv-latest/bin/pip freeze --exclude-editable --disable-pip-version-check | grep -i -E '^(transformers|peft|trl|torch)=='
	.venv-latest/bin/ruff check .
	.venv-latest/bin/python -m pytest -q -n 2

# Resolve `.[test]` afresh (no lock) in a scratch venv and write every version it got into $(LOCK).
lock:
	rm -rf .venv-lock
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/$(PIP) $(TORCH)
	.venv-lock/bin/$(PIP) -e '.[test]'
	{ echo "# written by \`make lock\` on $$(date -u +%Y-%m-%d) ($$(uname -m), $$(.venv-lock/bin/python -V)): pip's"; \
	  echo "# resolution of .[test] with $(TORCH); used as pip's -c by make install / install-test / demo / test"; \
	  .venv-lock/bin/pip freeze --exclude-editable --disable-pip-version-check; } > $(LOCK).tmp
	mv $(LOCK).tmp $(LOCK)
	rm -rf .venv-lock

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
	rm -rf $(VENV) .venv-latest .venv-lock build dist src/*.egg-info .pytest_cache
