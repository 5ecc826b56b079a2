"""The pretrained-backbone study rows (issue 22) end to end on a tiny stand-in: a 2-layer transformers model
directory with LoRA in place of SmolLM2; the tiny random-init row, the text-item row at equal step time, the
seeded evaluation subset, and a row resumed mid-run."""
import copy
import json

import pytest
import torch
import yaml

from speeder_rt.data import SyntheticConfig, generate_synthetic
from speeder_rt.study import __main__ as cli
from speeder_rt.study import all_rows, runner
from speeder_rt.study.rows import row_config
from speeder_rt.train.config import run_config_from_dict
from tests.tiny_pretrained import write_tiny_pretrained

SYNTHETIC = {"n_items": 120, "n_users": 120, "seed": 1}
STAGE = {"trainable": ["experts", "gate", "head", "spae", "lora"]}
EVAL_USERS = 40


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    _, table = generate_synthetic(SyntheticConfig(**SYNTHETIC))
    return write_tiny_pretrained(tmp_path_factory.mktemp("tiny_lm"), list(table.titles))


def pretrained_config(lm_dir) -> dict:
    return {
        "out_dir": "runs/unused",
        "data": {"source": "synthetic", "synthetic": SYNTHETIC, "split": {"short_users": "drop"},
                 "sasrec": {"epochs": 4, "eval_every": 2, "batch_size": 32, "lr": 0.005}},
        "model": {"backbone": {"pretrained": str(lm_dir), "lora": {"rank": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}},
                  "modalities": ["text", "collab"], "d_expert": 32, "max_history": 12},
        "mpo": [{"name": "text", "modalities": ["text"], "epochs": 1, "lr": 0.005, **STAGE},
                {"name": "text+collab", "modalities": ["text", "collab"], "epochs": 1, "lr": 0.005, "warmup_steps": 2,
                 **STAGE}],
        "train": {"batch_size": 16, "max_train_samples_per_epoch": 96, "progress": False, "num_threads": 1,
                  "checkpoint_every": 2},
        "text_baseline": {"epochs": 50, "lr": 0.005, "max_title_tokens": 8, "max_new_tokens": 6, "eval_limit": EVAL_USERS},
    }


def run_cli(config, out, *extra):
    return cli.main(["--config", str(config), "--out", str(out), "--seeds", "0", "--no-progress", *extra])


def write(path, raw):
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def results(out):
    return {r["row"]: r for r in json.loads((out / "results.json").read_text())["runs"]}


