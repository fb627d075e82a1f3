# Every target does its own set-up: a fresh clone needs nothing but python3.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test bench lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# the CPU build of torch comes first, so nothing below pulls a CUDA build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[hf,test]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m upop_fx.demo

test: $(STAMP)
	$(PY) -m ruff check upop_fx tests benchmarks
	$(PY) -m pytest -q -n 2 tests

bench: $(STAMP)
	$(PY) -m pip install -q -e ".[bench]"
	$(PY) -m pytest -q -m slow tests

lint: $(STAMP)
	$(PY) -m ruff check upop_fx tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
