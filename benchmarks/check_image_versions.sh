#!/usr/bin/env bash
# The kernels under the GPU image's library versions, on a machine without a GPU (docs/kernels.md, "GPU check"):
# makes (or reuses) a venv with the image's Triton, transformers, numpy, ONNX stack and test tools, then runs from
# the source tree (PYTHONPATH, nothing installed from it) the quick sm_90a compile report (compiled kernels, Triton's
# own compiler) and the kernel tests under TRITON_INTERPRET=1 (the interpreter).
#   bash benchmarks/check_image_versions.sh [pytest args, e.g. -k "S7 or strided"]
# VENV (default build/venv-gpuimage), PYTHON (default python3) and TORCH (default torch==2.13.0, this project's CPU
# build: the image's torch 2.11.0+cu130 is a CUDA build) can be set. The image (2026-11): Python 3.12, triton 3.6.0,
# transformers 5.17.0, numpy 2.5.2, onnx 1.23.1, onnxscript 0.7.2, onnxruntime 1.30.0, safetensors 0.8.0; numpy 2.5
# needs Python >= 3.12, so an older Python gets numpy 2.4.6, which refuses the same array-to-scalar conversions.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="${VENV:-$ROOT/build/venv-gpuimage}"
PYTHON="${PYTHON:-python3}"
TORCH="${TORCH:-torch==2.13.0}"
test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
VPY="$VENV/bin/python"
NUMPY=$("$VPY" -c 'import sys; print("numpy==2.5.2" if sys.version_info >= (3, 12) else "numpy==2.4.6")')
"$VPY" -m pip install -q --disable-pip-version-check "$TORCH"  # first: nothing after it may pull another torch
"$VPY" -m pip install -q --disable-pip-version-check "$TORCH" triton==3.6.0 transformers==5.17.0 "$NUMPY" \
    onnx==1.23.1 onnxscript==0.7.2 onnxruntime==1.30.0 safetensors==0.8.0 peft pyyaml tqdm matplotlib \
    pytest pytest-benchmark
"$VPY" - <<'EOF'
import importlib.metadata as md, sys
print("python", sys.version.split()[0], *(f"| {n} {md.version(n)}" for n in ("torch", "triton", "transformers", "numpy")))
EOF
export PYTHONPATH="$ROOT"
env -u TRITON_INTERPRET "$VPY" -m speeder_rt.tools.sm90_report --quick --jobs "$(nproc)" --cache "$VENV/sm90"
TRITON_INTERPRET=1 "$VPY" -m pytest -q -p no:cacheprovider -m "not gpu" tests/test_position_aware_attention.py \
    tests/test_item_token_projection.py tests/test_assemble_inputs_embeds.py tests/test_kernel_library.py "$@"
