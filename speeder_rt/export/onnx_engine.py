"""ONNX export (``torch.onnx.export(dynamo=True)``) and the full ``onnx.checker`` check (the ONNX Runtime runner:
``onnx_runner``).

Weights go to an external data file (``<name>.data`` beside the model) when they exceed
``EXTERNAL_DATA_BYTES`` (protobuf's 2 GB limit, less a margin for the graph itself).

The ``item_tokens`` input also gets the export-time table as its default (an initializer of the same name: an
ONNX "overridable initializer"), so Triton's own ONNX Runtime backend (``model_repository/``, where a request
cannot carry the table) serves the export-time catalog; every speeder_rt runner passes the current version.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from speeder_rt.export.format import ITEM_TOKENS, Ranges, io_specs
from speeder_rt.export.graph import export_program

EXTERNAL_DATA_BYTES = 2_000_000_000 - 64 * 2**20


def state_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def export_onnx(graph: nn.Module, args: tuple[torch.Tensor, ...], ranges: Ranges, graph_name: str, path: Path,
                default_item_tokens: np.ndarray) -> None:
    """Write ``graph`` (``graph_name``: scores, topk or query) to ``path`` (dynamic batch / history / candidates /
    table rows), ``default_item_tokens`` the default of its ``item_tokens`` input, and run the full checker on it."""
    import onnx

    program = export_program(graph, args, ranges, topk=graph_name != "scores")
    spec = io_specs(1, query=True)[graph_name]
    onnx_program = torch.onnx.export(program, args, dynamo=True, input_names=[s["name"] for s in spec["inputs"]],
                                     output_names=[s["name"] for s in spec["outputs"]], verbose=False)
    if onnx_program is None:  # dynamo=True returns the program
        raise RuntimeError("torch.onnx.export(dynamo=True) returned no ONNX program")
    path.parent.mkdir(parents=True, exist_ok=True)
    external = state_bytes(graph) + default_item_tokens.nbytes > EXTERNAL_DATA_BYTES
    onnx_program.save(str(path), external_data=external)
    _name_dims(path, default_item_tokens, external)
    onnx.checker.check_model(str(path), full_check=True)  # by path: external data is resolved beside it


def _name_dims(path: Path, default_item_tokens: np.ndarray, external: bool) -> None:
    """Rename the exporter's dimension symbols (``s29``...) to batch / history / candidates / num_items, and add
    the table's default initializer, in place.

    Loaded without external data and saved as a bare proto, so an external weights file is left untouched; with
    ``external``, the default table goes to its own external file ``<name>.items``.
    """
    import onnx
    from onnx import external_data_helper, numpy_helper

    model = onnx.load(str(path), load_external_data=False)
    default = numpy_helper.from_array(default_item_tokens, ITEM_TOKENS)
    if external:
        external_data_helper.set_external_data(default, f"{path.name}.items")
        (path.parent / f"{path.name}.items").write_bytes(default.raw_data)
        default.ClearField("raw_data")
        default.data_location = onnx.TensorProto.EXTERNAL
    model.graph.initializer.append(default)
    names = {"history_ids": ("batch", "history"), "candidate_ids": ("batch", "candidates"),
             ITEM_TOKENS: ("num_items",)}
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
