"""The request contract of every runtime, and the one error each refusal gets.

``Recommender`` (ONNX Runtime, AOTInductor, TensorRT, PyTorch), ``OptimizedSpeeder.recommend`` and the C++ runtime
(``speeder_rt::Recommender``, also through ``CppRecommender``) accept the same requests and refuse the same ones
with ``RequestError`` (a ``ValueError``): ``field`` names the part of the request (``history_ids[2]``,
``candidate_ids``, ``k``, ``requests[1].candidates``), ``reason`` says what is wrong and what is allowed, and
``str(error) == f"{field}: {reason}"``, identical in every runtime for the same input.

What a request holds:

    history_ids    a batch of histories, each a list of item ids, oldest first (rows may differ in length), or a
                   2-D integer array / tensor whose rows are padded with negative ids after their real items
    candidate_ids  one row of K item ids per history, the same K in every row: lists, or a 2-D array / tensor
    k              (top-k) an integer in 1..max_topk
    requests       (recommend_batch) a list of (history, candidates) pairs; candidate counts may differ

An item id is a Python ``int`` or a numpy integer scalar (booleans are not integers here; floats, ``3.0``
included, strings, ``None`` and nested lists are refused), or an element of an integer array / tensor of any width,
signed or unsigned (bool, float and object dtypes are refused). Ids are in 0..num_items-1: a value that does not fit
int64 (``2**63``, the upper half of a uint64 array) is out of range, never wrapped. A history holds
1..max_history items, a row of candidates 1..max_candidates ids; a batch holds at least one history or request
(batches larger than a runtime runs at once are split, never refused).

The checks run in two stages, each over every field in a fixed order, so that every runtime names the same first
problem of a request: ``parse_*`` (types and shapes; Python only, since C++ callers' types are static), then
``check_*`` (empty inputs, counts, ranges), which the C++ runtime mirrors check for check and message for message
(csrc/runtime/validation.h) and its binding raises as this ``RequestError``. Messages hold no in-process reprs
(values are shown as ``3``, ``1.5``, ``nan``, ``True``, ``None``, ``"abc"``, ``a list of length 2``), so a server
can return them as they are.

What a runtime returns is checked too: a NaN or infinite score of a valid request (non-finite weights or item
features) is ``ModelOutputError`` (a ``RuntimeError``: the server's fault, not the request's), never an answer; in
top-k only -inf for the row's own history items (excluded, ranked last) passes.
"""
from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeGuard, Union

import numpy as np

if TYPE_CHECKING:
    import torch

Ids = Union[Sequence[Sequence[int]], Sequence[np.ndarray], np.ndarray, "torch.Tensor"]
Rows = Sequence[np.ndarray] | np.ndarray  # int64 rows: a list of 1-D arrays, or a 2-D array

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
STRING_SHOWN = 40  # characters of a refused string that a message quotes


def is_array(value: object) -> TypeGuard[np.ndarray | torch.Tensor]:
    """A numpy array, or a torch tensor once torch is imported: a tensor cannot exist before, so the contract checks
    requests without importing torch (an ONNX export is served without it)."""
    torch = sys.modules.get("torch")
    return isinstance(value, np.ndarray) or (torch is not None and isinstance(value, torch.Tensor))


