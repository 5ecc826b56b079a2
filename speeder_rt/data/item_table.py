"""ItemTable: per-item features by modality, availability masks, titles and the key <-> dense-id map.

On disk a table is a directory holding ``features.safetensors`` (``<modality>.features`` float16 [N, d] and
``<modality>.available`` uint8 [N]) and ``items.json`` (keys, titles, descriptions, modality order, extra
metadata). It is written atomically and memory-mapped on load: the feature matrices of a loaded table are
views of the file's pages, so a million-item table costs no private RAM (loading reads every feature once, to
refuse a NaN or infinite one naming its item; the pages stay shared in the page cache).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.numpy import save_file

from speeder_rt.utils.io import atomic_dir, read_json_fields
from speeder_rt.utils.readers import first_non_finite, read_safetensors

FORMAT_VERSION = 1
FP16_MAX = float(np.finfo(np.float16).max)


class ItemTable:
    """Items 0..N-1 with ``item_keys``, ``titles``, ``descriptions`` and per-modality features.

    ``features[m]`` is a float16 tensor [N, d_m]; ``available[m]`` a bool tensor [N]. Rows of unavailable
    items are zero. ``meta`` holds small JSON-serialisable facts (e.g. the fingerprint of cached text
    features).
    """

    def __init__(
        self,
        item_keys: list[str],
        titles: list[str] | None = None,
        descriptions: list[str] | None = None,
    ) -> None:
        if len(item_keys) == 0:
            raise ValueError("ItemTable: empty table (no item keys)")
        self.item_keys = [str(k) for k in item_keys]
        self.key_to_id = {k: i for i, k in enumerate(self.item_keys)}
        if len(self.key_to_id) != len(self.item_keys):
            dup = next(k for k in self.item_keys if self.item_keys.count(k) > 1)
            raise ValueError(f"ItemTable: duplicate item key {dup!r}")
        n = len(self.item_keys)
        self.titles = list(titles) if titles is not None else [""] * n
        self.descriptions = list(descriptions) if descriptions is not None else [""] * n
        if len(self.titles) != n or len(self.descriptions) != n:
            raise ValueError(f"ItemTable: titles/descriptions need {n} entries, got {len(self.titles)}/{len(self.descriptions)}")
        self.features: dict[str, torch.Tensor] = {}
        self.available: dict[str, torch.Tensor] = {}
        self.meta: dict[str, Any] = {}

    def __len__(self) -> int:
        return len(self.item_keys)

    @property
    def modalities(self) -> list[str]:
        return list(self.features)

    def width(self, modality: str) -> int:
        return int(self.features[modality].shape[1])

    def ids(self, keys: list[str]) -> torch.Tensor:
        """Dense ids of external keys; an unknown key is a ``KeyError`` naming it."""
        try:
            return torch.tensor([self.key_to_id[str(k)] for k in keys], dtype=torch.int64)
        except KeyError as e:
            raise KeyError(f"ItemTable: unknown item key {e.args[0]!r}") from None

    def set_modality(
        self,
        name: str,
        values: np.ndarray | torch.Tensor,
        available: np.ndarray | torch.Tensor | None = None,
        source: str = "<memory>",
    ) -> None:
        """Store ``values`` [N, d] as modality ``name`` (float16). Rows with ``available`` False are zeroed.

        Raises ``ValueError`` naming ``source``, the modality and the row for a wrong shape, NaN/inf in an
        available row, or a value beyond float16's range.
        """
        if not name or not name.replace("_", "").isalnum():
            raise ValueError(f"{source}: modality name {name!r} must be alphanumeric (underscores allowed)")
        arr = values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
        n = len(self)
        if arr.ndim != 2 or arr.shape[0] != n or arr.shape[1] == 0:
            raise ValueError(f"{source}: modality {name!r} features must have shape [{n}, d], got {list(arr.shape)}")
        if available is None:
            avail = np.ones(n, dtype=bool)
        else:
            avail = available.cpu().numpy() if isinstance(available, torch.Tensor) else np.asarray(available)
            avail = avail.astype(bool)
            if avail.shape != (n,):
                raise ValueError(f"{source}: modality {name!r} availability must have shape [{n}], got {list(avail.shape)}")
        arr = arr.astype(np.float32, copy=True)
        arr[~avail] = 0.0
        bad = ~np.isfinite(arr)
        if bad.any():
            row, col = map(int, np.argwhere(bad)[0])
            raise ValueError(f"{source}: modality {name!r} row {row} (item {self.item_keys[row]!r}) column {col} is {arr[row, col]}")
        big = np.abs(arr) > FP16_MAX
        if big.any():
            row, col = map(int, np.argwhere(big)[0])
            raise ValueError(f"{source}: modality {name!r} row {row} column {col} = {arr[row, col]} exceeds float16 range")
        self.features[name] = torch.from_numpy(arr.astype(np.float16))
        self.available[name] = torch.from_numpy(avail)

    def save(self, path: str | os.PathLike, overwrite: bool = True) -> None:
        """Write the table to directory ``path`` atomically (temp dir + rename)."""
        tensors: dict[str, np.ndarray] = {}
        for m in self.modalities:
            tensors[f"{m}.features"] = np.ascontiguousarray(self.features[m].numpy())
            tensors[f"{m}.available"] = self.available[m].numpy().astype(np.uint8)
        index = {
            "format_version": FORMAT_VERSION,
            "modalities": self.modalities,
            "item_keys": self.item_keys,
            "titles": self.titles,
            "descriptions": self.descriptions,
            "meta": self.meta,
        }
        with atomic_dir(path, overwrite=overwrite) as tmp:
            if tensors:
                save_file(tensors, str(tmp / "features.safetensors"))
            (tmp / "items.json").write_text(json.dumps(index), encoding="utf-8")

    def _check_finite(self, file: Path) -> None:
        """A ``ValueError`` naming ``file``, the modality and the item of the first NaN / infinite feature."""
        found = first_non_finite(self.features)
        if found:
            modality, (row, col), value = found
            raise ValueError(f"{file}: modality {modality!r} row {row} (item {self.item_keys[row]!r}) column {col} is "
                             f"{value}: every feature must be finite")

    @classmethod
    def load(cls, path: str | os.PathLike, mmap: bool = True) -> ItemTable:
        """Load a table saved by :meth:`save`; with ``mmap`` the feature matrices map the file's pages."""
        path = Path(path)
        index = read_json_fields(path / "items.json", ("modalities", "item_keys", "titles", "descriptions"),
                                 FORMAT_VERSION, "not an ItemTable directory")
        table = cls(index["item_keys"], index["titles"], index["descriptions"])
        table.meta = dict(index.get("meta", {}))
        if index["modalities"]:
            n = len(table)
            expected = {}
            for m in index["modalities"]:
                expected[f"{m}.features"] = (torch.float16, (n, None))
                expected[f"{m}.available"] = (torch.uint8, (n,))
            tensors = read_safetensors(path / "features.safetensors", expected, mmap=mmap)
            for m in index["modalities"]:
                table.features[m] = tensors[f"{m}.features"]
                table.available[m] = tensors[f"{m}.available"].bool()
            table._check_finite(path / "features.safetensors")
        return table
