"""``OnnxRunner``: an ONNX export's graphs in ONNX Runtime sessions (numpy in, numpy out; no PyTorch).

The item-token table is one ``OrtValue`` per version (``set_item_tokens``), passed with every request by
``run_with_ort_values``: ONNX Runtime reads it in place, no copy per request (on CUDA it is copied to the device
once per version)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from speeder_rt.export.format import ITEM_TOKENS


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
        self._ort = ort
        self.device = device
        self.topk_k = topk_k
        self._table: Any = None  # the OrtValue of the item tokens (set_item_tokens)
        self._scores = ort.InferenceSession(str(scores_path), options, providers=providers)
        self._topk = ort.InferenceSession(str(topk_path), options, providers=providers) if topk_path is not None else None

    def set_item_tokens(self, tokens: np.ndarray) -> None:
        on_cuda = self.device.startswith("cuda")
        device, index = (("cuda", int(self.device.partition(":")[2] or 0)) if on_cuda else ("cpu", 0))
        self._table = self._ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(tokens), device, index)

    def _run(self, session: Any, **inputs: np.ndarray) -> list[np.ndarray]:
        if self._table is None:
            raise RuntimeError("no item tokens set (set_item_tokens)")
        feed = {name: self._ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a)) for name, a in inputs.items()}
        return [o.numpy() for o in session.run_with_ort_values(None, {**feed, ITEM_TOKENS: self._table})]

    def scores(self, history_ids: np.ndarray, history_mask: np.ndarray, candidate_ids: np.ndarray) -> np.ndarray:
        return self._run(self._scores, history_ids=history_ids, history_mask=history_mask, candidate_ids=candidate_ids)[0]

    def topk(self, history_ids: np.ndarray, history_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self._topk is None:
            raise ValueError("this artifact was exported without a top-k graph (--topk 0)")
        ids, scores = self._run(self._topk, history_ids=history_ids, history_mask=history_mask)
        return ids, scores
