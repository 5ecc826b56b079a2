"""``Recommender``: serve an exported artifact (ONNX Runtime, AOTInductor, TensorRT) or a checkpoint (PyTorch).

    rec = Recommender.load("exports/onnx")             # a directory written by python -m speeder_rt.export
    scores = rec.recommend([[3, 17, 5], [8]], [[1, 2, 3], [4, 5, 6]])   # float32 [B, K]
    item_ids, scores = rec.topk([[3, 17, 5], [8]], k=5)                  # int64 / float32 [B, k]
    per_request = rec.recommend_batch([([3, 17], [1, 2, 3]), ([8], [4, 5])])  # candidate counts may differ

Histories are lists of item ids, oldest first (ragged lists are padded internally), or 2-D arrays /
tensors padded with negative ids after the real items. Requests are checked by the request contract
(``speeder_rt.runtime.validation``: bad ones raise its ``RequestError``, with the C++ runtime's messages);
batches larger than the exported max batch are split into chunks. A NaN or infinite score is never returned:
``ModelOutputError`` names the request row instead (see ``validation.check_finite_scores``). Results are numpy
arrays and match the PyTorch model (within the export's parity).

An export's catalog is its item table's current version (``speeder_rt.export.items``): ``load`` reads it, and
``reload_items`` switches to a newer one (e.g. after ``python -m speeder_rt.catalog add --export DIR``) without
reloading the graphs; ids of the new items are accepted from then on. When that version has an ANN index (an export
made with ``--index``: ``speeder_rt.export.index``), ``topk`` answers through it: the query graph's vectors searched
by the index with each user's history excluded (``ItemIndex.search``); a row the index fills with fewer than ``k``
items (an approximate index's probed cells ran short) is answered by the exact top-k graph instead. The results keep
the exact path's contract. Loading such a version without FAISS installed raises a ValueError naming the extra
(``pip install 'speeder_rt[catalog]'``): an export built for ANN is not silently served by a full scan.
"""
from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from speeder_rt.export.format import EXPORT_JSON, Ranges, Runner
from speeder_rt.export.index import load_index
from speeder_rt.export.items import read_item_tokens, read_pointer
from speeder_rt.export.runners import check_threads, load_runner
from speeder_rt.runtime.validation import Ids, RequestContract, check_finite_scores, check_finite_topk

if TYPE_CHECKING:
    from speeder_rt.catalog.ann import ItemIndex


