"""NVIDIA Triton Inference Server model repository for an exported artifact.

``model_repository/speeder`` (candidate scoring) and ``model_repository/speeder_topk`` (full catalog),
each ``config.pbtxt`` + ``1/model.onnx`` (platform ``onnxruntime_onnx``) or ``1/model.plan``
(``tensorrt_plan``). ``max_batch_size`` is the export's max batch, so ``dims`` leave out the batch
dimension (-1 = dynamic) and ``dynamic_batching {}`` lets Triton merge requests of equal shape.
AOTInductor packages get no repository: Triton's ``pytorch_libtorch`` backend serves TorchScript, not
``.pt2`` (host the Python runtime with PyTriton instead).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

PLATFORMS = {"onnx": ("onnxruntime_onnx", "model.onnx"), "trt": ("tensorrt_plan", "model.plan")}
TRITON_TYPES = {"int64": "TYPE_INT64", "bool": "TYPE_BOOL", "float32": "TYPE_FP32"}
MODEL_NAMES = {"scores": "speeder", "topk": "speeder_topk"}


@dataclass
class TensorSpec:
    name: str
    dtype: str  # a key of TRITON_TYPES
    dims: list[int]  # without the batch dimension; -1 = dynamic


def config_pbtxt(name: str, platform: str, max_batch_size: int, inputs: list[TensorSpec], outputs: list[TensorSpec]) -> str:
    """The text-format ``ModelConfig``."""
    def tensor(s: TensorSpec) -> str:
        dims = ", ".join(map(str, s.dims))
        return f'  {{\n    name: "{s.name}"\n    data_type: {TRITON_TYPES[s.dtype]}\n    dims: [ {dims} ]\n  }}'

    def block(kind: str, specs: list[TensorSpec]) -> str:
        return f"{kind} [\n" + ",\n".join(map(tensor, specs)) + "\n]\n"

    return (f'name: "{name}"\nplatform: "{platform}"\nmax_batch_size: {max_batch_size}\n'
            + block("input", inputs) + block("output", outputs) + "dynamic_batching { }\n")


def model_dir(repo: Path, graph: str) -> Path:
    """Directory of ``graph`` ('scores' or 'topk') in the repository ``repo``."""
    return repo / MODEL_NAMES[graph]


def artifact_path(repo: Path, graph: str, engine: str) -> Path:
    """Where the exporter writes ``graph``'s model file for ``engine`` ('onnx' or 'trt')."""
    return model_dir(repo, graph) / "1" / PLATFORMS[engine][1]


def write_config(repo: Path, graph: str, engine: str, max_batch_size: int, inputs: list[TensorSpec],
                 outputs: list[TensorSpec]) -> Path:
    """Write ``config.pbtxt`` for ``graph``; the model file goes to ``artifact_path``."""
    path = model_dir(repo, graph) / "config.pbtxt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(config_pbtxt(MODEL_NAMES[graph], PLATFORMS[engine][0], max_batch_size, inputs, outputs), encoding="utf-8")
    return path
