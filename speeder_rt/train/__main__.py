"""python -m speeder_rt.train --config FILE [--model speeder|text_baseline] [--resume RUN/KIND/last]"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from speeder_rt.data import ItemTable
from speeder_rt.model.pretrained import ITEMS, check_model_dir
from speeder_rt.train.config import load_run_config
from speeder_rt.train.data import load_sequences, prepare
from speeder_rt.train.trainer import MODEL_KINDS, Trainer, check_table_fits


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m speeder_rt.train", description="Train Speeder or the text-item baseline.")
    parser.add_argument("--config", required=True, help="run configuration YAML (see configs/)")
    parser.add_argument("--model", default="speeder", choices=MODEL_KINDS)
    parser.add_argument("--resume", help="a run's last/ directory (<out_dir>/<model>/last) to continue from")
    args = parser.parse_args(argv)
    try:
        cfg = load_run_config(args.config)
        cfg.train.apply_num_threads()
        if args.resume:  # the checkpoint's own item table: no feature is rebuilt
            resume = check_model_dir(args.resume)
            _, _, data = load_sequences(cfg)
            table = ItemTable.load(resume / ITEMS)
            check_table_fits(data, table, resume)
        else:
            data, table = prepare(cfg)
        trainer = Trainer(args.model, cfg, data, table)
        if args.resume:
            trainer.resume(resume)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    best = (resume.parent if trainer.complete else trainer.out) / "best"  # a finished run's own best/
    metrics = trainer.run()
    print(json.dumps({"checkpoint": str(best), "last_valid": metrics}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