class Recommender:
    """Answers ``recommend`` / ``recommend_batch`` (candidate scores) and ``topk`` (full catalog) through one
    ``Runner``; ``contract`` holds what it accepts."""

    def __init__(self, runner: Runner, num_items: int, ranges: Ranges, engine: str, meta: dict[str, Any] | None = None,
                 export_dir: Path | None = None) -> None:
        """``export_dir``: the export whose item table ``reload_items`` follows (None: the runner's table is fixed)."""
        self.runner = runner
        self.num_items = num_items
        self.ranges = ranges
        self.engine = engine
        self.meta = meta or {}
        self.export_dir = export_dir
        self.items_version: int | None = None  # the export's item-table version served (None: not an export)
        self.index: ItemIndex | None = None  # that version's ANN index (None: top-k by the exact top-k graph)
        self.contract = RequestContract(num_items, ranges.max_history, ranges.max_candidates, runner.topk_k)

    @classmethod
    def load(cls, path: str | Path, device: str | None = None, max_topk: int = 100,
             threads: int | None = None) -> Recommender:
        """An export directory (engine from its export.json), or a Speeder model directory (PyTorch, top-k up to
        ``max_topk``; a pickled checkpoint is refused unread). ``device``: for ONNX Runtime and model
        directories; packages and plans keep their own. ``threads``: the engine's CPU threads (see
        ``speeder_rt.export.runners.load_runner``; for a model directory torch's), None for the engine's default."""
        path = Path(path)
        if path.is_dir() and not (path / "config.json").is_file():
            if not (path / EXPORT_JSON).is_file():
                raise ValueError(f"{path}: neither an export directory (no {EXPORT_JSON}) nor a model directory "
                                 "(no config.json)")
            runner, meta = load_runner(path, device, threads)
            recommender = cls(runner, meta["num_items"], Ranges(**meta["ranges"]), meta["engine"], meta, path)
            recommender.reload_items()
            return recommender
        check_threads(threads)
        from speeder_rt.runtime.torch_runner import load_model_runner  # PyTorch and the model: for a model directory

        runner, model = load_model_runner(path, max_topk, device or "cpu", threads)
        return cls(runner, model.num_items, Ranges(max_history=model.cfg.max_history, max_candidates=2**31 - 1),
                   "torch", {"source_checkpoint": str(path)})

    def reload_items(self) -> bool:
        """Serve the export's current item table (and its ANN index, if it has one) if it is newer than the one
        served; True when it switched. The table and the index are read and checked (``read_item_tokens``,
        ``load_index``) before anything changes: a bad version raises ValueError and the served one stays. Ids only
        grow (append-only versions), so a request checked against the old size is valid for the new table too."""
        if self.export_dir is None:
            raise ValueError(f"{self.meta.get('source_checkpoint')}: a model directory has no versioned item table "
                             "(add items with python -m speeder_rt.catalog add --model ... --out NEW_DIR)")
        if self.items_version is not None and read_pointer(self.export_dir)["version"] == self.items_version:
            return False
        items = read_item_tokens(self.export_dir)
        if items.num_items < self.num_items:
            raise ValueError(f"{self.export_dir}: item table version {items.version} has {items.num_items} items, "
                             f"fewer than the {self.num_items} served (versions only append)")
        index_dir = items.index_dir(self.export_dir)
        index = load_index(index_dir, items.num_items) if index_dir is not None else None
        self.runner.set_item_tokens(items.tokens)  # the table first: the old contract's ids stay valid for it
        self.num_items, self.items_version, self.index = items.num_items, items.version, index
        self.contract = RequestContract(self.num_items, self.ranges.max_history, self.ranges.max_candidates,
                                        self.runner.topk_k)
        return True

    @property
    def max_topk(self) -> int:
        """The largest ``k`` that ``topk`` answers (the exported ``--topk``; 0 = none)."""
        return self.runner.topk_k

    def recommend(self, history_ids: Ids, candidate_ids: Ids) -> np.ndarray:
        """Scores float32 [B, K] of each user's K candidates (higher = more likely next)."""
        scores = self._scores(*self.contract.recommend(history_ids, candidate_ids))
        check_finite_scores(scores)
        return scores

    def recommend_batch(self, requests: Sequence[tuple[Sequence[int], Sequence[int]]]) -> list[np.ndarray]:
        """Scores float32 [K_i] per (history, candidates) request; requests with the same K run batched together."""
        pairs = self.contract.requests(requests)
        out: list[np.ndarray] = [np.empty(0, np.float32)] * len(pairs)
        by_count: dict[int, list[int]] = {}
        for i, (_, candidates) in enumerate(pairs):
            by_count.setdefault(len(candidates), []).append(i)
        for members in by_count.values():
            scores = self._scores([pairs[i][0] for i in members], np.stack([pairs[i][1] for i in members]))
            check_finite_scores(scores, "requests", members)
            for i, row in zip(members, scores):
                out[i] = row
        return out

    def topk(self, history_ids: Ids, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """(item ids int64 [B, k], scores float32 [B, k]) over the whole catalog, history items excluded (through
        the ANN index when the served item-table version has one)."""
        histories, k = self.contract.topk(history_ids, k)
        index = self.index  # read once: a reload_items meanwhile changes the next call
        answer = self.runner.topk if index is None else partial(self._index_topk, index)
        parts = [answer(*pad_histories(histories[a:b])) for a, b in self._chunks(len(histories))]
        ids = np.concatenate([p[0] for p in parts])[:, :k]
        scores = np.concatenate([p[1] for p in parts])[:, :k]
        check_finite_topk(pad_histories(histories)[0], ids, scores)
        return ids.astype(np.int64, copy=False), scores.astype(np.float32, copy=False)

    def _index_topk(self, index: ItemIndex, history_ids: np.ndarray, history_mask: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray]:
        """The top-k graph's answer (ids, scores [B, topk_k]) from the query graph and ``index``; rows the index
        leaves short of ``topk_k`` items (an id -1) from the top-k graph. A non-finite query vector (a model fault)
        gives its row NaN scores, which ``topk`` refuses like the exact graph's (``check_finite_topk``)."""
        queries = self.runner.query(history_ids, history_mask)
        finite = np.isfinite(queries).all(1)
        scores, ids = index.search(np.where(finite[:, None], queries, 0), self.runner.topk_k,
                                   exclude=np.where(history_mask, history_ids, -1))
        scores[~finite] = np.nan
        short = (ids < 0).any(1)
        if short.any():
            ids[short], scores[short] = self.runner.topk(history_ids[short], history_mask[short])
        return ids, scores

    def _scores(self, histories: list[np.ndarray], candidates: np.ndarray) -> np.ndarray:
        out = [self.runner.scores(*pad_histories(histories[a:b]), candidates[a:b]) for a, b in self._chunks(len(histories))]
        return np.concatenate(out).astype(np.float32, copy=False)

    def _chunks(self, n: int) -> list[tuple[int, int]]:
        step = self.ranges.max_batch
        return [(a, min(a + step, n)) for a in range(0, n, step)]


def pad_histories(rows: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(history_ids padded with -1, history_mask) of width = the longest row: the exported graphs' inputs."""
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), -1, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=bool)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
        mask[i, : len(r)] = True
    return ids, mask
