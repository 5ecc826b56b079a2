"""python -m speeder_rt.data prepare --data SOURCE --out DIR [--history-len N] [--num-candidates K]
[--min-interactions M] [--max-train-samples-per-user C] [--kcore K] [--seed S]

Reads the source once, splits it and writes the split to DIR (``speeder_rt.data.prepared``: memory-mappable
arrays and a JSON recipe, atomically); prints rows, users, items, samples, seconds and peak RSS. A run reads it
with ``data.prepared: DIR`` in its config (the recipe must match the run's ``data.source`` and ``data.split``).
Short users are dropped, as in a run config's default split.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time

from speeder_rt.data.loaders import DataFormatError
from speeder_rt.data.prepared import save_split, split_recipe
from speeder_rt.data.sequences import SplitConfig, build_sequences
from speeder_rt.data.sources import SOURCES, load_source
from speeder_rt.utils.schema import ConfigError


def peak_rss_gb() -> float:
    """This process's peak resident set size in GB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m speeder_rt.data", description=__doc__.split("\n\n")[1])
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="split a source once and write it for runs to reuse")
    prep.add_argument("--data", required=True, help=f"the source: {SOURCES}")
    prep.add_argument("--out", required=True, help="directory to write the prepared split to (replaced)")
    prep.add_argument("--history-len", type=int, default=10)
    prep.add_argument("--num-candidates", type=int, default=20)
    prep.add_argument("--min-interactions", type=int, default=3)
    prep.add_argument("--max-train-samples-per-user", type=int, default=None)
    prep.add_argument("--kcore", type=int, default=0)
    prep.add_argument("--seed", type=int, default=0, help="the split's seed (a run's data.split.seed: its seed)")
    prep.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    try:
        split = SplitConfig(history_len=args.history_len, num_candidates=args.num_candidates,
                            max_train_samples_per_user=args.max_train_samples_per_user, kcore=args.kcore,
                            min_interactions=args.min_interactions, short_users="drop", seed=args.seed)
        recipe = split_recipe(args.data, split)
        inter, _ = load_source(args.data, progress=not args.no_progress)
        loaded = time.perf_counter()
        data = build_sequences(inter, split)
        stats = {"rows": len(inter), "users": len(data.user_keys), "items": data.num_items,
                 "samples": {s: len(data.split(s)) for s in ("train", "valid", "test")},
                 "load_s": round(loaded - start, 2), "split_s": round(time.perf_counter() - loaded, 2)}
        del inter
        save_split(data, recipe, args.out, stats)
    except (ConfigError, DataFormatError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    stats["seconds"] = round(time.perf_counter() - start, 2)
    stats["peak_rss_gb"] = round(peak_rss_gb(), 2)
    print(json.dumps({"prepared": args.out, **stats}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
