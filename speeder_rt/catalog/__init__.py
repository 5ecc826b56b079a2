"""The item catalog at serving scale: full-catalog top-k over item tokens (exact or FAISS ANN: ``ann``) and new items
for a model directory (``add``; an export's table: ``speeder_rt.export.add_items``). ``ItemIndex`` / ``recall`` load FAISS on first
use (PEP 562), so adding items to an export (e.g. from the serving environment) needs no faiss."""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from speeder_rt.catalog.ann import ItemIndex, recall

EXACT_MAX_ITEMS = 50_000  # ItemIndex.build's "auto" and an export's --index auto: exact below, FAISS IVF from here on
_LAZY = {"ItemIndex": "speeder_rt.catalog.ann", "recall": "speeder_rt.catalog.ann"}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name]), name)


__all__ = ["EXACT_MAX_ITEMS", "ItemIndex", "recall"]
