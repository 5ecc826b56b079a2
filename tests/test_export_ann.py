"""Exports with an ANN index (issue 24, item 3): ``export_model(index=...)`` saves a FAISS index in the item-table
version (``items/vNNNNNN/index/``) and a query graph beside the others; ``Recommender.topk`` answers through them
(query graph -> ``ItemIndex.search``, history excluded) with the exact path's contract; ``catalog add --export``
extends the index in the new version; ``reload_items`` switches to it; without FAISS, a clear error.

One ONNX export (index ``flat``: FAISS's exact scan) serves every test; the IVF test swaps in a seeded 20,000-item
table through a new version (the graphs take the table as an input), as ``catalog add`` would."""
import json
import shutil
import sys

import numpy as np
import pytest
from tiny_model import tiny_speeder

pytest.importorskip("faiss", reason="faiss-cpu (the catalog extra) is not installed")

import speeder_rt.catalog
from speeder_rt.catalog import EXACT_MAX_ITEMS, ItemIndex, recall
from speeder_rt.catalog import __main__ as catalog_cli
from speeder_rt.catalog.synthetic import clustered_catalog
from speeder_rt.export.add_items import add_export_items
from speeder_rt.export.exporter import ExportError, export_model
from speeder_rt.export.format import Ranges
from speeder_rt.export.index import index_kind, tuning_queries
from speeder_rt.export.items import read_item_tokens, read_pointer, write_item_tokens
from speeder_rt.runtime import Recommender
from speeder_rt.runtime.recommender import pad_histories
from speeder_rt.runtime.validation import ModelOutputError

N_ITEMS, RANGES, K = 60, Ranges(max_batch=4, max_history=6, max_candidates=8), 10
COPIED = [9, 0, 59, 9]  # existing items whose tokens the added ones (ids 60..63) carry
IVF_ITEMS, RECALL_FLOOR = 20_000, 0.9  # the IVF is tuned to recall@10 0.95 on other histories than the measured ones


def random_histories(num_items, count, seed):
    rng = np.random.default_rng(seed)
    return [rng.choice(num_items, size=rng.integers(1, RANGES.max_history + 1), replace=False).tolist()
            for _ in range(count)]


def exact_topk(rec, histories):
    """The exact top-k graph's answer (what ``topk`` returns without an index), cut at K."""
    ids, scores = rec.runner.topk(*pad_histories([np.asarray(h) for h in histories]))
    return ids[:, :K], scores[:, :K]


def assert_history_excluded(histories, ids):
    for history, row in zip(histories, ids):
        assert not set(history) & set(row.tolist())


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("ann") / "export"
    export_model(tiny_speeder(N_ITEMS), "onnx", out, ranges=RANGES, topk=K, device="cpu", index="flat",
                 log=lambda *_: None)
    return out


@pytest.fixture
def copy_of(export_dir, tmp_path):
    out = tmp_path / "export"
    shutil.copytree(export_dir, out)
    return out


def test_the_export_saves_the_index_in_the_version_and_a_parity_checked_query_graph(export_dir):
    pointer = read_pointer(export_dir)
    assert pointer["index"] == "v000001/index"
    index = ItemIndex.load(export_dir / "items" / pointer["index"])
    assert (index.kind, index.size) == ("exact", N_ITEMS)
    meta = json.loads((export_dir / "export.json").read_text())
    assert meta["index"] == {"requested": "flat", "kind": "exact"}
    assert meta["graphs"]["query"]["outputs"] == [{"name": "query", "dtype": "float32",
                                                   "shape": ["batch", meta["hidden_size"]]}]
    parity = json.loads((export_dir / "parity.json").read_text())
    assert parity["query"]["passed"] and parity["query"]["max_rel_error"] <= parity["atol"]
    assert len(parity["query"]["cases"]) == len(parity["scores"]["cases"])


