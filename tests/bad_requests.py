"""The request contract's test material: the bad-request table (every case of issues 15 and 16, each with the exact
error every runtime must raise), and the runtimes it is sent to: a tiny Speeder built from a fixed seed, its ONNX and
AOTInductor exports (``export_model``, no checkpoint), and every runtime over them (``load_runtimes``).

The limits everywhere: 120 items, histories of 1..8 items, 1..20 candidates, top-k up to 5, 4 users per model call
(larger batches are split). ``BAD_REQUESTS`` is the table's recommend cases in the (history, candidates, pattern)
form tests/test_export.py sends to the Python runtime.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from speeder_rt.data import SyntheticConfig, generate_synthetic
from speeder_rt.export.exporter import export_model
from speeder_rt.export.format import Ranges
from speeder_rt.model import BackboneConfig, SpeederConfig, SpeederModel

NUM_ITEMS, TOPK = 120, 5
RANGES = Ranges(max_batch=4, max_history=8, max_candidates=20)
ENGINES = ("onnx", "aoti")
METHODS = {"recommend": ("history_ids", "candidate_ids"), "topk": ("history_ids", "k"), "recommend_batch": ("requests",)}


@dataclass(frozen=True)
class Bad:
    """``getattr(runtime, method)(*args)`` must raise RequestError(field, reason) with ``str() == message``."""

    method: str
    args: tuple[Any, ...]
    message: str

    @property
    def field(self) -> str:
        return self.message.split(": ", 1)[0]


def _range(value: int) -> str:
    return f"item ids must be in 0..119, got {value}"


def _integers(shown: str) -> str:
    return f"item ids must be integers, got {shown}"


HISTORIES_EXPECTED = "expected a list of histories or a 2-D array padded with negative ids, got "
CONTRACT_CASES = [
    # history ids: ranges, empty, lengths
    Bad("recommend", ([[3, 120]], [[1]]), f"history_ids[0]: {_range(120)}"),
    Bad("recommend", ([[3], [3, -2]], [[1], [1]]), f"history_ids[1]: {_range(-2)}"),
    Bad("recommend", ([[3], []], [[1], [2]]), "history_ids[1]: empty history (at least one item is needed)"),
    Bad("recommend", ([list(range(9))], [[1]]), "history_ids[0]: 9 items, more than max_history=8"),
    Bad("recommend", ([], []), "history_ids: empty batch (at least one history is needed)"),
    Bad("recommend", (np.zeros((0, 3), dtype=np.int64), np.zeros((0, 1), dtype=np.int64)),
        "history_ids: empty batch (at least one history is needed)"),
    Bad("recommend", (np.array([[-1, 3]]), [[1]]), "history_ids[0]: padding (negative ids) must come after the real items"),
    Bad("recommend", (np.array([[4, 5], [-1, -1]]), [[1], [2]]),
        "history_ids[1]: empty history (at least one item is needed)"),
    # history ids beyond int64 are out of range, never wrapped (issue 16: [3, 17, 2**63] scored like [3, 17])
    Bad("recommend", ([[3, 17, 2**63]], [[1]]), f"history_ids[0]: {_range(2**63)}"),
    Bad("recommend", ([[3, 2**70]], [[1]]), f"history_ids[0]: {_range(2**70)}"),
    Bad("recommend", ([[3, -(2**63) - 1]], [[1]]), f"history_ids[0]: {_range(-(2**63) - 1)}"),
    Bad("recommend", (np.array([[3, 17, 2**63]], dtype=np.uint64), [[1]]), f"history_ids[0]: {_range(2**63)}"),
    Bad("recommend", ([[4], np.array([3, 2**64 - 1], dtype=np.uint64)], [[1], [1]]), f"history_ids[1]: {_range(2**64 - 1)}"),
    Bad("recommend", ([[3, np.uint64(2**63)]], [[1]]), f"history_ids[0]: {_range(2**63)}"),
    # history ids that are not plain integers
    Bad("recommend", ([[1.5]], [[1]]), f"history_ids[0]: {_integers('1.5')}"),
    Bad("recommend", ([[3.0]], [[1]]), f"history_ids[0]: {_integers('3.0')}"),
    Bad("recommend", ([[float("nan")]], [[1]]), f"history_ids[0]: {_integers('nan')}"),
    Bad("recommend", ([[3, float("inf")]], [[1]]), f"history_ids[0]: {_integers('inf')}"),
    Bad("recommend", ([[True, 2]], [[1]]), f"history_ids[0]: {_integers('True')}"),
    Bad("recommend", ([[np.bool_(False)]], [[1]]), f"history_ids[0]: {_integers('False')}"),
    Bad("recommend", ([["3"]], [[1]]), 'history_ids[0]: item ids must be integers, got "3"'),
    Bad("recommend", ([[3, None]], [[1]]), f"history_ids[0]: {_integers('None')}"),
    Bad("recommend", ([[[1, 2]]], [[1]]), f"history_ids[0]: {_integers('a list of length 2')}"),
    Bad("recommend", ([[np.float32(2)]], [[1]]), f"history_ids[0]: {_integers('2.0')}"),
    Bad("recommend", (np.array([[1.0, 2.0]]), [[1]]), "history_ids: item ids must be integers, got dtype float64"),
    Bad("recommend", (torch.tensor([[True]]), [[1]]), "history_ids: item ids must be integers, got dtype bool"),
    Bad("recommend", (torch.tensor([[1.0]], dtype=torch.float16), [[1]]),
        "history_ids: item ids must be integers, got dtype float16"),
    Bad("recommend", (np.array([[1, "2"]], dtype=object), [[1]]), "history_ids: item ids must be integers, got dtype object"),
    # the history container
    Bad("recommend", ([3, 4], [[1]]), "history_ids[0]: expected a list of item ids, got 3"),
    Bad("recommend", ([[3], "4"], [[1], [1]]), 'history_ids[1]: expected a list of item ids, got "4"'),
    Bad("recommend", (None, [[1]]), "history_ids: " + HISTORIES_EXPECTED + "None"),
    Bad("recommend", ("3 17", [[1]]), "history_ids: " + HISTORIES_EXPECTED + '"3 17"'),
    Bad("recommend", (np.array([3, 4]), [[1]]), "history_ids: " + HISTORIES_EXPECTED + "an array of shape [2] and dtype int64"),
    Bad("recommend", ({"history": [3]}, [[1]]), "history_ids: " + HISTORIES_EXPECTED + "a dict"),
    # candidates
    Bad("recommend", ([[3]], [list(range(21))]), "candidate_ids: 21 candidates per user, outside 1..max_candidates=20"),
    Bad("recommend", ([[3]], [[]]), "candidate_ids: 0 candidates per user, outside 1..max_candidates=20"),
    Bad("recommend", ([[3]], [[120]]), f"candidate_ids[0]: {_range(120)}"),
    Bad("recommend", ([[3], [4]], [[1, 2], [3, -1]]), f"candidate_ids[1]: {_range(-1)}"),
    Bad("recommend", ([[3], [4]], [[1, 2], [3]]),
        "candidate_ids[1]: 1 candidates where candidate_ids[0] has 2 (every row needs the same count)"),
    Bad("recommend", ([[3]], [[1], [2]]), "candidate_ids: 2 rows for 1 histories"),
    Bad("recommend", ([[3], [4]], []), "candidate_ids: 0 rows for 2 histories"),
    Bad("recommend", ([[3]], [[1, "2"]]), 'candidate_ids[0]: item ids must be integers, got "2"'),
    Bad("recommend", ([[3]], [[1, 2**63]]), f"candidate_ids[0]: {_range(2**63)}"),
    Bad("recommend", ([[3], [4]], np.array([[1], [2**63]], dtype=np.uint64)), f"candidate_ids[1]: {_range(2**63)}"),
    Bad("recommend", ([[3]], np.array([[0.5]])), "candidate_ids: item ids must be integers, got dtype float64"),
    Bad("recommend", ([[3]], None), "candidate_ids: expected a list of candidate rows or a 2-D array, got None"),
    Bad("recommend", ([[3]], [1, 2]), "candidate_ids[0]: expected a list of item ids, got 1"),
    Bad("recommend", ([[3]], np.array([1, 2])),
        "candidate_ids: expected a list of candidate rows or a 2-D array, got an array of shape [2] and dtype int64"),
    # the stage order: every field's types before any field's ranges
    Bad("recommend", ([[500]], [[1.5]]), f"candidate_ids[0]: {_integers('1.5')}"),
    Bad("recommend", ([[500]], [[1], [2]]), f"history_ids[0]: {_range(500)}"),
    # k of top-k
    Bad("topk", ([[1]], None), "k: expected an integer, got None"),
    Bad("topk", ([[1]], True), "k: expected an integer, got True"),
    Bad("topk", ([[1]], float("nan")), "k: expected an integer, got nan"),
    Bad("topk", ([[1]], 3.0), "k: expected an integer, got 3.0"),
    Bad("topk", ([[1]], "3"), 'k: expected an integer, got "3"'),
    Bad("topk", ([[1]], [3]), "k: expected an integer, got a list of length 1"),
    Bad("topk", ([[1]], 2**70), "k: 1180591620717411303424 is outside 1..max_topk=5"),
    Bad("topk", ([[1]], 0), "k: 0 is outside 1..max_topk=5"),
    Bad("topk", ([[1]], -3), "k: -3 is outside 1..max_topk=5"),
    Bad("topk", ([[1]], 6), "k: 6 is outside 1..max_topk=5"),
    Bad("topk", ([[1]], np.int64(6)), "k: 6 is outside 1..max_topk=5"),
    Bad("topk", ([[1], []], 2), "history_ids[1]: empty history (at least one item is needed)"),
    Bad("topk", ([[1, 2**63]], 2), f"history_ids[0]: {_range(2**63)}"),
    Bad("topk", ([[500]], 6), "k: 6 is outside 1..max_topk=5"),
    # recommend_batch
    Bad("recommend_batch", ([],), "requests: empty batch (at least one request is needed)"),
    Bad("recommend_batch", (None,), "requests: expected a list of (history, candidates) pairs, got None"),
    Bad("recommend_batch", ([([1],)],), "requests[0]: expected a (history, candidates) pair, got a tuple of length 1"),
    Bad("recommend_batch", ([([1], [2]), 3],), "requests[1]: expected a (history, candidates) pair, got 3"),
    Bad("recommend_batch", ([([1], [2]), ([1], [])],),
        "requests[1].candidates: 0 candidates per user, outside 1..max_candidates=20"),
    Bad("recommend_batch", ([([1], list(range(21)))],),
        "requests[0].candidates: 21 candidates per user, outside 1..max_candidates=20"),
    Bad("recommend_batch", ([([500], [2])],), f"requests[0].history: {_range(500)}"),
    Bad("recommend_batch", ([([], [2])],), "requests[0].history: empty history (at least one item is needed)"),
    Bad("recommend_batch", ([([1], [2, 120])],), f"requests[0].candidates: {_range(120)}"),
    Bad("recommend_batch", ([([1], [2**63])],), f"requests[0].candidates: {_range(2**63)}"),
    Bad("recommend_batch", ([([1], [2.0])],), f"requests[0].candidates: {_integers('2.0')}"),
    Bad("recommend_batch", ([(None, [2])],), "requests[0].history: expected a list of item ids, got None"),
]

BAD_REQUESTS = [(*case.args, re.escape(case.message)) for case in CONTRACT_CASES if case.method == "recommend"]


# -- the runtimes ----------------------------------------------------------------------------------------------
def contract_model() -> SpeederModel:
    """A tiny untrained Speeder (120 items, max_history 8), the same weights on every call."""
    _, table = generate_synthetic(SyntheticConfig(n_items=NUM_ITEMS, n_users=20, seed=3))
    table.set_modality("collab", np.random.default_rng(0).normal(size=(len(table), 6)))
    torch.manual_seed(0)
    model = SpeederModel(SpeederConfig(backbone=BackboneConfig(shape="tiny"), d_expert=32,
                                       max_history=RANGES.max_history), table).eval()
    with torch.no_grad():
        model.slopes.uniform_(0.1, 1.0)  # a position bias that matters
        model.candidate_embedding.normal_(std=0.02)
    return model


def export_contract_model(root: Path) -> Path:
    """``root/onnx`` and ``root/aoti``: the exports of ``contract_model()`` (CPU, fp32, top-k 5)."""
    model = contract_model()
    for engine in ENGINES:
        export_model(model, engine, root / engine, ranges=RANGES, topk=TOPK, device="cpu", log=lambda *_: None)
    return root


def load_runtimes(root: Path, model: SpeederModel) -> dict[str, Any]:
    """Every runtime over the same weights and limits: Recommender on ONNX Runtime, AOTInductor and PyTorch,
    OptimizedSpeeder (recommend only) and, where the extension is built, CppRecommender."""
    import copy

    from speeder_rt.runtime import Recommender, TorchRunner
    from speeder_rt.runtime.cpp import CppRecommender, available
    from speeder_rt.runtime.optimized import OptimizedSpeeder

    runtimes: dict[str, Any] = {engine: Recommender.load(root / engine) for engine in ENGINES}
    runtimes["torch"] = Recommender(TorchRunner(model, TOPK), NUM_ITEMS, RANGES, "torch")
    runtimes["optimized"] = OptimizedSpeeder(copy.deepcopy(model), buckets=(1, 2, 4), history_buckets=(4,),
                                             max_candidates=RANGES.max_candidates)
    if available():
        runtimes["cpp"] = CppRecommender.load(root / "aoti")
    return runtimes


def takes(runtime: Any, method: str) -> bool:
    return callable(getattr(runtime, method, None))
