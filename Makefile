# Set-up, build and test for the LLM Scratch book. Every target creates the
# virtual environment in .venv and installs what it needs when missing:
# requirements.txt for the book, plus requirements-test.txt for the tests.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
TEST_INSTALLED := $(VENV)/.installed-test
NOTEBOOKS := $(wildcard chapters/*.ipynb)

.PHONY: help install book test test-package test-notebooks test-book test-site notebooks bench clean

help:
	@echo "make install    create .venv and install requirements.txt and requirements-test.txt"
	@echo "make book       build the HTML book into _build/html from the stored notebook outputs"
	@echo "make test       package tests, strict nbval on every chapter, strict book build, browser check"
	@echo "make test-site  open every page of the built book in headless Chromium (needs _build/html)"
	@echo "make notebooks  re-execute every chapter in place and normalize its metadata"
	@echo "make bench      time attention on the CPU and write benchmarks/results/"
	@echo "make clean      remove _build"

$(INSTALLED): requirements.txt code/pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -r requirements.txt
	touch $@

# Test-only packages (Hugging Face transformers, Playwright); `make book` does not need them.
$(TEST_INSTALLED): $(INSTALLED) requirements-test.txt
	$(BIN)/python -m pip install -r requirements-test.txt
	touch $@

install: $(TEST_INSTALLED)

book: $(INSTALLED)
	$(BIN)/jupyter-book build .
	@echo "Open _build/html/index.html in a browser."

# Tests build reference models from configurations and never download weights.
test-package: $(TEST_INSTALLED)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest code/tests -q -p no:cacheprovider

# --nbval (not --nbval-lax) compares every stored text output with a fresh run.
test-notebooks: $(INSTALLED)
	MPLBACKEND=module://matplotlib_inline.backend_inline \
	$(BIN)/python -m pytest --nbval --nbval-current-env -p no:cacheprovider $(NOTEBOOKS) -q

# -W turns warnings into errors, -n reports every unresolved reference.
test-book: $(INSTALLED)
	rm -rf _build
	$(BIN)/jupyter-book build . -W -n --keep-going

# Opens the site in _build/html as it stands, in Debian's Chromium (`apt-get install chromium`);
# `make test` rebuilds the site first in test-book.
test-site: $(TEST_INSTALLED)
	$(BIN)/python -m pytest site_tests -q -p no:cacheprovider

# Runs in the listed order: test-site reads the _build/html that test-book writes, so no -j.
test: test-package test-notebooks test-book test-site

notebooks: $(INSTALLED)
	$(BIN)/python scripts/execute_notebooks.py $(NOTEBOOKS)

# Times attention on this machine and rewrites benchmarks/results/attention.{md,json,png};
# about a minute on 2 cores.
bench: $(INSTALLED)
	$(BIN)/python benchmarks/bench_attention.py

clean:
	rm -rf _build
