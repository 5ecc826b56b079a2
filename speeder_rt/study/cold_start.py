"""The cold-start study: items never seen in training, added afterwards from their titles, against ID-based models.

For each seed:

1. a seeded ``fraction`` (10 %) of the catalog's items is *cold*. Ids are renumbered so that the warm items are
   ``0..W-1`` (in their order) and the cold ones ``W..N-1`` (the order ``catalog add`` gives them);
2. the *training view* is the interactions less every cold item's (so a cold item is no training target, no
   history item and no sampled negative of training, and SASRec never sees it), split by the run config's
   protocol (leave-one-out; users left with fewer than 3 interactions are dropped from training);
3. SASRec (the collaborative features and the SASRec row), the warm item table and each Speeder row are trained
   on the training view, Speeder at its best validation NDCG@10 checkpoint;
4. the cold items are added to that checkpoint with ``speeder_rt.catalog.add.add_items`` from their titles (MiniLM,
   the model's recipe) and no collaborative vector (the MoME's missing-modality path);
5. every model is evaluated on the test split of the *full view* (all interactions, all items, the config's
   candidates: the target plus never-interacted items, cold ones included), and the test users are split into
   those whose target is a cold item and the rest.

SASRec and popularity cannot score an id they never saw: a cold candidate scores -inf (ranked last; with the
protocol's pessimistic ties a cold target is never ranked above another cold candidate) and a cold item in a
history is left out of the window SASRec reads.

``DIR/results.json`` holds every finished run (config, metrics per group, training and wall seconds), rewritten
atomically after each; a second invocation runs only what is missing (``speeder_rt.study.runner``'s record).
``DIR/study.md`` is the table and findings. Command: ``python -m speeder_rt.study.cold_start --config CONFIG
--out DIR [--seeds 0,1,2]``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from speeder_rt.baselines.simple import PopularityScorer
from speeder_rt.catalog.add import add_items
from speeder_rt.data.interactions import Interactions
from speeder_rt.data.sequences import PAD, Samples, SequenceData, SplitConfig, build_sequences
from speeder_rt.data.sources import load_source
from speeder_rt.eval.metrics import ranking_metrics
from speeder_rt.eval.protocol import Scorer, sample_ranks
from speeder_rt.model.speeder import SpeederModel
from speeder_rt.study.report import stat
from speeder_rt.study.rows import FULL, Row, row_config, run_key, study_rows
from speeder_rt.study.runner import (
    check_recorded,
    exclusive,
    find_run,
    loss_summary,
    read_results,
    shared_sasrec,
)
from speeder_rt.train.config import RunConfig, read_config_file, run_config_from_dict
from speeder_rt.train.data import item_table
from speeder_rt.train.kinds import SPEEDER
from speeder_rt.train.trainer import Trainer
from speeder_rt.utils.io import atomic_path, write_json

COLD_FRACTION = 0.1
COLD_STREAM = 0xC01D  # the cold draw's own word of the seed sequence
GROUPS = ("cold", "warm")
COLUMNS = (("cold", "HR@1"), ("cold", "NDCG@10"), ("warm", "HR@1"), ("warm", "NDCG@10"))
TEXT_ONLY_ROW = "mrc_text"
ROW_LABELS = {"full": "Speeder text+collab", TEXT_ONLY_ROW: "Speeder text-only", "sasrec": "SASRec",
              "popularity": "popularity"}
ROWS = (TEXT_ONLY_ROW, "full", "sasrec", "popularity")
COLD_ITEMS_FILE = "cold_items.jsonl"
WITH_COLD = "best_with_cold"
BIAS_COLUMNS = ("cold_negative_rank", "warm_negative_rank", "top1_cold", "cold_negative_share")


# -- the split --------------------------------------------------------------------------------------------------
def check_fraction(fraction: float) -> None:
    if not 0 < fraction < 1:
        raise ValueError(f"--cold-fraction must be in (0, 1), got {fraction}")


def cold_items(num_items: int, fraction: float, seed: int) -> np.ndarray:
    """Sorted ids of ``round(fraction * num_items)`` (at least 1) items drawn without replacement, fixed by seed."""
    check_fraction(fraction)
    count = max(1, round(fraction * num_items))
    return np.sort(np.random.default_rng([seed, COLD_STREAM]).choice(num_items, size=count, replace=False))


@dataclass
class ColdSplit:
    """``full``: every interaction and item, warm ids ``0..num_warm-1`` then cold ones (its test split is the
    one evaluated); ``train``: the warm items' interactions only, over ids ``0..num_warm-1``."""

    full: SequenceData
    train: SequenceData
    num_warm: int

    @property
    def cold_keys(self) -> list[str]:
        return self.full.item_keys[self.num_warm:]

    def cold_target(self) -> np.ndarray:
        """bool [test users]: the test target is a cold item."""
        return self.full.test.target >= self.num_warm


