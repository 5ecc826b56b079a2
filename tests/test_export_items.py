"""Exports with a swappable item table (issue 24): the graphs take ``item_tokens`` as an input, the table is a versioned
file beside them (``speeder_rt.export.items``), ``add_export_items`` / ``python -m speeder_rt.catalog add --export``
append rows as a new version, and every runner scores the grown table like the model: items added with the tokens of
existing items score exactly like them (PyTorch, ONNX Runtime, AOTInductor), ids past the new size stay invalid."""
import json

import numpy as np
import pytest
import torch
from tiny_model import tiny_speeder

from speeder_rt.catalog import __main__ as catalog_cli
from speeder_rt.export.add_items import add_export_items
from speeder_rt.export.exporter import export_model
from speeder_rt.export.format import Ranges
from speeder_rt.export.items import ITEMS_DIR, read_item_tokens, read_pointer, write_item_tokens
from speeder_rt.runtime import Recommender
from speeder_rt.runtime.torch_runner import TorchRunner

N_ITEMS, RANGES, K = 60, Ranges(max_batch=4, max_history=6, max_candidates=8), 5
COPIED = [9, 0, 59, 9]  # existing items whose tokens the new ones (ids 60..63) carry
HISTORY = [[3, 17, 5], [8], [1, 2, 3, 4]]
CANDIDATES = np.array([[9, 0, 59, 11], [59, 9, 2, 0], [0, 1, 9, 59]])


@pytest.fixture(scope="module")
def model():
    return tiny_speeder(N_ITEMS)


def export(model, engine, tmp_path_factory, topk=K):
    out = tmp_path_factory.mktemp(engine) / "export"
    export_model(model, engine, out, ranges=RANGES, topk=topk, device="cpu", log=lambda *_: None)
    return out


@pytest.fixture(scope="module")
def onnx_dir(model, tmp_path_factory):
    return export(model, "onnx", tmp_path_factory)


def as_new_ids(ids):
    """``ids`` with each item of COPIED replaced by its first copy (60 + its index in COPIED)."""
    first = {item: N_ITEMS + COPIED.index(item) for item in COPIED}
    return np.vectorize(lambda i: first.get(int(i), i))(np.asarray(ids))


def assert_copies_score_like_their_originals(recommend, topk=None, old_topk=None):
    """Same histories and candidates, the originals' ids replaced by their copies: the same scores, bit for bit. Top-k
    over the grown table: the old top-k with each item's copies ranked beside it (same score), cut at k."""
    want = recommend(HISTORY, CANDIDATES)
    np.testing.assert_array_equal(recommend(HISTORY, as_new_ids(CANDIDATES)), want)
    histories = [[9, 3], [59], [0, 9, 59]]
    np.testing.assert_array_equal(recommend([as_new_ids(h).tolist() for h in histories], CANDIDATES),
                                  recommend(histories, CANDIDATES))
    if topk is not None:
        history = [[3, 17, 5]]
        old_ids, old_scores = old_topk(history)
        expanded = [(item, score) for item, score in zip(old_ids[0], old_scores[0])
                    for _ in range(1 + COPIED.count(int(item)))][:K]
        ids, scores = topk(history)
        original = [COPIED[i - N_ITEMS] if i >= N_ITEMS else int(i) for i in ids[0]]
        assert sorted(original) == sorted(int(i) for i, _ in expanded)
        np.testing.assert_allclose(scores[0], [s for _, s in expanded], rtol=1e-6)
        assert any(i >= N_ITEMS for i in ids[0])  # COPIED holds the history's top item: its copy ranks


def test_the_export_writes_version_1_and_its_pointer(onnx_dir, model):
    pointer = read_pointer(onnx_dir)
    assert pointer == {"format_version": 1, "version": 1, "num_items": N_ITEMS, "dim": model.hidden_size,
                       "dtype": "float32", "file": "v000001/item_tokens.npy", "sha256": pointer["sha256"]}
    with torch.no_grad():
        np.testing.assert_array_equal(read_item_tokens(onnx_dir).tokens, model.item_token_table().float().numpy())
    meta = json.loads((onnx_dir / "export.json").read_text())
    assert meta["items"] == ITEMS_DIR and meta["num_items"] == N_ITEMS
    for graph in meta["graphs"].values():
        assert graph["inputs"][-1] == {"name": "item_tokens", "dtype": "float32", "shape": ["num_items", model.hidden_size]}
    config = (onnx_dir / "model_repository_python" / "speeder" / "config.pbtxt").read_text()
    assert "item_tokens" not in config  # clients never send the table


def grown_copy(onnx_dir, tmp_path):
    """A copy of the export with COPIED's tokens appended (ids 60..63) through ``add_export_items``."""
    import shutil

    out = tmp_path / "export"
    shutil.copytree(onnx_dir, out)
    table = read_item_tokens(out).tokens
    added = add_export_items(out, table[COPIED])
    assert (added.version, added.first_id, added.count) == (2, N_ITEMS, len(COPIED))
    return out


