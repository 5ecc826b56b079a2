# Two commands: `make demo` and `make test`. Each creates .venv when missing and installs what it needs.
# `make serve EXPORT=DIR` serves an export on Triton Inference Server from its own venv (.venv-serve).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# This machine's pip configuration names package folders (file:///opt/pypi-more/simple) that lack most packages,
# and pip warns once per package and folder: "WARNING: Location '...' is ignored: it is neither a file nor a
# directory." Exactly those lines are dropped from pip's stderr; every other message and pip's exit status pass.
PIP_LOCATION_NOISE := ^WARNING: Location '[^']*' is ignored: it is neither a file nor a directory\.$$
PIP := $(PY) -m pip --disable-pip-version-check -q 2> >(grep --line-buffered -v "$(PIP_LOCATION_NOISE)" >&2)
# On a machine without CUDA the CPU build of torch 2.13.0 (on disk here) is installed before anything
# else, so no dependency can pull a multi-GB CUDA build. A CUDA machine keeps its own torch.
HAS_CUDA := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo 1)
TORCH_CPU := torch==2.13.0
CPP_BUILD := build/cpp
CPP_SOURCES := $(wildcard csrc/*/*.cpp csrc/*/*.h include/speeder_rt/*.h)
# Serving: nvidia-pytriton pins numpy<2 (its Python backend stub returns empty responses with numpy 2), so it gets
# its own venv: the CPU torch file first (nothing may pull a CUDA build), then the package with serve + export.
SERVE_VENV := .venv-serve
SERVE_PY := $(SERVE_VENV)/bin/python
SERVE_PIP := $(SERVE_PY) -m pip --disable-pip-version-check -q 2> >(grep --line-buffered -v "$(PIP_LOCATION_NOISE)" >&2)

.PHONY: demo test lint venv cpp serve serve-venv gpu-wheels clean

$(VENV)/.base: setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip setuptools wheel
	$(if $(HAS_CUDA),,$(PIP) install $(TORCH_CPU))
	$(PIP) install -e .
	touch $@

$(VENV)/.test: $(VENV)/.base
	$(PIP) install -e ".[test,export,text,gguf,lint,catalog]"
	touch $@

# speeder_rt._C (the C++ runtime's binding) compiles against the installed torch: no build
# isolation. Plain `pip install -e .` (the demo's) builds no extension.
$(VENV)/.ext: $(VENV)/.test $(CPP_SOURCES)
	$(PIP) install --no-build-isolation -e .
	touch $@

venv: $(VENV)/.base

$(SERVE_VENV)/.ready: setup.py
	test -x $(SERVE_PY) || $(PYTHON) -m venv $(SERVE_VENV)
	$(SERVE_PIP) install --upgrade pip setuptools wheel
	$(SERVE_PIP) install $(TORCH_CPU)
	$(SERVE_PIP) install -e ".[serve,export,catalog]" "pytest>=8" "pytest-benchmark>=4"
	touch $@

serve-venv: $(SERVE_VENV)/.ready

# make serve EXPORT=exports/onnx [SERVE_ARGS="--http-port 8000 --grpc-port 8001 --metrics-port 8002 --instances 1"]
serve: $(SERVE_VENV)/.ready
	@test -n "$(EXPORT)" || { echo 'usage: make serve EXPORT=DIR [SERVE_ARGS="..."] (DIR written by python -m speeder_rt.export)' >&2; exit 2; }
	$(SERVE_PY) -m speeder_rt.serve --export "$(EXPORT)" $(SERVE_ARGS)

# The C++ runtime library and examples/cpp_serving (CMake, into build/cpp).
cpp: $(VENV)/.ext
	test -f $(CPP_BUILD)/CMakeCache.txt || cmake -S . -B $(CPP_BUILD) \
		-DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch; print(torch.utils.cmake_prefix_path)')"
	cmake --build $(CPP_BUILD) -j $$(nproc)

demo: $(VENV)/.base
	$(PY) -m speeder_rt.demo

# ruff (lint, pyproject.toml's rules) over the repository and mypy (types) over the public API packages
# (runtime, export, serve, model; pyproject.toml's [tool.mypy]).
lint: $(VENV)/.test
	$(PY) -m ruff check .
	$(PY) -m mypy

# The quick sm_90a compile report (speeder_rt.tools.sm90_report) builds the kernels for Hopper without a GPU;
# compiled kernels and analysed rows are cached in build/sm90. Then the tests, the kernels under the interpreter.
# The serving tests skip in .venv (no PyTriton there) and run in .venv-serve against the real tritonserver.
test: lint cpp $(SERVE_VENV)/.ready
	env -u TRITON_INTERPRET $(PY) -m speeder_rt.tools.sm90_report --quick --out build/sm90
	TRITON_INTERPRET=1 $(PY) -m pytest -q tests
	$(SERVE_PY) -m pytest -q tests/test_serve.py tests/test_serve_items.py

# The GPU image lacks polars (setup.py's pin): its wheels for Python 3.12 go to .whl/, which a device call carries and
# benchmarks/gpu_check.sh installs into its run's temporary site directory (docs/kernels.md, "GPU check").
gpu-wheels:
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl polars==2.1.0 polars-runtime-32==2.1.0 2> >(grep --line-buffered -v "$(PIP_LOCATION_NOISE)" >&2)

clean:
	rm -rf $(VENV) $(SERVE_VENV) runs .pytest_cache $(CPP_BUILD) speeder_rt/_C.*.so
