"""``OnnxRunner``: an ONNX export's graphs in ONNX Runtime sessions (numpy in, numpy out; no PyTorch).

The item-token table is one ``OrtValue`` per version (``set_item_tokens``, on the session's device: copied to a GPU
once per version), bound to every request's ``IOBinding``: ONNX Runtime reads it in place, no copy per request;
the request's own inputs are bound from host memory and the outputs copied back to it."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from speeder_rt.export.format import ITEM_TOKENS, NO_QUERY, NO_TOPK


class OnnxRunner:
    """ONNX Runtime sessions for the scoring graph and (optionally) the top-k and query graphs."""

    def __init__(self, scores_path: Path, topk_path: Path | None, topk_k: int, device: str = "cpu",
                 threads: int | None = None, query_path: Path | None = None) -> None:
        """``threads``: each session's intra-op threads, which then sleep instead of spin-waiting between ops
        (None: ORT's default, one spinning thread per core)."""
        import onnxruntime as ort

        available = ort.get_available_providers()
        wanted = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device.startswith("cuda") else ["CPUExecutionProvider"]
        providers = [p for p in wanted if p in available]
        options = ort.SessionOptions()
        # ORT's memory pattern is planned and kept per input shape: with dynamic batch / history / candidate sizes the
        # process grows with every new shape (+17 MiB over the first 1,000 random batch shapes of a served model,
        # -29 MiB and flat without it, no measurable speed difference: benchmarks/RESULTS.md, serving memory).
        options.enable_mem_pattern = False
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
        self._query = ort.InferenceSession(str(query_path), options, providers=providers) if query_path is not None else None

    def set_item_tokens(self, tokens: np.ndarray) -> None:
        on_cuda = self.device.startswith("cuda")
        device, index = (("cuda", int(self.device.partition(":")[2] or 0)) if on_cuda else ("cpu", 0))
        self._table = self._ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(tokens), device, index)

    def _run(self, session: Any, **inputs: np.ndarray) -> list[np.ndarray]:
        if self._table is None:
            raise RuntimeError("no item tokens set (set_item_tokens)")
        binding = session.io_binding()
        for name, array in inputs.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(array))
        binding.bind_ortvalue_input(ITEM_TOKENS, self._table)
        for output in session.get_outputs():
            binding.bind_output(output.name, "cpu")
        session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()

    def scores(self, history_ids: np.ndarray, history_mask: np.ndarray, candidate_ids: np.ndarray) -> np.ndarray:
        return self._run(self._scores, history_ids=history_ids, history_mask=history_mask, candidate_ids=candidate_ids)[0]

    def topk(self, history_ids: np.ndarray, history_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self._topk is None:
            raise ValueError(NO_TOPK)
        ids, scores = self._run(self._topk, history_ids=history_ids, history_mask=history_mask)
        return ids, scores

    def query(self, history_ids: np.ndarray, history_mask: np.ndarray) -> np.ndarray:
        if self._query is None:
            raise ValueError(NO_QUERY)
        return self._run(self._query, history_ids=history_ids, history_mask=history_mask)[0]
