"""python -m speeder_rt.train --config FILE [--model speeder|text_baseline] [--resume RUN/KIND/last
[--resume-changed-config]]

Under ``torchrun`` (e.g. ``torchrun --standalone --nproc_per_node 2 -m speeder_rt.train --config FILE``) it is one
training over all ranks (``speeder_rt.train.distributed``): rank 0 builds the item table and writes every file,
the other ranks read the table once it is there.

Exit status: 0 trained (or nothing left to train); 1 training diverged or a checkpoint could not be written; 2 bad
input (config, data, checkpoint); 128 + signal (143 SIGTERM, 130 SIGINT) stopped by a signal, after writing last/
at the step in flight (``speeder_rt.train.faults``). Each early stop prints one line on rank 0, no traceback.
"""
from __future__ import annotations

import argparse
import json
import signal
import sys

from speeder_rt.data import ItemTable, SequenceData
from speeder_rt.model.pretrained import ITEMS, check_model_dir
from speeder_rt.train.config import RunConfig, load_run_config
from speeder_rt.train.data import item_cache, load_sequences, prepare
from speeder_rt.train.distributed import World, barrier, close_world, init_world
from speeder_rt.train.faults import Preempted, TrainingStopped
from speeder_rt.train.kinds import MODEL_KINDS, SPEEDER
from speeder_rt.train.trainer import Trainer, check_table_fits


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m speeder_rt.train", description="Train Speeder or the text-item baseline.")
    parser.add_argument("--config", required=True, help="run configuration YAML (see configs/)")
    parser.add_argument("--model", default=SPEEDER.name, choices=MODEL_KINDS)
    parser.add_argument("--resume", help="a run's last/ directory (<out_dir>/<model>/last) to continue from")
    parser.add_argument("--resume-changed-config", action="store_true",
                        help="resume even though the config differs from the checkpoint's (each change is printed)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.resume_changed_config and not args.resume:
        parser.error("--resume-changed-config needs --resume")
    try:
        cfg = load_run_config(args.config)
        cfg.train.apply_process_settings()
        world = init_world(cfg.train.device)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        return _train(args, cfg, world)
    except KeyboardInterrupt:  # before training started (during it, SIGINT stops at a step: Preempted)
        print("stopped by SIGINT before training started; no checkpoint was written", file=sys.stderr)
        return 128 + signal.SIGINT
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
            trainer.resume(resume, allow_changed_config=args.resume_changed_config)
            barrier(world)  # every rank has read last/ before rank 0 may rewrite it
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    best = (resume.parent if trainer.complete else trainer.out) / "best"  # a finished run's own best/
    try:
        with trainer.stop_request.installed():
            metrics = trainer.run()
    except TrainingStopped as e:  # raised on every rank at the same step
        if world.is_main:
            print(e if isinstance(e, Preempted) else f"error: {e}", file=sys.stderr)
        return e.status
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
