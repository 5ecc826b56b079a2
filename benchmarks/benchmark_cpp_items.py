"""The C++ runtime on a grown item table: how long ``reload_items`` takes to switch to a version of ``--items`` rows,
and full-catalog top-5 at batch 1 on it, C++ (``CppRecommender``) beside the Python ``Recommender`` on the same
AOTInductor export.

A tiny untrained Speeder (hidden 64, 120 items) is exported to AOTInductor on the CPU; version 2 of its item table
appends random rows up to ``--items``. Reload times are the median of ``--reloads`` switches per runtime (each to a
new version of the same table, written before the timer starts); the Python reload also verifies the sha256, the
C++ one does not (docs/cpp.md). Top-5 latency (the contract model's k): median of ``--queries`` single-user calls
after 5 untimed ones, one torch thread.

Run: ``python benchmarks/benchmark_cpp_items.py --items 1000000`` (needs the built extension: make test); one JSON
line on stdout.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from bad_requests import RANGES, TOPK, contract_model  # the contract tests' tiny model

from speeder_rt.export.exporter import export_model
from speeder_rt.export.items import read_item_tokens, write_item_tokens
from speeder_rt.runtime import Recommender
from speeder_rt.runtime.cpp import CppRecommender


def median_s(step, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--reloads", type=int, default=5)
    parser.add_argument("--queries", type=int, default=50)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        export = Path(tmp) / "aoti"
        export_model(contract_model(), "aoti", export, ranges=RANGES, topk=TOPK, device="cpu", log=lambda *_: None)
        base = read_item_tokens(export).tokens
        extra = np.random.default_rng(0).normal(scale=float(base.std()), size=(args.items - len(base), base.shape[1]))
        table = np.concatenate([base, extra.astype(base.dtype)])
        cpp, python = CppRecommender.load(export), Recommender.load(export)
        result = {"items": args.items, "dim": int(base.shape[1]), "table_mb": round(table.nbytes / 2**20, 1)}
        version = 1
        for name, rec in (("cpp", cpp), ("python", python)):
            seconds = []
            for _ in range(args.reloads):
                version += 1
                write_item_tokens(export, table, version=version)
                start = time.perf_counter()
                assert rec.reload_items()
                seconds.append(time.perf_counter() - start)
            result[f"{name}_reload_s"] = round(sorted(seconds)[len(seconds) // 2], 3)
        rng = np.random.default_rng(1)
        histories = [[list(rng.integers(0, args.items, size=5))] for _ in range(args.queries + 5)]
        for name, rec in (("cpp", cpp), ("python", python)):
            for history in histories[:5]:
                rec.topk(history, k=TOPK)
            queries = iter(histories[5:])
            step = lambda rec=rec, queries=queries: rec.topk(next(queries), k=TOPK)  # noqa: E731
            result[f"{name}_top5_batch1_ms"] = round(1000 * median_s(step, args.queries), 2)
        print(json.dumps(result))


if __name__ == "__main__":
    main()
