"""The demo's table: Speeder evaluated at its best validation epoch (as SASRec is), and a text-item row that says
what it measures."""
from __future__ import annotations

import pytest
import yaml

from speeder_rt.demo import RANDOM_INIT_TEXT_BASELINE, main, text_baseline_row
from speeder_rt.eval.protocol import evaluate
from speeder_rt.train.config import run_config_from_dict
from speeder_rt.train.trainer import load_trained

STAGE = {"trainable": ["experts", "gate", "head", "spae", "backbone"]}
RUN = {
    "data": {"source": "synthetic", "synthetic": {"n_items": 120, "n_users": 80, "seed": 1},
             "split": {"short_users": "drop"}},
    "model": {"backbone": {"shape": "tiny"}, "modalities": ["text"], "d_expert": 32, "max_history": 12},
    # the second stage's learning rate wrecks the model: its last epoch is not its best one
    "mpo": [{"name": "text", "modalities": ["text"], "epochs": 2, "lr": 0.003, **STAGE},
            {"name": "wrecked", "modalities": ["text"], "epochs": 1, "lr": 50.0, **STAGE}],
    "train": {"batch_size": 32, "max_train_samples_per_epoch": 96, "progress": False, "num_threads": 1},
    "text_baseline": {"epochs": 1, "max_title_tokens": 4, "max_new_tokens": 6, "eval_limit": 10},
}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """(the demo's rows, its stdout, the run's out_dir) of RUN with Speeder, the text-item baseline, popularity."""
    home = tmp_path_factory.mktemp("demo")
    path = home / "run.yaml"
    path.write_text(yaml.safe_dump({**RUN, "out_dir": str(home / "run")}))
    capture = pytest.MonkeyPatch()
    lines: list[str] = []
    capture.setattr("builtins.print", lambda *a, **k: lines.append(" ".join(map(str, a))))
    try:
        rows = main(["--config", str(path), "--models", "speeder,text_baseline,popularity"])
    finally:
        capture.undo()
    return rows, "\n".join(lines), home / "run"


def test_speeder_row_is_its_best_validation_epoch(demo):
    rows, _, out = demo
    best, _, data, _, _ = load_trained(out / "speeder" / "best")
    last, _, _, _, _ = load_trained(out / "speeder" / "last")
    assert evaluate(best, data, "valid")["NDCG@10"] > evaluate(last, data, "valid")["NDCG@10"]  # the premise
    expected = evaluate(best, data, "test")
    assert {k: rows["Speeder"][k] for k in expected} == pytest.approx(expected)
    last_test = evaluate(last, data, "test")
    assert any(rows["Speeder"][k] != pytest.approx(last_test[k]) for k in expected)


def test_random_init_text_baseline_row_says_it_is_a_speed_comparison(demo):
    rows, printed, _ = demo
    assert "text-item LLM (random-init backbone, speed only, 10 users)" in rows
    assert RANDOM_INIT_TEXT_BASELINE in printed and "configs/movielens_smollm2.yaml" in RANDOM_INIT_TEXT_BASELINE


def test_pretrained_text_baseline_row_is_named_so():
    cfg = run_config_from_dict({"model": {"backbone": {"gguf_file": "smollm2"}}})
    assert text_baseline_row(cfg, 943) == "text-item LLM (pretrained backbone, 943 users)"
    assert text_baseline_row(run_config_from_dict(RUN), 5) == "text-item LLM (random-init backbone, speed only, 5 users)"
