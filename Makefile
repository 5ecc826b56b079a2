# Two commands: `make demo` and `make test`. Each creates .venv when missing and installs what it needs.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
# On a machine without CUDA the CPU build of torch 2.13.0 (on disk here) is installed before anything
# else, so no dependency can pull a multi-GB CUDA build. A CUDA machine keeps its own torch.
HAS_CUDA := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo 1)
TORCH_CPU := torch==2.13.0

.PHONY: demo test venv clean

$(VENV)/.base: setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip setuptools wheel
	$(if $(HAS_CUDA),,$(PIP) install $(TORCH_CPU))
	$(PIP) install -e .
	touch $@

$(VENV)/.test: $(VENV)/.base
	$(PIP) install -e ".[test,export,text,gguf]"
	touch $@

venv: $(VENV)/.base

demo: $(VENV)/.base
	$(PY) -m speeder_rt.demo

test: $(VENV)/.test
	TRITON_INTERPRET=1 $(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) runs .pytest_cache
