"""``CppRecommender``: the C++ runtime (``speeder_rt::Recommender``, csrc/runtime) from Python, through the
``speeder_rt._C`` extension; the ``Recommender`` API and validation for AOTInductor export directories.

    rec = CppRecommender.load("exports/aoti")                            # python -m speeder_rt.export --engine aoti
    scores = rec.recommend([[3, 17, 5], [8]], [[1, 2, 3], [4, 5, 6]])   # float32 [B, K]
    item_ids, scores = rec.topk([[3, 17, 5], [8]], k=5)                  # int64 / float32 [B, k]
    per_request = rec.recommend_batch([([3, 17], [1, 2, 3]), ([8], [4, 5])])  # candidate counts may differ

Inputs are the ``Recommender``'s: lists of item ids (ragged histories), or 2-D arrays / tensors with histories
padded by negative ids after the real items. Calls release the GIL and may come from many threads at once: up to
``num_runners`` of them run concurrently (AOTInductor model instances sharing the weights), the rest wait.
Bad requests raise ``speeder_rt.runtime.validation.RequestError`` with the Python runtimes' messages: types and
shapes are checked here (the contract's parse stage), counts and ranges by the C++ library (its check stage,
translated by the binding). A NaN or infinite score is refused by the C++ library too: the binding raises
``validation.ModelOutputError`` naming the request row and position, and nothing is returned.

The catalog is the export's item table (``speeder_rt.export.items``), read by the C++ library on load;
``reload_items`` switches to a newer version as ``Recommender.reload_items`` does.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch  # noqa: F401  (libtorch must be loaded before the extension)

from speeder_rt.export.format import Ranges
from speeder_rt.runtime.validation import Ids, RequestContract, Rows

try:
    import speeder_rt._C as _C
except ImportError:  # the extension is not built
    _C = None

BUILD_HINT = "speeder_rt._C is not built: run `pip install --no-build-isolation -e .` (or `make test`) after torch"


def available() -> bool:
    """Whether the C++ runtime's binding is built."""
    return _C is not None


class CppRecommender:
    """``recommend`` / ``recommend_batch`` / ``topk`` through the C++ ``speeder_rt::Recommender``."""

    engine = "cpp"

    def __init__(self, native: Any) -> None:
        self._native = native
        info = native.info
        self.ranges = Ranges(info.max_batch, info.max_history, info.max_candidates)
        self.max_topk: int = info.topk
        self.device: str = info.device
        self._follow_items()

    def _follow_items(self) -> None:
        """The served item table's size and version (and the contract's catalog) from the C++ library."""
        info = self._native.info
        self.num_items: int = info.num_items
        self.items_version: int = info.items_version
        self.contract = RequestContract(self.num_items, info.max_history, info.max_candidates, self.max_topk)

    @classmethod
    def load(cls, path: str | Path, num_runners: int = 1) -> CppRecommender:
        """An export directory written with ``--engine aoti``."""
        if _C is None:
            raise ImportError(BUILD_HINT)
        return cls(_C.Recommender(str(path), num_runners))

    def reload_items(self) -> bool:
        """Serve the export's current item table if its version differs from the one served; True when it switched. A
        table that fails its checks raises ValueError naming the file, and the served one stays."""
        switched: bool = self._native.reload_items()
        if switched:
            self._follow_items()
        return switched

    def recommend(self, history_ids: Ids, candidate_ids: Ids) -> np.ndarray:
        """Scores float32 [B, K] of each user's K candidates (higher = more likely next)."""
        histories, candidates = self.contract.parse_recommend(history_ids, candidate_ids)
        return np.asarray(self._native.recommend(_lists(histories), _lists(candidates)), dtype=np.float32)

    def recommend_batch(self, requests: Sequence[tuple[Sequence[int], Sequence[int]]]) -> list[np.ndarray]:
        """Scores float32 [K_i] per (history, candidates) request; requests with the same K run batched together."""
        pairs = [(h.tolist(), c.tolist()) for h, c in self.contract.parse_requests(requests)]
        return [np.asarray(s, dtype=np.float32) for s in self._native.recommend_batch(pairs)]

    def topk(self, history_ids: Ids, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """(item ids int64 [B, k], scores float32 [B, k]) over the whole catalog, history items excluded."""
        histories, k = self.contract.parse_topk(history_ids, k)
        ids, scores = self._native.topk(_lists(histories), k)
        return np.asarray(ids, dtype=np.int64).reshape(-1, k), np.asarray(scores, dtype=np.float32).reshape(-1, k)


def _lists(rows: Rows) -> list[list[int]]:
    return [row.tolist() for row in rows]