def cold_split(inter: Interactions, split: SplitConfig, fraction: float, seed: int) -> ColdSplit:
    """The two views of ``inter`` with a seeded ``fraction`` of its items cold (see the module docstring)."""
    cold = cold_items(inter.num_items, fraction, seed)
    is_cold = np.zeros(inter.num_items, dtype=bool)
    is_cold[cold] = True
    order = np.r_[np.flatnonzero(~is_cold), cold]  # new id -> old id
    new_id = np.empty(inter.num_items, dtype=np.int64)
    new_id[order] = np.arange(inter.num_items)
    keys = [inter.item_keys[i] for i in order]
    titles = [inter.titles[i] for i in order]
    descriptions = [inter.descriptions[i] for i in order]
    items = new_id[inter.items]
    full = Interactions(inter.users, items, inter.timestamps, inter.user_keys, keys, titles, descriptions,
                        inter.source)
    num_warm = inter.num_items - len(cold)
    warm = items < num_warm
    train = Interactions(inter.users[warm], items[warm], inter.timestamps[warm], inter.user_keys, keys[:num_warm],
                         titles[:num_warm], descriptions[:num_warm], f"{inter.source} less its cold items")
    return ColdSplit(build_sequences(full, split), build_sequences(train, dataclasses.replace(split, short_users="drop")),
                     num_warm)


class WarmOnly:
    """A scorer of the warm ids ``0..num_warm-1`` on samples of the full view: a cold item in a history is left out
    (the window holds the warm ones, in order), a cold candidate scores -inf. Candidate mode only."""

    def __init__(self, inner: Scorer, num_warm: int) -> None:
        self.inner, self.num_warm = inner, num_warm

    def score(self, samples: Samples, candidates: torch.Tensor | None) -> torch.Tensor:
        if candidates is None:
            raise ValueError("WarmOnly scores candidate lists only (a full-catalog ranking would rank cold items)")
        history = samples.history
        warm = (history >= 0) & (history < self.num_warm)
        order = np.argsort(~warm, axis=1, kind="stable")  # the warm items first, in their order
        compact = np.take_along_axis(np.where(warm, history, PAD), order, axis=1)
        width = history.shape[1]
        count = warm.sum(axis=1).astype(np.int64)
        # row r of the new items array: its warm items, then PAD; the (unused) target right after the last warm one
        items = np.concatenate([compact, np.zeros((len(compact), 1), dtype=np.int64)], axis=1).reshape(-1)
        end = np.arange(len(compact), dtype=np.int64) * (width + 1) + count
        warm_samples = Samples(samples.users, end, count, items, width)
        cold = candidates >= self.num_warm
        scores = self.inner.score(warm_samples, candidates.masked_fill(cold, 0)).double()
        return scores.masked_fill(cold, float("-inf"))


def grouped_metrics(ranks: np.ndarray, cold_target: np.ndarray) -> dict[str, dict[str, float]]:
    """Ranking metrics of the users whose target is cold, of the rest, and of all."""
    return {"cold": ranking_metrics(ranks[cold_target]), "warm": ranking_metrics(ranks[~cold_target]),
            "all": ranking_metrics(ranks)}


