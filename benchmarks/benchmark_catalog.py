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

``--recommender``: ``Recommender.topk`` end to end on an ``--items``-item synthetic export. A tiny random Speeder
(1,000 items, token width 64) is exported to ONNX with an index (``export_model(index="flat")``: the query graph);
then a seeded clustered table of ``--items`` rows becomes item-table version 2 with an IVF index, its search effort
tuned to ``--recall-target`` on the query graph's vectors of ``--tune-queries`` seeded random histories over that
table (``speeder_rt.export.index.tuning_queries``, as the exporter does). Measured on other random histories (1 to
12 items): ``topk(k=10)`` at batch 1 and 16 through the index (query graph + ``ItemIndex.search``) and through the
exact top-k graph (the same ``Recommender`` with ``index = None``: what an export without an index runs), the
query graph alone, and recall@10 of the index path against the exact one. ONNX Runtime and FAISS each run 1
thread.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from collections.abc import Callable
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


def recommender_topk(items: int, recall_target: float, tune_queries: int, queries: int, rounds: int,
                     efforts: list[int]) -> dict[str, object]:
    """``Recommender.topk`` through an IVF index vs the exact top-k graph on an ``items``-item synthetic export;
    ``efforts``: also recall@10 and batch-1 latency at these ``nprobe`` values (``row["sweep"]``)."""
    from speeder_rt.data import SyntheticConfig, generate_synthetic
    from speeder_rt.export.exporter import export_model
    from speeder_rt.export.format import Ranges
    from speeder_rt.export.index import tuning_queries
    from speeder_rt.model import BackboneConfig, SpeederConfig, SpeederModel
    from speeder_rt.runtime import Recommender
    from speeder_rt.runtime.recommender import pad_histories

    _, table = generate_synthetic(SyntheticConfig(n_items=1000, n_users=20, seed=3))
    model = SpeederModel(SpeederConfig(backbone=BackboneConfig(shape="tiny"), d_expert=32, max_history=12,
                                       modalities=["text", "image"]), table).eval()
    ranges = Ranges(max_batch=16, max_history=12, max_candidates=8)
    row: dict[str, object] = {"items": items, "mode": "recommender", "engine": "onnx", "threads": 1}
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        export = Path(tmp) / "export"
        start = time.perf_counter()
        export_model(model, "onnx", export, ranges=ranges, topk=K, device="cpu", index="flat", log=lambda *_: None)
        row["export_s"] = round(time.perf_counter() - start, 1)
        rec = Recommender.load(export, threads=1)
        tokens, _ = clustered_catalog(items, model.hidden_size, 0, seed=0)
        row["dim"] = model.hidden_size
        start = time.perf_counter()
        rec.runner.set_item_tokens(tokens)  # the query graph's vectors over the new table: the tuning set
        tune = tuning_queries(rec.runner, items, ranges, count=tune_queries, seed=0)
        index = ItemIndex.build(tokens, "ivf", recall_target=recall_target, tune_queries=tune)
        row["index_build_s"] = round(time.perf_counter() - start, 1)
        row["params"] = dict(index.params)
        write_item_tokens(export, tokens, version=2, index=index)
        del index, tune
        rec.reload_items()
        rng = np.random.default_rng(1)
        histories = [rng.choice(items, size=rng.integers(1, ranges.max_history + 1), replace=False).tolist()
                     for _ in range(queries)]
        got, _ = rec.topk(histories, k=K)
        served = rec.index
        rec.index = None  # the exact top-k graph: what Recommender.topk runs for an export without an index
        want, _ = rec.topk(histories, k=K)
        row["recall@10"] = round(recall(got, want), 4)
        for name, index_used, call_rounds in (("ann", served, rounds), ("exact", None, max(5, rounds // 10))):
            rec.index = index_used
            for batch in (1, 16):
                row[f"{name}_batch{batch}_ms"] = round(_median_call_ms(
                    lambda rows: rec.topk(rows, k=K), histories, batch, call_rounds), 3)
        for batch in (1, 16):
            row[f"query_graph_batch{batch}_ms"] = round(_median_call_ms(
                lambda rows: rec.runner.query(*pad_histories([np.asarray(h) for h in rows])), histories, batch,
                rounds), 3)
        rec.index, sweep = served, []
        for effort in efforts:
            served.set_search_effort(effort)
            got, _ = rec.topk(histories, k=K)
            sweep.append({"nprobe": effort, "recall@10": round(recall(got, want), 4), "batch1_ms": round(
                _median_call_ms(lambda rows: rec.topk(rows, k=K), histories, 1, rounds), 3)})
        row["sweep"] = sweep
    row["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    row["faiss"] = faiss.__version__
    row["load_average_1m"] = round(os.getloadavg()[0], 1)
    return row


def _median_call_ms(call: Callable[[list[list[int]]], object], histories: list[list[int]], batch: int,
                    rounds: int) -> float:
    """Median wall time of ``rounds`` calls on ``batch`` distinct histories each (after one warm-up)."""
    call(histories[:batch])
    times = []
    for r in range(rounds):
        rows = histories[(r * batch) % (len(histories) - batch + 1):][:batch]
        start = time.perf_counter()
        call(rows)
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1e3)


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
    parser.add_argument("--recommender", action="store_true", help="Recommender.topk end to end instead (see above)")
    parser.add_argument("--rounds", type=int, default=200, help="--recommender: latency rounds of the ANN path")
    args = parser.parse_args()
    if args.recommender:
        faiss.omp_set_num_threads(1)
        row = recommender_topk(args.items, args.recall_target, args.tune_queries, args.queries, args.rounds,
                               [int(e) for e in filter(None, args.effort_sweep.split(","))])
        print(json.dumps(row), flush=True)
        print(f"| {args.items:,} x {row['dim']} | {row['params']} | {row['ann_batch1_ms']} | {row['ann_batch16_ms']} | "
              f"{row['exact_batch1_ms']} | {row['exact_batch16_ms']} | {row['query_graph_batch1_ms']} | "
              f"{row['query_graph_batch16_ms']} | {row['recall@10']} | {row['peak_rss_gib']} GiB |",
              file=sys.stderr, flush=True)
        return
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