class RequestError(ValueError):
    """A request the contract refuses: ``field`` (which part), ``reason`` (what is wrong, what is allowed)."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason

    def __reduce__(self) -> tuple[type, tuple[str, str]]:  # pickles (multiprocessing) with both parts
        return type(self), (self.field, self.reason)


def describe(value: Any) -> str:
    """``value`` as the messages show it: numbers and booleans as written, strings JSON-quoted (the first
    ``STRING_SHOWN`` characters), containers by kind and size."""
    if value is None or isinstance(value, (bool, np.bool_)):
        return str(None if value is None else bool(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return repr(float(value))
    if isinstance(value, str):
        return json.dumps(value[:STRING_SHOWN], ensure_ascii=False) + ("..." if len(value) > STRING_SHOWN else "")
    if is_array(value):
        return f"an array of shape {list(value.shape)} and dtype {dtype_name(value.dtype)}"
    if isinstance(value, (list, tuple)):
        return f"a {type(value).__name__} of length {len(value)}"
    name = type(value).__name__
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def dtype_name(dtype: np.dtype | torch.dtype) -> str:
    """``float64``, ``int32``, ``bool`` for numpy and torch dtypes alike."""
    return str(dtype).removeprefix("torch.")


def check_integer_dtype(dtype: np.dtype | torch.dtype, field: str, what: str = "item ids") -> None:
    """RequestError unless ``dtype`` is a signed or unsigned integer type (bool is not)."""
    if not isinstance(dtype, np.dtype):  # a torch dtype
        integer = not (dtype_name(dtype) == "bool" or dtype.is_floating_point or dtype.is_complex)
    else:
        integer = dtype.kind in "iu"
    if not integer:
        raise RequestError(field, f"{what} must be integers, got dtype {dtype_name(dtype)}")


def _is_integer(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


@dataclass(frozen=True)
class RequestContract:
    """The limits of one runtime and the checks against them (see the module docstring)."""

    num_items: int  # item ids: 0 .. num_items - 1
    max_history: int  # items per history: 1 .. max_history
    max_candidates: int  # candidates per user: 1 .. max_candidates
    max_topk: int  # top-k answers 1 <= k <= max_topk; 0: no top-k graph

    # -- the requests, both stages ------------------------------------------------------------------
    def recommend(self, history_ids: Ids, candidate_ids: Ids) -> tuple[list[np.ndarray], np.ndarray]:
        """(one int64 array of real items per user, candidates int64 [B, K]) of a valid request."""
        histories, candidates = self.parse_recommend(history_ids, candidate_ids)
        self.check_histories(histories)
        return histories, self.check_candidates(candidates, len(histories))

    def topk(self, history_ids: Ids, k: Any) -> tuple[list[np.ndarray], int]:
        histories, k = self.parse_topk(history_ids, k)
        self.check_k(k)
        self.check_histories(histories)
        return histories, k

    def requests(self, requests: Any) -> list[tuple[np.ndarray, np.ndarray]]:
        """(history, candidates) int64 arrays per request of a valid ``recommend_batch``."""
        pairs = self.parse_requests(requests)
        self.check_requests(pairs)
        return pairs

    # -- stage 1: types and shapes --------------------------------------------------------------------
    def parse_recommend(self, history_ids: Ids, candidate_ids: Ids) -> tuple[list[np.ndarray], Rows]:
        return self.parse_histories(history_ids), self.parse_candidates(candidate_ids)

    def parse_topk(self, history_ids: Ids, k: Any) -> tuple[list[np.ndarray], int]:
        return self.parse_histories(history_ids), self.parse_k(k)

    def parse_histories(self, history_ids: Ids) -> list[np.ndarray]:
        """One int64 array of real items per user (not yet checked: rows may be empty, long or out of range)."""
        field = "history_ids"
        if is_array(history_ids) and history_ids.ndim == 2:
            ids = self._int64_array(history_ids, field)
            real = ids >= 0
            late = real[:, 1:] & ~real[:, :-1]
            if late.any():
                raise RequestError(f"{field}[{int(late.any(1).argmax())}]",
                                   "padding (negative ids) must come after the real items")
            return [row[mask] for row, mask in zip(ids, real)]
        if not isinstance(history_ids, (list, tuple)):
            raise RequestError(field, "expected a list of histories or a 2-D array padded with negative ids, got "
                               + describe(history_ids))
        return [self._id_row(row, f"{field}[{i}]") for i, row in enumerate(history_ids)]

    def parse_candidates(self, candidate_ids: Ids) -> Rows:
        """Rows of int64 ids (not yet checked: rows may differ in length or be out of range)."""
        field = "candidate_ids"
        if is_array(candidate_ids) and candidate_ids.ndim == 2:
            return self._int64_array(candidate_ids, field)
        if not isinstance(candidate_ids, (list, tuple)):
            raise RequestError(field, f"expected a list of candidate rows or a 2-D array, got {describe(candidate_ids)}")
        return [self._id_row(row, f"{field}[{i}]") for i, row in enumerate(candidate_ids)]

    def parse_k(self, k: Any) -> int:
        if not _is_integer(k):
            raise RequestError("k", f"expected an integer, got {describe(k)}")
        k = int(k)
        if not INT64_MIN <= k <= INT64_MAX:
            self.check_k(k)
        return k

    def parse_requests(self, requests: Any) -> list[tuple[np.ndarray, np.ndarray]]:
        if not isinstance(requests, (list, tuple)):
            raise RequestError("requests", f"expected a list of (history, candidates) pairs, got {describe(requests)}")
        pairs = []
        for i, pair in enumerate(requests):
            if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                raise RequestError(f"requests[{i}]", f"expected a (history, candidates) pair, got {describe(pair)}")
            pairs.append((self._id_row(pair[0], f"requests[{i}].history"),
                          self._id_row(pair[1], f"requests[{i}].candidates")))
        return pairs

    def _id_row(self, values: Any, field: str) -> np.ndarray:
        """A list / tuple of item ids or a 1-D integer array / tensor, as int64."""
        if is_array(values) and values.ndim == 1:
            return self._int64_array(values, field)
        if not isinstance(values, (list, tuple)):
            raise RequestError(field, f"expected a list of item ids, got {describe(values)}")
        if not all(type(v) is int for v in values):  # numpy integer scalars, or a refusal
            for v in values:
                if not _is_integer(v):
                    raise RequestError(field, f"item ids must be integers, got {describe(v)}")
            values = [int(v) for v in values]
        try:
            return np.array(values, dtype=np.int64)
        except OverflowError:  # beyond int64
            beyond = next(v for v in values if not INT64_MIN <= v <= INT64_MAX)
            raise RequestError(field, self._out_of_range(beyond)) from None

    def _int64_array(self, values: np.ndarray | torch.Tensor, field: str) -> np.ndarray:
        """An integer array / tensor as int64; an unsigned value beyond int64 is out of range (in row order)."""
        check_integer_dtype(values.dtype, field)
        array = values if isinstance(values, np.ndarray) else values.detach().cpu().numpy()  # a tensor
        if array.dtype == np.uint64 and array.size and array.max() > INT64_MAX:
            self.check_ids(array, field)  # names the first value beyond int64 (and any smaller one out of range)
        return array.astype(np.int64, copy=False)

    # -- stage 2: empty inputs, counts and ranges (mirrored in csrc/runtime/validation.h) ---------------
    def check_histories(self, histories: Rows) -> None:
        if not len(histories):
            raise RequestError("history_ids", "empty batch (at least one history is needed)")
        for i, row in enumerate(histories):
            self.check_history(row, f"history_ids[{i}]")

    def check_history(self, row: np.ndarray, field: str) -> None:
        if not len(row):
            raise RequestError(field, "empty history (at least one item is needed)")
        if len(row) > self.max_history:
            raise RequestError(field, f"{len(row)} items, more than max_history={self.max_history}")
        self.check_ids(row, field)

    def check_candidates(self, candidates: Rows, batch: int) -> np.ndarray:
        """The rows as one int64 [B, K] array, after: equal lengths, one row per history, K, ids."""
        field = "candidate_ids"
        for i, row in enumerate(candidates):
            if len(row) != len(candidates[0]):
                raise RequestError(f"{field}[{i}]", f"{len(row)} candidates where {field}[0] has {len(candidates[0])} "
                                   "(every row needs the same count)")
        if len(candidates) != batch:
            raise RequestError(field, f"{len(candidates)} rows for {batch} histories")
        self.check_count(len(candidates[0]), field)
        array = candidates if isinstance(candidates, np.ndarray) else np.stack(candidates)
        self.check_ids(array, field)
        return array

    def check_count(self, count: int, field: str) -> None:
        if not 1 <= count <= self.max_candidates:
            raise RequestError(field, f"{count} candidates per user, outside 1..max_candidates={self.max_candidates}")

    def check_ids(self, ids: np.ndarray, field: str) -> None:
        """Every id in 0..num_items-1; the first one that is not (in row order) is named, with its row for 2-D ids."""
        bad = (ids < 0) | (ids >= self.num_items)
        if bad.any():
            index = np.unravel_index(int(bad.argmax()), bad.shape)
            raise RequestError(field if ids.ndim == 1 else f"{field}[{index[0]}]", self._out_of_range(ids[index]))

    def check_k(self, k: int) -> None:
        if not self.max_topk:
            raise RequestError("k", "no top-k graph (exported with --topk 0)")
        if not 1 <= k <= self.max_topk:
            raise RequestError("k", f"{k} is outside 1..max_topk={self.max_topk}")

    def check_requests(self, requests: Sequence[tuple[np.ndarray, np.ndarray]]) -> None:
        if not requests:
            raise RequestError("requests", "empty batch (at least one request is needed)")
        for i, (history, candidates) in enumerate(requests):
            self.check_history(history, f"requests[{i}].history")
            self.check_count(len(candidates), f"requests[{i}].candidates")
            self.check_ids(candidates, f"requests[{i}].candidates")

    def _out_of_range(self, value: int | np.integer) -> str:
        return f"item ids must be in 0..{self.num_items - 1}, got {int(value)}"


# -- what a runtime returns ------------------------------------------------------------------------------------
class ModelOutputError(RuntimeError):
    """The model scored a valid request with a NaN or an infinity: its weights or item features are not finite (a
    diverged training, a corrupt export). Not the request's fault, so not a ``RequestError``; nothing is returned."""