def test_topk_through_a_flat_index_equals_the_exact_graph(export_dir):
    rec = Recommender.load(export_dir)
    assert rec.index is not None and rec.index.kind == "exact"
    histories = random_histories(N_ITEMS, 11, seed=0)  # 11 rows: three chunks of max_batch 4
    ids, scores = rec.topk(histories, k=K)
    want_ids, want_scores = exact_topk(rec, histories)
    assert ids.dtype == np.int64 and scores.dtype == np.float32 and ids.shape == (11, K)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-6)
    assert np.isfinite(scores).all()
    assert_history_excluded(histories, ids)
    top3_ids, top3_scores = rec.topk(histories, k=3)
    np.testing.assert_array_equal(top3_ids, ids[:, :3])


def test_a_row_the_index_leaves_short_is_answered_by_the_exact_graph(export_dir, monkeypatch):
    rec = Recommender.load(export_dir)
    search = rec.index.search

    def short_search(queries, k, exclude=None):  # an approximate index whose probed cells held too few items
        scores, ids = search(queries, k, exclude)
        scores[0, -1], ids[0, -1] = np.nan, -1
        return scores, ids

    monkeypatch.setattr(rec.index, "search", short_search)
    histories = random_histories(N_ITEMS, 3, seed=1)
    ids, scores = rec.topk(histories, k=K)
    want_ids, want_scores = exact_topk(rec, histories)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-6)


def test_a_non_finite_query_vector_is_refused_as_a_model_fault_naming_the_row(export_dir, monkeypatch):
    rec = Recommender.load(export_dir)
    query, calls = rec.runner.query, []

    def broken_query(history_ids, history_mask):  # the second chunk's second row gets a NaN query vector
        vectors = query(history_ids, history_mask)
        calls.append(1)
        if len(calls) == 2:
            vectors[1, 3] = np.nan
        return vectors

    monkeypatch.setattr(rec.runner, "query", broken_query)
    with pytest.raises(ModelOutputError, match=r"history_ids\[5\]: the model scored item \d+ \(rank 0\) nan"):
        rec.topk(random_histories(N_ITEMS, 6, seed=3), k=K)  # row 5: the second row of the second chunk of 4


def test_ivf_recall_on_a_seeded_catalog_and_reload_picks_up_the_new_index(copy_of):
    rec = Recommender.load(copy_of)
    tokens, _ = clustered_catalog(IVF_ITEMS, read_item_tokens(copy_of).tokens.shape[1], 0, seed=0)
    rec.runner.set_item_tokens(tokens)  # the query graph's vectors over the new table: what the IVF is tuned on
    ivf = ItemIndex.build(tokens, "ivf", tune_queries=tuning_queries(rec.runner, IVF_ITEMS, RANGES, seed=0))
    write_item_tokens(copy_of, tokens, version=2, index=ivf)
    assert rec.reload_items() and rec.index.kind == "ivf" and rec.num_items == IVF_ITEMS
    histories = random_histories(IVF_ITEMS, 64, seed=2)
    ids, scores = rec.topk(histories, k=K)
    want_ids, _ = exact_topk(rec, histories)
    assert recall(ids, want_ids) >= RECALL_FLOOR
    assert np.isfinite(scores).all() and (np.diff(scores, axis=1) <= 0).all()
    assert_history_excluded(histories, ids)


