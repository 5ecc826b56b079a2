"""Item features for an :class:`~speeder_rt.data.item_table.ItemTable`: text embeddings from all-MiniLM-L6-v2
(cached in the table by a fingerprint of the texts) and user-supplied image feature matrices."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from speeder_rt.data.assets import minilm_dir
from speeder_rt.data.item_table import ItemTable
from speeder_rt.utils.progress import progress_bar

MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"
TEXT_DIM = 384


def encode_texts(texts: list[str], batch_size: int = 64, device: str = "cpu", progress: bool = True) -> np.ndarray:
    """Sentence embeddings [N, 384] float32 of all-MiniLM-L6-v2, as sentence-transformers computes them: tokens
    truncated to the model's max_seq_length, mean pooling over the attention mask, L2 normalisation. Blank texts
    give zero rows. ``progress`` shows a bar over the texts."""
    out = np.zeros((len(texts), TEXT_DIM), dtype=np.float32)
    todo = sorted((i for i, t in enumerate(texts) if t.strip()), key=lambda i: -len(texts[i]))
    if not todo:
        return out
    tokenizer, model, max_length = _minilm(device)
    with torch.inference_mode(), progress_bar(total=len(todo), desc="MiniLM text features", unit="text",
                                              enabled=progress) as bar:
        for start in range(0, len(todo), batch_size):
            rows = todo[start : start + batch_size]
            batch = tokenizer(
                [texts[i] for i in rows], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
            ).to(device)
            hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
            out[rows] = torch.nn.functional.normalize(pooled, p=2, dim=1).float().cpu().numpy()
            bar.update(len(rows))
    return out


def add_text_features(table: ItemTable, batch_size: int = 64, device: str = "cpu", progress: bool = True) -> bool:
    """Set modality ``"text"`` to the embedding of each item's ``title + " " + description``.

    Items with no text are marked unavailable. The texts' fingerprint is kept in ``table.meta["text_fingerprint"]``;
    if it matches and the modality exists, nothing is computed and the result is False (True when computed).
    Saving the table keeps the cache.
    """
    texts = [
        f"{title} {description}".strip() for title, description in zip(table.titles, table.descriptions, strict=True)
    ]
    fingerprint = _fingerprint(texts)
    if table.meta.get("text_fingerprint") == fingerprint and "text" in table.modalities:
        return False
    embeddings = encode_texts(texts, batch_size=batch_size, device=device, progress=progress)
    table.set_modality("text", embeddings, available=np.array([bool(t) for t in texts]), source=MODEL_ID)
    table.meta["text_fingerprint"] = fingerprint
    return True


def load_image_features(table: ItemTable, path: str | os.PathLike) -> None:
    """Set modality ``"image"`` from a feature matrix keyed by item, in one of three forms:

    - ``.safetensors``: tensor ``features`` [M, d], metadata ``item_keys`` (a JSON list of M keys);
    - ``.npz``: arrays ``keys`` (strings) and ``features`` [M, d];
    - ``.npy``: ``features`` [M, d], with keys one per line in the sidecar ``<stem>.keys.txt``.

    Items without a row are unavailable. An unknown or repeated key, or a non-finite value, is a ``ValueError``
    naming the file and the row.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: file not found")
    readers = {".safetensors": _read_safetensors, ".npz": _read_npz, ".npy": _read_npy}
    reader = readers.get(path.suffix.lower())
    if reader is None:
        raise ValueError(f"{path}: unsupported image feature format (expected {', '.join(readers)})")
    keys, features = reader(path)
    if features.ndim != 2 or features.shape[0] != len(keys) or features.shape[1] == 0:
        raise ValueError(
            f"{path}: features have shape {list(features.shape)}, expected [{len(keys)}, d] (one row per key)"
        )
    if not np.issubdtype(features.dtype, np.number):
        raise ValueError(f"{path}: features have non-numeric dtype {features.dtype}")
    ids = np.empty(len(keys), dtype=np.int64)
    row_of: dict[int, int] = {}
    for row, key in enumerate(keys):
        item = table.key_to_id.get(key)
        if item is None:
            raise ValueError(f"{path}: row {row}: item key {key!r} is not in the item table")
        if item in row_of:
            raise ValueError(f"{path}: row {row}: item key {key!r} repeats row {row_of[item]}")
        row_of[item] = row
        ids[row] = item
    finite = np.isfinite(features).all(axis=1)
    if not finite.all():
        row = int(np.argmin(finite))
        raise ValueError(f"{path}: row {row} (item {keys[row]!r}) has a NaN or infinite value")
    values = np.zeros((len(table), features.shape[1]), dtype=np.float32)
    values[ids] = features
    available = np.zeros(len(table), dtype=bool)
    available[ids] = True
    table.set_modality("image", values, available=available, source=str(path))


@functools.cache
def _minilm(device: str) -> tuple[Any, torch.nn.Module, int]:
    """Tokenizer, model (eval mode, on ``device``) and max_seq_length of the bundled all-MiniLM-L6-v2."""
    from transformers import AutoModel, AutoTokenizer

    path = minilm_dir()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True, dtype=torch.float32).to(device).eval()
    max_length = json.loads((path / "sentence_bert_config.json").read_text(encoding="utf-8"))["max_seq_length"]
    return tokenizer, model, int(max_length)


def _fingerprint(texts: list[str]) -> str:
    h = hashlib.sha256(MODEL_ID.encode())
    for text in texts:
        data = text.encode("utf-8")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def _read_safetensors(path: Path) -> tuple[list[str], np.ndarray]:
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            if "features" not in f.keys():
                raise ValueError(f"{path}: tensor 'features' missing (found {list(f.keys())})")
            features = f.get_tensor("features").float().numpy()
    except SafetensorError as e:
        raise ValueError(f"{path}: not a valid safetensors file ({e})") from None
    if "item_keys" not in metadata:
        raise ValueError(f"{path}: metadata 'item_keys' missing")
    try:
        keys = json.loads(metadata["item_keys"])
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: metadata 'item_keys' is not valid JSON ({e.msg})") from None
    if not isinstance(keys, list):
        raise ValueError(f"{path}: metadata 'item_keys' must be a JSON list, got {type(keys).__name__}")
    return [str(k) for k in keys], features


def _read_npz(path: Path) -> tuple[list[str], np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {name: z[name] for name in ("keys", "features") if name in z.files}
            found = z.files
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path}: cannot read as .npz ({e})") from None
    for name in ("keys", "features"):
        if name not in arrays:
            raise ValueError(f"{path}: array {name!r} missing (found {found})")
    keys = arrays["keys"]
    if keys.ndim != 1:
        raise ValueError(f"{path}: array 'keys' must be 1-D, got shape {list(keys.shape)}")
    return [k.decode("utf-8") if isinstance(k, bytes) else str(k) for k in keys.tolist()], arrays["features"]


def _read_npy(path: Path) -> tuple[list[str], np.ndarray]:
    sidecar = path.with_name(f"{path.stem}.keys.txt")
    if not sidecar.is_file():
        raise ValueError(f"{path}: key file {sidecar} not found (one item key per line)")
    try:
        features = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a valid .npy file ({e})") from None
    keys = [line.strip() for line in sidecar.read_text(encoding="utf-8").splitlines()]
    return keys, features
