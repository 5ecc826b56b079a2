"""The item catalog at serving scale: full-catalog top-k over item tokens (exact or FAISS ANN: ``ann``) and new items
(``export_items``: an export's table; ``add``: a model directory's). ``ItemIndex`` / ``recall`` load FAISS on first
use (PEP 562), so adding items to an export (e.g. from the serving environment) needs no faiss."""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from speeder_rt.catalog.ann import ItemIndex, recall

_LAZY = {"ItemIndex": "speeder_rt.catalog.ann", "recall": "speeder_rt.catalog.ann"}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name]), name)


__all__ = ["ItemIndex", "recall"]
