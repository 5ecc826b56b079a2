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
CPP_BUILD := build/cpp
CPP_SOURCES := $(wildcard csrc/*/*.cpp csrc/*/*.h csrc/*/*.cu include/speeder_rt/*.h)

.PHONY: demo test venv cpp clean

$(VENV)/.base: setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip setuptools wheel
	$(if $(HAS_CUDA),,$(PIP) install $(TORCH_CPU))
	$(PIP) install -e .
	touch $@

$(VENV)/.test: $(VENV)/.base
	$(PIP) install -e ".[test,export,text,gguf]"
	touch $@

# speeder_rt._C (the C++ ops and the C++ runtime's binding) compiles against the installed torch: no build
# isolation. Plain `pip install -e .` (the demo's) builds no extension.
$(VENV)/.ext: $(VENV)/.test $(CPP_SOURCES)
	$(PIP) install --no-build-isolation -e .
	touch $@

venv: $(VENV)/.base

# The C++ runtime library and examples/cpp_serving (CMake, into build/cpp), and a compile-only check of the CUDA
# sources with nvcc (skipped with a message where there is none).
cpp: $(VENV)/.ext
	test -f $(CPP_BUILD)/CMakeCache.txt || cmake -S . -B $(CPP_BUILD) \
		-DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch; print(torch.utils.cmake_prefix_path)')"
	cmake --build $(CPP_BUILD) -j $$(nproc)
	csrc/check_cuda_compile.sh $(PY)

demo: $(VENV)/.base
	$(PY) -m speeder_rt.demo

# The quick sm_90a compile report (speeder_rt.kernels.sm90_report) builds the kernels for Hopper without a GPU;
# compiled kernels and analysed rows are cached in build/sm90. Then the tests, the kernels under the interpreter.
test: cpp
	env -u TRITON_INTERPRET $(PY) -m speeder_rt.kernels.sm90_report --quick --out build/sm90
	TRITON_INTERPRET=1 $(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) runs .pytest_cache $(CPP_BUILD) speeder_rt/_C.*.so
