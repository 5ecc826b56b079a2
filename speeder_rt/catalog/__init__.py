"""The item catalog at serving scale: full-catalog top-k over item tokens (exact or FAISS ANN)."""
from speeder_rt.catalog.ann import ItemIndex, recall

__all__ = ["ItemIndex", "recall"]
