"""``Recommender``: serve an exported artifact (ONNX Runtime, AOTInductor, TensorRT) or a checkpoint (PyTorch).

    rec = Recommender.load("exports/onnx")             # a directory written by python -m speeder_rt.export
    scores = rec.recommend([[3, 17, 5], [8]], [[1, 2, 3], [4, 5, 6]])   # float32 [B, K]
    item_ids, scores = rec.topk([[3, 17, 5], [8]], k=5)                  # int64 / float32 [B, k]

Histories are lists of item ids, oldest first (ragged lists are padded internally), or 2-D arrays /
tensors padded with negative ids after the real items. Requests larger than the exported max batch are
split into chunks. Results are numpy arrays and match the PyTorch model (within the export's parity).
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch

from speeder_rt.export import load_runner, load_speeder
from speeder_rt.export.graph import Ranges, Runner, ScoringGraph, TopKGraph
from speeder_rt.model.speeder import SpeederModel

Ids = Union[Sequence[Sequence[int]], np.ndarray, torch.Tensor]


class TorchRunner:
    """Eager PyTorch on the exported graphs' modules (the reference the other engines are checked against)."""

    def __init__(self, model: SpeederModel, topk_k: int, device: str = "cpu", backend: str = "sdpa") -> None:
        self.device = torch.device(device)
        self.topk_k = topk_k
        self._scores = ScoringGraph(model, backend=backend).to(self.device)
        self._topk = TopKGraph(model, topk_k, backend=backend).to(self.device) if topk_k else None

    def _to(self, *arrays: np.ndarray) -> list[torch.Tensor]:
        return [torch.from_numpy(a).to(self.device) for a in arrays]

    @torch.no_grad()
    def scores(self, history_ids: np.ndarray, history_mask: np.ndarray, candidate_ids: np.ndarray) -> np.ndarray:
        return self._scores(*self._to(history_ids, history_mask, candidate_ids)).cpu().numpy()

    @torch.no_grad()
    def topk(self, history_ids: np.ndarray, history_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ids, scores = self._topk(*self._to(history_ids, history_mask))
        return ids.cpu().numpy(), scores.cpu().numpy()


class Recommender:
    """Answers ``recommend`` (candidate scores) and ``topk`` (full catalog) through one ``Runner``."""

    def __init__(self, runner: Runner, num_items: int, ranges: Ranges, engine: str, meta: dict[str, Any] | None = None) -> None:
        self.runner = runner
        self.num_items = num_items
        self.ranges = ranges
        self.engine = engine
        self.meta = meta or {}

    @classmethod
    def load(cls, path: str | Path, device: str | None = None, max_topk: int = 100) -> Recommender:
        """An export directory (engine from its export.json), or a Speeder model directory (PyTorch, top-k up to
        ``max_topk``; a pickled checkpoint is refused unread). ``device``: for ONNX Runtime and model
        directories; packages and plans keep their own."""
        path = Path(path)
        if path.is_dir() and not (path / "config.json").is_file():
            if not (path / "export.json").is_file():
                raise ValueError(f"{path}: neither an export directory (no export.json) nor a model directory "
                                 "(no config.json)")
            runner, meta = load_runner(path, device)
            return cls(runner, meta["num_items"], Ranges(**meta["ranges"]), meta["engine"], meta)
        model = load_speeder(path)
        k = min(max_topk, model.num_items)
        runner = TorchRunner(model, k, device or "cpu")
        return cls(runner, model.num_items, Ranges(max_history=model.cfg.max_history, max_candidates=2**31 - 1),
                   "torch", {"source_checkpoint": str(path)})

    @property
    def max_topk(self) -> int:
        """The largest ``k`` that ``topk`` answers (the exported ``--topk``; 0 = none)."""
        return self.runner.topk_k

    def recommend(self, history_ids: Ids, candidate_ids: Ids) -> np.ndarray:
        """Scores float32 [B, K] of each user's K candidates (higher = more likely next)."""
        history = self._histories(history_ids)
        cands = as_ids(candidate_ids, "candidate_ids", ndim=2)
        if cands.shape[0] != len(history):
            raise ValueError(f"candidate_ids has {cands.shape[0]} rows for {len(history)} histories")
        if not 1 <= cands.shape[1] <= self.ranges.max_candidates:
            raise ValueError(f"{cands.shape[1]} candidates per user; this export takes 1..{self.ranges.max_candidates}")
        self._check_range(cands, "candidate_ids")
        out = [self.runner.scores(*_pad(history[a:b]), cands[a:b]) for a, b in self._chunks(len(history))]
        return np.concatenate(out).astype(np.float32, copy=False)

    def topk(self, history_ids: Ids, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """(item ids int64 [B, k], scores float32 [B, k]) over the whole catalog, history items excluded."""
        if not self.max_topk:
            raise ValueError("this export has no top-k graph (exported with --topk 0)")
        if not 1 <= k <= self.max_topk:
            raise ValueError(f"k={k}: this export answers 1 <= k <= {self.max_topk} (its --topk)")
        history = self._histories(history_ids)
        parts = [self.runner.topk(*_pad(history[a:b])) for a, b in self._chunks(len(history))]
        ids = np.concatenate([p[0] for p in parts])[:, :k]
        scores = np.concatenate([p[1] for p in parts])[:, :k]
        return ids.astype(np.int64, copy=False), scores.astype(np.float32, copy=False)

    # -- validation ----------------------------------------------------------------------------
    def _chunks(self, n: int) -> list[tuple[int, int]]:
        step = self.ranges.max_batch
        return [(a, min(a + step, n)) for a in range(0, n, step)]

    def _check_range(self, ids: np.ndarray, what: str) -> None:
        if ids.size and (ids.min() < 0 or ids.max() >= self.num_items):
            raise ValueError(f"{what}: item ids must be in 0..{self.num_items - 1}")

    def _histories(self, history_ids: Ids) -> list[np.ndarray]:
        """One int64 array of real items per user, validated against this export."""
        rows = parse_histories(history_ids)
        for i, row in enumerate(rows):
            if len(row) == 0:
                raise ValueError(f"history_ids[{i}]: empty history (at least one item is needed)")
            if len(row) > self.ranges.max_history:
                raise ValueError(f"history_ids[{i}]: {len(row)} items; this export takes at most {self.ranges.max_history}")
            self._check_range(row, f"history_ids[{i}]")
        return rows


def parse_histories(history_ids: Ids) -> list[np.ndarray]:
    """One int64 array of real items per user, from ragged lists or a 2-D batch padded with negative ids after
    each row's real items; shapes and dtypes are checked here, lengths and id ranges by the runtime."""
    if isinstance(history_ids, (np.ndarray, torch.Tensor)):
        arr = as_ids(history_ids, "history_ids", ndim=2)
        real = arr >= 0
        if (real[:, 1:] & ~real[:, :-1]).any():
            raise ValueError("history_ids: padding (negative ids) must come after a row's real items")
        rows = [row[mask] for row, mask in zip(arr, real)]
    else:
        rows = [as_ids(r, f"history_ids[{i}]", ndim=1) for i, r in enumerate(history_ids)]
    if not rows:
        raise ValueError("history_ids: empty batch")
    return rows


def as_ids(ids: Any, what: str, ndim: int) -> np.ndarray:
    """int64 array of ``ndim`` dimensions, or a ValueError naming ``what``."""
    try:
        arr = ids.detach().cpu().numpy() if isinstance(ids, torch.Tensor) else np.asarray(ids)
    except ValueError:  # numpy refuses ragged nesting
        arr = np.asarray(ids, dtype=object)
    shape = "a list of item ids" if ndim == 1 else "a 2-D batch [B, K] (rows of equal length)"
    if arr.ndim != ndim or arr.dtype == object:
        raise ValueError(f"{what}: expected {shape}, got {type(ids).__name__} of shape {list(arr.shape)}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{what}: item ids must be integers, got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


def _pad(rows: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(history_ids padded with -1, history_mask) of width = the longest row."""
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), -1, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=bool)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
        mask[i, : len(r)] = True
    return ids, mask
