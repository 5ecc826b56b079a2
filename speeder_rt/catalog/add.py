"""Add new items to a trained model directory, without retraining: new rows of its item table.

A Speeder item token is a function of the item's features and the MoME weights only (``model/mome.py``), so an
item that appears after training gets its token from its content:

    token(new item) = MoME(f_text, f_image, f_collab; availability a_m)       (the trained weights, unchanged)

Input is JSON Lines, one new item a line::

    {"item": "tt0111161", "title": "The Shawshank Redemption (1994)", "description": "..."}
    {"item": "B0C1X", "features": {"text": [...384 numbers...], "image": [...], "collab": [...]}}

- ``item`` (a non-empty string, or an integer) is the new key; ``title`` / ``description`` are strings
  (default ""); ``features`` maps a modality the model knows to its vector (the item table's width).
- ``text`` not given as a vector is computed with the model's recorded recipe: all-MiniLM-L6-v2 over
  ``title + " " + description`` (``data/features.py``), where the model's text features were MiniLM's (its
  ``items.json`` records ``text_fingerprint`` or ``text_model``); a blank text leaves ``text`` missing.
- A modality an item lacks (e.g. ``collab`` for a brand-new item: no interactions, no SASRec embedding) is
  *missing*: availability 0, the MoME's missing-modality path (the gate's softmax over the others; the token does
  not depend on that modality at all). An item with none of the model's modalities is refused (its token would be
  the zero vector).

Every line is checked before anything is written: bad JSON, a line that is not an object, a missing or unknown
field, a key already in the table or repeated in the file, a modality the model does not know, a vector of the
wrong width, a non-number, NaN / infinity or a value beyond float16 (the table's storage) is a ``ValueError``
naming the file, the line and the field. New items get the ids ``N, N+1, ...`` in file order; existing ids never
change. The result is written atomically: a full model directory at ``out`` (weights hard-linked, or copied
where a link is impossible; a trainer's resume state is left out), or the ``items/`` of the model directory
replaced in place.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from speeder_rt.data.features import MODEL_ID, _fingerprint, encode_texts
from speeder_rt.data.item_table import FP16_MAX, ItemTable
from speeder_rt.model.mome import MixtureOfModalityExperts
from speeder_rt.model.pretrained import BACKBONE, ITEMS, WEIGHTS, model_config, read_model_config
from speeder_rt.model.speeder import SpeederModel
from speeder_rt.utils.io import atomic_dir, read_json
from speeder_rt.utils.readers import check_finite, read_safetensors

FIELDS = ("item", "title", "description", "features")
RESUME_FILES = ("resume.json", "resume.safetensors")  # a trainer's state for the table it trained on: not copied
MIN_GEMM_ROWS = 8  # item_tokens_for computes at least this many rows (see there)


@dataclass
class NewItems:
    """Checked new items: keys, texts, and per table modality the features [M, d] (float32, zero where missing)
    with their availability [M]."""

    keys: list[str]
    titles: list[str]
    descriptions: list[str]
    features: dict[str, np.ndarray]
    available: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(self.keys)


@dataclass
class AddedItems:
    """What ``add_items`` wrote: the model directory, the first new id and the number of new items."""

    model_dir: Path
    first_id: int
    count: int


# -- reading and checking ---------------------------------------------------------------------------------------
def read_jsonl(path: str | os.PathLike) -> list[tuple[int, Any]]:
    """(line number, decoded value) of every non-blank line; bad JSON is a ValueError naming file and line."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: file not found (expected JSON Lines, one new item a line)")
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                records.append((number, json.loads(line)))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: line {number}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not records:
        raise ValueError(f"{path}: no items (every line is blank)")
    return records


class _Lines:
    """Words an error for ``source``'s line ``number`` and ``field``."""

    def __init__(self, source: str) -> None:
        self.source = source

    def error(self, number: int, field: str | None, problem: str) -> ValueError:
        where = f"{self.source}: line {number}"
        return ValueError(f"{where}: field {field!r}: {problem}" if field else f"{where}: {problem}")


