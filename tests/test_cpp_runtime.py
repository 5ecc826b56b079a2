"""The C++ runtime (csrc/runtime) on a tiny AOTInductor export: through the pybind11 binding (CppRecommender) and
through the example program examples/cpp_serving (built by CMake), both against the Python Recommender.

``make test`` builds both (the extension with pip, the runtime and example with CMake into build/cpp; set
SPEEDER_RT_CPP_BUILD to use another CMake build directory); without them these tests skip with a reason.
"""
import io
import json
import os
import re
import shutil
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from bad_requests import BAD_REQUESTS

from speeder_rt.export.exporter import export_checkpoint, export_model, load_speeder
from speeder_rt.export.format import EXPORT_JSON, FORMAT_VERSION, LEGACY_VERSION_KEY, VERSION_KEY, Ranges
from speeder_rt.export.items import CURRENT_JSON, ITEMS_DIR, TOKENS_FILE, read_item_tokens, write_item_tokens
from speeder_rt.runtime import Recommender
from speeder_rt.runtime.cpp import CppRecommender, available
from speeder_rt.runtime.validation import ModelOutputError, RequestError
from speeder_rt.train.config import run_config_from_dict
from speeder_rt.train.data import prepare
from speeder_rt.train.trainer import Trainer

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not available(), reason="speeder_rt._C is not built (make test, or pip install "
                                                         "--no-build-isolation -e .)")]

