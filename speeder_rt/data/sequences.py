"""Chronological user sequences, the leave-one-out split and LLaRA's 20-candidate protocol.

Per user, interactions are ordered by timestamp (ties keep the source's row order). The last item is the
test target, the second-last the validation target, and every earlier prefix yields a training sample.
Users with fewer than ``min_interactions`` (at least the 3 leave-one-out needs) are short users, refused or
dropped (``short_users``), e.g. ``min_interactions: 50`` for a study of long histories.
A sample's history is the ``history_len`` most recent items before its target, oldest first, right-padded
with ``PAD`` (-1). Evaluation candidates are the target plus ``num_candidates - 1`` items the user never
interacted with, shuffled; they are fixed by ``seed``, the split and the user's key (so filtering other
users does not change them).

Everything is computed on whole arrays (sort once, offsets per user): the kept users' chronological items are
one flat array, and a sample is an index into it (its target's position and its history length), so a split
costs O(interactions) memory; a history window ``[S, W]`` is gathered only for the samples asked for.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from functools import cached_property
from typing import Annotated, Literal

import numpy as np

from speeder_rt.data import candidates
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
    """``S`` next-item samples as an index into ``items`` (the kept users' chronological items, concatenated):
    sample ``r`` predicts ``items[end[r]]`` from the ``history_len[r]`` items before it (at most ``width``).
    ``candidates`` / ``label`` (index of the target in its row) may be None."""

    users: np.ndarray  # int64 [S], index of the user in SequenceData.user_keys
    end: np.ndarray  # int64 [S], position of the target in ``items``
    history_len: np.ndarray  # int64 [S]
    items: np.ndarray = field(repr=False)  # int64 [N], shared by every split
    width: int = 10  # W
    candidates: np.ndarray | None = None  # int64 [S, K]
    label: np.ndarray | None = None  # int64 [S]

    def __len__(self) -> int:
        return len(self.end)

    @property
    def target(self) -> np.ndarray:
        """int64 [S]: the item each sample predicts."""
        return self.items[self.end]

    @property
    def history(self) -> np.ndarray:
        """int64 [S, W]: each sample's ``history_len`` items before its target, oldest first, PAD on the right
        (gathered on each access: take it from a ``subset`` of the rows you need)."""
        cols = np.arange(self.width)
        real = cols < self.history_len[:, None]
        where = np.where(real, (self.end - self.history_len)[:, None] + cols, 0)
        return np.where(real, self.items[where], PAD)

    def subset(self, index: np.ndarray | slice) -> Samples:
        pick = lambda a: None if a is None else a[index]  # noqa: E731
        return Samples(pick(self.users), pick(self.end), pick(self.history_len), self.items, self.width,
                       pick(self.candidates), pick(self.label))


@dataclass
class SequenceData:
    """The split: ``items[offsets[u]:offsets[u + 1]]`` is kept user ``u``'s chronological items, and
    ``seen[seen_offsets[u]:seen_offsets[u + 1]]`` the sorted distinct items of that user."""

    num_items: int
    user_keys: list[str]
    item_keys: list[str]
    items: np.ndarray = field(repr=False)  # int64 [N]
    offsets: np.ndarray = field(repr=False)  # int64 [U + 1]
    seen: np.ndarray = field(repr=False)  # int64 [M]
    seen_offsets: np.ndarray = field(repr=False)  # int64 [U + 1]
    train: Samples
    valid: Samples
    test: Samples
    config: SplitConfig
    titles: list[str] = field(default_factory=list, repr=False)  # per item ("" for none)
    descriptions: list[str] = field(default_factory=list, repr=False)  # per item ("" for none)

    @cached_property
    def sequences(self) -> list[np.ndarray]:
        """Per kept user, the chronological items (views of ``items``)."""
        return np.split(self.items, self.offsets[1:-1])

    @cached_property
    def user_items(self) -> list[np.ndarray]:
        """Per kept user, the sorted distinct items (views of ``seen``)."""
        return np.split(self.seen, self.seen_offsets[1:-1])

    @cached_property
    def key_crc32(self) -> np.ndarray:
        """uint32 [U]: crc32 of each user key (UTF-8), a word of the user's candidate generators' seed."""
        return np.fromiter(map(zlib.crc32, map(str.encode, self.user_keys)), dtype=np.uint32, count=len(self.user_keys))

    def split(self, name: str) -> Samples:
        if name not in _SPLIT_CODES:
            raise ValueError(f"unknown split {name!r}; expected one of {list(_SPLIT_CODES)}")
        return getattr(self, name)

    def train_counts(self) -> np.ndarray:
        """Interactions per item in the training part of every sequence (all but each user's last two)."""
        training = np.ones(len(self.items), dtype=bool)
        training[self.offsets[1:] - 1] = False
        training[self.offsets[1:] - 2] = False
        return np.bincount(self.items[training], minlength=self.num_items).astype(np.int64)


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
    """``count`` distinct item ids in [0, num_items) not in the sorted array ``exclude``: batches of
    ``2 * missing + 4`` uniform draws, each draw kept in order unless excluded or already kept."""
    allowed = num_items - len(exclude)
    if allowed < count:
        raise ValueError(f"only {allowed} items are free to sample, {count} negatives needed")
    out = np.zeros(0, dtype=np.int64)
    while len(out) < count:
        x = rng.integers(0, num_items, size=2 * (count - len(out)) + 4)
        first = np.zeros(len(x), dtype=bool)
        first[np.unique(x, return_index=True)[1]] = True
        pos = np.minimum(np.searchsorted(exclude, x), max(len(exclude) - 1, 0))
        excluded = exclude[pos] == x if len(exclude) else np.zeros(len(x), dtype=bool)
        out = np.concatenate([out, x[first & ~excluded & ~np.isin(x, out)][: count - len(out)]])
    return out


def draw_candidates(data: SequenceData, samples: Samples, split: str, seed: int) -> None:
    """Fill ``samples.candidates`` / ``label``: the target plus negatives the user never touched, shuffled.

    Deterministic in (seed, split, user key, sample order within the user): one generator per user, seeded
    ``[seed, split code, crc32(user key)]``, draws the user's rows in order (``sample_negatives``, then
    ``permutation``); ``speeder_rt.data.candidates`` runs those generators on arrays over all users at once.
    """
    k, n = data.config.num_candidates, data.num_items
    target = samples.target

    def scalar_rows(rng: np.random.Generator, user: int, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        exclude = data.seen[data.seen_offsets[user] : data.seen_offsets[user + 1]]
        cands, label = np.empty((len(rows), k), dtype=np.int64), np.empty(len(rows), dtype=np.int64)
        for i, r in enumerate(rows):
            row = np.concatenate([[target[r]], sample_negatives(rng, exclude, n, k - 1)])
            order = rng.permutation(k)
            cands[i], label[i] = row[order], int(np.flatnonzero(order == 0)[0])
        return cands, label

    owner = np.repeat(np.arange(len(data.user_keys), dtype=np.int64), np.diff(data.seen_offsets))
    seen_key = owner * np.int64(n) + data.seen
    words = candidates.seed_words(seed, _SPLIT_CODES[split], data.key_crc32)
    samples.candidates, samples.label = candidates.draw(np.asarray(samples.users), target, words, seen_key, n, k,
                                                        scalar_rows)


def _user_error(inter: Interactions, user: int, problem: str) -> ValueError:
    return ValueError(f"{inter.source}: user {inter.user_keys[user]!r} {problem}")


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
    del order, ts
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
    lengths = np.diff(np.r_[starts, len(users)])
    user_ids = users[starts]
    del users

    k, w = cfg.num_candidates, cfg.history_len
    short = lengths < cfg.min_interactions
    kept = ~short
    # distinct items per user: sorted (user, item) pairs, once for all users
    pairs = np.repeat(np.arange(len(lengths)), lengths) * np.int64(inter.num_items) + items
    pairs.sort()
    pairs = pairs[np.r_[True, pairs[1:] != pairs[:-1]]]
    distinct = np.bincount(pairs // inter.num_items, minlength=len(lengths))
    starved = kept & (inter.num_items - distinct < k - 1)
    bad = np.flatnonzero((short & (cfg.short_users == "error")) | starved)
    if len(bad):
        u = bad[0]
        if short[u]:
            need = ("leave-one-out needs at least 3" if cfg.min_interactions == 3
                    else f"min_interactions is {cfg.min_interactions}")
            raise _user_error(inter, int(user_ids[u]), f"has {lengths[u]} interaction(s); {need} (use "
                              "short_users='drop' or a k-core filter)")
        raise _user_error(inter, int(user_ids[u]), f"interacted with {distinct[u]} of {inter.num_items} items; "
                          f"{k - 1} never-seen negatives cannot be drawn")
    if not kept.any():
        raise ValueError(f"{inter.source}: no user has the {cfg.min_interactions} interactions the split needs "
                         f"(min_interactions; leave-one-out needs 3)")
    flat = items[np.repeat(kept, lengths)]
    del items
    lengths = lengths[kept]
    offsets = np.r_[0, np.cumsum(lengths)].astype(np.int64)
    pair_kept = kept[pairs // inter.num_items]
    seen = (pairs[pair_kept] % inter.num_items).astype(np.int64)
    del pairs, pair_kept
    seen_offsets = np.r_[0, np.cumsum(distinct[kept])].astype(np.int64)

    # training targets at positions t = first..m-3 of each sequence (m items): every prefix, or the most recent cap
    cap = cfg.max_train_samples_per_user
    first = np.full(len(lengths), 1) if cap is None else np.maximum(1, lengths - 2 - cap)
    count = lengths - 2 - first
    # sample i of user u (its rows numbered from row0[u]) targets position offsets[u] + first[u] + i - row0[u]
    row0 = np.cumsum(count) - count
    train_end = np.repeat(offsets[:-1] + first - row0, count)
    train_end += np.arange(len(train_end))
    train_len = train_end - np.repeat(offsets[:-1], count)  # t, then its window length min(t, w)
    np.minimum(train_len, w, out=train_len)
    train = Samples(np.repeat(np.arange(len(lengths), dtype=np.int64), count), train_end, train_len, flat, w)

    def samples(user: np.ndarray, t: np.ndarray) -> Samples:
        return Samples(user.astype(np.int64), (offsets[user] + t).astype(np.int64),
                       np.minimum(t, w).astype(np.int64), flat, w)

    every = np.arange(len(lengths))
    data = SequenceData(
        num_items=inter.num_items,
        user_keys=[inter.user_keys[u] for u in user_ids[kept]],
        item_keys=inter.item_keys,
        items=flat,
        offsets=offsets,
        seen=seen,
        seen_offsets=seen_offsets,
        train=train,
        valid=samples(every, lengths - 2),
        test=samples(every, lengths - 1),
        config=cfg,
        titles=inter.titles,
        descriptions=inter.descriptions,
    )
    for name in ("valid", "test"):
        draw_candidates(data, data.split(name), name, cfg.seed)
    return data