def _vector(lines: _Lines, number: int, field: str, value: Any, width: int) -> list[float]:
    if not isinstance(value, list):
        raise lines.error(number, field, f"expected a list of {width} numbers, got {type(value).__name__}")
    if len(value) != width:
        raise lines.error(number, field, f"expected {width} numbers (the model's width), got {len(value)}")
    for col, v in enumerate(value):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise lines.error(number, field, f"element {col} is {v!r}, not a number")
        if not math.isfinite(v):
            raise lines.error(number, field, f"element {col} is {v}: every feature must be finite")
        if abs(v) > FP16_MAX:
            raise lines.error(number, field, f"element {col} = {v} exceeds float16 range (the table's storage)")
    return value


def check_records(records: Iterable[tuple[int, Any]], table: ItemTable, model_modalities: list[str],
                  source: str) -> tuple[NewItems, list[tuple[int, str]]]:
    """(the checked new items without computed text, [(row, text)] of the items whose text vector is to be
    computed from their title and description). ``model_modalities``: the MoME's experts."""
    lines = _Lines(source)
    keys: list[str] = []
    titles: list[str] = []
    descriptions: list[str] = []
    given: dict[str, dict[int, list[float]]] = {m: {} for m in table.modalities}
    line_of: dict[str, int] = {}
    numbers: list[int] = []
    for number, record in records:
        if not isinstance(record, dict):
            raise lines.error(number, None, f"expected a JSON object, got {type(record).__name__}")
        unknown = [k for k in record if k not in FIELDS]
        if unknown:
            raise lines.error(number, unknown[0], f"unknown field (allowed: {', '.join(FIELDS)})")
        if "item" not in record:
            raise lines.error(number, "item", "missing (the new item's key)")
        key = record["item"]
        if isinstance(key, bool) or not isinstance(key, (str, int)) or not str(key).strip():
            raise lines.error(number, "item", f"expected a non-empty string or an integer, got {key!r}")
        key = str(key)
        if key in table.key_to_id:
            raise lines.error(number, "item", f"key {key!r} is already item {table.key_to_id[key]} of the model")
        if key in line_of:
            raise lines.error(number, "item", f"key {key!r} repeats line {line_of[key]}")
        texts = []
        for field in ("title", "description"):
            text = record.get(field, "")
            if not isinstance(text, str):
                raise lines.error(number, field, f"expected a string, got {type(text).__name__}")
            texts.append(text)
        features = record.get("features", {})
        if not isinstance(features, dict):
            raise lines.error(number, "features", f"expected an object {{modality: [numbers]}}, got "
                                                  f"{type(features).__name__}")
        row = len(keys)
        for modality, value in features.items():
            if modality not in model_modalities:
                raise lines.error(number, f"features.{modality}", f"a modality the model does not know (it has "
                                                                  f"{', '.join(model_modalities)})")
            given[modality][row] = _vector(lines, number, f"features.{modality}", value, table.width(modality))
        line_of[key] = number
        numbers.append(number)
        keys.append(key)
        titles.append(texts[0])
        descriptions.append(texts[1])
    m = len(keys)
    if m == 0:
        raise ValueError(f"{source}: no items")
    new = NewItems(keys, titles, descriptions, {}, {})
    for modality, rows in given.items():
        values = np.zeros((m, table.width(modality)), dtype=np.float32)
        available = np.zeros(m, dtype=bool)
        if rows:
            index = np.fromiter(rows, dtype=np.int64, count=len(rows))
            values[index] = np.array(list(rows.values()), dtype=np.float32)
            available[index] = True
        new.features[modality], new.available[modality] = values, available
    to_encode = []
    if "text" in model_modalities:
        to_encode = [(r, f"{t} {d}".strip()) for r, (t, d) in enumerate(zip(titles, descriptions, strict=True))
                     if not new.available["text"][r] and f"{t} {d}".strip()]
        if to_encode and not minilm_text(table):
            r = to_encode[0][0]
            raise lines.error(numbers[r], "features.text", "missing, and the model's text features are not "
                                                           f"{MODEL_ID}'s (its items.json records no text_fingerprint), "
                                                           "so they cannot be computed from the title: give the vector")
    have = np.zeros(m, dtype=bool)
    for modality in model_modalities:
        have |= new.available[modality]
    have[[r for r, _ in to_encode]] = True
    if not have.all():
        r = int(np.argmin(have))
        raise lines.error(numbers[r], None, f"item {keys[r]!r} has none of the model's modalities "
                                            f"({', '.join(model_modalities)}): give a title or description, or features")
    return new, to_encode