def cold_jsonl(split: ColdSplit, path: Path) -> Path:
    """The cold items as ``catalog add`` input: key, title and description (no features: text from the title)."""
    full = split.full
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps({"item": full.item_keys[i], "title": full.titles[i],
                                           "description": full.descriptions[i]}) + "\n"
                               for i in range(split.num_warm, full.num_items)), encoding="utf-8")
    return path


# -- runs -------------------------------------------------------------------------------------------------------
@dataclass
class ColdStudy:
    raw: dict[str, Any]
    where: str
    rows: list[Row]
    seeds: list[int]
    out: Path
    fraction: float = COLD_FRACTION

    def seed_dir(self, seed: int) -> Path:
        return self.out / f"seed{seed}"

    def config(self, row: Row, seed: int) -> RunConfig:
        return row_config(self.raw, row, seed, self.seed_dir(seed) / row.id, self.where)

    def seed_config(self, seed: int) -> RunConfig:
        """The seed's shared inputs' config (its item table is cached in the seed's directory)."""
        return row_config(self.raw, FULL, seed, self.seed_dir(seed), self.where)

    def model_with_cold(self, row: Row, seed: int) -> Path:
        """The Speeder row's best/ checkpoint with the cold items added."""
        return Path(self.config(row, seed).out_dir) / SPEEDER.name / WITH_COLD

    def split(self, seed: int) -> ColdSplit:
        cfg = self.seed_config(seed)
        inter, _ = load_source(cfg.data.source, cfg.data.synthetic, progress=cfg.train.progress)
        return cold_split(inter, cfg.data.split, self.fraction, seed)

    def key(self, row: Row, seed: int) -> dict[str, Any]:
        return {**run_key(self.config(row, seed), row.kind), "cold_fraction": self.fraction}


def plan(raw: dict[str, Any], where: str, out: str | Path, seeds: list[int],
         fraction: float = COLD_FRACTION) -> ColdStudy:
    """The study of a parsed run config (rows: Speeder text-only and text+collab, SASRec, popularity), every row's
    config checked for every seed before anything runs."""
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise ValueError(f"--seeds: distinct integers >= 0 expected, got {seeds}")
    check_fraction(fraction)
    base = run_config_from_dict(raw, where)
    missing = [m for m in ("text", "collab") if m not in base.model.modalities]
    if missing or base.data.text_features != "minilm":
        raise ValueError(f"{where}: the cold-start study needs model.modalities with text and collab (missing "
                         f"{missing}) and data.text_features: minilm (the text cold items are added from)")
    selection = study_rows(raw, base, list(ROWS), where)
    study = ColdStudy(dict(raw), where, selection.rows, list(seeds), Path(out), fraction)
    for seed in seeds:
        for row in study.rows:
            study.config(row, seed)
    return study


def seed_inputs(study: ColdStudy, seed: int, log) -> tuple[ColdSplit, Any, Any, dict[str, Any]]:
    """(the seed's split, its warm item table, SASRec trained on the training view, SASRec's facts)."""
    cfg = study.seed_config(seed)
    split = study.split(seed)
    sasrec, facts = shared_sasrec(study.seed_dir(seed) / "sasrec", split.train, cfg, log)
    table = item_table(cfg, split.train, None, sasrec=sasrec, log=log)
    if table.item_keys != split.train.item_keys:
        raise ValueError(f"{study.seed_dir(seed) / 'items'}: an item table of other warm items (another cold "
                         "fraction?): use another --out, or delete the directory to start over")
    return split, table, sasrec, facts


