"""Export Speeder's scoring graphs to ONNX, TensorRT or AOTInductor, parity-checked, written atomically.

``export_checkpoint`` (the CLI, ``python -m speeder_rt.export``) and ``export_model`` write an export directory
(its layout, names and version: ``speeder_rt.export.format``). The graphs: ``graph.ScoringGraph`` and
``graph.TopKGraph``; ``runners.load_runner`` loads a written directory (the runtime ``Recommender`` uses it).

Errors: ``ExportError`` for bad input (the CLI's exit status 2, nothing written); ``ParityError`` when
the engine disagrees with PyTorch beyond ``atol`` (exit 1, nothing written unless ``allow_mismatch``).
"""
from __future__ import annotations

import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from speeder_rt.export import triton_repo, trt_engine
from speeder_rt.export.format import (
    ENGINE_REPOSITORY,
    ENGINES,
    EXPORT_JSON,
    FORMAT_VERSION,
    PARITY_JSON,
    PYTHON_REPOSITORY,
    VERSION_KEY,
    Ranges,
    artifact_files,
    io_specs,
    item_table_dtype,
)
from speeder_rt.export.graph import (
    DTYPES,
    EXPORT_BACKENDS,
    ParityReport,
    QueryGraph,
    ScoringGraph,
    TopKGraph,
    check_parity,
    example_inputs,
)
from speeder_rt.export.index import build_index, index_kind, tuning_queries
from speeder_rt.export.items import ITEMS_DIR, write_item_tokens
from speeder_rt.export.runners import open_runner
from speeder_rt.model.speeder import SpeederModel
from speeder_rt.train.kinds import kind_of
from speeder_rt.utils.io import atomic_dir, write_json


class ExportError(ValueError):
    """Bad input (checkpoint, ranges, options, environment); nothing was written."""


class ParityError(RuntimeError):
    """The exported engine disagrees with the PyTorch model beyond ``atol``; ``report`` has the numbers."""

    def __init__(self, report: ParityReport) -> None:
        super().__init__(report.failure())
        self.report = report


@dataclass
class ExportResult:
    out: Path
    report: ParityReport
    meta: dict[str, Any]


def default_atol(dtype: str, model_dtype: torch.dtype) -> float:
    """1e-4 when both the export and the model are fp32, else 5e-2 (relative to the score magnitude)."""
    return 1e-4 if dtype == "fp32" and model_dtype == torch.float32 else 5e-2


