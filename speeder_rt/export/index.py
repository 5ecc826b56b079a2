"""An export's ANN index for full-catalog top-k: which one ``--index`` builds, and a version's index loaded.

``--index`` (``export_model(index=...)``): ``exact`` builds none (top-k is the top-k graph's exact scan of the
table); ``faiss`` builds the approximate default (IVF, ``speeder_rt.catalog.ann``); ``auto`` (the default) is
``exact`` below ``EXACT_MAX_ITEMS`` items and ``faiss`` from there on; ``flat`` / ``ivf`` / ``hnsw`` name one
FAISS structure (``flat``: FAISS's exact inner-product scan, ``ItemIndex`` kind ``exact``). An index is saved in
the item-table version it covers (``items/vNNNNNN/index/``) and the export gets the query graph, which top-k then
goes through (``Recommender.topk``: query graph, then ``ItemIndex.search``). TensorRT exports and exports without
a top-k graph take none (``auto`` builds none for them).

FAISS is optional (the ``catalog`` extra): building, extending or loading an index without it raises a ValueError
that names the extra to install; an export without an index never imports it.
"""
from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np

from speeder_rt.catalog import EXACT_MAX_ITEMS
from speeder_rt.export.format import Ranges, Runner

if TYPE_CHECKING:
    from speeder_rt.catalog.ann import ItemIndex

INDEX_CHOICES = ("auto", "exact", "faiss", "flat", "ivf", "hnsw")
TUNE_HISTORIES = 256
_ANN_KINDS = {"faiss": "faiss", "flat": "exact", "ivf": "ivf", "hnsw": "hnsw"}  # --index -> ItemIndex.build kind


def index_kind(index: str, engine: str, topk: int, num_items: int) -> str | None:
    """The ``ItemIndex.build`` kind an export builds for ``--index`` (None: no index); ValueError naming the flag
    for a choice the export cannot take."""
    if index not in INDEX_CHOICES:
        raise ValueError(f"--index must be one of {list(INDEX_CHOICES)}, got {index!r}")
    if index == "auto":
        index = "faiss" if num_items >= EXACT_MAX_ITEMS and topk and engine != "trt" else "exact"
    if index == "exact":
        return None
    if engine == "trt":
        raise ValueError(f"--index {index}: TensorRT exports have no query graph to search an index with; "
                         "use --engine onnx or aoti, or --index exact")
    if not topk:
        raise ValueError(f"--index {index} answers full-catalog top-k: it needs --topk >= 1")
    _ann()  # FAISS missing: said now, before the graphs are built
    return _ANN_KINDS[index]


def _ann() -> ModuleType:
    """``speeder_rt.catalog.ann``, or a ValueError naming the extra that installs FAISS."""
    try:
        from speeder_rt.catalog import ann
    except ImportError as e:
        raise ValueError(f"an ANN item index (export --index; items/vNNNNNN/index/) needs FAISS ({e}): "
                         "pip install 'speeder_rt[catalog]'") from None
    return ann


def build_index(tokens: np.ndarray, kind: str, tune_queries: np.ndarray) -> ItemIndex:
    """An ``ItemIndex`` of ``kind`` over ``tokens`` [N, D] (any float dtype; indexed as float32), an approximate
    one's search effort tuned on ``tune_queries`` [Q, D] (``tuning_queries``)."""
    return _ann().ItemIndex.build(tokens.astype(np.float32), kind, tune_queries=tune_queries)


def tuning_queries(runner: Runner, num_items: int, ranges: Ranges, count: int = TUNE_HISTORIES,
                   seed: int = 0) -> np.ndarray:
    """The query graph's vectors [count, D] for ``count`` seeded random histories (lengths uniform in
    ``1..max_history``, items uniform over the catalog): what the index's search effort is tuned on, closer to the
    served queries than the default (item tokens moved by noise)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, ranges.max_history + 1, size=count)
    mask = np.arange(ranges.max_history)[None, :] < lengths[:, None]
    ids = np.where(mask, rng.integers(0, num_items, size=mask.shape), -1)
    step = ranges.max_batch
    return np.concatenate([runner.query(ids[a:a + step], mask[a:a + step]) for a in range(0, count, step)])


def load_index(path: Path, num_items: int) -> ItemIndex:
    """The index saved at ``path``; ValueError unless it covers exactly ``num_items`` items (its table's)."""
    index = _ann().ItemIndex.load(path)
    if index.size != num_items:
        raise ValueError(f"{path}: the index holds {index.size} items, its item table {num_items}")
    return index