def minilm_text(table: ItemTable) -> bool:
    """Whether the table's text features are all-MiniLM-L6-v2's (recorded by ``add_text_features`` or by an add)."""
    return "text" in table.modalities and ("text_fingerprint" in table.meta or table.meta.get("text_model") == MODEL_ID)


def _texts(titles: list[str], descriptions: list[str]) -> list[str]:
    return [f"{t} {d}".strip() for t, d in zip(titles, descriptions, strict=True)]


def encode_missing_text(new: NewItems, to_encode: list[tuple[int, str]]) -> None:
    """Fill ``new``'s text vectors of the rows ``to_encode`` with MiniLM embeddings of their texts."""
    if not to_encode:
        return
    rows = np.array([r for r, _ in to_encode], dtype=np.int64)
    new.features["text"][rows] = encode_texts([t for _, t in to_encode], progress=False)
    new.available["text"][rows] = True


def extended_table(table: ItemTable, new: NewItems, source: str, computed_text: bool) -> ItemTable:
    """``table`` followed by ``new`` (ids ``len(table)...``); the text cache fingerprint is kept valid only while
    every text row is MiniLM's of its text (``computed_text``: every new text row was computed)."""
    out = ItemTable(table.item_keys + new.keys, table.titles + new.titles, table.descriptions + new.descriptions)
    for modality in table.modalities:
        values = np.concatenate([table.features[modality].numpy().astype(np.float32), new.features[modality]])
        available = np.concatenate([table.available[modality].numpy(), new.available[modality]])
        out.set_modality(modality, values, available, source=source)
    out.meta = dict(table.meta)
    if minilm_text(table):
        out.meta["text_model"] = MODEL_ID
        fingerprint = out.meta.pop("text_fingerprint", None)
        if fingerprint is not None and computed_text and fingerprint == _fingerprint(_texts(table.titles,
                                                                                          table.descriptions)):
            out.meta["text_fingerprint"] = _fingerprint(_texts(out.titles, out.descriptions))
    out.meta["added"] = [*table.meta.get("added", []), {"source": Path(source).name, "first_id": len(table),
                                                        "count": len(new)}]
    return out


def _checked(model_dir: Path, records: Iterable[tuple[int, Any]], source: str
             ) -> tuple[Any, ItemTable, NewItems, bool]:
    """(the model's SpeederConfig, its table, the new items with every feature filled, whether text was computed
    for every new text row)."""
    cfg = model_config(SpeederModel, read_model_config(model_dir, SpeederModel.model_kind), model_dir)
    table = ItemTable.load(model_dir / ITEMS)
    new, to_encode = check_records(records, table, list(cfg.modalities), source)
    explicit_text = "text" in table.modalities and bool(new.available["text"].any())
    encode_missing_text(new, to_encode)
    return cfg, table, new, not explicit_text


# -- the public API ---------------------------------------------------------------------------------------------
def add_items(model_dir: str | os.PathLike, jsonl_path: str | os.PathLike,
              out_dir: str | os.PathLike | None = None) -> AddedItems:
    """Append the items of ``jsonl_path`` to the model directory ``model_dir``'s item table.

    ``out_dir``: a new model directory (the weights hard-linked or copied); None (or ``model_dir`` itself):
    ``model_dir/items`` replaced in place. Nothing is written unless every line is valid."""
    model_dir = Path(model_dir)
    records = read_jsonl(jsonl_path)
    _, table, new, computed_text = _checked(model_dir, records, str(jsonl_path))
    extended = extended_table(table, new, str(jsonl_path), computed_text)
    if out_dir is None or Path(out_dir).resolve() == model_dir.resolve():
        extended.save(model_dir / ITEMS)
        target = model_dir
    else:
        target = Path(out_dir)
        with atomic_dir(target) as tmp:
            for entry in model_dir.iterdir():
                if entry.name in (ITEMS, *RESUME_FILES):
                    continue
                if entry.is_dir():
                    shutil.copytree(entry, tmp / entry.name)
                elif entry.name == WEIGHTS:
                    _link_or_copy(entry, tmp / entry.name)
                else:
                    shutil.copy2(entry, tmp / entry.name)
            extended.save(tmp / ITEMS)
    return AddedItems(target, len(table), len(new))


