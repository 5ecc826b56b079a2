"""ONNX export (``torch.onnx.export(dynamo=True)``), the full ``onnx.checker`` check, and an ONNX Runtime runner.

Weights go to an external data file (``<name>.data`` beside the model) when they exceed
``EXTERNAL_DATA_BYTES`` (protobuf's 2 GB limit, less a margin for the graph itself).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from speeder_rt.export.graph import Ranges, export_program, io_specs

EXTERNAL_DATA_BYTES = 2_000_000_000 - 64 * 2**20


def state_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def export_onnx(graph: nn.Module, args: tuple[torch.Tensor, ...], ranges: Ranges, topk: bool, path: Path) -> None:
    """Write ``graph`` to ``path`` (dynamic batch / history / candidates) and run the full checker on it."""
    import onnx

    program = export_program(graph, args, ranges, topk)
    spec = io_specs(1)["topk" if topk else "scores"]
    onnx_program = torch.onnx.export(program, args, dynamo=True, input_names=[s["name"] for s in spec["inputs"]],
                                     output_names=[s["name"] for s in spec["outputs"]], verbose=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx_program.save(str(path), external_data=state_bytes(graph) > EXTERNAL_DATA_BYTES)
    _name_dims(path)
    onnx.checker.check_model(str(path), full_check=True)  # by path: external data is resolved beside it


def _name_dims(path: Path) -> None:
    """Rename the exporter's dimension symbols (``s29``...) to batch / history / candidates, in place.

    Loaded without external data and saved as a bare proto, so an external weights file is left untouched.
    """
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    names = {"history_ids": ("batch", "history"), "candidate_ids": ("batch", "candidates")}
    rename = {}
    for value in model.graph.input:
        for dim, name in zip(value.type.tensor_type.shape.dim, names.get(value.name, ())):
            if dim.dim_param:
                rename[dim.dim_param] = name
    for value in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param in rename:
                dim.dim_param = rename[dim.dim_param]
    onnx.save(model, str(path))


class OnnxRunner:
    """ONNX Runtime sessions for the scoring graph and (optionally) the top-k graph."""

    def __init__(self, scores_path: Path, topk_path: Path | None, topk_k: int, device: str = "cpu",
                 threads: int | None = None) -> None:
        """``threads``: each session's intra-op threads, which then sleep instead of spin-waiting between ops
        (None: ORT's default, one spinning thread per core)."""
        import onnxruntime as ort

        available = ort.get_available_providers()
        wanted = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device.startswith("cuda") else ["CPUExecutionProvider"]
        providers = [p for p in wanted if p in available]
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.device = device
        self.topk_k = topk_k
        self._scores = ort.InferenceSession(str(scores_path), options, providers=providers)
        self._topk = ort.InferenceSession(str(topk_path), options, providers=providers) if topk_path is not None else None

    def scores(self, history_ids: np.ndarray, history_mask: np.ndarray, candidate_ids: np.ndarray) -> np.ndarray:
        feed = {"history_ids": history_ids, "history_mask": history_mask, "candidate_ids": candidate_ids}
        return self._scores.run(None, feed)[0]

    def topk(self, history_ids: np.ndarray, history_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self._topk is None:
            raise ValueError("this artifact was exported without a top-k graph (--topk 0)")
        ids, scores = self._topk.run(None, {"history_ids": history_ids, "history_mask": history_mask})
        return ids, scores
