"""`make demo`: build the data, train Speeder (all MPO stages), the text-item baseline and SASRec, evaluate
them with popularity and random on the test split, and print one side-by-side table. SASRec and Speeder
are both evaluated at their best validation epoch (NDCG@10).

``python -m speeder_rt.demo [--config configs/demo.yaml] [--data SOURCE] [--models speeder,text_baseline,...]``
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from pathlib import Path

from speeder_rt.baselines.sasrec import train_sasrec
from speeder_rt.baselines.simple import PopularityScorer, RandomScorer
from speeder_rt.eval.metrics import format_table
from speeder_rt.eval.protocol import evaluate
from speeder_rt.model.pretrained import load_weights
from speeder_rt.train.config import RunConfig, load_run_config
from speeder_rt.train.data import item_table, load_sequences
from speeder_rt.train.faults import TrainingStopped
from speeder_rt.train.trainer import Trainer
from speeder_rt.utils.schema import ConfigError

MODELS = ("speeder", "text_baseline", "sasrec", "popularity", "random")
COLUMNS = ["VHR@1", "HR@1", "HR@5", "NDCG@10", "train_s", "infer_ms"]
DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"


RANDOM_INIT_TEXT_BASELINE = (
    "text-item LLM: every item written as its title tokens, generated token by token, on the same random-init\n"
    "backbone as Speeder: a speed comparison (train_s, infer_ms). A random-init LM cannot write a candidate's\n"
    "title, so its VHR@1 here is no accuracy figure; that needs a pretrained LM: configs/movielens_smollm2.yaml.")


def pretrained(cfg) -> bool:
    """Whether the run's backbone has pretrained weights (a local model directory or a GGUF file)."""
    return bool(cfg.model.backbone.pretrained or cfg.model.backbone.gguf_file)


def text_baseline_row(cfg, users: int) -> str:
    kind = "pretrained backbone" if pretrained(cfg) else "random-init backbone, speed only"
    return f"text-item LLM ({kind}, {users} users)"


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def _input(step):
    """Run a step that reads input (config, data files): a ValueError is one line on stderr and exit status 2,
    as in the train CLI."""
    try:
        return step()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def _config(path: str, data: str | None, models: list[str]) -> RunConfig:
    """The run config with the command line's overrides, checked again as a whole."""
    cfg = load_run_config(path)
    if "speeder" not in models:
        cfg.model.modalities = []  # no item features needed
    if data:
        out_dir = Path(cfg.out_dir)
        out_dir = out_dir.with_name(out_dir.name + "_" + data.replace(":", "_").replace("/", "_"))
        try:
            cfg = dataclasses.replace(cfg, out_dir=str(out_dir), data=dataclasses.replace(cfg.data, source=data))
        except ConfigError as e:
            raise ConfigError(e.problem, e.keys, where=f"{path} with --data {data}") from None
    return cfg


def _trained(trainer: Trainer) -> dict[str, float]:
    """``trainer.run()``; a divergence or a checkpoint that cannot be written is its one line on stderr and the
    train CLI's exit status (``speeder_rt.train.faults``)."""
    try:
        return trainer.run()
    except TrainingStopped as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(e.status) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m speeder_rt.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="run configuration (default: configs/demo.yaml)")
    parser.add_argument("--data", help="override data.source: synthetic, movielens[:DIR], csv:FILE, parquet:FILE, "
                                       "amazon:REVIEWS[,META]")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {','.join(MODELS)}")
    return parser


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = build_parser()
    args = parser.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        parser.error(f"unknown model {unknown[0]!r}; choose from {', '.join(MODELS)}")
    cfg = _input(lambda: _config(args.config, args.data, models))
    cfg.train.apply_process_settings()
    synthetic_table, data = _input(lambda: load_sequences(cfg))

    rows: dict[str, dict[str, float]] = {}
    sasrec = None
    if "sasrec" in models or ("speeder" in models and "collab" in cfg.model.modalities and cfg.data.collab_features):
        sasrec, secs = _timed(lambda: train_sasrec(data, cfg.data.sasrec, progress=cfg.train.progress))
        if "sasrec" in models:
            metrics, infer = _timed(lambda: evaluate(sasrec, data, "test"))
            rows["SASRec"] = {**metrics, "train_s": round(secs, 1), "infer_ms": 1000 * infer / len(data.test)}
    table = _input(lambda: item_table(cfg, data, synthetic_table, sasrec=sasrec))
    print(f"data: {cfg.data.source}: {len(data.sequences)} users, {data.num_items} items; {len(data.train)} training "
          f"samples, {len(data.test)} test users, {data.config.num_candidates} candidates, history window "
          f"{data.config.history_len}")

    if "speeder" in models:
        trainer = Trainer("speeder", cfg, data, table)
        _, secs = _timed(lambda: _trained(trainer))
        if math.isfinite(trainer.progress.best_metric):  # it validated: its best epoch, as SASRec's
            load_weights(trainer.model, trainer.out / "best")
        metrics, infer = _timed(lambda: evaluate(trainer.model, data, "test", batch_size=cfg.train.eval_batch_size))
        rows["Speeder"] = {**metrics, "train_s": round(secs, 1), "infer_ms": 1000 * infer / len(data.test)}
    if "text_baseline" in models:
        trainer = Trainer("text_baseline", cfg, data, table)
        _, secs = _timed(lambda: _trained(trainer))
        limit = cfg.text_baseline.eval_limit
        metrics, infer = _timed(lambda: trainer.model.evaluate(data, "test", limit=limit, progress=cfg.train.progress))
        n = min(limit or len(data.test), len(data.test))
        rows[text_baseline_row(cfg, n)] = {**metrics, "train_s": round(secs, 1), "infer_ms": 1000 * infer / n}
    if "popularity" in models:
        rows["popularity"] = {**evaluate(PopularityScorer(data), data, "test"), "train_s": 0.0}
    if "random" in models:
        rows["random"] = {**evaluate(RandomScorer(data.num_items, cfg.seed), data, "test"), "train_s": 0.0}
    print(f"\ntest split, {data.config.num_candidates} candidates (LLaRA protocol); infer_ms = wall time per "
          "request, batched, on this machine:")
    print(format_table(rows, COLUMNS))
    if "text_baseline" in models and not pretrained(cfg):
        print(RANDOM_INIT_TEXT_BASELINE)
    return rows


if __name__ == "__main__":
    main()
