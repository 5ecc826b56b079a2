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
One study writes a directory at a time (a lock held while it runs). With ``jobs`` > 1 the runs train in spawned
worker processes, which write only their seed's and row's directories; ``results.json`` is written by the study's
own process alone.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import multiprocessing
import os
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.torch import save_file

from speeder_rt.baselines.sasrec import SASRec, train_sasrec
from speeder_rt.baselines.simple import PopularityScorer, RandomScorer
from speeder_rt.data import ItemTable, SequenceData
from speeder_rt.eval.protocol import evaluate
from speeder_rt.model.pretrained import load_weights
from speeder_rt.study.rows import FULL, Row, StudyRows, history_overrides, merged, row_config, run_key, study_rows
from speeder_rt.train.config import RunConfig, run_config_from_dict
from speeder_rt.train.data import item_table, load_sequences
from speeder_rt.train.kinds import SPEEDER, TEXT_BASELINE
from speeder_rt.train.resume import has_resume_state
from speeder_rt.train.trainer import Trainer
from speeder_rt.utils.io import atomic_dir, read_json, read_json_fields, write_json
from speeder_rt.utils.progress import progress_bar
from speeder_rt.utils.readers import differences, read_safetensors

FORMAT_VERSION = 1
TEXT_ITEM = "text_item"  # the row kind of the text-item baseline (``rows.all_rows``)
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
    step_budgets: dict[int, float] = dataclasses.field(default_factory=dict)  # seed -> the full row's step seconds

    @property
    def rows(self) -> list[Row]:
        return self.selection.rows

    def config(self, row: Row, seed: int, out_dir: Path | None = None) -> RunConfig:
        """The row's run config; the text-item row's with ``train.max_step_seconds`` = the full row's step
        seconds for ``seed`` once that run is recorded (``budgets_from``)."""
        extra = self.extra
        if row.kind == TEXT_ITEM and seed in self.step_budgets:
            extra = merged(extra, {"train": {"max_step_seconds": self.step_budgets[seed]}})
        return row_config(self.raw, row, seed, out_dir or self.seed_dir(seed) / row.id, self.where, extra)

    def budgets_from(self, results: Mapping[str, Any]) -> None:
        """The text-item row's step-time budgets: the recorded full rows' ``step_s``, per seed."""
        self.step_budgets = {r["seed"]: r["step_s"] for r in results["runs"] if r["row"] == FULL.id and r.get("step_s")}

    def text_item_key(self, seed: int) -> dict[str, Any]:
        """The text-item row's run key for ``seed``, which needs the full row of that seed recorded first."""
        if seed not in self.step_budgets:
            raise ValueError(f"study row {TEXT_ITEM}, seed {seed}: its budget is the step time of the full row of the "
                             f"same seed, which is not recorded; run the full row too (--rows full,{TEXT_ITEM})")
        row = next(r for r in self.rows if r.kind == TEXT_ITEM)
        return run_key(self.config(row, seed), row.kind)

    def seed_dir(self, seed: int) -> Path:
        return self.out / f"seed{seed}"

    def apply_process_settings(self) -> None:
        """The run config's process settings (threads, deterministic kernels): one per study, not per row."""
        run_config_from_dict(merged(self.raw, self.extra), self.where).train.apply_process_settings()


