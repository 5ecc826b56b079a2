import json

import numpy as np
import pytest
import torch

from speeder_rt.data import ItemTable


def make_table(n=7):
    rng = np.random.default_rng(0)
    t = ItemTable([f"k{i}" for i in range(n)], titles=[f"title {i}" for i in range(n)])
    t.set_modality("text", rng.normal(size=(n, 5)))
    avail = np.arange(n) % 3 != 0
    t.set_modality("image", rng.normal(size=(n, 3)), available=avail)
    t.meta["note"] = "x"
    return t


@pytest.mark.parametrize("mmap", [True, False])
def test_round_trip(tmp_path, mmap):
    t = make_table()
    t.save(tmp_path / "tbl")
    u = ItemTable.load(tmp_path / "tbl", mmap=mmap)
    assert u.item_keys == t.item_keys and u.titles == t.titles and u.meta == {"note": "x"}
    assert u.modalities == ["text", "image"]
    for m in t.modalities:
        assert u.features[m].dtype == torch.float16
        torch.testing.assert_close(u.features[m], t.features[m], rtol=0, atol=0)
        assert torch.equal(u.available[m], t.available[m])
    assert (u.features["image"][~u.available["image"]] == 0).all()
    assert u.ids(["k3", "k0"]).tolist() == [3, 0]


def test_load_is_memory_mapped(tmp_path):
    make_table().save(tmp_path / "tbl")
    u = ItemTable.load(tmp_path / "tbl")
    file = str((tmp_path / "tbl" / "features.safetensors").resolve())
    addr = u.features["text"].data_ptr()
    mapped = []
    for line in open("/proc/self/maps"):
        parts = line.split()
        if parts[-1] == file:
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            mapped.append(lo <= addr < hi)
    assert any(mapped), "feature matrix is not backed by a mapping of features.safetensors"


def test_save_replaces_atomically_and_failure_leaves_old(tmp_path, monkeypatch):
    t = make_table()
    t.save(tmp_path / "tbl")
    t2 = make_table(4)
    import speeder_rt.data.item_table as mod

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(mod, "save_file", boom)
    with pytest.raises(OSError):
        t2.save(tmp_path / "tbl")
    assert len(ItemTable.load(tmp_path / "tbl")) == 7
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tbl"]


def test_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="empty table"):
        ItemTable([])
    with pytest.raises(ValueError, match="duplicate item key 'a'"):
        ItemTable(["a", "b", "a"])
    t = ItemTable(["a", "b", "c"])
    with pytest.raises(ValueError, match=r"shape \[3, d\], got \[2, 4\]"):
        t.set_modality("text", np.zeros((2, 4)))
    bad = np.ones((3, 2))
    bad[1, 1] = np.nan
    with pytest.raises(ValueError, match="row 1 .*'b'.* column 1 is nan"):
        t.set_modality("text", bad, source="feat.npy")
    bad[1, 1] = 1e9
    with pytest.raises(ValueError, match="exceeds float16"):
        t.set_modality("text", bad)
    with pytest.raises(KeyError, match="unknown item key 'zz'"):
        t.ids(["zz"])
    # corrupt files on load
    make_table().save(tmp_path / "tbl")
    (tmp_path / "tbl" / "items.json").write_text("{not json")
    with pytest.raises(ValueError, match="items.json: line 1: invalid JSON"):
        ItemTable.load(tmp_path / "tbl")
    make_table().save(tmp_path / "tbl2")
    f = tmp_path / "tbl2" / "features.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(ValueError, match="features.safetensors"):
        ItemTable.load(tmp_path / "tbl2")
    idx = json.loads((tmp_path / "tbl2" / "items.json").read_text())
    del idx["titles"]
    (tmp_path / "tbl2" / "items.json").write_text(json.dumps(idx))
    with pytest.raises(ValueError, match="field 'titles' missing"):
        ItemTable.load(tmp_path / "tbl2")
