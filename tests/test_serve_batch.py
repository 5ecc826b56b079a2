"""``speeder_rt.serve.batch`` (what a Triton model instance does with one batch of requests) without Triton: a
request the model scores NaN fails alone, the others of its merged batch are answered as if it were not there."""
import numpy as np
import pytest
import torch
from tiny_model import tiny_speeder

from speeder_rt.export.format import Ranges
from speeder_rt.runtime import Recommender, TorchRunner
from speeder_rt.runtime.validation import ModelOutputError
from speeder_rt.serve.batch import answer

N_ITEMS, POISONED, TOPK = 120, 50, 5


@pytest.fixture(scope="module")
def rec():
    """The tiny model with one NaN text feature for item ``POISONED``: a request that names it (history or
    candidate) is scored NaN, every other request is finite (a top-k over the catalog always meets it: the top-k
    graph shares ``answer``'s per-request fallback)."""
    model = tiny_speeder(N_ITEMS)
    with torch.no_grad():
        model.features_text[POISONED, 0] = float("nan")
    return Recommender(TorchRunner(model, TOPK), N_ITEMS, Ranges(max_batch=32, max_history=12, max_candidates=20),
                       "torch")


def request(histories, candidates):
    width = max(map(len, histories))
    ids = np.array([list(h) + [-1] * (width - len(h)) for h in histories], dtype=np.int64)
    mask = np.array([[True] * len(h) + [False] * (width - len(h)) for h in histories])
    return {"history_ids": ids, "history_mask": mask, "candidate_ids": np.array(candidates, dtype=np.int64)}


def test_a_request_scored_nan_fails_alone_in_a_merged_scores_batch(rec):
    requests = [request([[3, 17, 5], [8]], [[1, 2, 3], [4, 5, 6]]),
                request([[9, 10], [11]], [[12, 13, 14], [15, POISONED, 16]]),  # its row 1 is scored NaN
                request([[0, 1, 2, 3]], [[7, 8, 9, 10]])]  # another candidate count: a call of its own
    answers = answer(rec, "scores", requests)
    assert isinstance(answers[1], ModelOutputError)
    assert str(answers[1]).startswith("history_ids[1]: the model scored candidate 0 nan")  # the row in ITS request
    for i in (0, 2):
        alone = answer(rec, "scores", [requests[i]])[0]
        np.testing.assert_array_equal(answers[i]["scores"], alone["scores"])
        assert np.isfinite(answers[i]["scores"]).all()

