"""The ablation study (python -m speeder_rt.study) end to end on a tiny synthetic config, its rows, resume and the
long-history split."""
import contextlib
import copy
import json
import re
import shutil
import sys

import numpy as np
import pytest
import torch
import yaml

from speeder_rt.data import SplitConfig, SyntheticConfig, build_sequences, generate_synthetic
from speeder_rt.data.item_table import ItemTable
from speeder_rt.model import SpeederModel
from speeder_rt.study import __main__ as cli
from speeder_rt.study import all_rows, plan, runner
from speeder_rt.study.report import COLUMNS, HEADERS, Stat, verdict
from speeder_rt.study.rows import Row, schedule
from speeder_rt.train.config import run_config_from_dict
from speeder_rt.utils.readers import read_safetensors

# 2 MPO stages, enough steps that a working trainer lowers every row's loss; ~30 s for 2 seeds on one thread
TINY = {
    "out_dir": "runs/unused",
    "data": {"source": "synthetic", "synthetic": {"n_items": 120, "n_users": 120, "seed": 1},
             "split": {"short_users": "drop"},
             "sasrec": {"epochs": 6, "eval_every": 3, "batch_size": 32, "lr": 0.005}},
    "model": {"backbone": {"shape": "tiny"}, "modalities": ["text", "collab"], "d_expert": 32, "max_history": 12},
    "mpo": [{"name": "text", "modalities": ["text"], "epochs": 2, "lr": 0.005},
            {"name": "text+collab", "modalities": ["text", "collab"], "epochs": 2, "lr": 0.005, "warmup_steps": 4}],
    "train": {"batch_size": 32, "max_train_samples_per_epoch": 320, "progress": False},
}
ROWS = ["full", "mrc_text", "mrc_collab", "spae_off", "recency_off", "spae_recency_off", "mpo_off", "sasrec",
        "popularity", "random"]
LABELS = [r.label for r in all_rows(run_config_from_dict(TINY))]
SEEDS = [0, 1]
PNG = b"\x89PNG\r\n\x1a\n"