def _non_finite_answer(field: str, position: str, value: float) -> ModelOutputError:
    return ModelOutputError(f"{field}: the model scored {position} {describe(value)}; its weights or item features "
                            "are not finite (a diverged training or a corrupt export), so no scores are returned")


def check_finite_scores(scores: np.ndarray, field: str = "history_ids", rows: Sequence[int] | None = None) -> None:
    """``ModelOutputError`` naming the request row (``rows[i]`` for row i when given) and the candidate of the
    first non-finite score of ``scores`` [B, K]."""
    bad = ~np.isfinite(scores)
    if bad.any():
        row, col = (int(i) for i in np.argwhere(bad)[0])
        raise _non_finite_answer(f"{field}[{row if rows is None else rows[row]}]", f"candidate {col}",
                                 float(scores[row, col]))


def check_finite_topk(history_ids: np.ndarray, item_ids: np.ndarray, scores: np.ndarray) -> None:
    """``ModelOutputError`` unless every top-k score is finite, or -inf for an item of the row's own history (the
    excluded items a k beyond the items left reaches): a NaN would otherwise rank first. ``history_ids``: the
    histories padded with negative ids [B, n]."""
    bad = ~np.isfinite(scores)
    if bad.any():
        excluded = (item_ids[:, :, None] == history_ids[:, None, :]).any(2)
        bad &= ~((scores == -np.inf) & excluded)
    if bad.any():
        row, col = (int(i) for i in np.argwhere(bad)[0])
        raise _non_finite_answer(f"history_ids[{row}]", f"item {int(item_ids[row, col])} (rank {col})",
                                 float(scores[row, col]))


__all__ = ["INT64_MAX", "INT64_MIN", "Ids", "ModelOutputError", "RequestContract", "RequestError",
           "check_finite_scores", "check_finite_topk", "check_integer_dtype", "describe"]