def run_row(study: ColdStudy, row: Row, seed: int, inputs, log) -> dict[str, Any]:
    """One (row, seed): its grouped test metrics and seconds."""
    split, table, sasrec, facts = inputs
    cold_target = split.cold_target()
    start = time.perf_counter()
    if row.trains_speeder:
        cfg = study.config(row, seed)
        trainer = Trainer(SPEEDER.name, cfg, split.train, table, log=log)
        trainer.run()
        train_s = time.perf_counter() - start
        jsonl = cold_jsonl(split, study.seed_dir(seed) / COLD_ITEMS_FILE)
        added = add_items(trainer.out / "best", jsonl, study.model_with_cold(row, seed))
        model = SpeederModel.from_pretrained(added.model_dir)
        if model.item_table.item_keys != split.full.item_keys:
            raise RuntimeError("the model's ids after the add differ from the full view's")  # a bug, not an input
        ranks = sample_ranks(model, split.full, "test", batch_size=cfg.train.eval_batch_size)
        outcome = {"train_s": train_s, **loss_summary(trainer.step_losses)}
    else:
        inner = sasrec if row.kind == "sasrec" else PopularityScorer(split.train)
        ranks = sample_ranks(WarmOnly(inner, split.num_warm), split.full, "test")
        outcome = ({k: facts[k] for k in ("train_s", "steps", "loss_first", "loss_last", "loss_window")}
                   if row.kind == "sasrec" else {"train_s": 0.0, **loss_summary([])})
    return {"metrics": grouped_metrics(ranks, cold_target), **outcome, "wall_s": time.perf_counter() - start,
            "users": {"cold": int(cold_target.sum()), "warm": int((~cold_target).sum())},
            "items": {"cold": split.full.num_items - split.num_warm, "warm": split.num_warm}}


@torch.no_grad()
def candidate_bias(scorer: Scorer, split: ColdSplit, batch_size: int = 256) -> dict[str, float]:
    """How a model ranks cold items that are negatives, on the candidate lists of the users whose target is warm
    (every cold candidate there is a negative): the mean rank (0 = top of the list) of a cold negative and of a warm
    negative, the share of lists whose top candidate is a cold negative, and the share of cold items among the
    negatives (what that share would be if a model ranked cold and warm negatives alike)."""
    test = split.full.test
    lists = np.flatnonzero(~split.cold_target())
    sums = dict.fromkeys(("cold_rank", "cold", "warm_rank", "warm", "top1_cold"), 0.0)
    for a in range(0, len(lists), batch_size):
        part = test.subset(lists[a : a + batch_size])
        candidates = torch.from_numpy(part.candidates)
        order = scorer.score(part, candidates).double().argsort(dim=1, descending=True, stable=True)
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1]).expand_as(order))
        negative = torch.ones_like(candidates, dtype=torch.bool)
        negative[torch.arange(len(part)), torch.from_numpy(part.label)] = False
        cold = (candidates >= split.num_warm) & negative
        warm = ~(candidates >= split.num_warm) & negative
        sums["cold_rank"] += float(rank[cold].double().sum())
        sums["cold"] += float(cold.sum())
        sums["warm_rank"] += float(rank[warm].double().sum())
        sums["warm"] += float(warm.sum())
        sums["top1_cold"] += float(cold.gather(1, order[:, :1]).sum())
    return {"cold_negative_rank": sums["cold_rank"] / max(sums["cold"], 1.0),
            "warm_negative_rank": sums["warm_rank"] / sums["warm"], "top1_cold": sums["top1_cold"] / len(lists),
            "cold_negative_share": sums["cold"] / (sums["cold"] + sums["warm"])}


def measure_bias(study: ColdStudy, results: dict[str, Any], log=print) -> dict[str, Any]:
    """``candidate_bias`` of every finished Speeder run (its model with the cold items) into
    ``results["candidate_bias"]`` (row id -> seed -> figures), written with the results."""
    with exclusive(study.out):
        bias = results.setdefault("candidate_bias", {})
        for seed in study.seeds:
            rows = [r for r in study.rows if r.trains_speeder and find_run(results, r.id, seed) is not None]
            if not rows:
                continue
            split = study.split(seed)
            for row in rows:
                model = SpeederModel.from_pretrained(study.model_with_cold(row, seed))
                bias.setdefault(row.id, {})[str(seed)] = figures = candidate_bias(model, split)
                log(f"{ROW_LABELS[row.id]}, seed {seed}: " + ", ".join(f"{k} {v:.4f}" for k, v in figures.items()))
        write_json(study.out / "results.json", results)
    return results