def plan(raw: Mapping[str, Any], where: str, out: str | Path, seeds: list[int], rows: list[str] | None = None,
         history_len: int | None = None) -> Study:
    """The study of a parsed run config, every row's config checked for every seed before anything runs."""
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise ValueError(f"--seeds: distinct integers >= 0 expected, got {seeds}")
    if history_len is not None and history_len < 1:
        raise ValueError(f"--history-len: an integer >= 1 expected, got {history_len}")
    base = run_config_from_dict(raw, where)  # also the check that ``raw`` is a mapping
    raw = dict(raw)
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
    diffs = differences(run.get("config"), key)
    if diffs:
        diff = diffs[0]
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
    """Train a Speeder row (continuing from its ``last/`` checkpoint when an interrupted study left one: set
    ``train.checkpoint_every`` for long rows); its metrics at the best validation checkpoint. ``train_s``: the
    run's wall seconds (steps, validation, checkpoints) and ``step_s``: its optimizer steps' seconds, both summed
    over every invocation that trained it."""
    trainer = Trainer(SPEEDER.name, cfg, data, table, log=log)
    if has_resume_state(trainer.out / "last"):
        trainer.resume(trainer.out / "last")
    trainer.run()
    load_weights(trainer.model, trainer.out / "best")
    metrics = evaluate(trainer.model, data, "test", batch_size=cfg.train.eval_batch_size)
    users = eval_subset(data, cfg)
    subset = metrics if users is data else evaluate(trainer.model, users, "test", batch_size=cfg.train.eval_batch_size)
    return {"metrics": metrics, "subset_metrics": subset, "subset_users": len(users.test), **trained(trainer)}


def train_text_item(cfg: RunConfig, data: SequenceData, table: ItemTable, log: Log) -> dict[str, Any]:
    """Train the text-item baseline (to its ``train.max_step_seconds`` when the study set one, resuming like
    ``train_speeder``); VHR@1 at its best validation checkpoint on the seeded test users of ``eval_subset``."""
    trainer = Trainer(TEXT_BASELINE.name, cfg, data, table, log=log)
    if has_resume_state(trainer.out / "last"):
        trainer.resume(trainer.out / "last")
    trainer.run()
    load_weights(trainer.model, trainer.out / "best")
    users = eval_subset(data, cfg)
    metrics = trainer.model.evaluate(users, "test", progress=cfg.train.progress)
    return {"metrics": {}, "subset_metrics": metrics, "subset_users": len(users.test), **trained(trainer)}


def trained(trainer: Trainer) -> dict[str, Any]:
    """A finished run's training facts: ``train_s`` (wall seconds of its steps, validation and checkpoints) and
    ``step_s`` (its optimizer steps' seconds), both summed over every invocation that trained it; ``samples``
    (training samples it stepped over, warm-up steps included) and the loss summary."""
    p = trainer.progress
    samples = trainer.cfg.train.batch_size * len(trainer.step_losses)
    return {"train_s": p.run_seconds, "step_s": p.step_seconds, "samples": samples, **loss_summary(trainer.step_losses)}


def eval_subset(data: SequenceData, cfg: RunConfig) -> SequenceData:
    """``data`` with its test split reduced to ``text_baseline.eval_limit`` users drawn with the run's seed (sorted;
    all users when the limit is None or not below their count): the text-item row's test users, on which every
    Speeder row is evaluated too."""
    limit, users = cfg.text_baseline.eval_limit, len(data.test)
    if limit is None or limit >= users:
        return data
    rows = np.sort(np.random.default_rng(cfg.seed).choice(users, limit, replace=False))
    return dataclasses.replace(data, test=data.test.subset(rows))


@dataclass
class SeedInputs:
    """What every row of a seed shares: its split, item table (Speeder rows) and SASRec (collab / SASRec row)."""

    data: SequenceData
    table: ItemTable | None
    sasrec: SASRec | None
    facts: dict[str, Any] | None


_held: dict[tuple[str, int, frozenset[str]], SeedInputs] = {}  # this process's last seed, for its next row


@contextlib.contextmanager
def _holding() -> Iterator[None]:
    """Shared inputs are held for one study only (a later study may find its directory changed)."""
    _held.clear()
    try:
        yield
    finally:
        _held.clear()


