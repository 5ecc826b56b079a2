"""Vectorised candidate draws against one numpy Generator per user, prepared splits (reused, refused), and the
sample index's memory at 1M interactions."""
import json
import zlib

import numpy as np
import pytest

from speeder_rt.data import Interactions, SplitConfig, build_sequences
from speeder_rt.data.__main__ import main as data_main
from speeder_rt.data.candidates import Streams, seed_words
from speeder_rt.data.sequences import _SPLIT_CODES, draw_candidates, sample_negatives
from speeder_rt.train.config import run_config_from_dict
from speeder_rt.train.data import load_sequences


def random_interactions(rows: int, users: int, items: int, seed: int = 0) -> Interactions:
    rng = np.random.default_rng(seed)
    return Interactions(users=rng.integers(0, users, rows), items=rng.zipf(1.3, rows) % items,
                        timestamps=rng.integers(0, 10**6, rows), user_keys=[f"u{i}" for i in range(users)],
                        item_keys=[f"i{i}" for i in range(items)])


def scalar_draw(data, samples, split, seed):
    """The protocol as written: a fresh numpy Generator per user, rows in order."""
    k = data.config.num_candidates
    cands, label, rngs = np.empty((len(samples), k), np.int64), np.empty(len(samples), np.int64), {}
    for r, u in enumerate(samples.users):
        rng = rngs.setdefault(u, np.random.default_rng([seed, _SPLIT_CODES[split], zlib.crc32(data.user_keys[u].encode())]))
        row = np.concatenate([[samples.target[r]], sample_negatives(rng, data.user_items[u], data.num_items, k - 1)])
        order = rng.permutation(k)
        cands[r], label[r] = row[order], int(np.flatnonzero(order == 0)[0])
    return cands, label


def test_pcg64_streams_equal_numpy():
    keys = [f"user {i}" for i in range(300)] + ["", "é" * 40]
    streams = Streams(seed_words(7, 2, np.array([zlib.crc32(k.encode()) for k in keys], dtype=np.uint32)))
    rows = np.arange(len(keys))
    for step in (5, 90, 3):  # reads across buffer refills, odd positions included
        got, complete = streams.take(rows, step)
        assert complete.all()
        for u in (0, 150, len(keys) - 1):
            rng = np.random.default_rng([7, 2, zlib.crc32(keys[u].encode())])
            want = rng.integers(0, 2**32, size=int(streams.pos[u]) + step, dtype=np.uint32)[-step:]
            np.testing.assert_array_equal(got[u], want)
        streams.pos += step


@pytest.mark.parametrize("items, cap", [(60, None), (5000, 3)])
def test_vectorised_draws_equal_one_generator_per_user(items, cap):
    """A small catalog forces second batches and hand-overs to numpy; every row must still match."""
    data = build_sequences(random_interactions(5_000, 200, items),
                           SplitConfig(short_users="drop", max_train_samples_per_user=cap, seed=5))
    for split, samples in (("test", data.test), ("train", data.train.subset(slice(None)))):
        draw_candidates(data, samples, split, 5)
        cands, label = scalar_draw(data, samples, split, 5)
        np.testing.assert_array_equal(samples.candidates, cands)
        np.testing.assert_array_equal(samples.label, label)


def run_config(source: str, prepared: str, seed: int = 0):
    return run_config_from_dict({"seed": seed, "model": {"modalities": ["text"]},
                                 "data": {"source": source, "prepared": prepared,
                                          "split": {"history_len": 5, "min_interactions": 4}}})


def test_prepared_split_is_reused_and_refused_when_its_recipe_differs(tmp_path, capsys):
    rows = ["user,item,timestamp"] + [f"u{i % 30},i{(i * 7) % 97},{i}" for i in range(900)]
    csv = tmp_path / "x.csv"
    csv.write_text("\n".join(rows) + "\n")
    out = tmp_path / "split"
    assert data_main(["prepare", "--data", f"csv:{csv}", "--out", str(out), "--history-len", "5",
                      "--min-interactions", "4", "--no-progress"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["rows"] == 900 and printed["users"] == 30 and printed["samples"]["test"] == 30
    assert {"seconds", "peak_rss_gb", "items"} <= set(printed)

    _, reused = load_sequences(run_config(f"csv:{csv}", str(out)))
    _, built = load_sequences(run_config(f"csv:{csv}", None))
    assert isinstance(reused.items, np.memmap)  # read from the prepared files, not rebuilt
    for name in ("train", "valid", "test"):
        a, b = reused.split(name), built.split(name)
        np.testing.assert_array_equal(a.history, b.history)
        np.testing.assert_array_equal(a.target, b.target)
    np.testing.assert_array_equal(reused.test.candidates, built.test.candidates)
    assert (reused.user_keys, reused.item_keys) == (built.user_keys, built.item_keys)

    with pytest.raises(ValueError, match=r"differs from this run's data \(split.seed: prepared 0, wanted 1\)"):
        load_sequences(run_config(f"csv:{csv}", str(out), seed=1))
    csv.write_text("\n".join(rows[:-1]) + "\n")  # the source changed since
    with pytest.raises(ValueError, match=r"differs from this run's data \(files: prepared"):
        load_sequences(run_config(f"csv:{csv}", str(out)))
    with pytest.raises(ValueError, match=r"no prepared split .* python -m speeder_rt.data prepare"):
        load_sequences(run_config(f"csv:{csv}", str(tmp_path / "absent")))


def test_prepare_reports_bad_input(tmp_path, capsys):
    (tmp_path / "x.csv").write_text("user,item,timestamp\nu,i,later\n")
    assert data_main(["prepare", "--data", f"csv:{tmp_path / 'x.csv'}", "--out", str(tmp_path / "s"),
                      "--no-progress"]) == 2
    assert "x.csv, line 2, field 'timestamp': expected an integer" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_sample_index_memory_is_linear_in_rows():
    """1M interactions: the split's arrays are a few int64 per interaction; no [samples, window] matrix."""
    rows = 1_000_000
    data = build_sequences(random_interactions(rows, 20_000, 50_000, seed=1),
                           SplitConfig(history_len=50, short_users="drop"))
    samples = sum(len(data.split(s)) for s in ("train", "valid", "test"))
    assert samples > 0.9 * rows
    index = [data.items, data.offsets, data.seen, data.seen_offsets] + [
        getattr(data.split(s), f) for s in ("train", "valid", "test") for f in ("users", "end", "history_len")]
    per_row = sum(a.nbytes for a in index) / rows
    assert per_row <= 8 * 7  # items, seen, and 3 int64 per sample (plus per-user offsets)
    window = 8 * 50 * len(data.train)  # what [S, W] histories would cost
    assert sum(a.nbytes for a in index) < window / 5
    assert data.train.subset(slice(0, 64)).history.shape == (64, 50)  # gathered per batch
