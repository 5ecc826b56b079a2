"""New items for an export, in place: their token rows appended to the export's item table as a new version.

An export's graphs take the item-token table as an input (``speeder_rt.export.items``), so adding items needs no
re-export: ``add_export_items(export_dir, tokens)`` checks the new rows (width = the table's, every value finite in
the table's dtype), writes ``items/v<N+1>/item_tokens.npy`` = the current rows followed by the new ones, and then
points ``items/current.json`` at it. The new items get the ids ``N, N+1, ...``; existing ids never change. Readers
switch when they next read the pointer (``Recommender.reload_items``; the Triton model checks between requests).
When the current version has an ANN index (``items/vNNNNNN/index/``, exports made with ``--index``), the new
version gets a copy of it extended with the new rows (``ItemIndex.add``: an IVF index keeps its cells), written in
the new version's directory with its table; this needs FAISS (``pip install 'speeder_rt[catalog]'``).

The tokens of new items come from their features through the model's MoME (``speeder_rt.catalog.add.item_tokens_for``)
or from any other source of the same width (``--tokens FILE.npy``).
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from speeder_rt.export.items import (
    ItemTokens,
    SavedIndex,
    check_finite,
    read_item_tokens,
    write_item_tokens,
    writer_lock,
)


@dataclass(frozen=True)
class AddedToExport:
    export_dir: Path
    version: int  # the new version of the export's item table
    first_id: int  # the first new item's id (= the previous size)
    count: int
    indexed: bool  # the new version's ANN index was extended with the new items (False: the export has no index)


def add_export_items(export_dir: str | os.PathLike, tokens: np.ndarray | Sequence[Sequence[float]]) -> AddedToExport:
    """Append ``tokens`` [M, D] (M >= 1 new items; an array or a list of rows) to the export's item table as a new
    version (with the current version's index extended by them, when it has one); ValueError naming the export and
    the row for a wrong width or a value that is not finite in the table's dtype, and nothing written."""
    export_dir = Path(export_dir)
    with writer_lock(export_dir):
        current = read_item_tokens(export_dir)
        rows = _checked_rows(export_dir, current, tokens)
        index = _extended_index(export_dir, current, rows)
        pointer = write_item_tokens(export_dir, np.concatenate([current.tokens, rows]), current.version + 1, index)
    return AddedToExport(export_dir, pointer["version"], current.num_items, len(rows), index is not None)


def _extended_index(export_dir: Path, current: ItemTokens, rows: np.ndarray) -> SavedIndex | None:
    """The current version's index loaded and extended with ``rows`` (None: the version has no index)."""
    index_dir = current.index_dir(export_dir)
    if index_dir is None:
        return None
    from speeder_rt.export.index import load_index  # FAISS: only for an export with an index

    index = load_index(index_dir, current.num_items)
    index.add(rows.astype(np.float32))
    return index


def _checked_rows(export_dir: Path, current: ItemTokens, tokens: np.ndarray | Sequence[Sequence[float]]) -> np.ndarray:
    """``tokens`` in the table's dtype, after the width and finiteness checks (a value beyond float16 is refused for
    an fp16 table: it would be stored as infinity); rows are numbered from 0, the first new item's."""
    where = f"{export_dir}: new item tokens (row r is item id {current.num_items} + r)"
    width = current.tokens.shape[1]
    if not isinstance(tokens, np.ndarray):  # a list of rows: name the first of another width
        wrong = next((r for r, row in enumerate(tokens) if len(row) != width), None)
        if wrong is not None:
            raise ValueError(f"{where}: row {wrong} has width {len(tokens[wrong])}, the export's item tokens {width}")
        tokens = np.asarray(tokens, dtype=np.float64)
    if tokens.ndim != 2 or tokens.shape[0] == 0 or not np.issubdtype(tokens.dtype, np.floating):
        raise ValueError(f"{where}: must be a non-empty 2-D float array [M, {width}], got {tokens.dtype} "
                         f"{list(tokens.shape)}")
    if tokens.shape[1] != width:
        raise ValueError(f"{where}: every row has width {tokens.shape[1]}, the export's item tokens {width}")
    check_finite(tokens, where)
    with np.errstate(over="ignore"):
        stored = tokens.astype(current.tokens.dtype)
    check_finite(stored, f"{where} as {stored.dtype}")
    return stored


__all__ = ["AddedToExport", "add_export_items"]