def test_catalog_add_extends_the_index_and_added_copies_rank_like_their_originals(copy_of, tmp_path, capsys):
    before = read_item_tokens(copy_of)
    new = tmp_path / "new.npy"
    np.save(new, before.tokens[COPIED])
    assert catalog_cli.main(["add", "--export", str(copy_of), "--tokens", str(new)]) == 0
    assert "ANN index extended" in capsys.readouterr().out
    after = read_item_tokens(copy_of)
    index = ItemIndex.load(after.index_dir(copy_of))
    assert (after.version, index.size, index.kind) == (2, N_ITEMS + len(COPIED), "exact")
    rec = Recommender.load(copy_of)
    histories = [[3, 17, 5], [8], [1, 2, 3, 4], [9, 3], [0, 59]]
    ids, scores = rec.topk(histories, k=K)
    want_ids, want_scores = exact_topk(rec, histories)
    original = {N_ITEMS + i: item for i, item in enumerate(COPIED)}
    for row, want_row, got_scores in zip(ids, want_ids, scores):
        # a copy scores its original's score exactly, so equal-score neighbours may swap: compare as originals
        assert sorted(original.get(int(i), int(i)) for i in row) == sorted(original.get(int(i), int(i)) for i in want_row)
        ranked = dict(zip(row.tolist(), got_scores.tolist()))
        for copy, item in original.items():
            if copy in ranked and item in ranked:
                assert ranked[copy] == ranked[item]
    np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-6)
    assert any(i >= N_ITEMS for i in ids.ravel())  # the copies of top items do rank
    assert_history_excluded(histories, ids)


def test_reload_items_switches_to_the_extended_index(copy_of):
    rec = Recommender.load(copy_of)
    add_export_items(copy_of, read_item_tokens(copy_of).tokens[COPIED])
    assert rec.reload_items()
    assert (rec.items_version, rec.index.size) == (2, N_ITEMS + len(COPIED))
    ids, _ = rec.topk([[N_ITEMS + 1]], k=K)  # a new id is accepted and excluded from its own top-k
    assert N_ITEMS + 1 not in ids[0]


def test_without_faiss_an_indexed_export_is_refused_naming_the_extra(copy_of, monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss raises ImportError
    monkeypatch.delitem(sys.modules, "speeder_rt.catalog.ann")
    monkeypatch.delattr(speeder_rt.catalog, "ann", raising=False)
    extra = r"pip install 'speeder_rt\[catalog\]'"
    with pytest.raises(ValueError, match=extra):
        Recommender.load(copy_of)
    with pytest.raises(ValueError, match=extra):
        add_export_items(copy_of, read_item_tokens(copy_of).tokens[:1])
    assert read_pointer(copy_of)["version"] == 1  # nothing written
    with pytest.raises(ExportError, match=extra):  # said before any graph is built
        export_model(tiny_speeder(N_ITEMS), "onnx", copy_of.parent / "new", ranges=RANGES, topk=K, device="cpu",
                     index="faiss", log=lambda *_: None)
    assert not (copy_of.parent / "new").exists()


def test_index_choice():
    assert index_kind("auto", "onnx", K, EXACT_MAX_ITEMS - 1) is None
    assert index_kind("auto", "aoti", K, EXACT_MAX_ITEMS) == "faiss"
    assert index_kind("auto", "trt", K, EXACT_MAX_ITEMS) is None  # no query graph in a TensorRT export
    assert index_kind("auto", "onnx", 0, EXACT_MAX_ITEMS) is None  # no top-k to answer
    assert index_kind("exact", "onnx", K, 10**7) is None
    assert [index_kind(i, "onnx", K, 100) for i in ("faiss", "flat", "ivf", "hnsw")] == ["faiss", "exact", "ivf", "hnsw"]
    with pytest.raises(ValueError, match="--index faiss: TensorRT exports have no query graph"):
        index_kind("faiss", "trt", K, 100)
    with pytest.raises(ValueError, match="--index ivf answers full-catalog top-k: it needs --topk >= 1"):
        index_kind("ivf", "onnx", 0, 100)
    with pytest.raises(ValueError, match="--index must be one of"):
        index_kind("annoy", "onnx", K, 100)


def test_a_version_whose_index_does_not_cover_its_table_is_refused(tmp_path):
    tokens = np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32)
    with pytest.raises(ValueError, match="the index holds 7 items, the table 8"):
        write_item_tokens(tmp_path, tokens, version=1, index=ItemIndex.build(tokens[:7], "exact"))
    assert not (tmp_path / "items" / "v000001").exists()
