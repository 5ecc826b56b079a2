"""Evaluation candidates for many users at once, bit for bit what one numpy Generator per user draws.

The protocol (``speeder_rt.data.sequences``) gives each user of a split its own generator,
``np.random.default_rng([seed, split code, crc32(user key)])``, and per sample row draws

    negatives: batches of ``2 * missing + 4`` values ``rng.integers(0, N)``, each kept in order unless the user
               saw it or it was kept already, until ``K - 1`` are kept;
    order:     ``rng.permutation(K)``; the row is ``[target, *negatives][order]``.

Creating a million generators one by one is the slow part, so this module runs the same arithmetic on arrays
over users. ``default_rng`` seeds PCG64 from ``SeedSequence``: the entropy words are hashed into a pool of 4
uint32 (``hashmix`` / ``mix``), the pool gives 8 output words (``generate_state``), i.e. two 128-bit numbers
``s`` and ``t``; PCG64 then sets ``inc = 2t + 1``, ``state = (inc + s) * A + inc`` with the LCG step
``state <- state * A + inc (mod 2^128)``. Each step outputs ``rotr64(hi ^ lo, hi >> 58)`` (XSL-RR) of the new
state. The draws used here read 32 bits at a time (numpy keeps the upper half of a 64-bit output for the next
32-bit read), so a user's generator is one stream of uint32 ``lo0, hi0, lo1, hi1, ...``:

    integers(0, N):   Lemire's method: ``m = u32 * N``; if ``m mod 2^32 < 2^32 mod N`` draw again, else ``m >> 32``;
    permutation(K):   Fisher-Yates, for i = K-1 .. 1: ``j = u32 & mask(i)`` until ``j <= i`` (mask(i): the
                      smallest 2^b - 1 >= i), swap positions i and j of ``arange(K)``.

The common case (no Lemire rejection in the first batch, ``K - 1`` negatives in it, the shuffle within the
buffered stream) is computed for all users together; any other user is handed to a numpy Generator advanced to
the same point of its stream, which draws that user's remaining rows exactly as the scalar code does.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

_M32 = 0xFFFFFFFF
# SeedSequence's hash constants (numpy/random/bit_generator.pyx)
_INIT_A, _MULT_A, _INIT_B, _MULT_B = 0x43B0D7E5, 0x931E8875, 0x8B51F9DD, 0x58F38DED
_MIX_MULT_L, _MIX_MULT_R = 0xCA01F9DD, 0x4973F715
# PCG64's 128-bit LCG multiplier
_MULT_HI, _MULT_LO = 0x2360ED051FC65DA4, 0x4385DF649FCCF645
_BLOCK = 48  # 64-bit outputs generated per refill of a user's stream buffer (96 uint32)
_SHUFFLE_BUDGET = 48  # uint32 a shuffle may take before the user goes to the scalar path (it takes ~27 on average)
_CHUNK_USERS = 1 << 17  # users drawn together (their buffers: ~600 bytes each)
# (generator, user, rows) -> (candidates [len(rows), K], label [len(rows)]) drawn by the scalar code
ScalarRows = Callable[[np.random.Generator, int, np.ndarray], tuple[np.ndarray, np.ndarray]]


def _u32(x: int) -> np.uint32:
    return np.uint32(x & _M32)


def seed_words(seed: int, code: int, key_crc32: np.ndarray) -> list[np.ndarray]:
    """SeedSequence's entropy words of ``[seed, code, crc32(user key)]`` per user (each below 2^32: one word)."""
    if not (0 <= seed <= _M32 and 0 <= code <= _M32):
        raise ValueError(f"seed {seed} and split code {code} must be below 2^32")
    n = len(key_crc32)
    return [np.full(n, seed, dtype=np.uint32), np.full(n, code, dtype=np.uint32), key_crc32.astype(np.uint32)]