def run_study(study: ColdStudy, log=print) -> dict[str, Any]:
    """Run every (row, seed) missing from ``results.json``; returns the results (also on disk)."""
    out = study.out
    with exclusive(out):
        results = read_results(out)
        results["cold_fraction"] = study.fraction
        for seed in study.seeds:
            todo = []
            for row in study.rows:
                recorded = find_run(results, row.id, seed)
                if recorded is None:
                    todo.append(row)
                else:
                    check_recorded(out, recorded, study.key(row, seed))
            if not todo:
                continue
            start = time.perf_counter()
            inputs = seed_inputs(study, seed, log)
            log(f"seed {seed}: inputs (split, SASRec, item table) in {time.perf_counter() - start:.1f}s")
            for row in todo:
                outcome = run_row(study, row, seed, inputs, log)
                results["runs"].append({"row": row.id, "seed": seed, "kind": row.kind, **outcome,
                                        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
                                        "config": study.key(row, seed)})
                write_json(out / "results.json", results)
                m = outcome["metrics"]
                log(f"{ROW_LABELS[row.id]}, seed {seed}: cold HR@1 {m['cold']['HR@1']:.4f} NDCG@10 "
                    f"{m['cold']['NDCG@10']:.4f} | warm HR@1 {m['warm']['HR@1']:.4f} NDCG@10 "
                    f"{m['warm']['NDCG@10']:.4f} ({outcome['wall_s']:.1f}s)")
    return results


# -- report -----------------------------------------------------------------------------------------------------
def summarize(results: dict[str, Any], seeds: list[int]) -> dict[str, dict[Any, Any]]:
    """Row id -> (group, metric) -> Stat over the finished seeds, plus "train_s" and "wall_s"."""
    out = {}
    for row in ROWS:
        done = [r for r in results["runs"] if r["row"] == row and r["seed"] in seeds]
        if done:
            stats: dict[Any, Any] = {(g, m): stat([r["metrics"][g][m] for r in done]) for g, m in COLUMNS}
            stats["train_s"] = stat([r["train_s"] for r in done])
            stats["wall_s"] = stat([r["wall_s"] for r in done])
            out[row] = stats
    return out


def findings(summary: dict[str, dict[Any, Any]]) -> list[str]:
    """Plain statements: each Speeder row against SASRec and popularity, per group and metric, "above" / "below"
    when the difference of the means exceeds the larger std of the two rows, else "within the spread"."""
    def versus(a: Any, b: Any) -> str:
        spread = max(a.std, b.std)
        verdict = "above" if a.mean - b.mean > spread else "below" if b.mean - a.mean > spread else "within the spread"
        return f"{a.mean - b.mean:+.4f} ({verdict})"

    lines = []
    for speeder in (TEXT_ONLY_ROW, "full"):
        for other in ("sasrec", "popularity", TEXT_ONLY_ROW):
            if speeder not in summary or other not in summary or other == speeder or (speeder, other) == (
                    TEXT_ONLY_ROW, "full"):
                continue
            parts = [f"{group} HR@1 {versus(summary[speeder][(group, 'HR@1')], summary[other][(group, 'HR@1')])}, "
                     f"NDCG@10 {versus(summary[speeder][(group, 'NDCG@10')], summary[other][(group, 'NDCG@10')])}"
                     for group in GROUPS]
            lines.append(f"- {ROW_LABELS[speeder]} minus {ROW_LABELS[other]}: {'; '.join(parts)}.")
    return lines


