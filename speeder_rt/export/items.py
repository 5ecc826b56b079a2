"""An export's item-token table: versioned files beside the graphs, read by every runner (standard library and numpy
only, like ``format``). The contract other readers (the C++ runtime) build against is docs/export.md's "Item table":

    items/current.json             {"format_version": 1, "version": V, "num_items": N, "dim": D, "dtype": "float32",
                                    "file": "v000007/item_tokens.npy", "sha256": "<hex of that file>"}
    items/v000007/item_tokens.npy  plain .npy (no pickle, C order, little-endian), [N, D], ``format.item_table_dtype``
    items/v000007/index/           optional: a FAISS index over that version's rows (``speeder_rt.catalog.ann``,
                                   ``ItemIndex.save``); then current.json also has "index": "v000007/index"

A version is written completely into its own ``vNNNNNN/`` directory (``atomic_dir``: temporary directory + rename),
then ``current.json`` is replaced atomically; readers read ``current.json`` once and then only the file it names,
so a reader never sees half a table. Versions are append only: version V+1 holds version V's rows unchanged, then
the new ones (ids never change); a version's index is written inside its directory, with its table, so the two
always travel together. The previous version is kept (a reader holding the old pointer still finds its
file); older ones are pruned. Writers of one export take ``items/.lock`` (``flock``) for the whole update.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from speeder_rt.utils.io import atomic_dir, write_json

ITEMS_DIR, CURRENT_JSON, TOKENS_FILE, LOCK_FILE, INDEX_DIR = "items", "current.json", "item_tokens.npy", ".lock", "index"
ITEMS_FORMAT_VERSION = 1
KEPT_VERSIONS = 2  # the current one and the one before it
TABLE_DTYPES = ("float32", "float16")


@dataclass(frozen=True)
class ItemTokens:
    """One version of an export's table: ``tokens`` [num_items, dim] as stored, ``pointer`` its current.json."""

    version: int
    tokens: np.ndarray
    pointer: dict[str, Any]

    @property
    def num_items(self) -> int:
        return int(self.tokens.shape[0])

    def index_dir(self, export_dir: str | Path) -> Path | None:
        """This version's index directory in ``export_dir`` (None: the version has no index)."""
        return Path(export_dir) / ITEMS_DIR / self.pointer["index"] if "index" in self.pointer else None


class SavedIndex(Protocol):
    """What ``write_item_tokens`` stores beside a version's table (``speeder_rt.catalog.ann.ItemIndex``)."""

    @property
    def size(self) -> int: ...

    def save(self, path: str | Path) -> None: ...


def version_dir(version: int) -> str:
    return f"v{version:06d}"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def check_finite(tokens: np.ndarray, where: str) -> None:
    """ValueError naming the first row and column of ``tokens`` that is NaN or infinite."""
    bad = ~np.isfinite(tokens)
    if bad.any():
        row, col = (int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"{where}: item token row {row}, column {col} is {tokens[row, col]} (tokens must be finite)")


def read_pointer(export_dir: str | Path) -> dict[str, Any]:
    """``items/current.json`` of an export, its fields checked (a ValueError naming the file and field)."""
    path = Path(export_dir) / ITEMS_DIR / CURRENT_JSON
    if not path.is_file():
        raise ValueError(f"{path}: missing (an export written before item tables were versioned: re-export it)")
    try:
        pointer = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON ({e})") from None
    expected = {"format_version": int, "version": int, "num_items": int, "dim": int, "dtype": str, "file": str,
                "sha256": str}
    for field, kind in expected.items():
        if not isinstance(pointer.get(field), kind):
            raise ValueError(f"{path}: field {field!r} must be a {kind.__name__}, got {pointer.get(field)!r}")
    if pointer["format_version"] != ITEMS_FORMAT_VERSION:
        raise ValueError(f"{path}: unknown format_version {pointer['format_version']!r}")
    if pointer["dtype"] not in TABLE_DTYPES:
        raise ValueError(f"{path}: dtype {pointer['dtype']!r} is not one of {list(TABLE_DTYPES)}")
    if pointer["file"] != f"{version_dir(pointer['version'])}/{TOKENS_FILE}":
        raise ValueError(f"{path}: file {pointer['file']!r} is not version {pointer['version']}'s "
                         f"{version_dir(pointer['version'])}/{TOKENS_FILE}")
    if "index" in pointer and pointer["index"] != f"{version_dir(pointer['version'])}/{INDEX_DIR}":
        raise ValueError(f"{path}: index {pointer['index']!r} is not version {pointer['version']}'s "
                         f"{version_dir(pointer['version'])}/{INDEX_DIR}")
    return pointer