def item_tokens_for(model_dir: str | os.PathLike, records: list[Mapping[str, Any]]) -> np.ndarray:
    """The MoME tokens float32 [M, d_h] of new items given as records (the JSONL lines' objects), from the model
    directory's trained weights; the records are checked as ``add_items`` checks a file (against the model's own
    table: a key it holds is refused). Only the MoME is built (no backbone); computed on the CPU with the
    PyTorch reference path, as ``SpeederModel.item_tokens`` computes them there."""
    model_dir = Path(model_dir)
    cfg, table, new, _ = _checked(model_dir, enumerate(records, start=1), "<records>")
    modalities = list(cfg.modalities)
    mome, enabled = _trained_mome(model_dir, cfg, {m: table.width(m) for m in modalities})
    # CPU GEMMs of fewer than 4 rows take another kernel (another summation order): pad so that a row's token is
    # bit for bit the one a whole table's computation gives
    rows = np.minimum(np.arange(max(len(new), MIN_GEMM_ROWS)), len(new) - 1)
    features = {m: torch.from_numpy(new.features[m][rows]).to(torch.float16) for m in modalities}
    active = torch.stack([torch.from_numpy(new.available[m][rows]) for m in modalities], dim=1) & enabled[None, :]
    with torch.no_grad():
        tokens, _ = mome(features, active)
    return tokens[: len(new)].float().numpy()


def _trained_mome(model_dir: Path, cfg: Any, dims: dict[str, int]) -> tuple[MixtureOfModalityExperts, torch.Tensor]:
    """The model's trained MoME (its dtype, eval mode) and its ``enabled`` modality flags (the last MPO stage's),
    read from model.safetensors; the backbone is not built."""
    hidden = read_json(model_dir / BACKBONE / "config.json", "the backbone's transformers config").get("hidden_size")
    if not isinstance(hidden, int):
        raise ValueError(f"{model_dir / BACKBONE / 'config.json'}: field 'hidden_size' missing or not an integer")
    mome = MixtureOfModalityExperts(dims, cfg.d_expert, hidden).to(cfg.backbone.torch_dtype)
    file = model_dir / WEIGHTS
    tensors = read_safetensors(file)
    state = {name[len("mome."):]: t for name, t in tensors.items() if name.startswith("mome.")}
    check_finite(file, state)
    expected = {n: (t.dtype, tuple(t.shape)) for n, t in mome.state_dict().items()}
    found = {n: (t.dtype, tuple(t.shape)) for n, t in state.items()}
    if found != expected:
        raise ValueError(f"{file}: the MoME's tensors do not match config.json's model (missing, extra or reshaped "
                         f"mome.* tensors)")
    mome.load_state_dict(state)
    enabled = tensors.get("enabled")
    if enabled is None or tuple(enabled.shape) != (len(dims),):
        raise ValueError(f"{file}: tensor 'enabled' missing or not of shape [{len(dims)}]")
    return mome.eval(), enabled.bool()


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system, or links not allowed
        shutil.copy2(src, dst)


# -- command line (``python -m speeder_rt.catalog add`` calls these) ---------------------------------------------
def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The arguments of ``add`` for a model directory, on ``parser`` (e.g. a subcommand's) or a new one."""
    parser = parser or argparse.ArgumentParser(prog="python -m speeder_rt.catalog add", description=(
        "Add new items (JSON Lines) to a trained model directory without retraining."))
    parser.add_argument("--model", required=True, help="the trained model directory (e.g. runs/NAME/speeder/best)")
    parser.add_argument("--items", required=True, help="JSON Lines: {item, title, description} and/or "
                                                       "{item, features: {modality: [numbers]}} per line")
    parser.add_argument("--out", help="write a new model directory here (default: replace the model's items/ in "
                                      "place)")
    return parser


def main(args: argparse.Namespace) -> int:
    """Run ``add`` for parsed arguments; a refused input prints one error line and returns 2."""
    try:
        added = add_items(args.model, args.items, args.out)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"added {added.count} items (ids {added.first_id}..{added.first_id + added.count - 1}) to {added.model_dir}")
    return 0
