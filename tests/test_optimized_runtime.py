"""OptimizedSpeeder: bucketed static shapes, item-token table, fast backend, CUDA graphs -- same scores as the model."""
import copy

import numpy as np
import pytest
import torch

from speeder_rt.data import SyntheticConfig, generate_synthetic
from speeder_rt.model import BackboneConfig, SpeederConfig, SpeederModel
from speeder_rt.runtime.optimized import OptimizedSpeeder
from speeder_rt.runtime.validation import RequestError


@pytest.fixture(scope="module")
def table():
    _, table = generate_synthetic(SyntheticConfig(n_items=120, n_users=20, seed=3))
    table.set_modality("collab", np.random.default_rng(0).normal(size=(len(table), 6)))
    return table


def make_model(table, dtype: str = "float32") -> SpeederModel:
    torch.manual_seed(0)
    model = SpeederModel(SpeederConfig(backbone=BackboneConfig(shape="tiny", dtype=dtype), d_expert=32), table).eval()
    with torch.no_grad():
        model.slopes.uniform_(0.1, 1.0)  # a bias that matters
        model.candidate_embedding.normal_(std=0.02)
    return model


def requests(batch: int, width: int, num_items: int, k: int = 20, seed: int = 0, device: str = "cpu"):
    gen = torch.Generator().manual_seed(seed)
    history_len = torch.randint(1, width + 1, (batch,), generator=gen)
    history = torch.randint(0, num_items, (batch, width), generator=gen)
    history = torch.where(torch.arange(width)[None] < history_len[:, None], history, -1)
    candidates = torch.randint(0, num_items, (batch, k), generator=gen)
    return history.to(device), history_len.to(device), candidates.to(device)


def spy_shapes(fast: OptimizedSpeeder) -> list[tuple[int, int, int]]:
    """Record (rows, history width, K) of every call of the scoring function."""
    shapes, fn = [], fast._fn

    def wrapper(history, history_len, candidates):
        shapes.append((history.shape[0], history.shape[1], candidates.shape[1]))
        return fn(history, history_len, candidates)

    fast._fn = wrapper
    return shapes


@pytest.mark.parametrize("batch, width", [(1, 10), (3, 7), (4, 13), (5, 50)])
def test_scores_equal_the_model_and_shapes_are_bucketed(table, batch, width):
    model = make_model(table)
    naive = copy.deepcopy(model)  # reference backend, MoME tokens computed every call
    fast = OptimizedSpeeder(model, buckets=(1, 2, 4, 8), history_buckets=(10, 20))
    shapes = spy_shapes(fast)
    inputs = requests(batch, width, len(table), seed=batch)
    expected = naive(*inputs)
    got = fast.scores(*inputs)
    assert got.shape == (batch, 20) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    rows = next(b for b in (1, 2, 4, 8) if b >= batch)
    assert shapes == [(rows, next(w for w in (10, 20, 50) if w >= width), 20)]
    assert fast.backend == "sdpa" and fast.history_buckets == [10, 20, 50]


def test_batch_larger_than_the_biggest_bucket_is_split(table):
    model = make_model(table)
    naive = copy.deepcopy(model)
    fast = OptimizedSpeeder(model, buckets=(1, 4), history_buckets=(10,))
    shapes = spy_shapes(fast)
    inputs = requests(11, 10, len(table), k=7, seed=11)
    torch.testing.assert_close(fast.scores(*inputs), naive(*inputs), rtol=1e-5, atol=1e-5)
    assert shapes == [(4, 10, 7)] * 3  # 4 + 4 + 3 (padded to 4)


def test_padding_rows_and_columns_do_not_leak(table):
    fast = OptimizedSpeeder(make_model(table), buckets=(8,), history_buckets=(20,))
    history, history_len, candidates = requests(3, 5, len(table), seed=7)
    alone = fast.scores(history[:1], history_len[:1], candidates[:1])
    together = fast.scores(history, history_len, candidates)
    torch.testing.assert_close(together[:1], alone, rtol=1e-6, atol=1e-6)
    history[0, history_len[0]:] = 17  # ids beyond history_len are ignored, like PAD
    torch.testing.assert_close(fast.scores(history[:1], history_len[:1], candidates[:1]), alone, rtol=0, atol=0)


