"""python -m speeder_rt.eval --checkpoint MODEL_DIR [--split test|valid] [--full-catalog] [--out FILE.json]

MODEL_DIR is a model directory a run wrote (``<out_dir>/<model>/best`` or ``last``). Only it is read: the model
from its files, the data split rebuilt from its recorded recipe; nothing is trained or cached.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from speeder_rt.eval.metrics import format_table
from speeder_rt.utils.io import write_json


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m speeder_rt.eval", description="Evaluate a trained model directory.")
    parser.add_argument("--checkpoint", required=True, help="a model directory (e.g. runs/demo/speeder/best)")
    parser.add_argument("--split", default="test", choices=["test", "valid"])
    parser.add_argument("--full-catalog", action="store_true", help="rank against every item instead of 20 candidates")
    parser.add_argument("--out", help="metrics JSON (default: beside the model directory, "
                                      "<checkpoint>_metrics_<split>[_full_catalog].json)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from speeder_rt.train.kinds import kind_of
    from speeder_rt.train.trainer import load_trained

    try:
        model_kind = kind_of(args.checkpoint)
        if args.full_catalog and model_kind.full_catalog_refusal:
            raise ValueError(model_kind.full_catalog_refusal)
        model, cfg, data, _, kind = load_trained(args.checkpoint)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    metrics = model_kind.evaluate(model, data, args.split, args.full_catalog)
    mode = "full catalog" if args.full_catalog else f"{data.config.num_candidates} candidates"
    print(f"{kind} on {args.split} ({mode}, {len(data.split(args.split))} users):")
    columns = [c for c in ("VHR@1", "HR@1", "HR@5", "NDCG@10", "MRR", "valid_ratio") if c in metrics]
    print(format_table({kind: metrics}, columns))
    suffix = "_full_catalog" if args.full_catalog else ""
    checkpoint = Path(args.checkpoint)
    out = Path(args.out) if args.out else checkpoint.with_name(f"{checkpoint.name}_metrics_{args.split}{suffix}.json")
    write_json(out, {"checkpoint": str(checkpoint.resolve()), "split": args.split, "mode": mode, "metrics": metrics})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
