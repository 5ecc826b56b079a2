#!/usr/bin/env bash
# Compile-only check of the CUDA sources for sm_90, for machines whose torch is a CPU build (where setup.py
# builds no CUDA code): kernels.cu with nvcc, the ATen glue cuda.cpp with the host compiler against torch's
# (CUDA-capable) headers. Skips with a message when nvcc is missing. Usage: csrc/check_cuda_compile.sh [python]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${1:-python3}
if ! command -v nvcc >/dev/null 2>&1; then
  echo "check_cuda_compile: nvcc not found, CUDA sources not checked"
  exit 0
fi
# nvcc may be a wrapper script: ask it where its toolkit is.
CUDA_TOP=$(nvcc --dryrun -c -x cu /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p')
TORCH_INCLUDES=$("$PYTHON" -c 'from torch.utils.cpp_extension import include_paths; print(" ".join("-isystem" + p for p in include_paths()))')
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
# The flags torch's CUDAExtension passes (C++20, no implicit half / bfloat16 conversions).
nvcc -arch=sm_90 -std=c++20 -O3 -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__ -Werror=all-warnings -Xptxas=-warn-spills -Icsrc/ops -c csrc/ops/kernels.cu -o "$OUT/kernels.o"
# A CPU wheel lacks c10/cuda/impl/cuda_cmake_macros.h (generated; it only sets C10_CUDA_BUILD_SHARED_LIBS).
g++ -std=c++20 -fsyntax-only -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE -Wall -Wextra -Werror -Icsrc/ops -I"$CUDA_TOP/include" $TORCH_INCLUDES csrc/ops/cuda.cpp
echo "check_cuda_compile: kernels.cu (nvcc $(nvcc --version | sed -n 's/.*release \([0-9.]*\).*/\1/p'), sm_90) and cuda.cpp compile"
