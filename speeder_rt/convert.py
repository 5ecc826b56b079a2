"""python -m speeder_rt.convert OLD.pt NEW_DIR --trust-pickle [--items DIR] [--force]

Turns a ``best.pt`` / ``last.pt`` of an earlier speeder_rt into a model directory (``speeder_rt.model.pretrained``;
a ``last.pt`` becomes a ``last/`` that ``--resume`` continues exactly). This is the one place in the package that
unpickles a file, and only with ``--trust-pickle``: unpickling can run any code the file carries. Even then it
uses ``torch.load(weights_only=True)``, which accepts only tensors and plain containers (what speeder_rt's
checkpoints held) and refuses a file that needs code.

The item table the checkpoint was trained with is read from ``--items`` (default: the ``table_dir`` the
checkpoint recorded, relative to the directory it was trained in) and checked against the feature buffers the
checkpoint holds. Relative paths in its config are resolved against the current directory: run the conversion
from the directory the run was trained in.
"""
from __future__ import annotations

import argparse
import math
import pickle
import sys
from pathlib import Path
from typing import Any

import torch

from speeder_rt.data import ItemTable
from speeder_rt.train.config import run_config_from_dict
from speeder_rt.train.kinds import kind_named
from speeder_rt.train.resume import ResumeState, named_optimizer_state, save_checkpoint
from speeder_rt.train.trainer import recorded_config

OLD_FIELDS = ("kind", "config", "model", "progress")


def convert(old: str | Path, new: str | Path, items: str | Path | None = None, force: bool = False,
            log=print) -> Path:
    """Write the model directory of pickled checkpoint ``old`` at ``new`` (see the module docstring)."""
    old, new = Path(old), Path(new)
    if not old.is_file():
        raise ValueError(f"{old}: not found")
    if new.exists() and not force:
        raise ValueError(f"{new} already exists (pass --force to replace it)")
    log(f"unpickling {old} (--trust-pickle) with torch.load(weights_only=True): tensors and plain containers only")
    ckpt = _unpickle(old)
    kind = ckpt["kind"]
    cfg = run_config_from_dict(ckpt["config"], f"{old}: config")
    items = Path(items) if items is not None else Path(ckpt.get("table_dir") or Path(cfg.out_dir) / "items")
    if not (items / "items.json").is_file():
        raise ValueError(f"{items}: no item table there (the one {old} was trained with); pass --items DIR")
    table = ItemTable.load(items)
    model = kind_named(kind).build(cfg, table, torch.device("cpu"))
    optimizer = None
    if "optimizer" in ckpt:  # the optimizer of the phase the run was in (the last one once it finished)
        phases = kind_named(kind).phases(cfg)
        phase = phases[min(ckpt["progress"]["phase"], len(phases) - 1)]
        optimizer = torch.optim.AdamW(kind_named(kind).phase_parameters(model, phase), lr=phase.lr,
                                      weight_decay=cfg.train.weight_decay)
    own = model.state_dict()
    for name in getattr(model, "item_table_buffers", dict)():
        if name in ckpt["model"] and not torch.equal(ckpt["model"][name], own[name]):
            raise ValueError(f"{items}: not the item table {old} was trained with (its buffer {name!r} differs); "
                             "pass --items DIR with that table")
    try:
        model.load_state_dict(ckpt["model"])
        if optimizer is not None:
            optimizer.load_state_dict(ckpt["optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:
        raise ValueError(f"{old}: does not fit the model its config describes ({e})") from None
    resume = None
    if optimizer is not None:
        progress = dict(ckpt["progress"])
        if not math.isfinite(progress.get("best_metric", 0.0)):
            progress["best_metric"] = None
        rng = {"cpu": ckpt["rng"]}
        rng.update((f"cuda:{i}", s) for i, s in enumerate(ckpt.get("cuda_rng") or []))
        resume = ResumeState(progress, named_optimizer_state(model, optimizer), ckpt["scheduler"], rng,
                             {"last_valid": {}, "intra_op_threads": None})
    out = save_checkpoint(new, model, run_config=recorded_config(cfg), resume=resume)
    log(f"wrote {out} ({kind}{', with resume state' if resume else ''})")
    return out


def _unpickle(old: Path) -> dict[str, Any]:
    try:
        ckpt = torch.load(old, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise ValueError(f"{old}: needs code to unpickle, which no speeder_rt checkpoint does; refused ({reason})") from None
    except Exception as e:  # noqa: BLE001 -- torch raises several types for truncated or foreign files
        raise ValueError(f"{old}: not a readable checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict) or not all(f in ckpt for f in OLD_FIELDS):
        raise ValueError(f"{old}: not a speeder_rt checkpoint (fields {list(OLD_FIELDS)} expected)")
    return ckpt


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m speeder_rt.convert",
                                     description="Convert a pickled best.pt / last.pt into a model directory.")
    parser.add_argument("old", help="the .pt checkpoint of an earlier speeder_rt")
    parser.add_argument("new", help="the model directory to write (atomically)")
    parser.add_argument("--trust-pickle", action="store_true",
                        help="unpickle OLD (with torch.load(weights_only=True)); only for a file you trust")
    parser.add_argument("--items", help="the item table directory it was trained with (default: the one it recorded)")
    parser.add_argument("--force", action="store_true", help="replace an existing NEW_DIR")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.trust_pickle:
        print(f"error: converting {args.old} means unpickling it, and unpickling runs whatever code the file carries; "
              "pass --trust-pickle only for a file you (or someone you trust) wrote", file=sys.stderr)
        return 2
    try:
        convert(args.old, args.new, args.items, args.force)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
