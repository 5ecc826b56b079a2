"""NVIDIA Triton Inference Server model repositories for an exported artifact.

Two repositories, each with the models ``speeder`` (candidate scoring) and ``speeder_topk`` (full catalog):

``model_repository/`` (onnx, trt): the graphs served by Triton's own backends, platform ``onnxruntime_onnx``
(``1/model.onnx``) or ``tensorrt_plan`` (``1/model.plan``), as in NGC's ``tritonserver`` images. Triton's
``dims`` take a fixed size or -1, so only fixed sizes are bounds there (top-k's ``k``); the batch bound is
``max_batch_size`` and the other ranges are the export's (README). Dynamic batching merges requests of equal
shape only (no ragged inputs in these backends): clients that pad histories to one width (mask False) and
send one candidate count batch fully. Invalid ids give NaN scores (``graph`` module docstring).

``model_repository_python/`` (every engine): Triton's official Python backend, ``1/model.py`` importing
``format.TRITON_MODEL_MODULE`` (the package must be installed in the backend's Python), which loads the
export with ``Recommender``. Inputs allow ragged batches, so requests of any history width / candidate count
batch together; bad requests get INVALID_ARG (HTTP 400) with the runtime's message. This is what
``python -m speeder_rt.serve`` runs, on the ``tritonserver`` that the ``nvidia-pytriton`` wheel carries.
The model finds the export through its ``export_dir`` parameter, relative to the model's directory
(``../..``: the repository inside the export directory) or absolute.

AOTInductor packages get only the Python repository: Triton's ``pytorch_libtorch`` backend serves
TorchScript, not ``.pt2``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from speeder_rt.export.format import MODEL_NAMES, PLATFORMS, TRITON_MODEL_MODULE, io_specs, model_dir, request_inputs

TRITON_TYPES = {"int64": "TYPE_INT64", "bool": "TYPE_BOOL", "float32": "TYPE_FP32"}
PYTHON_MODEL = f"from {TRITON_MODEL_MODULE} import TritonPythonModel  # noqa: F401  (Triton's Python backend)\n"


@dataclass
class TensorSpec:
    name: str
    dtype: str  # a key of TRITON_TYPES
    dims: list[int]  # without the batch dimension; -1 = dynamic


@dataclass
class Serving:
    """How Triton schedules a model: requests merged into batches of at most ``max_batch_size`` rows, waiting at
    most ``queue_delay_us`` for more, on ``instances`` copies of the model (each executes one batch at a time)."""

    max_batch_size: int
    queue_delay_us: int = 2000
    instances: int = 1
    threads: int = 1  # the Python backend's engine threads per instance (Recommender.load's ``threads``)
    kind: str = "KIND_CPU"  # KIND_GPU for models placed on a GPU by the backend (TensorRT, ONNX Runtime on CUDA)


def config_pbtxt(name: str, runs_on: str, serving: Serving, inputs: list[TensorSpec], outputs: list[TensorSpec],
                 parameters: dict[str, str], ragged: bool = False) -> str:
    """The text-format ``ModelConfig``; ``runs_on`` is ``platform: "..."`` or ``backend: "..."``."""
    def tensor(s: TensorSpec, is_input: bool) -> str:
        extra = "\n    allow_ragged_batch: true" if ragged and is_input else ""
        return (f'  {{\n    name: "{s.name}"\n    data_type: {TRITON_TYPES[s.dtype]}\n    dims: [ {", ".join(map(str, s.dims))} ]'
                f'{extra}\n  }}')

    def block(kind: str, specs: list[TensorSpec]) -> str:
        return f"{kind} [\n" + ",\n".join(tensor(s, kind == "input") for s in specs) + "\n]\n"

    params = "".join(f'parameters {{\n  key: "{k}"\n  value: {{\n    string_value: "{v}"\n  }}\n}}\n'
                     for k, v in parameters.items())
    return (f'name: "{name}"\n{runs_on}\nmax_batch_size: {serving.max_batch_size}\n'
            + block("input", inputs) + block("output", outputs)
            + f"dynamic_batching {{\n  max_queue_delay_microseconds: {serving.queue_delay_us}\n}}\n"
            + f"instance_group [\n  {{\n    count: {serving.instances}\n    kind: {serving.kind}\n  }}\n]\n" + params)


def tensor_specs(specs: list[dict[str, Any]]) -> list[TensorSpec]:
    """``graph.io_specs`` entries as Triton tensors: the batch dimension dropped, symbolic sizes -1."""
    return [TensorSpec(s["name"], s["dtype"], [d if isinstance(d, int) else -1 for d in s["shape"][1:]]) for s in specs]


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def write_engine_repository(repo: Path, engine: str, topk: int, serving: Serving) -> None:
    """``config.pbtxt`` of each graph for Triton's ONNX Runtime / TensorRT backend (the model files go to
    ``artifact_path``). ONNX Runtime runs the graph's operators one after another (no inter-op pool), each
    on ``intra_op_thread_count`` threads (0 = ORT's default, one per physical core; with N instances on C
    cores, set C / N)."""
    parameters = {"intra_op_thread_count": "0", "inter_op_thread_count": "1"} if engine == "onnx" else {}
    for graph, spec in io_specs(topk).items():
        _write(model_dir(repo, graph) / "config.pbtxt", config_pbtxt(
            MODEL_NAMES[graph], f'platform: "{PLATFORMS[engine][0]}"', serving, tensor_specs(request_inputs(spec["inputs"])),
            tensor_specs(spec["outputs"]), parameters))


def write_python_repository(repo: Path, export_dir: str, topk: int, serving: Serving) -> None:
    """``config.pbtxt`` + ``1/model.py`` of each graph for Triton's Python backend, serving the export at
    ``export_dir`` (relative to the model's directory, or absolute) through ``Recommender``."""
    for graph, spec in io_specs(topk).items():
        directory = model_dir(repo, graph)
        _write(directory / "1" / "model.py", PYTHON_MODEL)
        _write(directory / "config.pbtxt", config_pbtxt(
            MODEL_NAMES[graph], 'backend: "python"', serving, tensor_specs(request_inputs(spec["inputs"])),
            tensor_specs(spec["outputs"]),
            {"export_dir": export_dir, "graph": graph, "threads": str(serving.threads)}, ragged=True))