def report(results: dict[str, Any], seeds: list[int], command: str) -> str:
    summary = summarize(results, seeds)
    runs = [r for r in results["runs"] if r["seed"] in seeds]
    users = {g: sorted({r["users"][g] for r in runs}) for g in GROUPS}
    items = {g: sorted({r["items"][g] for r in runs}) for g in GROUPS}
    lines = ["# Cold-start study", "",
             f"Items cold (held out of training, added after it from their titles): {results['cold_fraction']:.0%}"
             f" of the catalog ({', '.join(map(str, items['cold']))} cold, {', '.join(map(str, items['warm']))} warm "
             f"items). Test users whose target is cold: {', '.join(map(str, users['cold']))}; the rest: "
             f"{', '.join(map(str, users['warm']))} (per seed). Mean ± sample std over seeds "
             f"{', '.join(map(str, seeds))}; test split, the config's candidates (cold items among the negatives).",
             "", "| model | cold HR@1 | cold NDCG@10 | warm HR@1 | warm NDCG@10 | train s | wall s |",
             "|---|---|---|---|---|---|---|"]
    for row, stats in summary.items():
        cells = [str(stats[c]) for c in COLUMNS] + [stats["train_s"].seconds(), stats["wall_s"].seconds()]
        lines.append(f"| {ROW_LABELS[row]} | " + " | ".join(cells) + " |")
    bias = results.get("candidate_bias", {})
    if bias:
        lines += ["", "How each Speeder model ranks cold negatives, on the lists of warm-target users (mean over seeds; "
                  "rank 0 = top of 20): a model that favoured items with the collab modality missing would rank cold "
                  "negatives above warm ones and put one on top of more lists than their share.", "",
                  "| model | mean rank of a cold negative | of a warm negative | lists topped by a cold negative | "
                  "cold share of negatives |", "|---|---|---|---|---|"]
        for row, per_seed in bias.items():
            values = [stat([b[c] for s, b in per_seed.items() if int(s) in seeds]) for c in BIAS_COLUMNS]
            lines.append(f"| {ROW_LABELS[row]} | {values[0].mean:.2f} | {values[1].mean:.2f} | {values[2].mean:.4f} | "
                         f"{values[3].mean:.4f} |")
    lines += ["", "SASRec and popularity cannot score an unseen id: a cold candidate scores -inf (ranked last, ties "
              "pessimistic), and a cold item in a history is left out of SASRec's window; so their cold HR@1 is 0 by "
              "construction. Speeder's cold items have text (MiniLM of the title) and no collab vector (missing "
              "modality).", "", "Findings (difference of the means; above / below: it exceeds the larger std of the two rows):",
              "",
              *findings(summary), "", "Reproduce:", "", "```bash", command, "```"]
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m speeder_rt.study.cold_start", description=(
        "Cold-start study: hold a seeded fraction of items out of training, add them afterwards from their titles, "
        "and compare Speeder (text-only, text+collab) with SASRec and popularity on cold and warm test targets."))
    parser.add_argument("--config", required=True, help="the run configuration (text + collab, MiniLM text)")
    parser.add_argument("--out", required=True, help="the study directory (results.json, study.md, runs)")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    parser.add_argument("--cold-fraction", type=float, default=COLD_FRACTION, help="share of items held out (0.1)")
    parser.add_argument("--candidate-bias", action="store_true", help="also measure how each Speeder model ranks "
                                                                      "cold negatives (recorded in results.json)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        print(f"error: --seeds: comma-separated integers expected, got {args.seeds!r}", file=sys.stderr)
        return 2
    try:
        raw = read_config_file(args.config)
        study = plan(raw, args.config, args.out, seeds, args.cold_fraction)
        run_config_from_dict(raw, args.config).train.apply_process_settings()
        results = run_study(study)
        if args.candidate_bias:
            results = measure_bias(study, results)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    command = shlex.join(["python", "-m", "speeder_rt.study.cold_start", *(argv if argv is not None else sys.argv[1:])])
    text = report(results, seeds, command)
    with atomic_path(study.out / "study.md") as tmp:
        tmp.write_text(text, encoding="utf-8")
    print(text)
    print(f"wrote {study.out / 'results.json'}, {study.out / 'study.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
