# pyfast-tune: every install step lives here, so a clean clone needs only `make demo` / `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.torch_extensions
export PYTHONHASHSEED := 0

.PHONY: setup build demo test test-rust test-py test-all lint bench clean gpu-check gpu-wheel

# Python deps (torch, transformers, deepspeed, ... from PyPI) once per pyproject change.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip 'maturin>=1.5,<2'
	$(PIP) install -q -e '.[train,dev]'
	touch $@

setup: $(VENV)/.installed build

# (Re)build the Rust extension in release mode; cargo makes this a no-op when nothing changed.
build: $(VENV)/.installed
	VIRTUAL_ENV=$(CURDIR)/$(VENV) $(VENV)/bin/maturin develop --release -q

# The main job on the embedded default: generated data, a tokenizer trained on it, a tiny model.
demo: setup
	$(PY) -m pyfast_tune.demo --out demo_out

# Release speed with overflow checks on (Cargo.toml's release-checked profile).
test-rust:
	cargo test --profile release-checked -p packer -q

test-py: setup
	$(PY) -m pytest tests -q

# The README's test command (and .ci/run) runs this.
test: setup test-rust test-py

# Slow integration tests too.
test-all: setup test-rust
	$(PY) -m pytest tests -q -m ''

lint: $(VENV)/.installed
	cargo fmt --all --check
	cargo clippy --workspace --all-targets -q -- -D warnings
	$(VENV)/bin/ruff check pyfast_tune tests bench
	$(VENV)/bin/ruff format --check pyfast_tune tests bench

bench: setup
	$(PY) -m pytest bench -q -s -p no:cacheprovider

# The GPU check kit (README "GPU"): on CUDA the real run (<= 8 min); without, the same parts
# in a dry mode on the CPU. Report: gpu-report/report.json + summary.txt. Needs `make setup`.
gpu-check:
	$(PY) -m pyfast_tune.gpu_check --out gpu-report

# What a bare GPU image lacks, for the kit: our abi3 wheel (the data engine's extension, any
# CPython >= 3.10), built into dist-gpu/ (ignored) without touching the in-place build.
gpu-wheel:
	rm -rf dist-gpu
	VIRTUAL_ENV=$(CURDIR)/$(VENV) $(VENV)/bin/maturin build --release -q -o dist-gpu
	@du -sh dist-gpu; ls dist-gpu

clean:
	rm -rf target demo_out .pytest_cache