def read_item_tokens(export_dir: str | Path) -> ItemTokens:
    """The current table of an export, checked against its pointer: sha256, shape, dtype, every value finite."""
    pointer = read_pointer(export_dir)
    path = Path(export_dir) / ITEMS_DIR / pointer["file"]
    if not path.is_file():
        raise ValueError(f"{path}: missing (named by {CURRENT_JSON})")
    if file_sha256(path) != pointer["sha256"]:
        raise ValueError(f"{path}: sha256 differs from {CURRENT_JSON}'s (a corrupt or replaced file)")
    try:
        tokens = np.load(path, allow_pickle=False)
    except ValueError as e:
        raise ValueError(f"{path}: not a plain .npy array ({e})") from None
    want = (pointer["num_items"], pointer["dim"])
    if tokens.shape != want or tokens.dtype != np.dtype(pointer["dtype"]).newbyteorder("<"):
        raise ValueError(f"{path}: shape {list(tokens.shape)} / dtype {tokens.dtype} disagree with {CURRENT_JSON} "
                         f"({list(want)} / {pointer['dtype']})")
    check_finite(tokens, str(path))
    return ItemTokens(pointer["version"], np.ascontiguousarray(tokens), pointer)


@contextlib.contextmanager
def writer_lock(export_dir: str | Path) -> Iterator[None]:
    """Hold ``items/.lock`` exclusively: one writer of an export's table at a time."""
    items = Path(export_dir) / ITEMS_DIR
    items.mkdir(parents=True, exist_ok=True)
    with (items / LOCK_FILE).open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def write_item_tokens(export_dir: str | Path, tokens: np.ndarray, version: int,
                      index: SavedIndex | None = None) -> dict[str, Any]:
    """Write ``tokens`` as ``version`` of the export's table, with ``index`` (over exactly these rows) when given, and
    make it current (call under ``writer_lock`` when the export may have other writers); returns the new pointer.
    Versions before the previous one are pruned."""
    items = Path(export_dir) / ITEMS_DIR
    if tokens.ndim != 2 or tokens.dtype.name not in TABLE_DTYPES:
        raise ValueError(f"item tokens must be a 2-D {' or '.join(TABLE_DTYPES)} array, got {tokens.dtype} "
                         f"{list(tokens.shape)}")
    check_finite(tokens, f"{items} version {version}")
    if index is not None and index.size != tokens.shape[0]:
        raise ValueError(f"{items} version {version}: the index holds {index.size} items, the table {tokens.shape[0]}")
    name = version_dir(version)
    with atomic_dir(items / name, overwrite=False) as tmp:
        np.save(tmp / TOKENS_FILE, np.ascontiguousarray(tokens, dtype=tokens.dtype.newbyteorder("<")),
                allow_pickle=False)
        digest = file_sha256(tmp / TOKENS_FILE)
        if index is not None:
            index.save(tmp / INDEX_DIR)
    pointer = {"format_version": ITEMS_FORMAT_VERSION, "version": version, "num_items": int(tokens.shape[0]),
               "dim": int(tokens.shape[1]), "dtype": tokens.dtype.name, "file": f"{name}/{TOKENS_FILE}",
               "sha256": digest, **({"index": f"{name}/{INDEX_DIR}"} if index is not None else {})}
    write_json(items / CURRENT_JSON, pointer)
    for old in sorted(items.glob("v[0-9][0-9][0-9][0-9][0-9][0-9]"))[:-KEPT_VERSIONS]:
        if old.name < name:
            shutil.rmtree(old, ignore_errors=True)
    return pointer


__all__ = ["CURRENT_JSON", "INDEX_DIR", "ITEMS_DIR", "ItemTokens", "SavedIndex", "check_finite", "read_item_tokens", "read_pointer",
           "write_item_tokens", "writer_lock"]