def test_invalid_requests_are_refused(table):
    fast = OptimizedSpeeder(make_model(table), buckets=(4,))
    history, history_len, candidates = requests(2, 10, len(table))
    with pytest.raises(ValueError, match="max_history"):
        fast.scores(torch.zeros(2, 51, dtype=torch.int64), history_len, candidates)
    with pytest.raises(ValueError, match="candidate ids"):
        fast.scores(history, history_len, candidates + len(table))
    with pytest.raises(ValueError, match="history_len"):
        fast.scores(history, history_len + 10, candidates)
    with pytest.raises(ValueError, match=r"history \[B, W\]"):
        fast.scores(history, history_len[:1], candidates)
    with pytest.raises(ValueError, match="buckets"):
        OptimizedSpeeder(make_model(table), buckets=())


@pytest.mark.parametrize("name, dtype, message", [
    ("history", torch.float32, "history: item ids must be integers, got dtype float32"),
    ("candidates", torch.bool, "candidates: item ids must be integers, got dtype bool"),
    ("history_len", torch.float64, "history_len: lengths must be integers, got dtype float64"),
])
def test_scores_refuses_non_integer_tensors_instead_of_truncating_them(table, name, dtype, message):
    fast = OptimizedSpeeder(make_model(table), buckets=(4,))
    inputs = dict(zip(("history", "history_len", "candidates"), requests(2, 10, len(table))))
    inputs[name] = inputs[name].to(dtype)
    with pytest.raises(RequestError) as caught:
        fast.scores(**inputs)
    assert (str(caught.value), caught.value.field) == (message, name)


def test_candidate_count_is_bounded_by_max_candidates(table):
    fast = OptimizedSpeeder(make_model(table), buckets=(4,), max_candidates=7)
    history, history_len, candidates = requests(2, 10, len(table), k=8)
    with pytest.raises(RequestError, match=r"^candidates: 8 candidates per user, outside 1..max_candidates=7$"):
        fast.scores(history, history_len, candidates)
    with pytest.raises(RequestError, match=r"^candidate_ids: 8 candidates per user, outside 1..max_candidates=7$"):
        fast.recommend([[1, 2]] * 2, candidates.tolist())


def test_recommend_takes_the_recommenders_requests_with_the_scores_of_scores(table):
    fast = OptimizedSpeeder(make_model(table), buckets=(1, 2), history_buckets=(10,))
    history, history_len, candidates = requests(5, 10, len(table), k=6, seed=9)  # 5 users: 3 chunks of <= 2
    rows = [h[:n].tolist() for h, n in zip(history, history_len)]
    got = fast.recommend(rows, candidates.numpy().astype(np.uint8))
    assert isinstance(got, np.ndarray) and got.dtype == np.float32
    np.testing.assert_array_equal(got, fast.scores(history, history_len, candidates).numpy())
    with pytest.raises(RequestError, match=r"^history_ids\[1\]: item ids must be in 0..119, got 120$"):
        fast.recommend([[1], [2, 120]], [[1], [2]])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, tol", [("float32", 1e-4), ("bfloat16", 5e-2)])
def test_cuda_graphs_match_the_model(table, dtype, tol):
    model = make_model(table, dtype).cuda()
    naive = copy.deepcopy(model)
    fast = OptimizedSpeeder(model, buckets=(1, 4, 16), history_buckets=(10, 20))
    assert fast.use_cuda_graphs and fast.backend == "triton"
    for batch, width, seed in [(3, 10, 0), (3, 10, 1), (16, 20, 2), (40, 7, 3), (1, 50, 4)]:
        inputs = requests(batch, width, len(table), seed=seed, device="cuda")
        expected = naive(*inputs)
        got = fast.scores(*inputs)
        scale = max(1.0, expected.abs().max().item())
        assert (got - expected).abs().max().item() <= tol * scale, (batch, width)
    assert set(fast._graphs) == {(4, 10, 20), (16, 20, 20), (16, 10, 20), (1, 50, 20)}


@pytest.mark.slow
def test_compiled_scores_equal_the_model(table):
    model = make_model(table)
    naive = copy.deepcopy(model)
    fast = OptimizedSpeeder(model, buckets=(4,), history_buckets=(10,), compile=True)
    inputs = requests(3, 10, len(table), seed=5)
    torch.testing.assert_close(fast.scores(*inputs), naive(*inputs), rtol=1e-5, atol=1e-5)
