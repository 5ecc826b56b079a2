import numpy as np
import pytest

from speeder_rt.baselines.sasrec import SASRecConfig, add_collab_features, train_sasrec
from speeder_rt.baselines.simple import PopularityScorer, RandomScorer
from speeder_rt.data import build_sequences, generate_synthetic
from speeder_rt.eval.protocol import evaluate


@pytest.fixture(scope="module")
def default_data():
    inter, table = generate_synthetic()
    return build_sequences(inter), table


@pytest.mark.slow
def test_sasrec_beats_popularity_clearly_on_default_data(default_data):
    data, table = default_data
    model = train_sasrec(data, SASRecConfig(epochs=20, eval_every=10), log=lambda *_: None)
    sasrec = evaluate(model, data, "test")
    pop = evaluate(PopularityScorer(data), data, "test")
    rand = evaluate(RandomScorer(data.num_items), data, "test")
    assert sasrec["HR@1"] > pop["HR@1"] + 0.15, (sasrec, pop)
    assert pop["HR@1"] > rand["HR@1"]
    assert abs(rand["HR@1"] - 1 / 20) < 0.03
    add_collab_features(table, model)
    assert table.features["collab"].shape == (data.num_items, 64)


def test_full_catalog_mode_excludes_seen_items(default_data):
    data, _ = default_data
    full = evaluate(PopularityScorer(data), data, "test", full_catalog=True, ks=(10,))
    cand = evaluate(PopularityScorer(data), data, "test", ks=(10,))
    assert 0 < full["HR@10"] < cand["HR@10"]


def test_sasrec_reads_the_last_real_items_of_right_padded_histories():
    from speeder_rt.baselines.sasrec import SASRec

    history = np.array([[10, 11, 12, 13, 14, -1], [20, 21, -1, -1, -1, -1]])
    seq = SASRec.left_pad(history, np.array([5, 2]), max_len=4)
    assert seq.tolist() == [[12, 13, 14, 15], [0, 0, 21, 22]]
    with pytest.raises(ValueError, match="epochs"):
        SASRecConfig(epochs=0)
