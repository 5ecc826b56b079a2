"""The model of Triton's Python backend for a speeder_rt export (``model_repository_python/*/1/model.py`` imports it).

Each model instance loads the export with ``Recommender`` (its ``export_dir`` parameter, relative to the model's
directory or absolute; ``graph``: ``scores`` for ``speeder``, ``topk`` for ``speeder_topk``; ``threads``: the
engine's CPU threads, 1 by default, as each instance is a process of its own) and answers each
batch of requests with one runtime call (``batch.answer``). A bad request gets ``INVALID_ARG`` (HTTP 400,
gRPC INVALID_ARGUMENT) with the runtime's message and no traceback, a request the model scores NaN / infinite an
internal error with the runtime's message; the other requests of its batch are answered as if it had not been
there. Only importable inside Triton's Python backend stub.

New items without a restart: before a batch, at most every ``items_poll_s`` seconds (parameter, default 1), the
instance reads the export's ``items/current.json`` and, for a new version, switches to its table
(``Recommender.reload_items``) between two batches, so no request is failed and none sees half a table; a version
that cannot be read is logged once and the served one stays.
"""
from __future__ import annotations

import json
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from speeder_rt.export.format import io_specs, request_inputs
from speeder_rt.runtime import Recommender
from speeder_rt.serve.batch import CLIENT_ERRORS, MODEL_ERRORS, answer

INPUTS = {graph: tuple(s["name"] for s in request_inputs(spec["inputs"])) for graph, spec in io_specs(topk_k=1).items()}


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        if int(np.__version__.split(".")[0]) >= 2:
            raise RuntimeError(f"numpy {np.__version__} in Triton's Python backend stub: the wheel's stub needs "
                               "numpy<2 (with numpy 2 it returns empty responses); use the serve venv")
        config = json.loads(args["model_config"])
        params = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        self.graph = params["graph"]
        if self.graph not in INPUTS:
            raise ValueError(f"parameter graph={self.graph!r}: must be one of {sorted(INPUTS)}")
        export_dir = (Path(args["model_repository"]) / params["export_dir"]).resolve()  # an absolute one stays
        self.recommender = Recommender.load(export_dir, threads=int(params.get("threads", "1")))
        self.logger = pb_utils.Logger
        self.items_poll_s = float(params.get("items_poll_s", "1"))
        self._next_poll = time.monotonic() + self.items_poll_s
        self._refused = ""  # the last refused version's message (logged once)
        self._warm_up(int(config.get("max_batch_size", 0)) or self.recommender.ranges.max_batch)

    def _warm_up(self, max_batch: int) -> None:
        """Answer one batch of the largest shape Triton can merge (``max_batch`` rows, the longest history, the
        most candidates) before the first request: the engine's memory (ONNX Runtime's CPU arena) and the buffers of
        this process reach their peak at load rather than under traffic (an RSS that grows after warm-up is then a
        leak, not the first large batch)."""
        ranges, items = self.recommender.ranges, self.recommender.num_items
        rows = min(max_batch, ranges.max_batch)
        shapes = {"history_ids": (rows, ranges.max_history), "history_mask": (rows, ranges.max_history),
                  "candidate_ids": (rows, ranges.max_candidates)}
        inputs = {name: (np.ones(shapes[name], bool) if name == "history_mask"
                         else np.arange(np.prod(shapes[name]), dtype=np.int64).reshape(shapes[name]) % items)
                  for name in INPUTS[self.graph]}
        (result,) = answer(self.recommender, self.graph, [inputs])
        if isinstance(result, Exception):
            self.logger.log_error(f"{self.graph}: the warm-up batch of {rows} rows failed: {result}")

    def _poll_items(self) -> None:
        """Switch to the export's current item table if it is new (at most every ``items_poll_s``)."""
        now = time.monotonic()
        if now < self._next_poll:
            return
        self._next_poll = now + self.items_poll_s
        try:
            if self.recommender.reload_items():
                self.logger.log_info(f"{self.graph}: item table version {self.recommender.items_version}, "
                                     f"{self.recommender.num_items} items")
        except (OSError, ValueError) as e:  # a bad or vanished version: keep serving the current one
            if str(e) != self._refused:
                self._refused = str(e)
                self.logger.log_error(f"{self.graph}: new item table refused, still serving version "
                                      f"{self.recommender.items_version}: {e}")

    def execute(self, requests: list[Any]) -> list[Any]:
        self._poll_items()
        inputs = [{name: pb_utils.get_input_tensor_by_name(r, name).as_numpy() for name in INPUTS[self.graph]}
                  for r in requests]
        try:
            answers = answer(self.recommender, self.graph, inputs)
        except Exception:  # noqa: BLE001 -- a server fault: logged here, a short message to the clients
            self.logger.log_error(traceback.format_exc())
            answers = [RuntimeError("internal error (see the server log)")] * len(requests)
        return [self._response(a) for a in answers]

    def _response(self, result: Any) -> Any:
        if isinstance(result, CLIENT_ERRORS):
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(result), pb_utils.TritonError.INVALID_ARG))
        if isinstance(result, Exception):
            self.logger.log_error("".join(traceback.format_exception(result)))
            message = str(result) if isinstance(result, MODEL_ERRORS) else f"internal error: {type(result).__name__}"
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(message))
        return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(name, np.ascontiguousarray(array))
                                                          for name, array in result.items()])