def seed_inputs(study: Study, seed: int, kinds: frozenset[str], log: Log, bars: bool = True) -> SeedInputs:
    """The seed's shared inputs for rows of ``kinds``: SASRec trained once and the item table built once, both
    kept in the seed's directory (so another process, or a resumed study, reads them instead); ``bars``: their
    progress bars, as the config says."""
    key = (str(study.out), seed, kinds)
    if key in _held:
        return _held[key]
    seed_cfg = study.config(FULL, seed, study.seed_dir(seed))
    seed_cfg.train.progress = seed_cfg.train.progress and bars
    synthetic_table, data = load_sequences(seed_cfg)
    collab = "collab" in seed_cfg.model.modalities and seed_cfg.data.collab_features
    sasrec = facts = None
    needs_table = bool(kinds & {SPEEDER.name, TEXT_ITEM})  # the text-item row reads the table's titles
    if "sasrec" in kinds or (needs_table and collab):
        sasrec, facts = shared_sasrec(study.seed_dir(seed) / "sasrec", data, seed_cfg, log)
    table = item_table(seed_cfg, data, synthetic_table, sasrec=sasrec, log=log) if needs_table else None
    _held.clear()
    _held[key] = SeedInputs(data, table, sasrec, facts)
    return _held[key]


def run_row(study: Study, row: Row, seed: int, kinds: frozenset[str], log: Log, bars: bool = True
            ) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the outcome of ``row`` for ``seed``, the protocol facts); ``bars``: the trainer's own progress bars."""
    inputs = seed_inputs(study, seed, kinds, log, bars)
    if row.trains_speeder or row.kind == TEXT_ITEM:
        cfg = study.config(row, seed)
        cfg.train.progress = cfg.train.progress and bars
        train = train_speeder if row.trains_speeder else train_text_item
        outcome = train(cfg, inputs.data, inputs.table, log)
    elif row.kind == "sasrec":
        outcome = {"metrics": evaluate(inputs.sasrec, inputs.data, "test"),
                   **{k: inputs.facts[k] for k in ("train_s", "steps", "loss_first", "loss_last", "loss_window")}}
    else:
        scorer = PopularityScorer(inputs.data) if row.kind == "popularity" else RandomScorer(inputs.data.num_items, seed)
        outcome = {"metrics": evaluate(scorer, inputs.data, "test"), "train_s": 0.0, **loss_summary([])}
    return outcome, protocol(inputs.data)


def _record(row: Row, seed: int, key: dict[str, Any], outcome: dict[str, Any]) -> dict[str, Any]:
    return {"row": row.id, "seed": seed, "kind": row.kind, **outcome,
            "finished": datetime.now(UTC).isoformat(timespec="seconds"), "config": key}


def _planned(study: Study, results: Mapping[str, Any]) -> list[tuple[Row, int, dict[str, Any], dict[str, Any] | None]]:
    """(row, seed, run key, the recorded run or None) for every run of ``study``; a recorded run is checked against
    the config its row has now."""
    planned = []
    for seed in study.seeds:
        for row in study.rows:
            key = run_key(study.config(row, seed), row.kind)  # the text-item row's: final once its budget is known
            recorded = find_run(results, row.id, seed)
            if recorded is not None:
                check_recorded(study.out, recorded, study.text_item_key(seed) if row.kind == TEXT_ITEM else key)
            planned.append((row, seed, key, recorded))
    return planned


def recorded_results(study: Study) -> dict[str, Any]:
    """The results ``study.out`` holds, each recorded run of the study's rows and seeds checked against the config
    its row has now; nothing is trained (``--report-only``: the report of a partial or finished study)."""
    results = read_results(study.out)
    study.budgets_from(results)
    _planned(study, results)
    return results