def resolve_device(device: str, engine: str) -> str:
    """'auto' -> cuda when available (always cuda for trt); ExportError for an impossible request."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() or engine == "trt" else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        need = " (TensorRT needs one)" if engine == "trt" else ""
        raise ExportError(f"--device {device}: no CUDA device is available{need}")
    if engine == "trt" and not device.startswith("cuda"):
        raise ExportError("--engine trt builds for a CUDA device; --device cpu is not possible")
    return device


def _check_options(engine: str, out: Path, dtype: str, ranges: Ranges, topk: int, attn_backend: str, force: bool) -> None:
    if engine not in ENGINES:
        raise ExportError(f"--engine must be one of {list(ENGINES)}, got {engine!r}")
    if engine == "trt" and not trt_engine.available():
        raise ExportError(trt_engine.INSTALL_HINT)
    if dtype not in DTYPES:
        raise ExportError(f"--dtype must be one of {list(DTYPES)}, got {dtype!r}")
    if attn_backend not in EXPORT_BACKENDS:
        raise ExportError(f"--attn-backend must be one of {list(EXPORT_BACKENDS)}, got {attn_backend!r}")
    if topk < 0:
        raise ExportError(f"--topk must be >= 0 (0 = no top-k graph), got {topk}")
    try:
        ranges.validate()
    except ValueError as e:
        raise ExportError(str(e)) from None
    if out.exists() and not force:
        raise ExportError(f"{out} already exists (pass --force to replace it)")


def export_checkpoint(checkpoint: str | Path, engine: str, out: str | Path, *, dtype: str = "fp32",
                      max_batch: int = 64, max_history: int | None = None, max_candidates: int = 100, topk: int = 10,
                      atol: float | None = None, attn_backend: str = "sdpa", device: str = "auto", force: bool = False,
                      allow_mismatch: bool = False, index: str = "auto", log: Callable[[str], None] = print) -> ExportResult:
    """Export a Speeder model directory (a run's ``best/`` or ``last/``); ``max_history`` defaults to the model's."""
    out = Path(out)
    known = Ranges(max_batch, 1 if max_history is None else max_history, max_candidates)
    _check_options(engine, out, dtype, known, topk, attn_backend, force)
    device = resolve_device(device, engine)
    model = load_speeder(Path(checkpoint))
    ranges = Ranges(max_batch, model.cfg.max_history if max_history is None else max_history, max_candidates)
    return export_model(model, engine, out, dtype=dtype, ranges=ranges, topk=topk, atol=atol, attn_backend=attn_backend,
                        device=device, force=force, allow_mismatch=allow_mismatch, source=str(Path(checkpoint).resolve()),
                        index=index, log=log)


def load_speeder(path: str | Path) -> SpeederModel:
    """The Speeder model of a model directory, on the CPU in eval mode; ExportError for anything else (a pickled
    checkpoint is refused unread, a text-baseline model has no scoring graph)."""
    try:
        kind = kind_of(path)
        if kind.export_refusal:
            raise ValueError(f"{path}: a {kind.name!r} model; only Speeder models export ({kind.export_refusal})")
        return SpeederModel.from_pretrained(path)
    except ValueError as e:
        raise ExportError(str(e)) from None


def export_model(model: SpeederModel, engine: str, out: str | Path, *, dtype: str = "fp32", ranges: Ranges | None = None,
                 topk: int = 10, atol: float | None = None, attn_backend: str = "sdpa", device: str = "cpu",
                 force: bool = False, allow_mismatch: bool = False, source: str | None = None, index: str = "auto",
                 log: Callable[[str], None] = print) -> ExportResult:
    """Export ``model`` (left unchanged) to ``out``; see the module docstring for the layout and errors. ``index``:
    the ANN index of full-catalog top-k (``speeder_rt.export.index``: auto, exact = none, faiss, flat, ivf, hnsw)."""
    out = Path(out)
    ranges = ranges or Ranges(max_history=model.cfg.max_history)
    _check_options(engine, out, dtype, ranges, topk, attn_backend, force)
    device = resolve_device(device, engine)
    try:
        ranges.validate(model.cfg.max_history)
        if model.cfg.max_history < 3:  # see graph.dynamic_shapes
            raise ValueError(f"the model's max_history={model.cfg.max_history}; export needs at least 3")
        if topk > model.num_items:
            raise ValueError(f"--topk {topk} exceeds the catalog size {model.num_items}")
        kind = index_kind(index, engine, topk, model.num_items)
    except ValueError as e:
        raise ExportError(str(e)) from None
    model_dtype = next(model.parameters()).dtype
    atol = default_atol(dtype, model_dtype) if atol is None else atol
    artifacts = artifact_files(engine, topk > 0, query=kind is not None)
    timings: dict[str, float] = {}
    with torch.no_grad():
        item_tokens = model.item_token_table().detach().float().cpu().numpy().astype(item_table_dtype(engine, dtype))
    with atomic_dir(out, overwrite=force) as tmp:
        for name, rel in artifacts.items():
            start = time.perf_counter()
            _build(model, engine, name, tmp, rel, ranges, topk, dtype, attn_backend, device, item_tokens)
            timings[f"build_{name}"] = round(time.perf_counter() - start, 2)
            log(f"{engine}: built {rel} in {timings[f'build_{name}']:.1f}s")
        _write_triton(tmp, engine, ranges, topk, device)
        start = time.perf_counter()
        runner = open_runner(engine, tmp, artifacts, topk, device)
        runner.set_item_tokens(item_tokens)
        home, training = model.available.device, model.training
        try:
            report = check_parity(runner, model.to(device), ranges, atol, query="query" in artifacts)
        finally:
            model.to(home).train(training)
        timings["parity"] = round(time.perf_counter() - start, 2)
        log(report.table())
        item_index = None
        if kind is not None:  # tuned on the query graph's own vectors
            start = time.perf_counter()
            item_index = build_index(item_tokens, kind, tuning_queries(runner, model.num_items, ranges))
            timings["build_index"] = round(time.perf_counter() - start, 2)
            log(f"index: built {item_index.kind} {item_index.params} over {item_index.size} items in "
                f"{timings['build_index']:.1f}s")
        del runner
        write_item_tokens(tmp, item_tokens, version=1, index=item_index)
        meta = _meta(model, engine, dtype, ranges, topk, attn_backend, device, artifacts, atol, report, source, timings)
        meta["index"] = {"requested": index, "kind": item_index.kind if item_index else None}  # kind None: exact graph
        write_json(tmp / PARITY_JSON, report.summary())
        write_json(tmp / EXPORT_JSON, meta)
        if not report.passed and not allow_mismatch:
            raise ParityError(report)
    return ExportResult(out, report, meta)


def _build(model: SpeederModel, engine: str, graph_name: str, tmp: Path, rel: str, ranges: Ranges, topk: int, dtype: str,
           attn_backend: str, device: str, item_tokens: np.ndarray) -> None:
    no_candidates = graph_name != "scores"  # topk and query take the history only
    graph_dtype = torch.float32 if engine == "trt" else DTYPES[dtype]  # TensorRT lowers precision by builder flags
    graph: torch.nn.Module
    if graph_name == "topk":
        graph = TopKGraph(model, topk, graph_dtype, attn_backend, ranges)
    elif graph_name == "query":
        graph = QueryGraph(model, graph_dtype, attn_backend, ranges)
    else:
        graph = ScoringGraph(model, graph_dtype, attn_backend, ranges)
    graph_device = device if engine == "aoti" else "cpu"
    graph.to(graph_device)
    args = example_inputs(torch.from_numpy(item_tokens), no_candidates, graph_device)
    if engine == "aoti":
        from speeder_rt.export.aoti_engine import export_aoti

        export_aoti(graph, args, ranges, no_candidates, tmp / rel)
        return
    from speeder_rt.export.onnx_engine import export_onnx

    onnx_path = tmp / rel if engine == "onnx" else tmp / "onnx" / f"{graph_name}.onnx"
    export_onnx(graph, args, ranges, graph_name, onnx_path, default_item_tokens=item_tokens)
    del graph
    if engine == "trt":
        trt_engine.build_plan(onnx_path, tmp / rel, ranges, no_candidates, dtype)


def _write_triton(tmp: Path, engine: str, ranges: Ranges, topk: int, device: str) -> None:
    """Both Triton repositories (``triton_repo``), batching up to the export's max batch."""
    if engine != "aoti":
        on_gpu = engine == "trt" or device.startswith("cuda")
        serving = triton_repo.Serving(ranges.max_batch, kind="KIND_GPU" if on_gpu else "KIND_CPU")
        triton_repo.write_engine_repository(tmp / ENGINE_REPOSITORY, engine, topk, serving)
    triton_repo.write_python_repository(tmp / PYTHON_REPOSITORY, "../..", topk,
                                        triton_repo.Serving(ranges.max_batch))


def _meta(model: SpeederModel, engine: str, dtype: str, ranges: Ranges, topk: int, attn_backend: str, device: str,
          artifacts: dict[str, str], atol: float, report: ParityReport, source: str | None,
          timings: dict[str, float]) -> dict[str, Any]:
    import transformers

    versions = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}
    packages = {"onnx": ["onnx", "onnxruntime"], "trt": ["onnx", "tensorrt"], "aoti": []}[engine]
    for package in packages:
        versions[package] = __import__(package).__version__
    specs = io_specs(topk, item_table_dtype(engine, dtype), model.hidden_size, query="query" in artifacts)
    return {
        VERSION_KEY: FORMAT_VERSION,
        "engine": engine,
        "dtype": dtype,
        "attn_backend": attn_backend,
        "device": device,
        "ranges": asdict(ranges),
        "topk": topk,
        "graphs": {name: {"file": artifacts[name], **specs[name]} for name in artifacts},
        "triton_repository": ENGINE_REPOSITORY if engine != "aoti" else None,
        "triton_python_repository": PYTHON_REPOSITORY,
        "num_items": model.num_items,  # at export time; the served catalog: items/current.json
        "items": ITEMS_DIR,
        "hidden_size": model.hidden_size,
        "model_kind": model.model_kind,
        "model_max_history": model.cfg.max_history,
        "model_dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "source_checkpoint": source,
        "atol": atol,
        "parity_passed": report.passed,
        "timings_s": timings,
        "versions": versions,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


__all__ = ["ExportError", "ExportResult", "ParityError", "default_atol", "export_checkpoint", "export_model",
           "load_speeder"]
