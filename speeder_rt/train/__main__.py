"""python -m speeder_rt.train --config FILE [--model speeder|text_baseline] [--resume RUN/KIND/last]

Under ``torchrun`` (e.g. ``torchrun --standalone --nproc_per_node 2 -m speeder_rt.train --config FILE``) it is one
training over all ranks (``speeder_rt.train.distributed``): rank 0 builds the item table and writes every file,
the other ranks read the table once it is there.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from speeder_rt.data import ItemTable, SequenceData
from speeder_rt.model.pretrained import ITEMS, check_model_dir
from speeder_rt.train.config import RunConfig, load_run_config
from speeder_rt.train.data import item_cache, load_sequences, prepare
from speeder_rt.train.distributed import World, barrier, close_world, init_world
from speeder_rt.train.trainer import MODEL_KINDS, Trainer, check_table_fits


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m speeder_rt.train", description="Train Speeder or the text-item baseline.")
    parser.add_argument("--config", required=True, help="run configuration YAML (see configs/)")
    parser.add_argument("--model", default="speeder", choices=MODEL_KINDS)
    parser.add_argument("--resume", help="a run's last/ directory (<out_dir>/<model>/last) to continue from")
    args = parser.parse_args(argv)
    try:
        cfg = load_run_config(args.config)
        cfg.train.apply_process_settings()
        world = init_world(cfg.train.device)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        return _train(args, cfg, world)
    finally:
        close_world(world)


def _train(args: argparse.Namespace, cfg: RunConfig, world: World) -> int:
    try:
        if args.resume:  # the checkpoint's own item table: no feature is rebuilt
            resume = check_model_dir(args.resume)
            _, data = load_sequences(cfg)
            table = ItemTable.load(resume / ITEMS)
            check_table_fits(data, table, resume)
        else:
            data, table = _prepare(cfg, world)
        trainer = Trainer(args.model, cfg, data, table, world=world)
        if args.resume:
            trainer.resume(resume)
            barrier(world)  # every rank has read last/ before rank 0 may rewrite it
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    best = (resume.parent if trainer.complete else trainer.out) / "best"  # a finished run's own best/
    metrics = trainer.run()
    if world.is_main:
        print(json.dumps({"checkpoint": str(best), "last_valid": metrics}, indent=2))
    return 0


def _prepare(cfg: RunConfig, world: World) -> tuple[SequenceData, ItemTable]:
    """Sequences and item table; under torchrun rank 0 builds (and caches) the table while the others wait, then
    they read the cache it wrote."""
    if world.is_main:
        prepared = prepare(cfg)
    barrier(world)
    if world.is_main:
        return prepared
    _, data = load_sequences(cfg)
    return data, ItemTable.load(item_cache(cfg))


if __name__ == "__main__":
    sys.exit(main())