def test_items_added_with_existing_tokens_score_exactly_like_them_in_onnx(onnx_dir, tmp_path):
    out = grown_copy(onnx_dir, tmp_path)
    old = Recommender.load(onnx_dir)
    rec = Recommender.load(out)
    assert (rec.num_items, rec.items_version) == (N_ITEMS + len(COPIED), 2)
    np.testing.assert_array_equal(rec.recommend(HISTORY, CANDIDATES), old.recommend(HISTORY, CANDIDATES))
    assert_copies_score_like_their_originals(rec.recommend, lambda h: rec.topk(h, k=K), lambda h: old.topk(h, k=K))
    with pytest.raises(ValueError, match=r"must be in 0..63, got 64"):  # past the new size: still refused by the contract
        rec.recommend([[1]], [[N_ITEMS + len(COPIED)]])
    # and the raw graph (what Triton's backends serve): NaN for an id past the table passed in
    scores = rec.runner.scores(np.array([[1, -1]]), np.array([[True, False]]), np.array([[63, 64]]))
    assert np.isfinite(scores[0, 0]) and np.isnan(scores[0, 1])


def test_items_added_with_existing_tokens_score_exactly_like_them_in_pytorch(model, onnx_dir):
    old = Recommender(TorchRunner(model, topk_k=K), N_ITEMS, RANGES, "torch")
    runner = TorchRunner(model, topk_k=K)
    table = read_item_tokens(onnx_dir).tokens
    runner.set_item_tokens(np.concatenate([table, table[COPIED]]))
    rec = Recommender(runner, N_ITEMS + len(COPIED), RANGES, "torch")
    assert_copies_score_like_their_originals(rec.recommend, lambda h: rec.topk(h, k=K), lambda h: old.topk(h, k=K))


@pytest.mark.slow
def test_items_added_with_existing_tokens_score_exactly_like_them_in_aoti(model, tmp_path_factory):
    out = export(model, "aoti", tmp_path_factory, topk=0)  # one graph: AOTInductor compiles slowly on this CPU
    table = read_item_tokens(out).tokens
    add_export_items(out, table[COPIED])
    rec = Recommender.load(out)
    assert rec.num_items == N_ITEMS + len(COPIED)
    assert_copies_score_like_their_originals(rec.recommend)