def _seed_state(words: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """SeedSequence(words).generate_state(4, uint64) per user, as (s_hi, s_lo, t_hi, t_lo)."""
    const = _INIT_A

    def hashmix(value: np.ndarray) -> np.ndarray:
        nonlocal const
        value = value ^ _u32(const)
        const = (const * _MULT_A) & _M32
        value = value * _u32(const)
        return value ^ (value >> np.uint32(16))

    def mix(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        result = _u32(_MIX_MULT_L) * x - _u32(_MIX_MULT_R) * y
        return result ^ (result >> np.uint32(16))

    zero = np.zeros_like(words[0])
    pool = [hashmix(words[i] if i < len(words) else zero) for i in range(4)]
    for src in range(4):
        for dst in range(4):
            if src != dst:
                pool[dst] = mix(pool[dst], hashmix(pool[src]))
    const = _INIT_B
    out = []
    for i in range(8):
        value = pool[i % 4] ^ _u32(const)
        const = (const * _MULT_B) & _M32
        value = value * _u32(const)
        out.append((value ^ (value >> np.uint32(16))).astype(np.uint64))
    val = [out[2 * i] | (out[2 * i + 1] << np.uint64(32)) for i in range(4)]  # little-endian uint64 view
    return val[0], val[1], val[2], val[3]


def _mul_const(hi: np.ndarray, lo: np.ndarray, c_hi: int, c_lo: int) -> tuple[np.ndarray, np.ndarray]:
    """(hi, lo) * (c_hi, c_lo) mod 2^128; the 64 x 64 -> 128 product of the low words from 32-bit halves."""
    a0, a1 = lo & np.uint64(_M32), lo >> np.uint64(32)
    b0, b1 = np.uint64(c_lo & _M32), np.uint64(c_lo >> 32)
    p00, p01, p10, p11 = a0 * b0, a0 * b1, a1 * b0, a1 * b1
    mid = (p00 >> np.uint64(32)) + (p01 & np.uint64(_M32)) + (p10 & np.uint64(_M32))
    low = (p00 & np.uint64(_M32)) | (mid << np.uint64(32))
    high = p11 + (p01 >> np.uint64(32)) + (p10 >> np.uint64(32)) + (mid >> np.uint64(32))
    return high + lo * np.uint64(c_hi) + hi * np.uint64(c_lo), low


def _add(hi: np.ndarray, lo: np.ndarray, b_hi: np.ndarray, b_lo: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    low = lo + b_lo
    return hi + b_hi + (low < lo).astype(np.uint64), low


class Streams:
    """The uint32 streams of many PCG64 generators: ``take(rows, count)`` reads ahead without consuming;
    ``pos`` is each stream's read position (uint32 consumed since seeding)."""

    def __init__(self, words: list[np.ndarray]) -> None:
        with np.errstate(over="ignore"):
            s_hi, s_lo, t_hi, t_lo = _seed_state(words)
            self.inc_hi = (t_hi << np.uint64(1)) | (t_lo >> np.uint64(63))
            self.inc_lo = (t_lo << np.uint64(1)) | np.uint64(1)
            hi, lo = _add(s_hi, s_lo, self.inc_hi, self.inc_lo)  # step from state 0 gives inc; add s
            self.hi, self.lo = self._step(hi, lo, np.arange(len(hi)))
        n = len(words[0])
        self.pos = np.zeros(n, dtype=np.int64)
        self.start = np.zeros(n, dtype=np.int64)  # stream position of buffer[:, 0]
        self.end = np.zeros(n, dtype=np.int64)  # stream position after the buffer's last valid value
        self.buffer = np.zeros((n, 3 * _BLOCK), dtype=np.uint32)  # an unread part (< _BLOCK) and a new block

    def _step(self, hi: np.ndarray, lo: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        hi, lo = _mul_const(hi, lo, _MULT_HI, _MULT_LO)
        return _add(hi, lo, self.inc_hi[rows], self.inc_lo[rows])

    def _generate(self, rows: np.ndarray) -> np.ndarray:
        """The next ``_BLOCK`` 64-bit outputs of streams ``rows`` as uint32 [len(rows), 2 * _BLOCK] (lo, hi)."""
        out = np.empty((len(rows), 2 * _BLOCK), dtype=np.uint32)
        hi, lo = self.hi[rows], self.lo[rows]
        with np.errstate(over="ignore"):
            for k in range(_BLOCK):
                hi, lo = self._step(hi, lo, rows)
                x = hi ^ lo
                rot = hi >> np.uint64(58)
                value = (x >> rot) | (x << ((np.uint64(64) - rot) & np.uint64(63)))
                out[:, 2 * k] = value & np.uint64(_M32)
                out[:, 2 * k + 1] = value >> np.uint64(32)
        self.hi[rows], self.lo[rows] = hi, lo
        return out

    def take(self, rows: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
        """(uint32 [len(rows), count] from each stream's ``pos``, whether the buffer held them all); ``count`` is
        at most ``_BLOCK``."""
        width = self.buffer.shape[1]
        flat = self.buffer.reshape(-1)
        short = rows[self.pos[rows] + count > self.end[rows]]
        if len(short):  # keep the unread part (< count values), append a new block after it
            keep = self.end[short] - self.pos[short]
            base = short * width
            if keep.any():
                unread = np.minimum((self.pos[short] - self.start[short])[:, None] + np.arange(count), width - 1)
                flat[base[:, None] + np.arange(count)] = flat[base[:, None] + unread]
            fresh = self._generate(short)
            flat[(base + keep)[:, None] + np.arange(fresh.shape[1])] = fresh
            self.start[short] = self.pos[short]
            self.end[short] = self.pos[short] + keep + fresh.shape[1]
        at = np.minimum((self.pos[rows] - self.start[rows])[:, None] + np.arange(count), width - 1)
        complete = self.pos[rows] + count <= self.end[rows]
        return flat[(rows * width)[:, None] + at], complete


def scalar_generator(words: list[int], pos: int) -> np.random.Generator:
    """The numpy Generator of entropy ``words``, moved to stream position ``pos`` (uint32 consumed)."""
    rng = np.random.default_rng(words)
    rng.bit_generator.advance(pos // 2)
    if pos % 2:
        rng.integers(0, 2**32, dtype=np.uint32)  # reads the low half, keeps the high half for the next read
    return rng


def draw(users: np.ndarray, target: np.ndarray, words: list[np.ndarray], seen_key: np.ndarray, num_items: int,
         num_candidates: int, scalar_rows: ScalarRows) -> tuple[np.ndarray, np.ndarray]:
    """(candidates int64 [S, K], label int64 [S]) of sample rows whose users are ``users`` (indices into
    ``words``' arrays), each user's rows drawn in row order. ``seen_key``: sorted ``user * N + item`` of every
    item a user saw; ``scalar_rows(rng, user, rows)``: (candidates, label) of rows the array path hands over,
    drawn in order with ``rng``."""
    s = len(users)
    cands = np.zeros((s, num_candidates), dtype=np.int64)
    label = np.zeros(s, dtype=np.int64)
    by_user = np.argsort(users, kind="stable")
    sorted_users = users[by_user]
    first_row = np.flatnonzero(np.r_[True, sorted_users[1:] != sorted_users[:-1]]) if s else np.zeros(0, np.int64)
    counts = np.diff(np.r_[first_row, s])
    for a in range(0, len(first_row), _CHUNK_USERS):
        part = slice(a, a + _CHUNK_USERS)
        _draw_users(sorted_users[first_row[part]], first_row[part], counts[part], by_user, target, words, seen_key,
                    num_items, num_candidates, scalar_rows, cands, label)
    return cands, label


def _draw_users(drawing: np.ndarray, first_row: np.ndarray, counts: np.ndarray, by_user: np.ndarray,
                target: np.ndarray, words: list[np.ndarray], seen_key: np.ndarray, num_items: int, k: int,
                scalar_rows: ScalarRows, cands: np.ndarray,
                label: np.ndarray) -> None:
    """``draw`` for users ``drawing``, whose rows are ``by_user[first_row[i]:][:counts[i]]``, round by round
    (round r: every user's r-th row)."""
    streams = Streams([w[drawing] for w in words])
    batch = 2 * (k - 1) + 4
    threshold = (1 << 32) % num_items  # Lemire: a product whose low word is below this is drawn again
    handed = np.zeros(len(drawing), dtype=bool)
    for r in range(int(counts.max())):
        active = np.flatnonzero((counts > r) & ~handed)
        if not len(active):
            break
        rows = by_user[first_row[active] + r]
        raw, complete = streams.take(active, batch)
        product = raw.astype(np.uint64) * np.uint64(num_items)
        x = (product >> np.uint64(32)).astype(np.int64)
        ok = complete & ~((product & np.uint64(_M32)) < threshold).any(1)
        order = np.argsort(x, axis=1, kind="stable")  # equal values keep draw order: the first is the kept one
        ordered = np.take_along_axis(x, order, 1)
        first = np.empty_like(ordered, dtype=bool)
        np.put_along_axis(first, order, np.c_[np.ones(len(x), bool), ordered[:, 1:] != ordered[:, :-1]], 1)
        key = drawing[active][:, None] * np.int64(num_items) + x
        where = np.minimum(np.searchsorted(seen_key, key), len(seen_key) - 1)
        kept = first & (seen_key[where] != key)
        kept &= np.cumsum(kept, 1) <= k - 1
        ok &= kept.sum(1) == k - 1
        streams.pos[active[ok]] += batch
        good, rows = active[ok], rows[ok]
        negatives = x[ok][kept[ok]].reshape(-1, k - 1)
        perm = np.tile(np.arange(k), (len(good), 1))
        raw, complete = streams.take(good, _SHUFFLE_BUDGET)
        used = np.zeros(len(good), dtype=np.int64)
        line = np.arange(len(good))
        for i in range(k - 1, 0, -1):
            mask = (1 << i.bit_length()) - 1
            j = raw[line, np.minimum(used, _SHUFFLE_BUDGET - 1)] & mask
            while True:
                retry = (j > i) & (used < _SHUFFLE_BUDGET)
                if not retry.any():
                    break
                used[retry] += 1
                j[retry] = raw[line[retry], np.minimum(used[retry], _SHUFFLE_BUDGET - 1)] & mask
            used += 1
            j = j.astype(np.int64)
            perm[line, i], perm[line, j] = perm[line, j], perm[line, i].copy()
        fits = complete & (used <= _SHUFFLE_BUDGET)
        streams.pos[good[fits]] += used[fits]
        full = np.c_[target[rows], negatives]
        cands[rows[fits]] = np.take_along_axis(full[fits], perm[fits], 1)
        label[rows[fits]] = np.argmax(perm[fits] == 0, axis=1)
        streams.pos[good[~fits]] -= batch  # the negatives are drawn again by the scalar path
        for user in np.r_[active[~ok], good[~fits]]:  # rare: handed to numpy itself, from the same stream position
            handed[user] = True
            rng = scalar_generator([int(w[drawing[user]]) for w in words], int(streams.pos[user]))
            rest = by_user[first_row[user] + r: first_row[user] + counts[user]]
            cands[rest], label[rest] = scalar_rows(rng, int(drawing[user]), rest)