@pytest.fixture(scope="module")
def study(lm_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrained_study")
    config = write(root / "study.yaml", pretrained_config(lm_dir))
    threads = torch.get_num_threads()
    try:
        assert run_cli(config, root / "out", "--rows", "full,mpo_off,mrc_text,backbone_tiny,text_item,popularity") == 0
    finally:
        torch.set_num_threads(threads)
    return config, root / "out"


def test_a_pretrained_backbone_adds_the_tiny_and_text_item_rows(lm_dir):
    raw = pretrained_config(lm_dir)
    rows = {r.id: r for r in all_rows(run_config_from_dict(raw))}
    assert {"full", "mpo_off", "mrc_text", "backbone_tiny", "text_item"} <= set(rows)
    full, tiny = (row_config(raw, rows[r], 0, "x") for r in ("full", "backbone_tiny"))
    assert tiny.model.backbone.pretrained is None and tiny.model.backbone.lora is None
    assert tiny.model.backbone.hidden_size == 64 and full.model.backbone.pretrained == str(lm_dir)
    # exactly the same samples, epochs, batches and learning rates; LoRA's trainable set becomes the whole backbone
    assert tiny.train == full.train and tiny.data == full.data
    assert [(s.epochs, s.lr, s.modalities, s.warmup_steps) for s in tiny.mpo] == \
           [(s.epochs, s.lr, s.modalities, s.warmup_steps) for s in full.mpo]
    assert all("backbone" in s.trainable and "lora" not in s.trainable for s in tiny.mpo)
    tiny_cfg = copy.deepcopy(raw)
    tiny_cfg["model"]["backbone"] = {"shape": "tiny"}
    tiny_cfg["mpo"] = [{**s, "trainable": ["experts", "gate", "head", "spae", "backbone"]} for s in tiny_cfg["mpo"]]
    assert not {"backbone_tiny", "text_item"} & {r.id for r in all_rows(run_config_from_dict(tiny_cfg))}


def test_every_row_records_its_step_time_and_samples(study):
    _, out = study
    runs = results(out)
    for row in ("full", "mpo_off", "mrc_text", "backbone_tiny", "text_item"):
        run = runs[row]
        assert run["steps"] > 0 and 0 < run["step_s"] <= run["train_s"], row
        assert run["samples"] == 16 * run["steps"], row
    assert runs["full"]["steps"] == runs["backbone_tiny"]["steps"]  # the same samples and epochs


def test_the_text_item_row_trains_for_the_full_rows_step_time(study):
    _, out = study
    runs = results(out)
    budget = runs["full"]["step_s"]
    text = runs["text_item"]
    assert text["config"]["train"]["max_step_seconds"] == budget
    # it stops after the step that spends the budget: over it, but by less than one of its own steps
    assert budget <= text["step_s"] < budget + 2 * text["step_s"] / text["steps"]
    assert text["steps"] < 50 * 96 // 16  # the budget, not its 50 epochs, ended it


def test_speeder_and_the_text_item_row_are_evaluated_on_the_same_seeded_users(study):
    _, out = study
    runs = results(out)
    assert runs["text_item"]["subset_users"] == runs["full"]["subset_users"] == EVAL_USERS
    assert set(runs["text_item"]["subset_metrics"]) >= {"VHR@1", "valid_ratio"}
    assert 0 <= runs["full"]["subset_metrics"]["HR@1"] <= 1
    text = (out / "study.md").read_text()
    assert "## Equal compute: full Speeder vs the text-item LLM" in text
    assert "| text-item LLM | 40 |" in text and "| Speeder (full) | 40 |" in text
    assert "| tiny random-init backbone |" in text
    assert "| text-item LLM (equal step time) | below | below |" in text  # its figures: the equal-compute table's


def test_the_text_item_row_needs_the_full_row(lm_dir, tmp_path, capsys):
    config = write(tmp_path / "c.yaml", pretrained_config(lm_dir))
    assert run_cli(config, tmp_path / "out", "--rows", "text_item") == 2
    assert "its budget is the step time of the full row of the same seed" in capsys.readouterr().err
    assert run_cli(config, tmp_path / "out2", "--rows", "full,text_item", "--jobs", "2") == 2
    assert "runs with --jobs 1" in capsys.readouterr().err


def test_an_interrupted_row_resumes_from_its_checkpoint(study, lm_dir, tmp_path, monkeypatch):
    """A study stopped mid-row continues that row from its last/ checkpoint; the run equals the uninterrupted one
    (one thread) and its step count and losses cover both invocations."""
    config, out = study
    real = runner.Trainer

    class Interrupted(real):
        def run(self, stop_after_steps=None):
            super().run(stop_after_steps=4)
            raise KeyboardInterrupt

    monkeypatch.setattr(runner, "Trainer", Interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_cli(config, tmp_path / "out", "--rows", "full")
    assert not (tmp_path / "out" / "results.json").exists()
    monkeypatch.setattr(runner, "Trainer", real)
    assert run_cli(config, tmp_path / "out", "--rows", "full") == 0
    resumed, uninterrupted = results(tmp_path / "out")["full"], results(out)["full"]
    assert resumed["metrics"] == uninterrupted["metrics"]
    for key in ("steps", "samples", "loss_first", "loss_last"):
        assert resumed[key] == uninterrupted[key], key