def test_cli_adds_items_from_their_features_through_the_models_mome(model, onnx_dir, tmp_path, capsys):
    """``add --export DIR --model MODEL --items NEW.jsonl``: the new items' tokens from the model's MoME over their
    features (``speeder_rt.catalog.add``); items carrying the features of existing ones score exactly like them."""
    pytest.importorskip("speeder_rt.catalog.add", reason="speeder_rt.catalog.add (the model-directory add) is not here")
    import shutil

    model_dir = model.save_pretrained(tmp_path / "model")  # the weights the export was made from
    out = tmp_path / "export"
    shutil.copytree(onnx_dir, out)
    table = model.item_table
    records = [{"item": f"new-{n}", "features": {m: table.features[m][i].float().tolist()
                                                   for m in table.modalities if table.available[m][i]}}
               for n, i in enumerate(COPIED)]
    (tmp_path / "new.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    args = ["add", "--export", str(out), "--model", str(model_dir), "--items", str(tmp_path / "new.jsonl")]
    assert catalog_cli.main(args) == 0
    assert f"added {len(COPIED)} items (ids {N_ITEMS}..{N_ITEMS + len(COPIED) - 1})" in capsys.readouterr().out
    tokens = read_item_tokens(out).tokens
    np.testing.assert_array_equal(tokens[N_ITEMS:], tokens[COPIED])
    assert_copies_score_like_their_originals(Recommender.load(out).recommend)


def test_reload_items_switches_a_loaded_recommender_to_the_new_version(onnx_dir, tmp_path):
    import shutil

    out = tmp_path / "export"
    shutil.copytree(onnx_dir, out)
    rec = Recommender.load(out)
    before = rec.recommend(HISTORY, CANDIDATES)
    assert rec.reload_items() is False  # nothing new
    with pytest.raises(ValueError, match=r"item ids must be in 0..59, got 60"):
        rec.recommend([[1]], [[N_ITEMS]])
    add_export_items(out, read_item_tokens(out).tokens[COPIED])
    assert rec.reload_items() is True and (rec.num_items, rec.items_version) == (N_ITEMS + len(COPIED), 2)
    np.testing.assert_array_equal(rec.recommend(HISTORY, CANDIDATES), before)
    np.testing.assert_array_equal(rec.recommend(HISTORY, as_new_ids(CANDIDATES)), before)
    add_export_items(out, read_item_tokens(out).tokens[:1])  # version 3; version 1 is pruned, 2 kept
    assert sorted(p.name for p in (out / ITEMS_DIR).glob("v*")) == ["v000002", "v000003"]
    assert rec.reload_items() and rec.num_items == N_ITEMS + len(COPIED) + 1


# -- the table's files: written atomically, refused when they disagree -------------------------------------------
def table_dir(tmp_path, rows=5, dim=3):
    tokens = np.arange(rows * dim, dtype=np.float32).reshape(rows, dim)
    write_item_tokens(tmp_path, tokens, version=1)
    return tmp_path, tokens


def test_a_corrupt_or_disagreeing_table_is_refused_naming_the_file(tmp_path):
    root, tokens = table_dir(tmp_path)
    path = root / "items" / "v000001" / "item_tokens.npy"
    pointer = json.loads((root / "items" / "current.json").read_text())

    def with_pointer(**changes):
        (root / "items" / "current.json").write_text(json.dumps({**pointer, **changes}))

    with_pointer(sha256="0" * 64)
    with pytest.raises(ValueError, match=r"item_tokens.npy: sha256 differs"):
        read_item_tokens(root)
    with_pointer(num_items=6)
    with pytest.raises(ValueError, match=r"item_tokens.npy: shape \[5, 3\] / dtype float32 disagree with current.json \(\[6, 3\]"):
        read_item_tokens(root)
    with_pointer(dtype="float16")
    with pytest.raises(ValueError, match=r"disagree with current.json \(\[5, 3\] / float16\)"):
        read_item_tokens(root)
    with_pointer(file="v000002/item_tokens.npy")
    with pytest.raises(ValueError, match=r"current.json: file 'v000002/item_tokens.npy' is not version 1's"):
        read_item_tokens(root)
    bad = tokens.copy()
    bad[3, 2] = np.nan
    np.save(path, bad)
    from speeder_rt.export.items import file_sha256

    with_pointer(sha256=file_sha256(path))
    with pytest.raises(ValueError, match=r"item_tokens.npy: item token row 3, column 2 is nan"):
        read_item_tokens(root)
    (root / "items" / "current.json").unlink()
    with pytest.raises(ValueError, match=r"current.json: missing"):
        read_item_tokens(root)


@pytest.mark.parametrize("new, message", [
    (np.ones((2, 4), np.float32), r"every row has width 4, the export's item tokens 3"),
    ([[1.0, 2.0, 3.0], [1.0, 2.0]], r"row 1 has width 2, the export's item tokens 3"),
    (np.array([[1.0, 2.0, 3.0], [1.0, np.inf, 3.0]]), r"item id 5 \+ r\): item token row 1, column 1 is inf"),
    (np.zeros((0, 3), np.float32), r"non-empty 2-D float array \[M, 3\]"),
])
def test_add_refuses_bad_rows_naming_them_and_writes_nothing(tmp_path, new, message):
    root, _ = table_dir(tmp_path)
    with pytest.raises(ValueError, match=message):
        add_export_items(root, new)
    assert read_pointer(root)["version"] == 1
    assert sorted(p.name for p in (root / "items").iterdir()) == [".lock", "current.json", "v000001"]


def test_an_fp16_table_refuses_a_value_it_would_store_as_infinity(tmp_path):
    write_item_tokens(tmp_path, np.zeros((3, 2), np.float16), version=1)
    with pytest.raises(ValueError, match=r"as float16: item token row 0, column 1 is inf"):
        add_export_items(tmp_path, np.array([[0.0, 1e6]]))
    added = add_export_items(tmp_path, np.array([[0.5, -2.0]]))
    table = read_item_tokens(tmp_path).tokens
    assert added.version == 2 and table.dtype == np.float16 and table[3].tolist() == [0.5, -2.0]


def test_cli_adds_precomputed_tokens_to_an_export(tmp_path, capsys):
    root, tokens = table_dir(tmp_path / "export")
    np.save(tmp_path / "new.npy", tokens[[4, 0]])
    assert catalog_cli.main(["add", "--export", str(root), "--tokens", str(tmp_path / "new.npy")]) == 0
    assert "added 2 items (ids 5..6)" in capsys.readouterr().out
    grown = read_item_tokens(root)
    np.testing.assert_array_equal(grown.tokens, np.concatenate([tokens, tokens[[4, 0]]]))
    np.save(tmp_path / "bad.npy", np.ones((1, 2), np.float32))
    assert catalog_cli.main(["add", "--export", str(root), "--tokens", str(tmp_path / "bad.npy")]) == 2
    assert "every row has width 2" in capsys.readouterr().err and read_pointer(root)["version"] == 2
    assert catalog_cli.main(["add", "--export", str(root)]) == 2
    assert "--export needs --tokens, or --model and --items" in capsys.readouterr().err
