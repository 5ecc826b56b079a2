"""Load an export directory into a ``Runner``: ONNX Runtime, AOTInductor or TensorRT, each imported only when its
engine is asked for (an ONNX export loads without PyTorch)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from speeder_rt.export import trt_engine
from speeder_rt.export.format import Runner, read_export_json


def open_runner(engine: str, root: Path, artifacts: dict[str, str], topk: int, device: str,
                threads: int | None = None) -> Runner:
    """The engine's runner over the graphs ``artifacts`` (relative to ``root``); no item table set yet."""
    topk_path = root / artifacts["topk"] if "topk" in artifacts else None
    query_path = root / artifacts["query"] if "query" in artifacts else None
    if engine == "onnx":
        from speeder_rt.export.onnx_runner import OnnxRunner

        return OnnxRunner(root / artifacts["scores"], topk_path, topk, device, threads, query_path)
    import torch

    if threads is not None:
        torch.set_num_threads(threads)  # AOTInductor's CPU kernels run on torch's intra-op pool
    if engine == "aoti":
        from speeder_rt.export.aoti_engine import AotiRunner

        return AotiRunner(root / artifacts["scores"], topk_path, topk, device, query_path)
    from speeder_rt.export.trt_engine import TrtRunner

    return TrtRunner(root / artifacts["scores"], topk_path, topk, device)


def check_threads(threads: int | None) -> None:
    """ValueError unless ``threads`` (an engine's CPU threads) is None or >= 1."""
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")


def load_runner(directory: str | Path, device: str | None = None, threads: int | None = None
                ) -> tuple[Runner, dict[str, Any]]:
    """(runner, export.json) of an export directory, no item table set (``Recommender.reload_items`` sets the current
    one); ``device`` overrides the exported one (onnx only);
    ``threads``: the engine's CPU threads (ONNX Runtime's per session, without spin-waiting; for the other
    engines torch's process-wide intra-op threads), None for the engine's default."""
    check_threads(threads)
    directory = Path(directory)
    meta = read_export_json(directory)
    artifacts = {name: g["file"] for name, g in meta["graphs"].items()}
    if meta["engine"] == "trt" and not trt_engine.available():
        raise ValueError(trt_engine.INSTALL_HINT)
    if device is not None and meta["engine"] != "onnx" and device != meta["device"]:
        raise ValueError(f"{directory}: a {meta['engine']} export is compiled for {meta['device']}; it cannot run "
                         f"on {device} (only ONNX exports choose their device at load time)")
    return open_runner(meta["engine"], directory, artifacts, meta["topk"], device or meta["device"], threads), meta
