"""`make demo`: build the default data, train and evaluate the models, print one metrics table.

``python -m speeder_rt.demo [--data synthetic|movielens|DIR|FILE.csv] [--epochs N]``
"""
from __future__ import annotations

import argparse
import time

from speeder_rt.baselines.sasrec import SASRecConfig, train_sasrec
from speeder_rt.baselines.simple import PopularityScorer, RandomScorer
from speeder_rt.data import SplitConfig, build_sequences, generate_synthetic
from speeder_rt.data.interactions import Interactions
from speeder_rt.eval.metrics import format_table
from speeder_rt.eval.protocol import evaluate

COLUMNS = ["HR@1", "HR@5", "NDCG@10", "MRR", "train_s"]


def load_interactions(spec: str) -> Interactions:
    if spec == "synthetic":
        return generate_synthetic()[0]
    from speeder_rt.data import loaders

    if spec == "movielens":
        from speeder_rt.data.assets import movielens_100k

        return loaders.load_movielens(movielens_100k())
    if spec.endswith(".csv"):
        return loaders.load_csv(spec)
    return loaders.load_movielens(spec)


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(prog="python -m speeder_rt.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="synthetic", help="synthetic (default), movielens, a MovieLens dir or a CSV")
    parser.add_argument("--epochs", type=int, default=SASRecConfig.epochs, help="SASRec epochs")
    parser.add_argument("--history-len", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    inter = load_interactions(args.data)
    data = build_sequences(inter, SplitConfig(history_len=args.history_len, seed=args.seed, short_users="drop"))
    print(f"data: {inter.source}: {len(data.sequences)} users, {data.num_items} items, {len(inter)} interactions; "
          f"{len(data.train)} train samples, {len(data.test)} test users, {data.config.num_candidates} candidates")

    rows: dict[str, dict[str, float]] = {}
    start = time.perf_counter()
    sasrec = train_sasrec(data, SASRecConfig(epochs=args.epochs, seed=args.seed))
    rows["SASRec"] = {**evaluate(sasrec, data, "test"), "train_s": round(time.perf_counter() - start, 1)}
    rows["popularity"] = {**evaluate(PopularityScorer(data), data, "test"), "train_s": 0.0}
    rows["random"] = {**evaluate(RandomScorer(data.num_items, args.seed), data, "test"), "train_s": 0.0}
    print(f"\ntest split, {data.config.num_candidates} candidates (LLaRA protocol):")
    print(format_table(rows, COLUMNS))
    return rows


if __name__ == "__main__":
    main()
