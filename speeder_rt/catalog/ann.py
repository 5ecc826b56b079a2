"""Full-catalog top-k over item tokens: exact or approximate maximum-inner-product search on FAISS.

A user's score for item ``i`` is ``s_i = q . t_i``, the dot product of the query vector ``q`` (the model's
head output) with the item token ``t_i``, so full-catalog top-k is maximum-inner-product search (MIPS)
over the item-token table ``T [N, d]``. :class:`ItemIndex` answers it with one FAISS index, all with
``METRIC_INNER_PRODUCT``:

- ``exact``: ``IndexFlatIP``, a scan of every item in BLAS / SIMD blocks of bounded size (FAISS chunks the
  queries and the catalog); the reference for recall and the default for small catalogs;
- ``ivf``: ``IndexIVFFlat`` over ``nlist ~ 4 sqrt(N)`` k-means cells (trained on the catalog at build);
  the approximate default (``kind="faiss"``): on the 2-core CPU it built 3x faster than HNSW at 100k items
  with the same latency and recall, and in 101 s at 1M where HNSW had not finished in 10 minutes
  (``docs/catalog.md`` has the measurements);
- ``hnsw``: ``IndexHNSWFlat`` (a navigable small-world graph over the tokens), by name only: it needs no
  training, so items added later are placed as well as the first ones, where IVF keeps the cells of its
  first catalog.

The search-time effort of an approximate index (HNSW's ``efSearch``, IVF's ``nprobe``) is tuned at build:
the smallest value whose recall@10 against the exact answer reaches ``recall_target`` on ``tune_queries``
given by the caller (best: real query vectors), by default on a seeded sample of the catalog's tokens
each moved by Gaussian noise of the sample's per-dimension spread (a query near items, not one of them).

Results follow the package's full-catalog top-k (``export.graph.TopKGraph``): ``(scores [B, k] float32,
ids [B, k] int64)``, scores descending, equal scores by ascending id (which of several items tied at the
k-th score is returned is FAISS's choice); a slot with no item (every item excluded, or an approximate index
that found fewer than ``k``) holds id ``-1`` and score NaN. No non-finite score is ever ranked: tokens and
queries must be finite, and a query whose norm times the largest token norm could overflow float32 is
refused (``|q . t| <= |q| |t|`` bounds every partial sum), so every score FAISS computes is finite.

Items are added with :meth:`ItemIndex.add`: they get the next ids ``N, N+1, ...``; existing ids never
change. :meth:`ItemIndex.save` writes a directory ``index.faiss`` (FAISS's own serialisation, no pickle)
+ ``index.json`` (format version, kind, size, dim, parameters) atomically; :meth:`ItemIndex.load`
checks one against the other.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import faiss
import numpy as np

from speeder_rt.catalog import EXACT_MAX_ITEMS
from speeder_rt.utils.io import atomic_dir, read_json_fields, write_json

FORMAT_VERSION = 1
INDEX_FILE, SIDECAR_FILE = "index.faiss", "index.json"
Kind = Literal["auto", "exact", "faiss", "hnsw", "ivf"]
KINDS: tuple[str, ...] = ("auto", "exact", "faiss", "hnsw", "ivf")
HNSW_M, HNSW_EF_CONSTRUCTION = 32, 64
IVF_TRAIN_POINTS_PER_CELL = 64
EF_SEARCH_MAX = 512
TUNE_K, TUNE_QUERIES = 10, 256
_FLOAT32_MAX = float(np.finfo(np.float32).max)
_FAISS_CLASSES = {"exact": faiss.IndexFlatIP, "hnsw": faiss.IndexHNSWFlat, "ivf": faiss.IndexIVFFlat}
SEARCH_PARAMS = {"exact": (), "hnsw": ("efSearch",), "ivf": ("nprobe",)}  # set by name (faiss.ParameterSpace)


class ItemIndex:
    """Top-k maximum-inner-product search over an item-token table (see the module docstring)."""

    def __init__(self, index: faiss.Index, kind: str, params: dict[str, Any], max_token_norm: float) -> None:
        self._index = index
        self.kind = kind  # "exact" | "hnsw" | "ivf"
        self.params = params  # the structure's build and search parameters (recorded in the sidecar)
        self._max_token_norm = max_token_norm
        self._apply_search_params()

    @property
    def size(self) -> int:
        """Number of items (ids ``0 .. size - 1``)."""
        return int(self._index.ntotal)

    @property
    def dim(self) -> int:
        return int(self._index.d)

    @classmethod
    def build(cls, tokens: np.ndarray, kind: Kind = "auto", recall_target: float = 0.95,
              tune_queries: np.ndarray | None = None, seed: int = 0) -> ItemIndex:
        """An index over ``tokens [N, d]`` (item ``i`` = row ``i``). ``kind``: ``auto`` (exact below
        ``EXACT_MAX_ITEMS`` items, else ``faiss``), ``faiss`` (the approximate default, ``ivf``), or one
        structure by name (``exact``, ``ivf``, ``hnsw``). An approximate index's search effort is tuned to
        ``recall_target`` recall@10 on ``tune_queries`` (default: a seeded sample of the tokens)."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}; got {kind!r}")
        if not 0.0 < recall_target <= 1.0:
            raise ValueError(f"recall_target must be in (0, 1]; got {recall_target}")
        tokens = _matrix(tokens, "tokens")
        if not len(tokens):
            raise ValueError("tokens: the catalog is empty (shape [0, d])")
        n, d = tokens.shape
        if kind == "auto":
            kind = "exact" if n < EXACT_MAX_ITEMS else "faiss"
        if kind == "faiss":
            kind = "ivf"
        index, params = _empty_index(kind, tokens, seed)
        index.add(tokens)
        built = cls(index, kind, params, float(_norms(tokens).max()))
        if kind != "exact":
            if tune_queries is None:  # catalog tokens moved by noise of the catalog's own spread: not in it
                rng = np.random.default_rng(seed)
                sample = tokens[np.sort(rng.choice(n, size=min(n, TUNE_QUERIES), replace=False))]
                tune_queries = sample + sample.std(axis=0) * rng.standard_normal(sample.shape, np.float32)
            built._tune(_matrix(tune_queries, "tune_queries", d), tokens, recall_target)
        return built

    def _tune(self, queries: np.ndarray, tokens: np.ndarray, recall_target: float) -> None:
        """Set the smallest search effort whose recall@TUNE_K on ``queries`` reaches ``recall_target``
        (the largest tried when none does); records the recall reached in ``params["tuned_recall@10"]``."""
        k = min(TUNE_K, len(tokens))
        _, want = faiss.knn(queries, tokens, k, metric=faiss.METRIC_INNER_PRODUCT)
        lowest, highest = (16, EF_SEARCH_MAX) if self.kind == "hnsw" else (1, self.params["nlist"])
        # 1, 1.5, 2, 3, 4, 6, ... x lowest: each step at most 1.5x the work of the one before
        steps = sorted({round(lowest * f * 2**e) for f in (1, 1.5) for e in range(40)} - {0})
        for value in [s for s in steps if s < highest] + [highest]:
            self.set_search_effort(value)
            _, got = self._index.search(queries, k)
            reached = recall(got, want)
            if reached >= recall_target:
                break
        self.params["tuned_recall@10"] = round(reached, 4)

    def set_search_effort(self, value: int) -> None:
        """Set the approximate index's search effort (HNSW ``efSearch`` / IVF ``nprobe``, recorded in
        ``params``): more effort, higher recall, slower searches. The exact index has none."""
        if self.kind == "exact":
            raise ValueError("the exact index has no search effort to set")
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"search effort must be an integer >= 1; got {value!r}")
        self.params[SEARCH_PARAMS[self.kind][0]] = int(value)
        self._apply_search_params()

    def _apply_search_params(self) -> None:
        for name in SEARCH_PARAMS[self.kind]:
            faiss.ParameterSpace().set_index_parameter(self._index, name, self.params[name])

    def add(self, tokens: np.ndarray) -> np.ndarray:
        """Append items; returns their ids (``size .. size + M - 1``). Existing ids never change. An IVF
        index keeps its cells (trained on the first catalog)."""
        tokens = _matrix(tokens, "tokens", self.dim)
        first = self.size
        if len(tokens):
            self._index.add(tokens)
            self._max_token_norm = max(self._max_token_norm, float(_norms(tokens).max()))
        return np.arange(first, self.size, dtype=np.int64)

    def search(self, queries: np.ndarray, k: int, exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` items by ``queries [B, d] . tokens^T``: ``(scores [B, k] float32, ids [B, k] int64)``,
        scores descending, ``(NaN, -1)`` in slots without an item. ``exclude [B, W]`` (int, ``-1`` = padding):
        ids never returned for that row (a user's history)."""
        queries = _matrix(queries, "queries", self.dim)
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= self.size:
            raise ValueError(f"k must be an integer in 1..{self.size} (the catalog size); got {k!r}")
        norms = _norms(queries) * self._max_token_norm
        if (too_large := np.flatnonzero(norms >= _FLOAT32_MAX)).size:
            raise ValueError(f"queries: row {too_large[0]} could overflow float32 scores (|q| x max |t| = "
                             f"{norms[too_large[0]]:.3g})")
        fetch = int(k)
        if exclude is not None:
            exclude = _exclusions(exclude, len(queries), self.size)
            fetch = min(self.size, fetch + exclude.shape[1])  # enough that k remain after the exclusions
        scores, ids = self._index.search(queries, fetch)
        if exclude is not None:
            ids = np.where((ids[:, :, None] == exclude[:, None, :]).any(axis=2), -1, ids)
        scores = np.where(ids >= 0, scores, np.float32(np.nan))
        order = np.lexsort((ids, -scores), axis=-1)[:, :k]  # score descending, NaN last, ties: lower id first
        return np.take_along_axis(scores, order, axis=1), np.take_along_axis(ids, order, axis=1)

    def save(self, path: str | Path) -> None:
        """Write directory ``path`` (``index.faiss`` + ``index.json``) atomically: a reader sees the old
        index or the new one, never a mix."""
        with atomic_dir(path) as tmp:
            faiss.write_index(self._index, str(tmp / INDEX_FILE))
            write_json(tmp / SIDECAR_FILE, {
                "format_version": FORMAT_VERSION, "kind": self.kind, "size": self.size, "dim": self.dim,
                "metric": "inner_product", "params": self.params, "max_token_norm": self._max_token_norm,
                "faiss_version": faiss.__version__,
            })

    @classmethod
    def load(cls, path: str | Path) -> ItemIndex:
        """An index written by :meth:`save`; a ``ValueError`` naming the file and the field when the sidecar
        and the FAISS file disagree (kind, size, dim, metric) or a field is malformed."""
        path = Path(path)
        sidecar, index_file = path / SIDECAR_FILE, path / INDEX_FILE
        meta = read_json_fields(sidecar, ("kind", "size", "dim", "metric", "params", "max_token_norm"),
                                FORMAT_VERSION, "item index sidecar")
        kind = meta["kind"]
        if kind not in _FAISS_CLASSES:
            raise ValueError(f"{sidecar}: field 'kind' is {kind!r}; expected one of {', '.join(_FAISS_CLASSES)}")
        if meta["metric"] != "inner_product":
            raise ValueError(f"{sidecar}: field 'metric' is {meta['metric']!r}; expected 'inner_product'")
        norm = meta["max_token_norm"]
        if isinstance(norm, bool) or not isinstance(norm, (int, float)) or not math.isfinite(norm) or norm < 0:
            raise ValueError(f"{sidecar}: field 'max_token_norm' is {norm!r}; expected a finite number >= 0")
        if not index_file.is_file():
            raise ValueError(f"{index_file}: missing (the FAISS index beside {sidecar})")
        try:
            index = faiss.read_index(str(index_file))  # already of its concrete class
        except RuntimeError as e:
            raise ValueError(f"{index_file}: not a readable FAISS index ({str(e).splitlines()[0]})") from None
        found = {"kind": type(index).__name__, "size": int(index.ntotal), "dim": int(index.d),
                 "metric": "inner_product" if index.metric_type == faiss.METRIC_INNER_PRODUCT else str(index.metric_type)}
        expected = {"kind": _FAISS_CLASSES[kind].__name__, "size": meta["size"], "dim": meta["dim"],
                    "metric": "inner_product"}
        for field, want in expected.items():
            if found[field] != want:
                raise ValueError(f"{sidecar}: field {field!r} is {meta[field]!r}, but {index_file} holds "
                                 f"{field} {found[field]!r}")
        params = meta["params"]
        for name in SEARCH_PARAMS[kind]:
            value = params.get(name) if isinstance(params, dict) else None
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{sidecar}: field 'params.{name}' is {value!r}; expected an integer >= 1")
        return cls(index, kind, params, float(norm))


def _empty_index(kind: str, tokens: np.ndarray, seed: int) -> tuple[faiss.Index, dict[str, Any]]:
    """The FAISS index of ``kind`` for ``tokens`` (IVF: trained on them), with no item yet, and its
    parameters (the search effort at its maximum until tuned)."""
    n, d = tokens.shape
    if kind == "exact":
        return faiss.IndexFlatIP(d), {}
    if kind == "hnsw":
        hnsw = faiss.IndexHNSWFlat(d, HNSW_M, faiss.METRIC_INNER_PRODUCT)
        hnsw.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        return hnsw, {"M": HNSW_M, "efConstruction": HNSW_EF_CONSTRUCTION, "efSearch": EF_SEARCH_MAX}
    nlist = max(1, min(n // 39, round(4 * math.sqrt(n))))  # FAISS: 4 to 16 sqrt(N); >= 39 training rows a cell
    ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
    ivf.cp.seed = seed
    ivf.cp.max_points_per_centroid = IVF_TRAIN_POINTS_PER_CELL
    ivf.train(tokens)  # k-means on a seeded sample of max_points_per_centroid * nlist rows
    return ivf, {"nlist": nlist, "nprobe": nlist}


def recall(got: np.ndarray, want: np.ndarray) -> float:
    """Recall@k of ``got [B, k]`` ids against the exact ``want [B, k]``: the share of the exact ids found
    (per row, ``|got_b & want_b| / |want_b|``, averaged over the rows; ``-1`` slots of ``want`` not counted)."""
    real = want >= 0
    hits = ((got[:, :, None] == want[:, None, :]).any(axis=1) & real).sum()
    return float(hits / max(1, real.sum()))


def _matrix(x: np.ndarray, name: str, dim: int | None = None) -> np.ndarray:
    """``x`` as a C-contiguous float32 ``[rows, d]`` array with only finite values, or a ``ValueError``."""
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[1] == 0:
        raise ValueError(f"{name}: a 2-D array [rows, d] with d >= 1 expected; got shape {list(x.shape)}")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"{name}: width {x.shape[1]} does not match the index's dim {dim}")
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"{name}: a floating-point array expected; got dtype {x.dtype}")
    with np.errstate(over="ignore"):  # a float64 value beyond float32 becomes inf, refused below
        x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(x).all():  # also catches float64 values that overflow float32
        row, col = np.argwhere(~np.isfinite(x))[0]
        raise ValueError(f"{name}: row {row}, column {col} is {x[row, col]} (non-finite values are refused)")
    return x


def _norms(x: np.ndarray) -> np.ndarray:
    """Row norms of a float32 matrix, accumulated in float64 (no overflow for finite float32 rows)."""
    return np.sqrt(np.einsum("ij,ij->i", x, x, dtype=np.float64))


def _exclusions(exclude: np.ndarray, rows: int, size: int) -> np.ndarray:
    """``exclude`` as int64 ``[rows, W]`` with ids below ``size`` (negative: padding), or a ``ValueError``."""
    exclude = np.asarray(exclude)
    if exclude.ndim != 2 or exclude.shape[0] != rows or not np.issubdtype(exclude.dtype, np.integer):
        raise ValueError(f"exclude: an integer array [B={rows}, W] expected; got {exclude.dtype} "
                         f"{list(exclude.shape)}")
    if (beyond := np.argwhere(exclude >= size)).size:
        row, col = beyond[0]
        raise ValueError(f"exclude: row {row}, column {col} is {exclude[row, col]}, outside the catalog's ids "
                         f"0..{size - 1} (negative = padding)")
    return exclude.astype(np.int64, copy=False)