def run_study(study: Study, log: Log = print, progress: bool = True, jobs: int = 1) -> dict[str, Any]:
    """Run every (row, seed) of ``study`` missing from its results; returns the results (also on disk).

    ``jobs`` > 1 trains that many runs at once, each in its own process (one seed's SASRec and item table first,
    then its rows); the results are the same as with one job, only the order they finish in differs."""
    if jobs < 1:
        raise ValueError(f"--jobs: an integer >= 1 expected, got {jobs}")
    out = study.out
    with exclusive(out), _holding():
        results = read_results(out)
        study.budgets_from(results)
        todo = [(row, seed, key) for row, seed, key, recorded in _planned(study, results) if recorded is None]
        if jobs > 1 and any(row.kind == TEXT_ITEM for row, _, _ in todo):
            raise ValueError(f"--jobs {jobs}: the {TEXT_ITEM} row runs with --jobs 1 (its budget is the full row's "
                             "step time, measured on the same core with nothing else training)")
        kinds = {seed: frozenset(row.kind for row, s, _ in todo if s == seed) for seed in study.seeds}
        total = len(study.rows) * len(study.seeds)
        start = time.perf_counter()
        with progress_bar(total=total, desc="study", unit="run", enabled=progress) as bar:
            def say(message: str) -> None:  # a line above the bar, not through it
                with bar.external_write_mode():
                    log(str(message))

            def record(row: Row, seed: int, key: dict[str, Any], outcome: dict[str, Any], facts: dict[str, Any]):
                results["runs"].append(_record(row, seed, key, outcome))
                results["protocol"] = facts
                write_json(out / RESULTS, results)
                metrics = outcome["metrics"]
                scores = (f"test HR@1 {metrics['HR@1']:.4f}  NDCG@10 {metrics['NDCG@10']:.4f}" if metrics else
                          f"test VHR@1 {outcome['subset_metrics']['VHR@1']:.4f} on {outcome['subset_users']} users")
                say(f"{row.label}, seed {seed}: {scores}  ({outcome['train_s']:.1f}s of training)")
                bar.update(1)

            bar.update(total - len(todo))
            if jobs == 1:
                for row, seed, key in todo:
                    bar.set_postfix_str(f"{row.id}, seed {seed}")
                    if row.kind == TEXT_ITEM:
                        study.budgets_from(results)
                        key = study.text_item_key(seed)
                    record(row, seed, key, *run_row(study, row, seed, kinds[seed], say))
            elif todo:
                _run_parallel(study, todo, kinds, jobs, record, say)
        if todo:
            results.setdefault("invocations", []).append(
                {"runs": len(todo), "jobs": jobs, "wall_s": time.perf_counter() - start,
                 "finished": datetime.now(UTC).isoformat(timespec="seconds")})
            write_json(out / RESULTS, results)
    return results


def _worker_prepare(study: Study, seed: int, kinds: frozenset[str]) -> list[str]:
    lines: list[str] = []
    seed_inputs(study, seed, kinds, lambda m: lines.append(f"seed {seed}: {m}"), bars=False)
    return lines


def _worker_row(study: Study, row: Row, seed: int, kinds: frozenset[str]):
    lines: list[str] = []
    outcome, facts = run_row(study, row, seed, kinds, lambda m: lines.append(f"{row.id}, seed {seed}: {m}"),
                             bars=False)
    return outcome, facts, lines


def _run_parallel(study: Study, todo: list[tuple[Row, int, dict[str, Any]]], kinds: Mapping[int, frozenset[str]],
                  jobs: int, record: Callable[..., None], say: Log) -> None:
    """``todo`` over ``jobs`` spawned processes: each seed's shared inputs first, its rows once they exist."""
    context = multiprocessing.get_context("spawn")  # no fork of a process that holds torch's threads
    with ProcessPoolExecutor(jobs, mp_context=context, initializer=study.apply_process_settings) as pool:
        try:
            waiting: dict[Future, tuple[str, Any]] = {}
            for seed in dict.fromkeys(seed for _, seed, _ in todo):
                waiting[pool.submit(_worker_prepare, study, seed, kinds[seed])] = ("prepare", seed)
            while waiting:
                finished, _ = wait(waiting, return_when=FIRST_COMPLETED)
                for future in finished:
                    what, item = waiting.pop(future)
                    if what == "prepare":
                        for line in future.result():
                            say(line)
                        for row, seed, key in todo:
                            if seed == item:
                                waiting[pool.submit(_worker_row, study, row, seed, kinds[seed])] = ("row", (row, seed, key))
                    else:
                        outcome, facts, lines = future.result()
                        for line in lines:
                            say(line)
                        record(*item, outcome, facts)
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)  # the runs in flight finish; nothing new starts
            raise


def protocol(data: SequenceData) -> dict[str, Any]:
    """The evaluation protocol facts the table states."""
    return {"split": "test", "users": len(data.test), "items": data.num_items,
            "candidates": data.config.num_candidates, "history_len": data.config.history_len,
            "min_interactions": data.config.min_interactions}

