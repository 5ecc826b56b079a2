"""Full-catalog top-10 over a synthetic clustered item-token catalog: exact vs FAISS ANN (speeder_rt.catalog).

For one catalog size per run (a fresh process, so the peak RSS is that size's), each index kind is built from
the same tokens and measured: build time, saved size (``ItemIndex.save``), top-10 latency at batch 1 and 16
(median over distinct queries), recall@10 against the exact answer on ``--queries`` queries, adding 1,000 items,
and the process's peak RSS at the end. Queries come from the catalog's own law (near a cluster centre;
``speeder_rt.catalog.synthetic``), not isotropic noise; the ANN search effort is tuned to ``--recall-target``
on ``--tune-queries`` other queries of that law (as a deployment tunes on held-out user states), not on the
measured ones: the target sits above the 0.95 goal to cover the gap between the two samples. FAISS runs
``--threads`` OpenMP threads (default 1: on a shared 2-core machine OpenMP's spinning threads measure the other
jobs more than the index).

Run: ``python benchmarks/benchmark_catalog.py --items 1000000`` (``--dim 64``; ``--kinds exact,hnsw,ivf``);
one JSON line per kind on stdout, a Markdown row each on stderr.

``--export-add``: instead, ``catalog add --export`` of 1,000 items to an export's item table of ``--items`` rows
(``add_export_items``: read + check the current version, write the next one, switch ``current.json``), median of
``--add-rounds`` adds (each a new version); the directory holds only ``items/``, as the add never opens the graphs.
Also the time a reader takes to load the new version (``read_item_tokens``: read, sha256, finite check), what a
served model spends between two batches when it switches (``Recommender.reload_items`` then binds it).
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

from speeder_rt.catalog import ItemIndex, recall
from speeder_rt.catalog.synthetic import clustered_catalog
from speeder_rt.export.add_items import add_export_items
from speeder_rt.export.items import read_item_tokens, write_item_tokens

K, ADDED = 10, 1000


def median_ms(index: ItemIndex, queries: np.ndarray, batch: int, rounds: int) -> float:
    """Median wall time of ``rounds`` searches of ``batch`` distinct queries each (after one warm-up)."""
    index.search(queries[:batch], K)
    times = []
    for r in range(rounds):
        rows = queries[(r * batch) % (len(queries) - batch + 1):][:batch]
        start = time.perf_counter()
        index.search(rows, K)
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1e3)


def saved_mib(index: ItemIndex) -> float:
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        index.save(Path(tmp) / "index")
        return sum(f.stat().st_size for f in (Path(tmp) / "index").iterdir()) / 2**20


def export_add(items: int, dim: int, rounds: int) -> dict[str, object]:
    """Seconds of adding ``ADDED`` items to an export's table of ``items`` rows (median and each of ``rounds``)."""
    tokens, _ = clustered_catalog(items, dim, 0, seed=0)
    new_tokens, _ = clustered_catalog(ADDED, dim, 0, seed=1)
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        write_item_tokens(tmp, tokens, version=1)
        del tokens
        times = []
        for _ in range(rounds):
            start = time.perf_counter()
            added = add_export_items(tmp, new_tokens)
            times.append(time.perf_counter() - start)
        start = time.perf_counter()
        read_item_tokens(tmp)
        read_s = time.perf_counter() - start
        size_mib = sum(f.stat().st_size for f in Path(tmp).rglob("*.npy")) / 2**20
    return {"items": items, "dim": dim, "added": ADDED, "add_s_median": round(float(np.median(times)), 3),
            "add_s": [round(t, 3) for t in times], "last_version": added.version, "read_new_version_s": round(read_s, 3),
            "items_mib_on_disk": round(size_mib, 1),
            "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, required=True)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--kinds", default="exact,hnsw,ivf")
    parser.add_argument("--queries", type=int, default=300, help="recall queries (and the latency pool)")
    parser.add_argument("--tune-queries", type=int, default=1000, help="held-out queries the ANN effort is tuned on")
    parser.add_argument("--recall-target", type=float, default=0.97, help="recall@10 the tuning aims at")
    parser.add_argument("--exact-rounds", type=int, default=20, help="latency rounds for the exact kind")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--effort-sweep", default="", help="also measure these search efforts (nprobe / efSearch), "
                        "comma-separated: recall@10 and batch-1 latency of each")
    parser.add_argument("--export-add", action="store_true", help="measure catalog add --export instead (see above)")
    parser.add_argument("--add-rounds", type=int, default=3)
    args = parser.parse_args()
    if args.export_add:
        row = export_add(args.items, args.dim, args.add_rounds)
        print(json.dumps(row), flush=True)
        print(f"| {args.items:,} x {args.dim} | {ADDED:,} | {row['add_s_median']} s ({row['add_s']}) | "
              f"{row['read_new_version_s']} s | "
              f"{row['items_mib_on_disk']} MiB | {row['peak_rss_gib']} GiB |", file=sys.stderr, flush=True)
        return
    faiss.omp_set_num_threads(args.threads)
    start = time.perf_counter()
    tokens, both = clustered_catalog(args.items, args.dim, args.queries + args.tune_queries, seed=0)
    queries, tune_queries = both[:args.queries], both[args.queries:]
    new_tokens, _ = clustered_catalog(ADDED, args.dim, 0, seed=1)
    print(f"catalog {args.items} x {args.dim}: {time.perf_counter() - start:.1f} s", file=sys.stderr)
    _, want = faiss.knn(queries, tokens, K, metric=faiss.METRIC_INNER_PRODUCT)  # the exact top-10, on the raw table
    for kind in args.kinds.split(","):
        start = time.perf_counter()
        index = ItemIndex.build(tokens, kind, recall_target=args.recall_target, tune_queries=tune_queries)
        built_s = time.perf_counter() - start
        _, got = index.search(queries, K)
        rounds = args.exact_rounds if kind == "exact" else 200
        row = {
            "items": args.items, "dim": args.dim, "kind": index.kind, "params": dict(index.params),
            "build_s": round(built_s, 2), "saved_mib": round(saved_mib(index), 1),
            "batch1_ms": round(median_ms(index, queries, 1, rounds), 3),
            "batch16_ms": round(median_ms(index, queries, 16, max(5, rounds // 4)), 3),
            "recall@10": round(recall(got, want), 4), "recall_target": args.recall_target, "threads": args.threads,
            "faiss": faiss.__version__,
        }
        start = time.perf_counter()
        index.add(new_tokens)
        row["add_1000_s"] = round(time.perf_counter() - start, 3)
        row["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
        for effort in filter(None, args.effort_sweep.split(",") if index.kind != "exact" else []):
            index.set_search_effort(int(effort))
            _, got = index.search(queries, K)
            sweep = {"items": args.items, "dim": args.dim, "kind": index.kind, "effort": int(effort),
                     "recall@10": round(recall(got, want), 4), "batch1_ms": round(median_ms(index, queries, 1, 100), 3)}
            print(json.dumps(sweep), flush=True)
            print(f"| {args.items:,} x {args.dim} | {index.kind} effort {effort} | {sweep['recall@10']} | "
                  f"{sweep['batch1_ms']} |", file=sys.stderr, flush=True)
        del index
        print(json.dumps(row), flush=True)
        print(f"| {args.items:,} x {args.dim} | {row['kind']} {row['params']} | {row['build_s']} | {row['saved_mib']} | "
              f"{row['batch1_ms']} | {row['batch16_ms']} | {row['recall@10']} | {row['add_1000_s']} | "
              f"{row['peak_rss_gib']} |", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
