"""Data path throughput: ``python -m speeder_rt.data prepare`` on synthetic interaction files of 1M, 5M and 30M rows.

The files (CSV ``user,item,timestamp,title`` and the same rows as Parquet) are generated once into
``data_cache/bench_data/`` (gitignored): users uniform, item popularity Zipf (exponent 1.1 over the catalog, ids
shuffled), timestamps uniform. Sizes: 1M rows (50k users, 100k items), 5M (250k, 500k), 30M (1M, 2M). Each case
runs the CLI in a fresh process (so its peak RSS is its own) with the default split (history 10, 20 candidates,
short users dropped) and reports its seconds (load + split + write), rows/s, the load and split parts, the CPU
seconds of the process (user + system: on a machine shared with other jobs, wall time also counts their share)
and the peak RSS. Goal on the 2-core machine: 30M in <= 60 s and <= 4 GB, 5M in <= 10 s.

    python benchmarks/benchmark_data.py [--sizes 1M,5M,30M] [--formats csv,parquet] [--nice 10] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "data_cache" / "bench_data"
SIZES = {"1M": (1_000_000, 50_000, 100_000), "5M": (5_000_000, 250_000, 500_000), "30M": (30_000_000, 1_000_000, 2_000_000)}
CHUNK_ROWS = 5_000_000


def generate(size: str) -> dict[str, Path]:
    """The CSV and Parquet files of ``size`` (written once, atomically: a half-written file never stays)."""
    rows, users, items = SIZES[size]
    paths = {"csv": CACHE / f"interactions_{size}.csv", "parquet": CACHE / f"interactions_{size}.parquet"}
    if all(p.is_file() for p in paths.values()):
        return paths
    CACHE.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    popularity = np.cumsum(1.0 / np.arange(1, items + 1) ** 1.1)
    item_of_rank = rng.permutation(items)
    tmp = paths["csv"].with_suffix(".csv.tmp")
    with open(tmp, "wb") as f:
        for start in range(0, rows, CHUNK_ROWS):
            n = min(CHUNK_ROWS, rows - start)
            rank = np.searchsorted(popularity, rng.random(n) * popularity[-1])
            item = item_of_rank[np.minimum(rank, items - 1)]
            chunk = pl.DataFrame({"user": rng.integers(0, users, n), "item": item,
                                  "timestamp": rng.integers(1_500_000_000, 1_700_000_000, n)})
            chunk = chunk.select(pl.format("u{}", "user").alias("user"), pl.format("i{}", "item").alias("item"),
                                 "timestamp", pl.format("Title of item {}", "item").alias("title"))
            chunk.write_csv(f, include_header=start == 0)
    os.replace(tmp, paths["csv"])
    tmp = paths["parquet"].with_suffix(".parquet.tmp")
    pl.scan_csv(paths["csv"], schema={"user": pl.String, "item": pl.String, "timestamp": pl.Int64,
                                      "title": pl.String}).sink_parquet(tmp)
    os.replace(tmp, paths["parquet"])
    return paths


def prepare(fmt: str, path: Path, nice: int) -> dict:
    """One ``prepare`` run in a fresh process: the CLI's JSON line plus the process's wall time."""
    out = Path(tempfile.mkdtemp(prefix="prepared_", dir=CACHE))
    cmd = ["nice", "-n", str(nice), sys.executable, "-m", "speeder_rt.data", "prepare", "--data", f"{fmt}:{path}",
           "--out", str(out / "split"), "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    start, before = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr[-2000:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "process_s": round(time.perf_counter() - start, 2),
            "cpu_s": round(cpu, 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1M,5M,30M", help=f"comma-separated of {', '.join(SIZES)}")
    parser.add_argument("--formats", default="csv,parquet")
    parser.add_argument("--nice", type=int, default=10, help="niceness of the prepare processes (default 10)")
    parser.add_argument("--json", help="write the results here as JSON")
    args = parser.parse_args(argv)
    results = []
    print(f"{'size':>5} {'format':>8} {'rows':>11} {'users':>9} {'items':>9} {'samples':>11} {'load s':>7} "
          f"{'split s':>7} {'total s':>7} {'CPU s':>7} {'rows/s':>11} {'peak RSS GB':>11}", flush=True)
    for size in args.sizes.split(","):
        paths = generate(size)
        for fmt in args.formats.split(","):
            r = prepare(fmt, paths[fmt], args.nice)
            r.update(size=size, format=fmt, rows_per_s=round(r["rows"] / r["seconds"]))
            results.append(r)
            print(f"{size:>5} {fmt:>8} {r['rows']:>11,} {r['users']:>9,} {r['items']:>9,} "
                  f"{sum(r['samples'].values()):>11,} {r['load_s']:>7.1f} {r['split_s']:>7.1f} {r['seconds']:>7.1f} "
                  f"{r['cpu_s']:>7.1f} "
                  f"{r['rows_per_s']:>11,} {r['peak_rss_gb']:>11.2f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
