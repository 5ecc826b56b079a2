"""The export format, in one place: what an export directory holds, its names, its version and its reader.

Standard library and numpy only, so a process that serves an export (the runtime, the Triton server, the C++
runtime's tests) reads the format without loading PyTorch or the model. The exporter
(``speeder_rt.export.exporter``) writes it; ``speeder_rt.export.runners.load_runner`` loads it. A directory:

    export.json                  format_version, engine, dtype, ranges, graphs (file, inputs, outputs), num_items,
                                 versions (``read_export_json``)
    parity.json                  engine vs the PyTorch model on random valid inputs (see ``graph.check_parity``)
    model_repository/            onnx, trt: Triton repository, speeder/ (scores) and speeder_topk/ (top-k),
                                 each config.pbtxt + 1/model.onnx (+ model.onnx.data over 2 GB) or 1/model.plan
    model_repository_python/     every engine: Triton repository for the Python backend (``Recommender`` in
                                 1/model.py), what ``python -m speeder_rt.serve`` runs; see ``triton_repo``
    onnx/scores.onnx, topk.onnx  trt: the ONNX graphs the plans were built from
    scores.pt2, topk.pt2         aoti: AOTInductor packages (no Triton repository)
    query.onnx / query.pt2       onnx / aoti exports with an ANN index: the query graph
    items/current.json           the item-token table's current version (``speeder_rt.export.items``)
    items/v000001/item_tokens.npy  one version of the table, [N, D]; later versions append rows
    items/v000001/index/         its FAISS index when the export has one (``speeder_rt.catalog.ann.ItemIndex``)

Two graphs: candidate scoring and full-catalog top-k (``k = topk`` fixed at export; ``topk=0`` leaves it out),
and a third, ``query`` (the PRED query vector [B, D]: an item's score is its dot product with the item's token),
only in an export with an ANN index, which answers top-k from it; their inputs and outputs given by ``io_specs``.
Batch, history width and candidate count are dynamic within ``Ranges``. The item-token table is the graphs' last
input, ``item_tokens`` [N, D] with N dynamic (the current version of ``items/``, bound by the runner, never sent by a
client: ``request_inputs``). A loaded set of graphs is a ``Runner``.

The version: ``FORMAT_VERSION`` under the key ``VERSION_KEY`` (``format_version``), the key every speeder_rt file
uses (model directories, item tables, study results). Exports written before it had the key ``format``
(``LEGACY_VERSION_KEY``); they still read. The C++ runtime (csrc/runtime/recommender.cpp) reads both keys.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

FORMAT_VERSION = 1
VERSION_KEY = "format_version"
LEGACY_VERSION_KEY = "format"  # exports written before VERSION_KEY was the one key
ENGINES = ("onnx", "trt", "aoti")
EXPORT_JSON, PARITY_JSON = "export.json", "parity.json"
ENGINE_REPOSITORY = "model_repository"
PYTHON_REPOSITORY = "model_repository_python"
MODEL_NAMES = {"scores": "speeder", "topk": "speeder_topk"}  # graph -> Triton model name
PLATFORMS = {"onnx": ("onnxruntime_onnx", "model.onnx"), "trt": ("tensorrt_plan", "model.plan")}  # (platform, file)
# The module whose ``TritonPythonModel`` the Python repository's 1/model.py imports: Triton's Python backend loads a
# file from the repository, and the serving package sits above the exporter, so the file names it by module path.
TRITON_MODEL_MODULE = "speeder_rt.serve.triton_model"


NO_TOPK = "this artifact was exported without a top-k graph (--topk 0)"  # Runner.topk's error without one
NO_QUERY = "this artifact was exported without a query graph (no ANN index: --index exact)"  # Runner.query's error
ITEM_TOKENS = "item_tokens"  # the graphs' table input (not batched: the runner binds it, clients never send it)


def io_specs(topk_k: int, table_dtype: str = "float32", table_dim: int | str = "dim", query: bool = False
             ) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """Graph name -> inputs / outputs as {name, dtype, shape}; symbolic dims are named, the batch first (except
    ``item_tokens`` [num_items, table_dim], of ``table_dtype``: ``item_table_dtype``). ``query``: with the query
    graph (exports with an ANN index)."""
    def spec(name: str, dtype: str, *shape: str | int) -> dict[str, Any]:
        return {"name": name, "dtype": dtype, "shape": list(shape)}

    history = [spec("history_ids", "int64", "batch", "history"), spec("history_mask", "bool", "batch", "history")]
    table = spec(ITEM_TOKENS, table_dtype, "num_items", table_dim)
    specs = {"scores": {"inputs": history + [spec("candidate_ids", "int64", "batch", "candidates"), table],
                        "outputs": [spec("scores", "float32", "batch", "candidates")]}}
    if topk_k:
        specs["topk"] = {"inputs": history + [table], "outputs": [spec("item_ids", "int64", "batch", topk_k),
                                                                  spec("scores", "float32", "batch", topk_k)]}
    if query:
        specs["query"] = {"inputs": history + [table], "outputs": [spec("query", "float32", "batch", table_dim)]}
    return specs


def request_inputs(inputs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The inputs of an ``io_specs`` graph that a request carries (all but ``item_tokens``)."""
    return [s for s in inputs if s["name"] != ITEM_TOKENS]


