"""Running the study: every (row, seed) trained and evaluated under one protocol, resumable.

Layout of the study directory ``DIR``::

    DIR/results.json            every finished run (per seed), rewritten atomically after each one
    DIR/study.md, study.png     the table and the chart (``speeder_rt.study.report``)
    DIR/seed<S>/items/          the seed's item table (the training cache, keyed by the data recipe)
    DIR/seed<S>/sasrec/         the seed's SASRec: its collab features and the SASRec row are this one model
    DIR/seed<S>/<row>/speeder/  the row's model directories (best/, last/)

A run already in ``results.json`` is not run again, as long as its recorded config is the one the row has now
(else the study stops and says which key differs). Each Speeder row is evaluated at its best validation
NDCG@10 checkpoint (``best/``), as SASRec keeps its best validation epoch; test split, the config's candidates.
One study writes a directory at a time (a lock held while it runs).
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from speeder_rt.baselines.sasrec import SASRec, train_sasrec
from speeder_rt.baselines.simple import PopularityScorer, RandomScorer
from speeder_rt.data import ItemTable, SequenceData
from speeder_rt.eval.protocol import evaluate
from speeder_rt.model.pretrained import load_weights
from speeder_rt.study.rows import FULL, Row, StudyRows, history_overrides, merged, row_config, run_key, study_rows
from speeder_rt.train.config import RunConfig, run_config_from_dict
from speeder_rt.train.data import item_table, load_sequences
from speeder_rt.train.trainer import Trainer, _first_difference
from speeder_rt.utils.io import atomic_dir, write_json
from speeder_rt.utils.progress import progress_bar
from speeder_rt.utils.readers import read_json, read_json_fields, read_safetensors

FORMAT_VERSION = 1
RESULTS = "results.json"
RUN_FIELDS = ("row", "seed", "kind", "metrics", "train_s", "steps", "loss_first", "loss_last", "config")
SASREC_WEIGHTS, SASREC_FACTS = "model.safetensors", "sasrec.json"
Log = Callable[[str], None]


@dataclass
class Study:
    """What one invocation runs: ``rows`` x ``seeds`` of the run config ``raw`` (a parsed file at ``where``)."""

    raw: dict[str, Any]
    where: str
    extra: dict[str, Any]  # overrides every row gets (the long-history study's)
    selection: StudyRows
    seeds: list[int]
    out: Path

    @property
    def rows(self) -> list[Row]:
        return self.selection.rows

    def config(self, row: Row, seed: int, out_dir: Path | None = None) -> RunConfig:
        return row_config(self.raw, row, seed, out_dir or self.seed_dir(seed) / row.id, self.where, self.extra)

    def seed_dir(self, seed: int) -> Path:
        return self.out / f"seed{seed}"


def plan(raw: Mapping[str, Any], where: str, out: str | Path, seeds: list[int], rows: list[str] | None = None,
         history_len: int | None = None) -> Study:
    """The study of a parsed run config, every row's config checked for every seed before anything runs."""
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise ValueError(f"--seeds: distinct integers >= 0 expected, got {seeds}")
    if history_len is not None and history_len < 1:
        raise ValueError(f"--history-len: an integer >= 1 expected, got {history_len}")
    raw = dict(raw)
    base = run_config_from_dict(raw, where)
    extra = history_overrides(base, history_len) if history_len is not None else {}
    base = run_config_from_dict(merged(raw, extra), where)
    study = Study(raw, where, extra, study_rows(raw, base, rows, where, extra), list(seeds), Path(out))
    for seed in seeds:
        for row in study.rows:
            study.config(row, seed)
    return study


# -- results ------------------------------------------------------------------------------------------------
def read_results(out: Path) -> dict[str, Any]:
    """``out/results.json``, or a new empty record."""
    file = out / RESULTS
    if not file.exists():
        return {"format_version": FORMAT_VERSION, "runs": []}
    results = read_json_fields(file, ("runs",), FORMAT_VERSION, "the study's results")
    runs = results["runs"]
    if not isinstance(runs, list):
        raise ValueError(f"{file}: field 'runs' must be a list")
    for i, run in enumerate(runs):
        missing = [k for k in RUN_FIELDS if not isinstance(run, dict) or k not in run]
        if missing:
            raise ValueError(f"{file}: runs[{i}]: field {missing[0]!r} missing")
    return results


def find_run(results: Mapping[str, Any], row: str, seed: int) -> dict[str, Any] | None:
    return next((r for r in results["runs"] if r["row"] == row and r["seed"] == seed), None)


def check_recorded(out: Path, run: Mapping[str, Any], key: dict[str, Any]) -> None:
    """A recorded run must have been made with the config the row has now."""
    diff = _first_difference(run.get("config"), key)
    if diff:
        raise ValueError(f"{out / RESULTS}: row {run['row']!r} seed {run['seed']} was run with {diff[0] or 'config'} = "
                         f"{diff[1]!r}; this study's config has {diff[2]!r}. Use another --out for a different "
                         "config, or delete the directory to start over")


@contextlib.contextmanager
def exclusive(out: Path) -> Iterator[None]:
    """Hold ``out/.study.lock`` while the study writes ``out``: a second study of the same directory is refused."""
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out / ".study.lock", os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(f"{out}: another study is writing this directory right now") from None
        yield
    finally:
        os.close(fd)


