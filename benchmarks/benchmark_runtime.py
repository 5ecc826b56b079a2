"""pytest-benchmark: speeder_rt's optimized inference path vs a naive transformers implementation of Speeder.

Both score the same requests (history + 20 candidates -> scores -> chosen item ids), batches 1, 16, 128, 256 on
CUDA (1 and 16 on CPU), with the same weights:

* ``optimized``: ``speeder_rt.runtime.optimized.OptimizedSpeeder`` -- precomputed item-token table, Triton attention
  on CUDA (SDPA on CPU), static shape buckets, one CUDA graph per bucket (captured in the warm-up rounds).
* ``naive``: ``SpeederModel`` with ``attn_backend="reference"`` (plain PyTorch attention over HF's decoder, bias
  materialised), computing every MoME item token on every call.

Run: ``pytest benchmarks/benchmark_runtime.py --benchmark-only``.
"""
from __future__ import annotations

import common
import pytest
import torch

from speeder_rt.runtime.optimized import OptimizedSpeeder

CASES = [(method, batch) for method in ("optimized", "naive") for batch in common.RUNTIME_BATCHES]


@pytest.mark.parametrize("method, batch", CASES, ids=[f"{m}-b{b}" for m, b in CASES])
def test_request(benchmark, settings: common.Settings, history: int, method: str, batch: int) -> None:
    hist, hist_len, cand, _ = common.requests(batch, history)
    model = common.eval_model("speeder", settings, backend="reference")
    if method == "optimized":
        score = OptimizedSpeeder(model).scores
        extra = {"backend": "triton" if common.CUDA else "sdpa", "cuda_graphs": common.CUDA}
    else:
        score, extra = model, {"backend": "reference", "cuda_graphs": False}

    @torch.no_grad()
    def request() -> None:
        scores = score(hist, hist_len, cand)
        cand.gather(1, scores.argmax(1, keepdim=True))
        common.sync()

    common.run(benchmark, request, "runtime", method, "request", batch, history, **extra)