@contextlib.contextmanager
def single_thread():
    """One intra-op thread: on a shared 2-core machine OpenMP's spinning threads slow the tiny model down ~10x
    (measured here: a tiny row trains in ~1 s on one thread, ~20 s wall on two under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def one_thread():
    with single_thread():
        yield


def write_config(path, raw):
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def study_cli(config, out, *extra):
    return cli.main(["--config", str(config), "--out", str(out), "--seeds", ",".join(map(str, SEEDS)), "--no-progress",
                     *extra])


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """(config file, study directory) of the whole tiny study, run once."""
    root = tmp_path_factory.mktemp("study")
    config = write_config(root / "tiny.yaml", TINY)
    with single_thread():
        assert study_cli(config, root / "out") == 0
    return config, root / "out"


def results(out):
    return json.loads((out / "results.json").read_text())


def test_rows_of_the_tiny_config():
    assert [r.id for r in all_rows(run_config_from_dict(TINY))] == ROWS


def test_the_table_has_every_row_and_column_as_mean_and_std(study):
    _, out = study
    text = (out / "study.md").read_text()
    header = next(line for line in text.splitlines() if line.startswith("| row |"))
    assert [c.strip() for c in header.strip("|").split("|")] == (
        ["row", *[HEADERS.get(c, c) for c in COLUMNS], "seeds", "vs full Speeder"])
    lines = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ")}
    for label in LABELS:
        cells = [c.strip() for c in lines[label].strip().strip("|").split("|")]
        assert len(cells) == len(COLUMNS) + 3
        for cell in cells[1:5]:  # HR@1, HR@5, NDCG@10, MRR
            assert re.fullmatch(r"[01]\.\d{4} ± \d\.\d{4}", cell), (label, cell)
        assert re.fullmatch(r"\d+\.\d ± \d+\.\d", cells[5]), (label, cells[5])
        trained_here = label not in ("SASRec", "popularity", "random")  # SASRec's steps are not timed one by one
        assert re.fullmatch(r"\d\.\d{4} ± \d\.\d{4}" if trained_here else "n/a", cells[6]), (label, cells[6])
        assert cells[7] == str(len(SEEDS))
        if label != "Speeder (full)":
            assert re.fullmatch(r"HR@1 [+-]\d\.\d{4}, NDCG@10 [+-]\d\.\d{4} vs full.*", cells[8]), cells[8]
    for label in LABELS[1:7]:  # a finding for every ablated row: helps / does not help / helps on ... only
        assert re.search(rf"^- .* (helps?|do(es)? not help on this data|helps? on .+ only) \({re.escape(label)} is "
                         rf".*\): HR@1 .* vs full .*; NDCG@10 .* vs full .*\.$", text, re.M), label
    assert re.search(r"^- (Full Speeder beats SASRec|SASRec beats full Speeder|Full Speeder does not beat SASRec) ",
                     text, re.M)


def stats(hr1, ndcg):
    return {"HR@1": Stat(*hr1, 2), "NDCG@10": Stat(*ndcg, 2)}


@pytest.mark.parametrize("hr1, ndcg, note, sentence", [
    ((0.40, 0.01), (0.60, 0.01), "helps", "is below full Speeder beyond the spread"),
    ((0.49, 0.02), (0.69, 0.01), "does not help on this data", "is within the seed spread of full Speeder"),
    ((0.55, 0.01), (0.75, 0.01), "does not help on this data", "is above full Speeder beyond the spread"),
    ((0.40, 0.01), (0.695, 0.01), "helps on HR@1 only", "is below full Speeder beyond the spread on HR@1 only"),
])
def test_the_verdict_follows_the_numbers(hr1, ndcg, note, sentence):
    full = stats((0.50, 0.02), (0.70, 0.02))
    row = Row("recency_off", "recency table off", "speeder", removes="the recency table")
    got_note, got_sentence = verdict(row, full, stats(hr1, ndcg))
    assert got_note.endswith(f"vs full: {note}")
    assert got_sentence.startswith(f"The recency table {note} (recency table off {sentence}): HR@1 ")


@pytest.mark.parametrize("hr1, ndcg, claim", [
    ((0.40, 0.01), (0.60, 0.01), "Full Speeder beats SASRec beyond the seed spread"),
    ((0.60, 0.01), (0.80, 0.01), "SASRec beats full Speeder beyond the seed spread"),
    ((0.40, 0.01), (0.71, 0.01), "Full Speeder does not beat SASRec beyond the seed spread on NDCG@10"),
])
def test_the_baseline_verdict_follows_the_numbers(hr1, ndcg, claim):
    full = stats((0.50, 0.02), (0.70, 0.02))
    _, sentence = verdict(Row("sasrec", "SASRec", "sasrec"), full, stats(hr1, ndcg))
    assert sentence.startswith(claim + ": ")


def test_the_table_states_the_numbers_it_was_computed_from(study):
    _, out = study
    runs = results(out)["runs"]
    text = (out / "study.md").read_text()
    for row, label in zip(ROWS, LABELS):
        hr1 = [r["metrics"]["HR@1"] for r in runs if r["row"] == row]
        mean, std = np.mean(hr1), np.std(hr1, ddof=1)
        assert f"| {label} | {mean:.4f} ± {std:.4f} |" in text


def test_results_hold_every_run_per_seed_and_every_trained_loss_fell(study):
    _, out = study
    runs = results(out)["runs"]
    assert sorted((r["row"], r["seed"]) for r in runs) == sorted((row, s) for row in ROWS for s in SEEDS)
    for run in runs:
        assert {"HR@1", "HR@5", "NDCG@10", "MRR"} <= set(run["metrics"])
        assert 0 <= run["metrics"]["HR@1"] <= run["metrics"]["HR@5"] <= 1
        if run["kind"] in ("speeder", "sasrec"):
            assert run["steps"] >= 12 and run["train_s"] > 0
            assert run["loss_last"] < run["loss_first"], (run["row"], run["seed"], run["loss_first"], run["loss_last"])
        else:
            assert run["steps"] == 0 and run["loss_first"] is None and run["train_s"] == 0
    protocol = results(out)["protocol"]
    assert protocol["split"] == "test" and protocol["candidates"] == 20 and protocol["history_len"] == 10


def test_rows_train_what_they_say(study):
    _, out = study
    config = {(r["row"], r["seed"]): r["config"] for r in results(out)["runs"]}
    full = config["full", 0]
    assert [s["modalities"] for s in full["mpo"]] == [["text"], ["text", "collab"]]
    assert config["mrc_collab", 0]["model"]["modalities"] == ["collab"]
    assert [(s["modalities"], s["epochs"]) for s in config["mrc_collab", 0]["mpo"]] == [(["collab"], 4)]
    assert [(s["modalities"], s["epochs"]) for s in config["mpo_off", 0]["mpo"]] == [(["text", "collab"], 4)]
    assert config["spae_off", 0]["model"]["relative_bias"] is False and config["spae_off", 0]["model"]["recency"]
    assert config["recency_off", 0]["model"]["recency"] is False
    assert config["full", 1]["seed"] == 1 and config["full", 1]["data"]["split"]["seed"] == 1  # the split follows
    assert SpeederModel.from_pretrained(out / "seed0" / "recency_off" / "speeder" / "best").recency is None


def test_the_chart_is_a_png(study):
    _, out = study
    data = (out / "study.png").read_bytes()
    assert data.startswith(PNG) and len(data) > 10_000


def test_sasrec_is_trained_once_per_seed_and_is_the_collab_source(study):
    _, out = study
    for seed in SEEDS:
        weights = read_safetensors(out / f"seed{seed}" / "sasrec" / "model.safetensors")
        table = ItemTable.load(out / f"seed{seed}" / "items")
        torch.testing.assert_close(table.features["collab"].float(), weights["item_emb.weight"][1:].half().float())
    a, b = (read_safetensors(out / f"seed{s}" / "sasrec" / "model.safetensors")["item_emb.weight"] for s in SEEDS)
    assert not torch.equal(a, b)  # one model per seed


def test_a_second_invocation_reuses_every_result(study, monkeypatch, capsys):
    config, out = study
    before = results(out)

    def no_training(*args, **kwargs):
        raise AssertionError("trained again")

    monkeypatch.setattr(runner, "Trainer", no_training)
    monkeypatch.setattr(runner, "train_sasrec", no_training)
    assert study_cli(config, out) == 0
    assert results(out) == before
    assert "| Speeder (full) |" in capsys.readouterr().out


def test_an_interrupted_study_runs_only_what_is_missing(study, tmp_path, monkeypatch, one_thread):
    config, out = study
    copy_dir = tmp_path / "out"
    shutil.copytree(out, copy_dir)
    record = results(copy_dir)
    kept = [r for r in record["runs"] if (r["row"], r["seed"]) not in {("recency_off", 1), ("sasrec", 1)}]
    (copy_dir / "results.json").write_text(json.dumps({**record, "runs": kept}))
    trained = []
    real = runner.Trainer

    def counting(kind, cfg, *args, **kwargs):
        trained.append(cfg.out_dir)
        return real(kind, cfg, *args, **kwargs)

    def no_sasrec(*args, **kwargs):
        raise AssertionError("SASRec trained again: the seed's saved one must be used")

    monkeypatch.setattr(runner, "Trainer", counting)
    monkeypatch.setattr(runner, "train_sasrec", no_sasrec)
    assert study_cli(config, copy_dir) == 0
    assert trained == [str(copy_dir / "seed1" / "recency_off")]
    again = {(r["row"], r["seed"]): r for r in results(copy_dir)["runs"]}
    first = {(r["row"], r["seed"]): r for r in record["runs"]}
    assert again["sasrec", 1]["metrics"] == first["sasrec", 1]["metrics"]  # the same SASRec
    assert again["sasrec", 1]["train_s"] == first["sasrec", 1]["train_s"]
    assert len(again) == len(first)


def test_report_only_reports_a_partial_study_and_trains_nothing(study, tmp_path, monkeypatch, capsys):
    config, out = study
    copy_dir = tmp_path / "out"
    shutil.copytree(out, copy_dir)
    (copy_dir / "study.md").unlink()
    record = results(copy_dir)
    kept = [r for r in record["runs"] if r["row"] != "recency_off" and (r["row"], r["seed"]) != ("full", 1)]
    (copy_dir / "results.json").write_text(json.dumps({**record, "runs": kept}))

    def no_training(*args, **kwargs):
        raise AssertionError("trained in --report-only")

    monkeypatch.setattr(runner, "Trainer", no_training)
    monkeypatch.setattr(runner, "train_sasrec", no_training)
    assert study_cli(config, copy_dir, "--report-only") == 0
    assert results(copy_dir)["runs"] == kept  # nothing recorded or trained
    table = (copy_dir / "study.md").read_text()
    assert re.search(r"\| recency table off \| not run \|.*\| 0 \| \|", table)
    [full_hr1] = [r["metrics"]["HR@1"] for r in kept if r["row"] == "full"]  # seed 0 only: no spread
    assert re.search(rf"\| Speeder \(full\) \| {full_hr1:.4f} \|.*\| 1 \|", table), table
    assert "results.json" not in capsys.readouterr().out.splitlines()[-1]  # the last line names what was written


def test_parallel_jobs_give_the_results_of_one_job(study, tmp_path):
    """--jobs 2 trains in spawned processes (one thread each, as the module's study ran in this one): the same
    metrics and losses, and the invocation's wall time is recorded and stated."""
    _, out = study
    raw = copy.deepcopy(TINY)
    raw["train"]["num_threads"] = 1
    rows = ["full", "mrc_text", "sasrec", "random"]
    assert study_cli(write_config(tmp_path / "threads.yaml", raw), tmp_path / "jobs", "--jobs", "2",
                     "--rows", ",".join(rows)) == 0
    record = results(tmp_path / "jobs")
    parallel = {(r["row"], r["seed"]): r for r in record["runs"]}
    one_job = {(r["row"], r["seed"]): r for r in results(out)["runs"]}
    assert set(parallel) == {(row, seed) for row in rows for seed in SEEDS}
    for key, run in parallel.items():
        assert run["metrics"] == one_job[key]["metrics"], key
        assert (run["steps"], run["loss_last"]) == (one_job[key]["steps"], one_job[key]["loss_last"]), key
    [invocation] = record["invocations"]
    assert (invocation["runs"], invocation["jobs"]) == (len(parallel), 2) and invocation["wall_s"] > 0
    assert re.search(rf"Study wall time: \d+\.\d min \({len(parallel)} runs in \d+\.\d min with --jobs 2;",
                     (tmp_path / "jobs" / "study.md").read_text())


def test_a_changed_config_is_refused_for_recorded_runs(study, tmp_path, capsys):
    config, out = study
    raw = copy.deepcopy(TINY)
    raw["mpo"][1]["lr"] = 0.001
    assert study_cli(write_config(tmp_path / "changed.yaml", raw), out) == 2
    err = capsys.readouterr().err
    assert re.search(r"results\.json: row 'full' seed 0 was run with mpo\[1\]\.lr = 0\.005; this study's config has "
                     r"0\.001\. Use another --out", err), err


def test_cli_input_errors(tmp_path, capsys, monkeypatch):
    config = write_config(tmp_path / "tiny.yaml", TINY)
    assert study_cli(config, tmp_path / "a", "--rows", "full,spae_of") == 2
    assert "--rows: unknown row 'spae_of'; this config's rows are full, mrc_text," in capsys.readouterr().err
    assert study_cli(config, tmp_path / "a", "--jobs", "0") == 2
    assert "--jobs: an integer >= 1 expected, got 0" in capsys.readouterr().err
    bad = copy.deepcopy(TINY)
    bad["model"]["recency"] = "no"
    assert study_cli(write_config(tmp_path / "bad.yaml", bad), tmp_path / "b") == 2
    assert "bad.yaml: model.recency: expected true or false, got 'no'" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # not installed
    assert study_cli(config, tmp_path / "c") == 2
    assert "the study's chart needs matplotlib: pip install 'speeder_rt[test]'" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()  # refused before anything is written


def test_rows_of_a_three_modality_default_schedule():
    raw = {**TINY, "model": {**TINY["model"], "modalities": ["text", "collab", "image"]}, "mpo": None,
           "mpo_defaults": {"epochs": 2, "lr": 0.002, "warmup_steps": 5}}
    s = plan(raw, "three.yaml", "unused", [0])
    ids = [r.id for r in s.rows]
    assert ids[:5] == ["full", "mrc_text", "mrc_collab", "mrc_image", "mrc_text+collab"]
    for row in s.rows:
        if row.kind == "speeder":
            cfg = s.config(row, 0)
            assert sum(st.epochs for st in schedule(cfg)) == 6, row.id  # every row trains the full row's epochs
    tc = schedule(s.config(s.rows[4], 0))
    assert [(st.modalities, st.epochs) for st in tc] == [(["text"], 2), (["text", "collab"], 4)]
    one_stage = {**TINY, "mpo": TINY["mpo"][1:]}
    s = plan(one_stage, "one.yaml", "unused", [0])
    assert "mpo_off" not in [r.id for r in s.rows] and s.selection.same_as["mpo_off"] == "full"


def test_min_interactions_keeps_only_long_users():
    inter, _ = generate_synthetic(SyntheticConfig(n_items=200, n_users=150, min_seq_len=8, max_seq_len=40, seed=3))
    data = build_sequences(inter, SplitConfig(history_len=20, min_interactions=20, short_users="drop"))
    counts = np.bincount(inter.users)
    assert len(data.sequences) == int((counts >= 20).sum()) > 0
    assert min(len(s) for s in data.sequences) >= 20
    assert data.test.history_len.min() == 19  # the last item is the target: 19 before it for a 20-item user
    with pytest.raises(ValueError, match=r"has \d+ interaction\(s\); min_interactions is 20"):
        build_sequences(inter, SplitConfig(history_len=20, min_interactions=20))
    with pytest.raises(ValueError, match=r"min_interactions: expected an integer >= 3, got 2"):
        SplitConfig(min_interactions=2)


def test_the_long_history_study(tmp_path, one_thread):
    config = write_config(tmp_path / "tiny.yaml", TINY)
    s = plan(TINY, "tiny.yaml", tmp_path / "long", SEEDS, cli.rows_for(None, 15), history_len=15)
    assert [r.id for r in s.rows] == ["full", "spae_off", "recency_off", "spae_recency_off", "sasrec", "popularity",
                                      "random"]
    cfg = s.config(s.rows[0], 0)
    assert (cfg.data.split.history_len, cfg.data.split.min_interactions, cfg.model.max_history) == (15, 15, 15)
    assert study_cli(config, tmp_path / "long", "--history-len", "15", "--rows", "popularity,random") == 0
    text = (tmp_path / "long" / "study.md").read_text()
    assert "history window 15, users with >= 15 interactions" in text