# -- runs ---------------------------------------------------------------------------------------------------
def loss_summary(losses: list[float]) -> dict[str, Any]:
    """First and last training loss, each the mean of a window of ``max(1, min(10, steps // 4))`` steps."""
    if not losses:
        return {"steps": 0, "loss_first": None, "loss_last": None, "loss_window": 0}
    k = max(1, min(10, len(losses) // 4))
    return {"steps": len(losses), "loss_first": sum(losses[:k]) / k, "loss_last": sum(losses[-k:]) / k,
            "loss_window": k}


def shared_sasrec(directory: Path, data: SequenceData, cfg: RunConfig, log: Log) -> tuple[SASRec, dict[str, Any]]:
    """The seed's SASRec and its facts (training seconds, losses): trained once and kept in ``directory``, so the
    collab features and the SASRec row are the same model also across an interrupted study."""
    recipe = run_key(cfg, "sasrec")
    model = SASRec(data.num_items, cfg.data.sasrec)
    facts_file = directory / SASREC_FACTS
    if facts_file.is_file():
        facts = read_json(facts_file, "the study's SASRec facts")
        if isinstance(facts, dict) and facts.get("recipe") == recipe:
            expected = {n: (t.dtype, tuple(t.shape)) for n, t in model.state_dict().items()}
            model.load_state_dict(read_safetensors(directory / SASREC_WEIGHTS, expected))
            return model.eval(), facts
    losses: list[float] = []
    start = time.perf_counter()
    model = train_sasrec(data, cfg.data.sasrec, log=log, progress=cfg.train.progress, step_losses=losses)
    facts = {"recipe": recipe, "train_s": time.perf_counter() - start, **loss_summary(losses)}
    with atomic_dir(directory) as tmp:
        save_file({n: t.detach().cpu().contiguous() for n, t in model.state_dict().items()}, tmp / SASREC_WEIGHTS)
        write_json(tmp / SASREC_FACTS, facts)
    return model, facts


def train_speeder(cfg: RunConfig, data: SequenceData, table: ItemTable, log: Log) -> dict[str, Any]:
    """Train a Speeder row; its metrics at the best validation checkpoint."""
    trainer = Trainer("speeder", cfg, data, table, log=log)
    start = time.perf_counter()
    trainer.run()
    train_s = time.perf_counter() - start
    load_weights(trainer.model, trainer.out / "best")
    metrics = evaluate(trainer.model, data, "test", batch_size=cfg.train.eval_batch_size)
    return {"metrics": metrics, "train_s": train_s, **loss_summary(trainer.step_losses)}


def _record(row: Row, seed: int, key: dict[str, Any], outcome: dict[str, Any]) -> dict[str, Any]:
    return {"row": row.id, "seed": seed, "kind": row.kind, **outcome,
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"), "config": key}


def run_study(study: Study, log: Log = print, progress: bool = True) -> dict[str, Any]:
    """Run every (row, seed) of ``study`` missing from its results; returns the results (also on disk)."""
    out = study.out
    with exclusive(out):
        results = read_results(out)
        todo = []
        for seed in study.seeds:
            for row in study.rows:
                key = run_key(study.config(row, seed), row.kind)
                recorded = find_run(results, row.id, seed)
                if recorded is not None:
                    check_recorded(out, recorded, key)
                else:
                    todo.append((row, seed, key))
        total = len(study.rows) * len(study.seeds)
        with progress_bar(total=total, desc="study", unit="run", enabled=progress) as bar:
            bar.update(total - len(todo))
            for seed in study.seeds:
                pending = [(row, key) for row, s, key in todo if s == seed]
                if pending:
                    _run_seed(study, seed, pending, results, bar, log)
    return results


def _run_seed(study: Study, seed: int, pending: list[tuple[Row, dict[str, Any]]], results: dict[str, Any], bar,
              log: Log) -> None:
    """The pending rows of one seed on its data: SASRec first (trained once), then the item table, then the rows."""
    def say(message: str) -> None:  # a line above the bar, not through it
        with bar.external_write_mode():
            log(str(message))

    seed_cfg = study.config(FULL, seed, study.seed_dir(seed))
    inter, synthetic_table, data = load_sequences(seed_cfg)
    kinds = {row.kind for row, _ in pending}
    collab = "collab" in seed_cfg.model.modalities and seed_cfg.data.collab_features
    sasrec = facts = None
    if "sasrec" in kinds or ("speeder" in kinds and collab):
        sasrec, facts = shared_sasrec(study.seed_dir(seed) / "sasrec", data, seed_cfg, say)
    table = item_table(seed_cfg, inter, data, synthetic_table, sasrec=sasrec, log=say) if "speeder" in kinds else None
    for row, key in pending:
        bar.set_postfix_str(f"{row.id}, seed {seed}")
        if row.kind == "speeder":
            outcome = train_speeder(study.config(row, seed), data, table, say)
        elif row.kind == "sasrec":
            outcome = {"metrics": evaluate(sasrec, data, "test"),
                       **{k: facts[k] for k in ("train_s", "steps", "loss_first", "loss_last", "loss_window")}}
        else:
            scorer = PopularityScorer(data) if row.kind == "popularity" else RandomScorer(data.num_items, seed)
            outcome = {"metrics": evaluate(scorer, data, "test"), "train_s": 0.0, **loss_summary([])}
        results["runs"].append(_record(row, seed, key, outcome))
        results["protocol"] = protocol(data)
        write_json(study.out / RESULTS, results)
        say(f"{row.label}, seed {seed}: test HR@1 {outcome['metrics']['HR@1']:.4f}  NDCG@10 "
            f"{outcome['metrics']['NDCG@10']:.4f}  ({outcome['train_s']:.1f}s of training)")
        bar.update(1)


def protocol(data: SequenceData) -> dict[str, Any]:
    """The evaluation protocol facts the table states."""
    return {"split": "test", "users": len(data.test), "items": data.num_items,
            "candidates": data.config.num_candidates, "history_len": data.config.history_len,
            "min_interactions": data.config.min_interactions}