BUILD = Path(os.environ.get("SPEEDER_RT_CPP_BUILD", Path(__file__).resolve().parents[1] / "build" / "cpp"))
SERVE = BUILD / "examples" / "cpp_serving" / "speeder_serve"
RANGES = dict(max_batch=4, max_history=8, max_candidates=20, topk=5)
HISTORIES = [[3, 17, 5], [8], [0, 1, 2, 3, 4, 5, 6, 7], [44, 0], [9, 9, 10], [119]]  # 6 users > max batch 4
CANDIDATES = np.random.default_rng(0).integers(0, 120, size=(6, 7))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A briefly trained tiny Speeder (120 items, max_history 12): its best/ model directory."""
    tmp = tmp_path_factory.mktemp("cpp_runtime")
    cfg = run_config_from_dict({
        "out_dir": str(tmp / "run"),
        "data": {"source": "synthetic", "synthetic": {"n_items": 120, "n_users": 80, "seed": 1},
                 "split": {"short_users": "drop"}, "collab_features": False},
        "model": {"backbone": {"shape": "tiny"}, "modalities": ["text", "image"], "d_expert": 32, "max_history": 12},
        "mpo": [{"name": "text", "modalities": ["text"], "epochs": 1, "lr": 0.003}],
        "train": {"batch_size": 32, "max_train_samples_per_epoch": 64, "progress": False},
    })
    trainer = Trainer("speeder", cfg, *prepare(cfg, log=lambda *_: None), log=lambda *_: None)
    trainer.run()
    return trainer.out / "best"


@pytest.fixture(scope="module")
def export_dir(model_dir, tmp_path_factory):
    """The trained model exported with --engine aoti."""
    out = tmp_path_factory.mktemp("cpp_export") / "export"
    export_checkpoint(model_dir, "aoti", out, device="cpu", log=lambda *_: None, **RANGES)
    return out


@pytest.fixture(scope="module")
def nan_export_dir(model_dir, tmp_path_factory):
    """The trained model with a NaN in recency row 7 (the oldest item of an 8-item history), exported past the
    failing parity check (allow_mismatch): 8-item histories score NaN, shorter ones as in the finite export."""
    model = load_speeder(model_dir)
    with torch.no_grad():
        model.recency.weight[7, 0] = float("nan")
    out = tmp_path_factory.mktemp("cpp_nan_export") / "export"
    ranges = Ranges(**{name: value for name, value in RANGES.items() if name != "topk"})
    export_model(model, "aoti", out, ranges=ranges, topk=RANGES["topk"], device="cpu", allow_mismatch=True,
                 log=lambda *_: None)
    return out


@pytest.fixture(scope="module")
def python_rec(export_dir):
    return Recommender.load(export_dir)


@pytest.fixture(scope="module")
def cpp_rec(export_dir):
    return CppRecommender.load(export_dir)


# -- the binding -------------------------------------------------------------------------------------------------
def test_binding_answers_like_the_python_runtime(cpp_rec, python_rec):
    assert (cpp_rec.num_items, cpp_rec.ranges, cpp_rec.max_topk, cpp_rec.device) == (120, python_rec.ranges, 5, "cpu")
    scores = cpp_rec.recommend(HISTORIES, CANDIDATES)
    assert scores.dtype == np.float32 and scores.shape == (6, 7)
    np.testing.assert_array_equal(scores, python_rec.recommend(HISTORIES, CANDIDATES))  # the same package and inputs
    padded = torch.tensor([r + [-1] * (8 - len(r)) for r in HISTORIES])
    np.testing.assert_array_equal(cpp_rec.recommend(padded, torch.from_numpy(CANDIDATES)), scores)
    ids, top = cpp_rec.topk(HISTORIES, k=3)
    want_ids, want_top = python_rec.topk(HISTORIES, k=3)
    assert ids.dtype == np.int64 and top.dtype == np.float32
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_array_equal(top, want_top)


def test_recommend_batch_groups_requests_by_candidate_count(cpp_rec, python_rec):
    requests = [(h, CANDIDATES[i, : 3 + i % 3]) for i, h in enumerate(HISTORIES)] * 2  # K = 3, 4, 5 mixed
    got = cpp_rec.recommend_batch(requests)
    assert [len(s) for s in got] == [len(c) for _, c in requests]
    for (history, candidates), scores in zip(requests, got):
        np.testing.assert_allclose(scores, python_rec.recommend([history], [candidates])[0], rtol=1e-5, atol=1e-5)


def test_binding_answers_8_threads_at_once_with_identical_results(export_dir):
    rec = CppRecommender.load(export_dir, num_runners=2)
    rng = np.random.default_rng(1)
    jobs = [([list(rng.integers(0, 120, size=rng.integers(1, 9))) for _ in range(rng.integers(1, 7))], n)
            for n in range(32)]
    work = lambda job: (rec.recommend(job[0], np.full((len(job[0]), 4), job[1])), rec.topk(job[0], 5))  # noqa: E731
    sequential = [work(job) for job in jobs]
    with ThreadPoolExecutor(8) as pool:
        concurrent = list(pool.map(work, jobs * 2))
    for got, want in zip(concurrent, sequential * 2):
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1][0], want[1][0])
        np.testing.assert_array_equal(got[1][1], want[1][1])


@pytest.mark.parametrize("history, candidates, message", BAD_REQUESTS)
def test_bad_requests_raise_the_python_runtimes_errors(cpp_rec, python_rec, history, candidates, message):
    for rec in (cpp_rec, python_rec):  # every method and runtime: tests/test_request_contract.py
        with pytest.raises(RequestError, match=message):
            rec.recommend(history, candidates)


def test_bad_topk_batch_and_load_requests_raise(cpp_rec, tmp_path):
    with pytest.raises(RequestError, match=r"^k: 6 is outside 1..max_topk=5$"):
        cpp_rec.topk([[1]], k=6)
    with pytest.raises(RequestError, match=r"^requests\[1\].candidates: 0 candidates per user"):
        cpp_rec.recommend_batch([([1], [2]), ([1], [])])
    with pytest.raises(RequestError, match=r"^requests\[0\].history: item ids must be in 0..119, got 500$"):
        cpp_rec.recommend_batch([([500], [2])])
    with pytest.raises(ValueError, match="not an export directory") as caught:
        CppRecommender.load(tmp_path)
    assert not isinstance(caught.value, RequestError)  # a load error, not a request's
    for key in (VERSION_KEY, LEGACY_VERSION_KEY):  # the version key, and the one of exports written before it
        (tmp_path / EXPORT_JSON).write_text(json.dumps({key: FORMAT_VERSION, "engine": "onnx"}))
        with pytest.raises(ValueError, match=r"engine 'onnx'; the C\+\+ runtime serves AOTInductor exports"):
            CppRecommender.load(tmp_path)
    (tmp_path / EXPORT_JSON).write_text(f'{{"{VERSION_KEY}": {FORMAT_VERSION}, "engine": ')
    with pytest.raises(RuntimeError, match="JSON: unexpected end"):
        CppRecommender.load(tmp_path)
    assert cpp_rec.recommend([[1]], [[2]]).shape == (1, 1)  # still serving


# -- non-finite scores: refused by the C++ library, translated by the binding --------------------------------------
REFUSED = ("the model scored candidate 0 nan; its weights or item features are not finite (a diverged training or a "
           "corrupt export), so no scores are returned")
SHORT = [i for i, history in enumerate(HISTORIES) if len(history) < 8]  # all but row 2


def test_nan_scores_are_refused_naming_the_row_and_position(nan_export_dir, cpp_rec):
    rec = CppRecommender.load(nan_export_dir)
    with pytest.raises(ModelOutputError, match=rf"^history_ids\[2\]: {re.escape(REFUSED)}$"):
        rec.recommend(HISTORIES, CANDIDATES)
    requests = [(h, CANDIDATES[i, : 3 + i % 3]) for i, h in enumerate(HISTORIES)]  # request 2 alone has K = 5
    with pytest.raises(ModelOutputError, match=rf"^requests\[2\]: {re.escape(REFUSED)}$"):
        rec.recommend_batch(requests)
    with pytest.raises(ModelOutputError, match=r"^history_ids\[2\]: the model scored item \d+ \(rank 0\) nan; its"):
        rec.topk(HISTORIES, k=3)
    short = [HISTORIES[i] for i in SHORT]  # recency row 7 unused: the finite export's answers
    np.testing.assert_allclose(rec.recommend(short, CANDIDATES[SHORT]), cpp_rec.recommend(short, CANDIDATES[SHORT]),
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(rec.topk(short, k=3)[0], cpp_rec.topk(short, k=3)[0])


# -- the item table: items/current.json and the .npy it names, read by the C++ library ---------------------------
@pytest.fixture
def items_export(export_dir, tmp_path):
    """A copy of the export whose item table a test may change."""
    return Path(shutil.copytree(export_dir, tmp_path / "export"))


def test_reload_items_serves_an_appended_version(items_export):
    rec = CppRecommender.load(items_export)
    assert (rec.num_items, rec.items_version, rec.reload_items()) == (120, 1, False)  # nothing new
    tokens = read_item_tokens(items_export).tokens
    write_item_tokens(items_export, np.concatenate([tokens, tokens[[3, 17]]]), version=2)  # items 120, 121
    with pytest.raises(RequestError, match=r"^candidate_ids\[0\]: item ids must be in 0..119, got 120$"):
        rec.recommend([[5]], [[120]])  # not served before the reload
    assert rec.reload_items() and (rec.num_items, rec.items_version) == (122, 2)
    # the new items have items 3 and 17's tokens: they score exactly like them, as candidates and in a history
    np.testing.assert_array_equal(rec.recommend(HISTORIES, [[120, 121]] * 6), rec.recommend(HISTORIES, [[3, 17]] * 6))
    np.testing.assert_array_equal(rec.recommend([[120, 8]], [[1, 2]]), rec.recommend([[3, 8]], [[1, 2]]))
    python_rec = Recommender.load(items_export)  # the Python runtime on the same version
    for got, want in zip(rec.topk(HISTORIES, k=5), python_rec.topk(HISTORIES, k=5)):
        np.testing.assert_array_equal(got, want)
    # a .npy header of format 2.0 (4-byte header length) reads as well
    version = items_export / ITEMS_DIR / "v000003"
    version.mkdir()
    with open(version / TOKENS_FILE, "wb") as f:
        np.lib.format.write_array(f, np.concatenate([tokens, tokens[[3, 17, 5]]]), version=(2, 0))
    write_pointer(items_export, version=3, num_items=123)
    assert rec.reload_items() and (rec.num_items, rec.items_version) == (123, 3)
    np.testing.assert_array_equal(rec.recommend([[8]], [[122]]), rec.recommend([[8]], [[5]]))
    write_item_tokens(items_export, tokens[:100], version=4)  # ids never disappear
    with pytest.raises(ValueError, match=r": item table version 4 has 100 items, fewer than the 123 served \(versions "
                                         r"only append\)$"):
        rec.reload_items()
    assert (rec.num_items, rec.items_version) == (123, 3)


def test_requests_during_reloads_all_succeed_with_unchanged_scores(items_export):
    """Versions only append, so an old item's score is the same under every version: 4 threads query while the
    table grows by 3 versions; every answer equals the one before the first reload."""
    rec = CppRecommender.load(items_export, num_runners=2)
    want = rec.recommend(HISTORIES, CANDIDATES)
    tokens = read_item_tokens(items_export).tokens
    stop = threading.Event()

    def query() -> int:
        answers = 0
        while not stop.is_set() or answers == 0:
            np.testing.assert_array_equal(rec.recommend(HISTORIES, CANDIDATES), want)
            answers += 1
        return answers

    with ThreadPoolExecutor(4) as pool:
        clients = [pool.submit(query) for _ in range(4)]
        for version in (2, 3, 4):
            write_item_tokens(items_export, np.concatenate([tokens] + [tokens[:10]] * (version - 1)), version=version)
            assert rec.reload_items()
        stop.set()
        assert all(client.result(timeout=60) > 0 for client in clients)  # re-raises a failed answer
    assert (rec.num_items, rec.items_version) == (150, 4)


def write_pointer(export: Path, **fields) -> None:
    """items/current.json for the table file of fields["version"] (fields override the rest)."""
    pointer = {"format_version": 1, "num_items": 120, "dim": 64, "dtype": "float32", "sha256": "0" * 64, **fields}
    pointer.setdefault("file", f"v{pointer['version']:06d}/{TOKENS_FILE}")
    (export / ITEMS_DIR / CURRENT_JSON).write_text(json.dumps(pointer))


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def with_value(row: int, col: int, value: float, dtype: str = "float32") -> np.ndarray:
    table = np.ones((120, 64), dtype)
    table[row, col] = value
    return table


FILE = r"\S+/items/v000002/item_tokens\.npy: "
POINTER = r"\S+/items/current\.json: "
# (table file bytes or None (no file), current.json fields, the error)
BAD_TABLES = {
    "nan": (npy_bytes(with_value(5, 3, np.nan)), {}, FILE + r"item token row 5, column 3 is nan \(tokens must be finite\)"),
    "inf": (npy_bytes(with_value(119, 63, np.inf)), {}, FILE + "item token row 119, column 63 is inf"),
    "float16 -inf": (npy_bytes(with_value(2, 1, -np.inf, "float16")), {"dtype": "float16"},
                     FILE + "item token row 2, column 1 is -inf"),
    "float16 nan": (npy_bytes(with_value(0, 7, np.nan, "float16")), {"dtype": "float16"},
                    FILE + "item token row 0, column 7 is nan"),
    "float16 for a float32 graph": (npy_bytes(np.ones((120, 64), np.float16)), {"dtype": "float16"},
                                    FILE + "float16 rows of width 64; the graphs' item_tokens input takes float32 rows "
                                           "of width 64$"),
    "width": (npy_bytes(np.ones((120, 32), np.float32)), {"dim": 32}, FILE + "float32 rows of width 32; the graphs'"),
    "shape": (npy_bytes(np.ones((125, 64), np.float32)), {"num_items": 130},
              FILE + r"shape \[125, 64\] / dtype float32 disagree with current.json \(\[130, 64\] / float32\)$"),
    "dtype": (npy_bytes(np.ones((120, 64), np.float16)), {}, FILE + r"shape \[120, 64\] / dtype float16 disagree"),
    "float64": (npy_bytes(np.ones((120, 64))), {}, FILE + r"not a plain .npy item table \(dtype '<f8'; "),
    "big-endian": (npy_bytes(np.ones((120, 64), ">f4")), {}, FILE + r"not a plain .npy item table \(dtype '>f4'"),
    "fortran order": (npy_bytes(np.asfortranarray(np.ones((120, 64), np.float32))), {},
                      FILE + r"not a plain .npy item table \(fortran_order is not False"),
    "truncated": (npy_bytes(np.ones((120, 64), np.float32))[:-4], {},
                  FILE + r"30716 data bytes where \[120, 64\] float32 needs 30720$"),
    "not npy": (b"item,token\n1,2\n", {}, FILE + r"not a .npy file"),
    "missing file": (None, {}, FILE + r"missing \(named by current.json\)$"),
    "format_version": (None, {"format_version": 2}, POINTER + "unknown format_version 2$"),
    "pointer dtype": (None, {"dtype": "bfloat16"}, POINTER + r"dtype 'bfloat16' is not one of \['float32', 'float16'\]"),
    "pointer file": (None, {"file": "../../export.json"}, POINTER + r"file '../../export.json' is not version 2's "
                                                                   r"v000002/item_tokens.npy$"),
    "pointer field": (None, {"num_items": "120"}, POINTER + r"field 'num_items': JSON: not an integer$"),
}


@pytest.mark.parametrize("table, pointer, message", BAD_TABLES.values(), ids=BAD_TABLES.keys())
def test_a_bad_item_table_is_refused_naming_the_file_and_the_served_one_stays(items_export, table, pointer, message):
    rec = CppRecommender.load(items_export)
    want = rec.recommend(HISTORIES, CANDIDATES)
    if table is not None:
        (items_export / ITEMS_DIR / "v000002").mkdir()
        (items_export / ITEMS_DIR / "v000002" / TOKENS_FILE).write_bytes(table)
    write_pointer(items_export, version=2, **pointer)
    with pytest.raises(ValueError, match=message):
        rec.reload_items()
    assert rec.items_version == 1 and rec.num_items == 120
    np.testing.assert_array_equal(rec.recommend(HISTORIES, CANDIDATES), want)
    with pytest.raises(ValueError, match=message):  # loading refuses it too
        CppRecommender.load(items_export)


def test_an_export_without_an_item_table_is_refused(items_export):
    shutil.rmtree(items_export / ITEMS_DIR)
    with pytest.raises(ValueError, match=r"/items/current.json: missing \(an export written before item tables were "
                                         r"versioned: re-export it\)$"):
        CppRecommender.load(items_export)
    (items_export / ITEMS_DIR).mkdir()
    (items_export / ITEMS_DIR / CURRENT_JSON).write_text('{"format_version": 1, ')
    with pytest.raises(ValueError, match=r"/items/current.json: JSON: unexpected end"):
        CppRecommender.load(items_export)


# -- the example program -----------------------------------------------------------------------------------------
needs_example = pytest.mark.skipif(not SERVE.is_file(), reason=f"{SERVE} is not built (make test, or cmake -S . -B "
                                                                "build/cpp && cmake --build build/cpp)")
LINE = re.compile(r"top=(\d+) score=(\S+) latency_us=(\d+)")


@needs_example
def test_example_program_prints_the_python_runtimes_top_candidate(export_dir, python_rec, tmp_path):
    requests = tmp_path / "requests.txt"
    lines = [" ".join(map(str, h)) + " ; " + " ".join(map(str, c)) for h, c in zip(HISTORIES, CANDIDATES)]
    requests.write_text("# history ; candidates\n" + "\n".join(lines[:3]) + "\n\n" + "\n".join(lines[3:]) + "\n")
    run = subprocess.run([SERVE, export_dir, requests], check=False, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    out = run.stdout.splitlines()
    assert len(out) == len(HISTORIES)
    for line, history, candidates in zip(out, HISTORIES, CANDIDATES):
        top, score, latency = LINE.fullmatch(line).groups()
        want = python_rec.recommend([history], [candidates])[0]  # the example answers one request per call
        assert int(top) == candidates[want.argmax()]
        assert np.float32(score) == want.max()  # 9 significant digits round-trip a float32
        assert int(latency) > 0


@needs_example
def test_example_program_gets_the_cpp_error_for_nan_scores(nan_export_dir):
    stdin = "3 17 ; 1 2\n0 1 2 3 4 5 6 7 ; 1 2\n"  # the second history has 8 items
    run = subprocess.run([SERVE, nan_export_dir], check=False, input=stdin, capture_output=True, text=True, timeout=120)
    assert run.returncode == 1
    first, second = run.stdout.splitlines()
    assert LINE.fullmatch(first) and second == f"error=history_ids[0]: {REFUSED}"


# (line, the same request from Python): speeder_serve answers with the contract's message for it
TEXT_REQUESTS = [
    ("3 x ; 1", ([[3, "x"]], [[1]])),
    ("+3 ; 1", ([["+3"]], [[1]])),
    ("3 ; 3.0", ([[3]], [["3.0"]])),
    ("0x3 ; 1", ([["0x3"]], [[1]])),
    ("1e3 ; 1", ([["1e3"]], [[1]])),
    ('3 "q\\ ; 1', ([[3, '"q\\']], [[1]])),
    ("3 9223372036854775808 ; 1", ([[3, 2**63]], [[1]])),
    ("3 ; 1 -9223372036854775809", ([[3]], [[1, -(2**63) - 1]])),
    ("3 ; 00000000000000000000123456789012345678901", ([[3]], [[123456789012345678901]])),
    ("3 ; 500", ([[3]], [[500]])),
    ("3 120 ; 1", ([[3, 120]], [[1]])),
    (" ; 1", ([[]], [[1]])),
    ("3 ; ", ([[3]], [[]])),
    ("0 1 2 3 4 5 6 7 8 ; 1", ([list(range(9))], [[1]])),
]


@needs_example
def test_example_program_refuses_what_is_not_a_plain_int64_with_the_contracts_message(export_dir, python_rec):
    stdin = "3 17 ; 1 2\n" + "\n".join(line for line, _ in TEXT_REQUESTS) + "\n1 2 3\n007 -0 ; 5\n"
    run = subprocess.run([SERVE, export_dir], check=False, input=stdin, capture_output=True, text=True, timeout=120)
    assert run.returncode == 1
    out = run.stdout.splitlines()
    assert len(out) == len(TEXT_REQUESTS) + 3 and LINE.fullmatch(out[0])
    for line, (_, request) in zip(out[1:], TEXT_REQUESTS):
        with pytest.raises(RequestError) as caught:
            python_rec.recommend(*request)
        assert line == f"error={caught.value}"
    assert out[-2] == "error=expected 'history ids ; candidate ids'"
    assert LINE.fullmatch(out[-1])  # leading zeros and -0 are decimal integers; -0 is item 0
    missing = subprocess.run([SERVE, export_dir.parent / "missing"], check=False, capture_output=True, text=True,
                             timeout=60)
    assert missing.returncode == 2 and "not an export directory" in missing.stderr
