import math

import numpy as np
import pytest
import torch

from speeder_rt.eval.metrics import ranking_metrics, ranks_from_scores


def test_ranks_hand_computed():
    scores = torch.tensor([[0.1, 0.9, 0.5], [3.0, 1.0, 2.0], [1.0, 1.0, 1.0]])
    label = torch.tensor([1, 2, 0])
    # row 0: target best -> 0; row 1: 3.0 beats 2.0 -> 1; row 2: all tied -> pessimistic 2
    assert ranks_from_scores(scores, label).tolist() == [0, 1, 2]


def test_exclusion_in_full_catalog_mode():
    scores = torch.tensor([[5.0, 4.0, 1.0, 3.0]])
    exclude = torch.tensor([[True, False, False, False]])
    assert ranks_from_scores(scores, torch.tensor([1]), exclude).tolist() == [0]
    # the target itself is never excluded
    assert ranks_from_scores(scores, torch.tensor([0]), exclude).tolist() == [0]


def test_metrics_hand_computed():
    ranks = np.array([0, 1, 4, 12])
    m = ranking_metrics(ranks, ks=(1, 5, 10))
    assert m["HR@1"] == pytest.approx(0.25)
    assert m["HR@5"] == pytest.approx(0.75)
    assert m["HR@10"] == pytest.approx(0.75)
    assert m["NDCG@5"] == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(6)) / 4)
    assert m["MRR"] == pytest.approx((1 + 1 / 2 + 1 / 5 + 1 / 13) / 4)
    assert m["VHR@1"] == m["HR@1"]


def test_vhr_counts_only_valid_outputs():
    m = ranking_metrics(np.array([0, 0, 3]), valid=np.array([True, False, True]))
    assert m["VHR@1"] == pytest.approx(1 / 3)
    assert m["HR@1"] == pytest.approx(2 / 3)


def test_bad_inputs():
    with pytest.raises(ValueError, match="label out of range"):
        ranks_from_scores(torch.zeros(2, 3), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="NaN"):
        ranks_from_scores(torch.tensor([[float("nan"), 1.0]]), torch.tensor([0]))
    with pytest.raises(ValueError, match="no samples"):
        ranking_metrics(np.array([]))
