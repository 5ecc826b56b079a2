"""Chronological user sequences, the leave-one-out split and LLaRA's 20-candidate protocol.

Per user, interactions are ordered by timestamp (ties keep the source's row order). The last item is the
test target, the second-last the validation target, and every earlier prefix yields a training sample.
Users with fewer than ``min_interactions`` (at least the 3 leave-one-out needs) are short users, refused or
dropped (``short_users``), e.g. ``min_interactions: 50`` for a study of long histories.
A sample's history is the ``history_len`` most recent items before its target, oldest first, right-padded
with ``PAD`` (-1). Evaluation candidates are the target plus ``num_candidates - 1`` items the user never
interacted with, shuffled; they are fixed by ``seed``, the split and the user's key (so filtering other
users does not change them).
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Annotated, Literal

import numpy as np

from speeder_rt.data.interactions import Interactions
from speeder_rt.utils.schema import NonNegativeInt, PositiveInt, Range, check

PAD = -1
_SPLIT_CODES = {"train": 0, "valid": 1, "test": 2}


@dataclass(frozen=True)
class SplitConfig:
    history_len: PositiveInt = 10
    num_candidates: Annotated[int, Range(ge=2)] = 20
    max_train_samples_per_user: PositiveInt | None = None  # keep the most recent prefixes; None = all
    kcore: NonNegativeInt = 0  # iterative k-core on users and items (0 = off)
    min_interactions: Annotated[int, Range(ge=3)] = 3  # users with fewer (after the k-core) are short users
    short_users: Literal["error", "drop"] = "error"  # what happens to short users
    seed: NonNegativeInt = 0

    def __post_init__(self) -> None:
        check(self)


@dataclass
class Samples:
    """``S`` next-item samples. ``candidates`` / ``label`` (index of the target in its row) may be None."""

    users: np.ndarray  # int64 [S]
    history: np.ndarray  # int64 [S, W], PAD-padded on the right
    history_len: np.ndarray  # int64 [S]
    target: np.ndarray  # int64 [S]
    candidates: np.ndarray | None = None  # int64 [S, K]
    label: np.ndarray | None = None  # int64 [S]

    def __len__(self) -> int:
        return len(self.target)

    def subset(self, index: np.ndarray | slice) -> Samples:
        pick = lambda a: None if a is None else a[index]  # noqa: E731
        return Samples(pick(self.users), pick(self.history), pick(self.history_len), pick(self.target),
                       pick(self.candidates), pick(self.label))


@dataclass
class SequenceData:
    num_items: int
    user_keys: list[str]
    item_keys: list[str]
    sequences: list[np.ndarray]  # per kept user, chronological item ids
    train: Samples
    valid: Samples
    test: Samples
    config: SplitConfig
    user_items: list[np.ndarray] = field(repr=False, default_factory=list)  # sorted unique items per user

    def split(self, name: str) -> Samples:
        if name not in _SPLIT_CODES:
            raise ValueError(f"unknown split {name!r}; expected one of {list(_SPLIT_CODES)}")
        return getattr(self, name)

    def train_counts(self) -> np.ndarray:
        """Interactions per item in the training part of every sequence (for popularity)."""
        counts = np.zeros(self.num_items, dtype=np.int64)
        for seq in self.sequences:
            np.add.at(counts, seq[:-2], 1)
        return counts


def _kcore(users: np.ndarray, items: np.ndarray, k: int) -> np.ndarray:
    keep = np.ones(len(users), dtype=bool)
    while True:
        u_cnt = np.bincount(users[keep], minlength=users.max() + 1)
        i_cnt = np.bincount(items[keep], minlength=items.max() + 1)
        new_keep = keep & (u_cnt[users] >= k) & (i_cnt[items] >= k)
        if new_keep.sum() == keep.sum():
            return keep
        keep = new_keep


def sample_negatives(rng: np.random.Generator, exclude: np.ndarray, num_items: int, count: int) -> np.ndarray:
    """``count`` distinct item ids in [0, num_items) not in the sorted array ``exclude``."""
    allowed = num_items - len(exclude)
    if allowed < count:
        raise ValueError(f"only {allowed} items are free to sample, {count} negatives needed")
    out: list[int] = []
    taken = set()
    while len(out) < count:
        for x in rng.integers(0, num_items, size=2 * (count - len(out)) + 4):
            x = int(x)
            if x in taken:
                continue
            pos = np.searchsorted(exclude, x)
            if pos < len(exclude) and exclude[pos] == x:
                continue
            taken.add(x)
            out.append(x)
            if len(out) == count:
                break
    return np.asarray(out, dtype=np.int64)


def draw_candidates(data: SequenceData, samples: Samples, split: str, seed: int) -> None:
    """Fill ``samples.candidates`` / ``label``: the target plus negatives the user never touched, shuffled.

    Deterministic in (seed, split, user key, sample order within the user).
    """
    user_items, num_items, num_candidates = data.user_items, data.num_items, data.config.num_candidates
    s = len(samples)
    cands = np.empty((s, num_candidates), dtype=np.int64)
    label = np.empty(s, dtype=np.int64)
    code = _SPLIT_CODES[split]
    rng_by_user: dict[int, np.random.Generator] = {}
    for r in range(s):
        u = int(samples.users[r])
        rng = rng_by_user.get(u)
        if rng is None:
            rng = rng_by_user[u] = np.random.default_rng([seed, code, zlib.crc32(data.user_keys[u].encode())])
        row = np.concatenate([[samples.target[r]], sample_negatives(rng, user_items[u], num_items, num_candidates - 1)])
        order = rng.permutation(num_candidates)
        cands[r] = row[order]
        label[r] = int(np.flatnonzero(order == 0)[0])
    samples.candidates, samples.label = cands, label


def _window(seq: np.ndarray, end: int, w: int) -> tuple[np.ndarray, int]:
    hist = seq[max(0, end - w) : end]
    row = np.full(w, PAD, dtype=np.int64)
    row[: len(hist)] = hist
    return row, len(hist)


def build_sequences(inter: Interactions, cfg: SplitConfig | None = None) -> SequenceData:
    cfg = cfg or SplitConfig()
    users, items, ts = inter.users, inter.items, inter.timestamps
    if cfg.kcore > 0:
        keep = _kcore(users, items, cfg.kcore)
        if not keep.any():
            raise ValueError(f"{inter.source}: the {cfg.kcore}-core filter removed every interaction")
        users, items, ts = users[keep], items[keep], ts[keep]
    order = np.lexsort((ts, users))  # stable: equal timestamps keep row order
    users, items = users[order], items[order]
    bounds = np.flatnonzero(np.diff(users)) + 1
    starts = np.concatenate([[0], bounds])
    ends = np.concatenate([bounds, [len(users)]])

    w, k = cfg.history_len, cfg.num_candidates
    kept_users, sequences, user_items = [], [], []
    for a, b in zip(starts, ends):
        seq = items[a:b]
        u = int(users[a])
        if len(seq) < cfg.min_interactions:
            if cfg.short_users == "error":
                need = ("leave-one-out needs at least 3" if cfg.min_interactions == 3
                        else f"min_interactions is {cfg.min_interactions}")
                raise ValueError(
                    f"{inter.source}: user {inter.user_keys[u]!r} has {len(seq)} interaction(s); {need} (use "
                    "short_users='drop' or a k-core filter)"
                )
            continue
        uniq = np.unique(seq)
        if inter.num_items - len(uniq) < k - 1:
            raise ValueError(
                f"{inter.source}: user {inter.user_keys[u]!r} interacted with {len(uniq)} of {inter.num_items} items; "
                f"{k - 1} never-seen negatives cannot be drawn"
            )
        kept_users.append(u)
        sequences.append(seq)
        user_items.append(uniq)
    if not sequences:
        raise ValueError(f"{inter.source}: no user has the {cfg.min_interactions} interactions the split needs "
                         f"(min_interactions; leave-one-out needs 3)")

    def make(rows: list[tuple[int, np.ndarray, int, int]]) -> Samples:
        if not rows:
            return Samples(np.zeros(0, np.int64), np.zeros((0, w), np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64))
        return Samples(
            users=np.array([r[0] for r in rows], dtype=np.int64),
            history=np.stack([r[1] for r in rows]),
            history_len=np.array([r[2] for r in rows], dtype=np.int64),
            target=np.array([r[3] for r in rows], dtype=np.int64),
        )

    train_rows, valid_rows, test_rows = [], [], []
    for idx, seq in enumerate(sequences):
        m = len(seq)
        ends_train = range(1, m - 2)
        if cfg.max_train_samples_per_user is not None:
            ends_train = ends_train[max(0, len(ends_train) - cfg.max_train_samples_per_user) :]
        for t in ends_train:
            train_rows.append((idx, *_window(seq, t, w), int(seq[t])))
        valid_rows.append((idx, *_window(seq, m - 2, w), int(seq[m - 2])))
        test_rows.append((idx, *_window(seq, m - 1, w), int(seq[m - 1])))

    data = SequenceData(
        num_items=inter.num_items,
        user_keys=[inter.user_keys[u] for u in kept_users],
        item_keys=inter.item_keys,
        sequences=sequences,
        train=make(train_rows),
        valid=make(valid_rows),
        test=make(test_rows),
        config=cfg,
        user_items=user_items,
    )
    for name in ("valid", "test"):
        draw_candidates(data, data.split(name), name, cfg.seed)
    return data