def item_table_dtype(engine: str, dtype: str) -> str:
    """The numpy dtype of an export's item-token table (file and graph input): float16 for fp16 ONNX / AOTI
    graphs, else float32 (bf16 graphs cast it; TensorRT graphs are fp32, lowered by builder flags)."""
    return "float16" if dtype == "fp16" and engine != "trt" else "float32"


@dataclass
class Ranges:
    """Upper bounds of the dynamic dimensions; every lower bound is 1."""

    max_batch: int = 64
    max_history: int = 50
    max_candidates: int = 100

    def validate(self, model_max_history: int | None = None) -> None:
        """ValueError naming the CLI flag for a bound < 1 or a history longer than the model allows."""
        for name, value in asdict(self).items():
            if value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        if model_max_history is not None and self.max_history > model_max_history:
            raise ValueError(f"--max-history {self.max_history} exceeds the model's max_history={model_max_history}")


class Runner(Protocol):
    """A loaded artifact: numpy in, numpy out (the shapes of ``io_specs``)."""

    topk_k: int  # the exported k (0: no top-k graph)

    def set_item_tokens(self, tokens: np.ndarray) -> None:
        """Score against ``tokens`` [N, D] (the export's table dtype) from now on; ids are 0..N-1."""
        ...

    def scores(self, history_ids: np.ndarray, history_mask: np.ndarray, candidate_ids: np.ndarray) -> np.ndarray: ...

    def topk(self, history_ids: np.ndarray, history_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...

    def query(self, history_ids: np.ndarray, history_mask: np.ndarray) -> np.ndarray:
        """The query vectors float32 [B, D] (a ValueError where the export has no query graph)."""
        ...


def model_dir(repo: Path, graph: str) -> Path:
    """Directory of ``graph`` ('scores' or 'topk') in the Triton repository ``repo``."""
    return repo / MODEL_NAMES[graph]


def artifact_path(repo: Path, graph: str, engine: str) -> Path:
    """Where the exporter writes ``graph``'s model file for ``engine`` ('onnx' or 'trt')."""
    return model_dir(repo, graph) / "1" / PLATFORMS[engine][1]


def artifact_files(engine: str, topk: bool, query: bool = False) -> dict[str, str]:
    """Graph name -> its file, relative to the export directory. The query graph (onnx, aoti) is not a Triton model:
    it sits beside the repository."""
    graphs = ["scores", "topk"] if topk else ["scores"]
    if engine == "aoti":
        return {g: f"{g}.pt2" for g in graphs + ["query"] * query}
    files = {g: str(artifact_path(Path(ENGINE_REPOSITORY), g, engine)) for g in graphs}
    if query:  # onnx (TensorRT exports take no ANN index: export.index.index_kind)
        files["query"] = "query.onnx"
    return files


def format_version(meta: dict[str, Any]) -> Any:
    """The version an ``export.json`` states, under the current key or the legacy one (None: neither)."""
    return meta.get(VERSION_KEY, meta.get(LEGACY_VERSION_KEY))


def read_export_json(directory: str | Path) -> dict[str, Any]:
    """``export.json`` of an export directory, checked: a ValueError for a directory without one, an unknown
    format version or engine."""
    directory = Path(directory)
    meta_path = directory / EXPORT_JSON
    if not meta_path.is_file():
        raise ValueError(f"{directory}: not an export directory (no {EXPORT_JSON})")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    if format_version(meta) != FORMAT_VERSION or meta.get("engine") not in ENGINES:
        raise ValueError(f"{meta_path}: unknown export format {format_version(meta)!r} / engine {meta.get('engine')!r}")
    return meta
