"""speeder_rt.catalog.ItemIndex: exact top-k against a numpy reference, FAISS recall against exact, add,
save / load, and the refusals (non-finite input, wrong widths, k out of range, a sidecar that does not match)."""
from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("faiss", reason="faiss-cpu (the catalog extra, pip install 'speeder_rt[catalog]') is not installed")

from speeder_rt.catalog import ItemIndex, recall
from speeder_rt.catalog.ann import EXACT_MAX_ITEMS
from speeder_rt.catalog.synthetic import clustered_catalog

RECALL_FLOOR = 0.95  # recall@10 of the tuned ANN kinds against exact on the clustered catalog


def reference_topk(queries: np.ndarray, tokens: np.ndarray, k: int, exclude: np.ndarray | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Brute force in float64: every score, excluded ids at -inf, sorted by (score descending, id)."""
    scores = queries.astype(np.float64) @ tokens.astype(np.float64).T
    if exclude is not None:
        for row, ids in enumerate(exclude):
            scores[row, ids[ids >= 0]] = -np.inf
    ids = np.broadcast_to(np.arange(len(tokens)), scores.shape)
    order = np.lexsort((ids, -scores), axis=-1)[:, :k]
    return np.take_along_axis(scores, order, axis=1), order


@pytest.fixture(scope="module")
def integer_catalog() -> tuple[np.ndarray, np.ndarray]:
    """Small integer entries: every score is exact in float32 whatever the summation order, and many tie."""
    rng = np.random.default_rng(0)
    return (rng.integers(-2, 3, (3000, 6)).astype(np.float32), rng.integers(-2, 3, (40, 6)).astype(np.float32))


@pytest.fixture(scope="module")
def clustered() -> tuple[np.ndarray, np.ndarray]:
    return clustered_catalog(EXACT_MAX_ITEMS, 32, 200, seed=3)


@pytest.fixture(scope="module")
def ivf(clustered: tuple[np.ndarray, np.ndarray]) -> ItemIndex:
    return ItemIndex.build(clustered[0], "auto")  # 50,000 items: approximate


@pytest.fixture(scope="module")
def hnsw() -> ItemIndex:
    return ItemIndex.build(clustered_catalog(4000, 16, 0, seed=4)[0], "hnsw")


def check_against_reference(got: tuple[np.ndarray, np.ndarray], want: tuple[np.ndarray, np.ndarray],
                            queries: np.ndarray, tokens: np.ndarray) -> None:
    """Scores equal value for value; ids are distinct, score what is reported, ascend within equal scores,
    and match the reference wherever the score beats the k-th (ties at the k-th are FAISS's choice)."""
    (scores, ids), (want_scores, want_ids) = got, want
    np.testing.assert_array_equal(scores, want_scores.astype(np.float32))
    assert all(len(set(row)) == len(row) for row in ids)
    np.testing.assert_array_equal(np.einsum("bd,bkd->bk", queries, tokens[ids]), scores)
    same = scores[:, 1:] == scores[:, :-1]
    assert (ids[:, 1:][same] > ids[:, :-1][same]).all()
    above = scores > scores[:, -1:]
    np.testing.assert_array_equal(ids[above], want_ids[above])


def test_exact_equals_numpy_reference_with_ties(integer_catalog: tuple[np.ndarray, np.ndarray]) -> None:
    tokens, queries = integer_catalog
    index = ItemIndex.build(tokens, "auto")
    assert index.kind == "exact" and index.size == 3000 and index.dim == 6
    for batch in (1, 5, 40):  # FAISS's single-query, SIMD and BLAS paths
        for k in (1, 20, 3000):
            got = index.search(queries[:batch], k)
            check_against_reference(got, reference_topk(queries[:batch], tokens, k), queries[:batch], tokens)
    assert (index.search(queries, 20)[0][:, 0] == (queries @ tokens.T).max(axis=1)).all()


def test_exclusions_are_never_returned(integer_catalog: tuple[np.ndarray, np.ndarray]) -> None:
    tokens, queries = integer_catalog
    index = ItemIndex.build(tokens, "exact")
    exclude = np.random.default_rng(1).integers(-1, 3000, (40, 12))  # -1: padding
    exclude[0] = index.search(queries[:1], 12)[1][0]  # row 0: its own top 12
    scores, ids = index.search(queries, 10, exclude=exclude)
    assert not (ids[:, :, None] == exclude[:, None, :]).any()
    check_against_reference((scores, ids), reference_topk(queries, tokens, 10, exclude), queries, tokens)


def test_slots_without_an_item_are_nan_and_minus_one() -> None:
    tokens = np.eye(4, dtype=np.float32)
    index = ItemIndex.build(tokens, "exact")
    scores, ids = index.search(np.ones((2, 4), np.float32), 4, exclude=np.array([[0, 2], [-1, -1]]))
    np.testing.assert_array_equal(ids, [[1, 3, -1, -1], [0, 1, 2, 3]])
    assert np.isnan(scores[0, 2:]).all() and np.isfinite(scores[0, :2]).all() and np.isfinite(scores[1]).all()


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_ann_recall_at_10_against_exact(kind: str, request: pytest.FixtureRequest,
                                        clustered: tuple[np.ndarray, np.ndarray]) -> None:
    index: ItemIndex = request.getfixturevalue(kind)
    tokens, queries = clustered if kind == "ivf" else clustered_catalog(4000, 16, 200, seed=4)
    assert index.kind == kind and index.params["tuned_recall@10"] >= RECALL_FLOOR
    _, want = ItemIndex.build(tokens, "exact").search(queries, 10)
    scores, got = index.search(queries, 10)
    assert recall(got, want) >= RECALL_FLOOR
    np.testing.assert_allclose(scores, np.einsum("bd,bkd->bk", queries, tokens[got]), rtol=1e-5, atol=1e-4)


def test_search_effort_trades_recall(ivf: ItemIndex, clustered: tuple[np.ndarray, np.ndarray]) -> None:
    tokens, queries = clustered
    _, want = ItemIndex.build(tokens, "exact").search(queries, 10)
    tuned = ivf.params["nprobe"]
    try:
        ivf.set_search_effort(ivf.params["nlist"])  # every cell: exact
        assert recall(ivf.search(queries, 10)[1], want) == 1.0
        ivf.set_search_effort(1)
        assert ivf.params["nprobe"] == 1 and recall(ivf.search(queries, 10)[1], want) < RECALL_FLOOR
    finally:
        ivf.set_search_effort(tuned)
    with pytest.raises(ValueError, match="search effort must be an integer >= 1; got 0"):
        ivf.set_search_effort(0)
    with pytest.raises(ValueError, match="the exact index has no search effort"):
        ItemIndex.build(tokens[:10], "exact").set_search_effort(4)


def test_recall_counts_the_exact_ids_found() -> None:
    want = np.array([[1, 2, 3, 4], [5, 6, -1, -1]])
    assert recall(np.array([[4, 3, 9, 8], [6, 5, 7, -1]]), want) == 4 / 6
    assert recall(want, want) == 1.0


def test_kind_auto_chooses_by_size(ivf: ItemIndex) -> None:
    assert ItemIndex.build(clustered_catalog(EXACT_MAX_ITEMS - 1, 8, 0)[0], "auto").kind == "exact"
    assert ItemIndex.build(clustered_catalog(1000, 8, 0)[0], "faiss").kind == "ivf"
    assert ivf.size == EXACT_MAX_ITEMS and ivf.kind == "ivf"


@pytest.mark.parametrize("kind", ["exact", "ivf", "hnsw"])
def test_add_appends_ids_and_keeps_the_old_ones(kind: str) -> None:
    everything, queries = clustered_catalog(3300, 16, 200, seed=5)
    tokens, new = everything[:3000], everything[3000:]  # the new items follow the catalog's law
    index = ItemIndex.build(tokens, kind)
    before = index.search(queries, 5)
    np.testing.assert_array_equal(index.add(new), np.arange(3000, 3300))
    assert index.size == 3300
    scores, ids = index.search(queries, 10)
    want = reference_topk(queries, everything, 10)
    assert (want[1] >= 3000).mean() > 0.05  # the new items do matter to these queries
    if kind == "exact":
        np.testing.assert_array_equal(ids, want[1])
        np.testing.assert_allclose(scores, want[0], rtol=1e-5)
    else:
        assert recall(ids, want[1]) >= RECALL_FLOOR
    old_scores, old_ids = index.search(queries, 5, exclude=np.tile(np.arange(3000, 3300), (200, 1)))
    if kind == "exact":  # the old items keep their ids and answers
        np.testing.assert_array_equal(old_ids, before[1])
        np.testing.assert_array_equal(old_scores, before[0])
    np.testing.assert_allclose(old_scores, np.einsum("bd,bkd->bk", queries, tokens[old_ids]), rtol=1e-5, atol=1e-4)
    assert index.add(np.zeros((0, 16), np.float32)).size == 0 and index.size == 3300


@pytest.mark.parametrize("kind", ["exact", "ivf", "hnsw"])
def test_save_load_round_trip(kind: str, tmp_path, request: pytest.FixtureRequest,
                              clustered: tuple[np.ndarray, np.ndarray]) -> None:
    index: ItemIndex = (ItemIndex.build(clustered[0][:2000], "exact") if kind == "exact"
                        else request.getfixturevalue(kind))
    queries = clustered[1][:, :index.dim]
    index.save(tmp_path / "index")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index"]  # no temporary left beside it
    loaded = ItemIndex.load(tmp_path / "index")
    assert (loaded.kind, loaded.size, loaded.dim, loaded.params) == (index.kind, index.size, index.dim, index.params)
    for got, want in zip(loaded.search(queries, 10), index.search(queries, 10)):
        np.testing.assert_array_equal(got, want)
    index.save(tmp_path / "index")  # overwriting is atomic too
    np.testing.assert_array_equal(ItemIndex.load(tmp_path / "index").search(queries, 3)[1], index.search(queries, 3)[1])


@pytest.fixture
def saved(tmp_path) -> tuple:
    ItemIndex.build(np.eye(8, dtype=np.float32), "exact").save(tmp_path / "index")
    return tmp_path / "index", json.loads((tmp_path / "index" / "index.json").read_text())


@pytest.mark.parametrize("field, value, message", [
    ("size", 9, "field 'size' is 9, but .*index.faiss holds size 8"),
    ("dim", 4, "field 'dim' is 4, but .*index.faiss holds dim 8"),
    ("kind", "hnsw", "field 'kind' is 'hnsw', but .*index.faiss holds kind 'IndexFlatIP'"),
    ("kind", "lsh", "field 'kind' is 'lsh'"),
    ("metric", "l2", "field 'metric' is 'l2'"),
    ("format_version", 2, "field 'format_version' is 2"),
    ("max_token_norm", float("nan"), "field 'max_token_norm'"),
])
def test_mismatched_sidecar_is_refused(saved: tuple, field: str, value, message: str) -> None:
    path, meta = saved
    (path / "index.json").write_text(json.dumps({**meta, field: value}))
    with pytest.raises(ValueError, match=f"index.json: {message}"):
        ItemIndex.load(path)


def test_damaged_or_missing_files_are_refused(saved: tuple) -> None:
    path, meta = saved
    (path / "index.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "params"}))
    with pytest.raises(ValueError, match="index.json: field 'params' missing"):
        ItemIndex.load(path)
    (path / "index.json").write_text(json.dumps(meta))
    (path / "index.faiss").write_bytes(b"not an index")
    with pytest.raises(ValueError, match="index.faiss: not a readable FAISS index"):
        ItemIndex.load(path)
    (path / "index.faiss").unlink()
    with pytest.raises(ValueError, match="index.faiss: missing"):
        ItemIndex.load(path)


def test_bad_inputs_are_refused_with_the_reason() -> None:
    tokens = np.eye(8, dtype=np.float32)
    with pytest.raises(ValueError, match=r"tokens: row 3, column 5 is nan"):
        ItemIndex.build(np.where(np.arange(64).reshape(8, 8) == 29, np.nan, tokens), "exact")
    with pytest.raises(ValueError, match=r"tokens: row 0, column 0 is inf"):
        ItemIndex.build(np.full((2, 8), 1e300), "exact")  # finite float64, infinite in float32
    with pytest.raises(ValueError, match="tokens: the catalog is empty"):
        ItemIndex.build(np.zeros((0, 8), np.float32))
    with pytest.raises(ValueError, match="tokens: a floating-point array expected; got dtype int64"):
        ItemIndex.build(np.eye(8, dtype=np.int64))
    with pytest.raises(ValueError, match="kind must be one of"):
        ItemIndex.build(tokens, "annoy")  # type: ignore[arg-type]
    index = ItemIndex.build(tokens, "exact")
    with pytest.raises(ValueError, match="tokens: row 0, column 1 is inf"):
        index.add(np.where(np.eye(2, 8, 1, dtype=bool), np.inf, 0).astype(np.float32))
    assert index.size == 8  # nothing was added
    with pytest.raises(ValueError, match="tokens: width 4 does not match the index's dim 8"):
        index.add(np.zeros((1, 4), np.float32))
    with pytest.raises(ValueError, match="queries: width 7 does not match the index's dim 8"):
        index.search(np.zeros((1, 7), np.float32), 3)
    with pytest.raises(ValueError, match=r"queries: a 2-D array \[rows, d\]"):
        index.search(np.zeros(8, np.float32), 3)
    with pytest.raises(ValueError, match="queries: row 0, column 1 is nan"):
        index.search(np.array([[0, np.nan, 0, 0, 0, 0, 0, 0]], np.float32), 3)
    for k in (0, 9, 2.0, True):
        with pytest.raises(ValueError, match=r"k must be an integer in 1..8 \(the catalog size\)"):
            index.search(tokens, k)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"exclude: an integer array \[B=8, W\]"):
        index.search(tokens, 3, exclude=np.zeros((7, 2), np.int64))
    with pytest.raises(ValueError, match=r"exclude: row 1, column 0 is 8, outside the catalog's ids 0..7"):
        index.search(tokens[:2], 3, exclude=np.array([[-1, 3], [8, 0]]))


def test_a_query_that_could_overflow_is_refused_not_ranked() -> None:
    index = ItemIndex.build(np.full((4, 8), 1e19, np.float32), "exact")  # finite tokens, |t| ~ 2.8e19
    assert np.isfinite(index.search(np.full((1, 8), 1e18, np.float32), 4)[0]).all()
    with pytest.raises(ValueError, match="queries: row 1 could overflow float32 scores"):
        index.search(np.array([[1.0] * 8, [1e19] * 8], np.float32), 2)
