"""python -m speeder_rt.train --config FILE [--model speeder|text_baseline] [--resume CKPT]"""
from __future__ import annotations

import argparse
import json
import sys

from speeder_rt.train.config import load_run_config
from speeder_rt.train.data import prepare
from speeder_rt.train.trainer import MODEL_KINDS, Trainer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m speeder_rt.train", description="Train Speeder or the text-item baseline.")
    parser.add_argument("--config", required=True, help="run configuration YAML (see configs/)")
    parser.add_argument("--model", default="speeder", choices=MODEL_KINDS)
    parser.add_argument("--resume", help="a last.pt checkpoint to continue from")
    args = parser.parse_args(argv)
    try:
        cfg = load_run_config(args.config)
        data, table = prepare(cfg)
        trainer = Trainer(args.model, cfg, data, table)
        if args.resume:
            trainer.resume(args.resume)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    metrics = trainer.run()
    print(json.dumps({"checkpoint": str(trainer.out / "best.pt"), "last_valid": metrics}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
