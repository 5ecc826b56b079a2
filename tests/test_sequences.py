import numpy as np
import pytest

from speeder_rt.data import PAD, Interactions, SplitConfig, SyntheticConfig, build_sequences, generate_synthetic

SMALL = SyntheticConfig(n_items=200, n_users=150, seed=3)


@pytest.fixture(scope="module")
def small():
    inter, _ = generate_synthetic(SMALL)
    return inter, build_sequences(inter)


def test_split_is_deterministic_across_runs(small):
    inter, data = small
    again = build_sequences(generate_synthetic(SMALL)[0])
    for name in ("train", "valid", "test"):
        a, b = data.split(name), again.split(name)
        np.testing.assert_array_equal(a.history, b.history)
        np.testing.assert_array_equal(a.target, b.target)
    np.testing.assert_array_equal(data.test.candidates, again.test.candidates)
    other_seed = build_sequences(inter, SplitConfig(seed=1))
    assert not np.array_equal(data.test.candidates, other_seed.test.candidates)


def test_candidates_hold_target_once_and_nothing_the_user_touched(small):
    _, data = small
    for name in ("valid", "test"):
        s = data.split(name)
        assert s.candidates.shape == (len(s), 20)
        for r in range(len(s)):
            row = s.candidates[r]
            assert (row == s.target[r]).sum() == 1
            assert row[s.label[r]] == s.target[r]
            assert len(set(row.tolist())) == 20
            seq = data.sequences[s.users[r]]
            negatives = set(row.tolist()) - {int(s.target[r])}
            assert not negatives & set(seq.tolist())
    # the target's slot is shuffled, not always first
    assert len(set(data.test.label.tolist())) > 5


def test_leave_one_out_and_history_window():
    # user a: items in timestamp order x0..x5 (given out of order, with a tie kept in row order)
    rows = [("a", "x3", 30), ("a", "x0", 0), ("a", "x1", 10), ("a", "x2", 10), ("a", "x5", 50), ("a", "x4", 40)]
    items = [f"x{i}" for i in range(6)] + [f"n{i}" for i in range(30)]
    inter = Interactions.from_keys([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows],
                                   titles={k: k for k in items})
    data = build_sequences(inter, SplitConfig(history_len=3))
    key = lambda ids: [inter.item_keys[i] for i in ids]  # noqa: E731
    assert key(data.sequences[0]) == ["x0", "x1", "x2", "x3", "x4", "x5"]
    assert key([data.test.target[0]]) == ["x5"] and key([data.valid.target[0]]) == ["x4"]
    assert key(data.test.history[0]) == ["x2", "x3", "x4"]
    # training targets: every prefix of x0..x3
    assert [key([t])[0] for t in data.train.target] == ["x1", "x2", "x3"]
    assert data.train.history_len.tolist() == [1, 2, 3]
    assert data.train.history[0].tolist()[1:] == [PAD, PAD]


def test_train_cap_keeps_most_recent_prefixes(small):
    inter, data = small
    capped = build_sequences(inter, SplitConfig(max_train_samples_per_user=2))
    assert len(capped.train) <= 2 * len(capped.sequences)
    last = {int(u): int(t) for u, t in zip(data.train.users, data.train.target)}
    assert {int(u): int(t) for u, t in zip(capped.train.users, capped.train.target)} == last


def test_kcore_filters_users_and_items():
    inter, _ = generate_synthetic(SMALL)
    data = build_sequences(inter, SplitConfig(kcore=5))
    counts = np.bincount(np.concatenate(data.sequences), minlength=data.num_items)
    assert all(len(s) >= 5 for s in data.sequences)
    assert (counts[counts > 0] >= 5).all()


def test_short_users_error_names_the_user_or_are_dropped():
    rows = [("u1", "a", 1), ("u1", "b", 2), ("u1", "c", 3), ("u2", "a", 1), ("u2", "b", 2)]
    items = {k: k for k in "abcdefghijklmnopqrstuvwxyz"}
    inter = Interactions.from_keys([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows], titles=items)
    with pytest.raises(ValueError, match="'u2' has 2 interaction"):
        build_sequences(inter)
    assert build_sequences(inter, SplitConfig(short_users="drop")).user_keys == ["u1"]


def test_too_small_catalog_for_negatives_is_an_error():
    inter = Interactions.from_keys(["u"] * 4, ["a", "b", "c", "d"], [1, 2, 3, 4])
    with pytest.raises(ValueError, match="never-seen negatives"):
        build_sequences(inter)


def test_interactions_reject_mismatched_rows():
    with pytest.raises(ValueError, match="lengths differ"):
        Interactions(users=[0, 0], items=[0], timestamps=[1, 2], user_keys=["u"], item_keys=["a"])
    with pytest.raises(ValueError, match="item id out of range"):
        Interactions(users=[0], items=[3], timestamps=[1], user_keys=["u"], item_keys=["a"])
