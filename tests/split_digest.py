"""Compact digests of a split (sha256 per array, a few shapes) and the split configurations they are frozen for.

``tests/data/split_digests.json`` holds the digests the row-by-row implementation produced (written once by
``python tests/split_digest.py``, before the columnar path replaced it); ``test_split_digests.py`` compares
the current implementation with them.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from speeder_rt.data import SequenceData
from speeder_rt.data.sequences import draw_candidates
from speeder_rt.study.rows import history_overrides
from speeder_rt.train.config import read_config_file, run_config_from_dict
from speeder_rt.train.data import load_sequences

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "data" / "split_digests.json"
SEEDS = (0, 1, 2)
TRAIN_DRAW_SEED = 12345


def cases() -> list[tuple[str, Any]]:
    """(name, RunConfig) of every frozen split: the MovieLens and demo configs, each seed, and the study's
    history-50 variant of the MovieLens config."""
    out = []
    for config in ("movielens", "demo"):
        raw = read_config_file(ROOT / "configs" / f"{config}.yaml")
        for seed in SEEDS:
            base = run_config_from_dict({**raw, "seed": seed})
            out.append((f"{config}/seed{seed}", base))
            if config == "movielens":
                long = history_overrides(base, 50)
                merged = {**raw, "seed": seed, "data": {**raw["data"], "split": {**raw["data"]["split"],
                                                                                  **long["data"]["split"]}},
                          "model": {**raw.get("model", {}), **long["model"]}}
                out.append((f"{config}-history50/seed{seed}", run_config_from_dict(merged)))
    return out


def _sha(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a, dtype=np.int64).tobytes()).hexdigest()


def digest(data: SequenceData) -> dict[str, Any]:
    """sha256 of every array of the split (as C-contiguous int64) and of the key lists, plus the shapes."""
    out: dict[str, Any] = {
        "num_items": data.num_items,
        "users": len(data.user_keys),
        "user_keys": hashlib.sha256("\n".join(data.user_keys).encode()).hexdigest(),
        "item_keys": hashlib.sha256("\n".join(data.item_keys).encode()).hexdigest(),
        "sequences": _sha(np.concatenate(data.sequences)),
        "sequence_lengths": _sha(np.array([len(s) for s in data.sequences])),
    }
    for name in ("train", "valid", "test"):
        s = data.split(name)
        part = {"samples": len(s), "history_shape": list(s.history.shape)}
        for field in ("users", "history", "history_len", "target", "candidates", "label"):
            value = getattr(s, field)
            if value is not None:
                part[field] = _sha(value)
        out[name] = part
    train = data.train.subset(slice(None))  # the trainer draws each epoch's training candidates like this
    draw_candidates(data, train, "train", TRAIN_DRAW_SEED)
    out["train"]["epoch_candidates"] = _sha(train.candidates)
    out["train"]["epoch_label"] = _sha(train.label)
    return out


def digests() -> dict[str, Any]:
    return {name: digest(load_sequences(cfg)[1]) for name, cfg in cases()}


if __name__ == "__main__":
    FIXTURE.write_text(json.dumps(digests(), indent=1, sort_keys=True) + "\n")
    print(f"wrote {FIXTURE}")
