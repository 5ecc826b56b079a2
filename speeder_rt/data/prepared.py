"""A prepared split on disk: the arrays of a :class:`SequenceData` as ``.npy`` files (memory-mapped when read)
and ``recipe.json``, what it was prepared from (the source, its files' sizes and modification times, the split
configuration, the synthetic configuration). A reader passes the recipe it wants; a split prepared from a
different recipe is refused, never silently used.

    DIR/recipe.json     {"format", "recipe", "stats"}
    DIR/keys.json       user_keys, item_keys, titles, descriptions
    DIR/*.npy           items, offsets, seen, seen_offsets; per split users/end/history_len; valid/test candidates/label
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from speeder_rt.data.sequences import Samples, SequenceData, SplitConfig
from speeder_rt.data.sources import parse_source, source_files
from speeder_rt.data.synthetic import SyntheticConfig
from speeder_rt.utils.io import atomic_dir

FORMAT = 1
RECIPE = "recipe.json"
_ARRAYS = ("items", "offsets", "seen", "seen_offsets")
_SAMPLE_ARRAYS = ("users", "end", "history_len")


def split_recipe(source: str, split: SplitConfig, synthetic: SyntheticConfig | None = None) -> dict[str, Any]:
    """What a split is prepared from: the source string, each file it reads (resolved path, bytes, mtime in ns),
    the split configuration and, for synthetic data, its configuration."""
    kind, _ = parse_source(source)
    files = [{"path": str(p.resolve()), "bytes": p.stat().st_size, "mtime_ns": p.stat().st_mtime_ns}
             for p in source_files(source) if p.is_file()]
    return {"source": source, "files": files, "split": dataclasses.asdict(split),
            "synthetic": dataclasses.asdict(synthetic or SyntheticConfig()) if kind == "synthetic" else None}


def save_split(data: SequenceData, recipe: dict[str, Any], out: str | os.PathLike, stats: dict[str, Any]) -> None:
    """Write ``data`` to directory ``out`` atomically (replacing what is there)."""
    with atomic_dir(out) as tmp:
        for name in _ARRAYS:
            np.save(tmp / f"{name}.npy", getattr(data, name))
        for split in ("train", "valid", "test"):
            samples = data.split(split)
            for name in _SAMPLE_ARRAYS:
                np.save(tmp / f"{split}.{name}.npy", getattr(samples, name))
            if samples.candidates is not None:
                np.save(tmp / f"{split}.candidates.npy", samples.candidates)
                np.save(tmp / f"{split}.label.npy", samples.label)
        keys = {"user_keys": data.user_keys, "item_keys": data.item_keys, "titles": data.titles,
                "descriptions": data.descriptions}
        (tmp / "keys.json").write_text(json.dumps(keys), encoding="utf-8")
        (tmp / RECIPE).write_text(json.dumps({"format": FORMAT, "recipe": recipe, "stats": stats}, indent=1) + "\n",
                                  encoding="utf-8")


def load_split(path: str | os.PathLike, recipe: dict[str, Any]) -> SequenceData:
    """The split prepared in ``path``, its arrays memory-mapped; refused (ValueError naming what differs) unless it
    was prepared from ``recipe``."""
    path = Path(path)
    if not (path / RECIPE).is_file():
        raise ValueError(f"{path}: no prepared split (no {RECIPE}); write one with python -m speeder_rt.data prepare "
                         f"--data {recipe['source']} --out {path} (and the split options of this run)")
    written = json.loads((path / RECIPE).read_text(encoding="utf-8"))
    if written.get("format") != FORMAT:
        raise ValueError(f"{path / RECIPE}: format {written.get('format')!r}, this version reads {FORMAT}; prepare "
                         "the split again")
    differs = _differences(written.get("recipe", {}), recipe)
    if differs:
        raise ValueError(f"{path}: the prepared split differs from this run's data ({'; '.join(differs)}); prepare "
                         "it again for this run or point data.prepared elsewhere")
    load = lambda name: np.load(path / f"{name}.npy", mmap_mode="r", allow_pickle=False)  # noqa: E731
    keys = json.loads((path / "keys.json").read_text(encoding="utf-8"))
    cfg = SplitConfig(**recipe["split"])
    items = load("items")

    def samples(split: str) -> Samples:
        part = Samples(*(load(f"{split}.{n}") for n in _SAMPLE_ARRAYS), items=items, width=cfg.history_len)
        if (path / f"{split}.candidates.npy").is_file():
            part.candidates, part.label = load(f"{split}.candidates"), load(f"{split}.label")
        return part

    return SequenceData(num_items=len(keys["item_keys"]), user_keys=keys["user_keys"], item_keys=keys["item_keys"],
                        items=items, offsets=load("offsets"), seen=load("seen"), seen_offsets=load("seen_offsets"),
                        train=samples("train"), valid=samples("valid"), test=samples("test"), config=cfg,
                        titles=keys["titles"], descriptions=keys["descriptions"])


def _differences(written: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """``key: prepared X, wanted Y`` for each recipe entry (split options one by one) that differs."""
    out = []
    for key in sorted(set(written) | set(wanted)):
        a, b = written.get(key), wanted.get(key)
        if key == "split" and isinstance(a, dict) and isinstance(b, dict):
            out += [f"split.{k}: prepared {a.get(k)!r}, wanted {b.get(k)!r}" for k in sorted(set(a) | set(b))
                    if a.get(k) != b.get(k)]
        elif a != b:
            out.append(f"{key}: prepared {a!r:.200}, wanted {b!r:.200}")
    return out
