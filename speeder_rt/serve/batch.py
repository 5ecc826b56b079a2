"""One Triton batch of requests -> one ``Recommender`` call, with one answer (outputs or a client error) per request.

Triton's dynamic batcher hands the Python backend a list of requests; their inputs may differ in history width
and candidate count (ragged inputs). ``answer`` first runs them merged: one runtime call per candidate count
(candidates are prompt tokens), histories padded by the runtime to the longest one (mask False, which leaves
every score unchanged). If the runtime refuses the merged batch (a bad request, or a non-finite score of one
request: ``ModelOutputError``), each request runs alone, so every bad request gets its own message (indices
relative to that request) and the good ones their answers.

``CLIENT_ERRORS`` is the one place that says which exceptions are the client's fault (HTTP 400 / gRPC
INVALID_ARGUMENT); ``MODEL_ERRORS`` the server faults whose message the client gets (no traceback in it);
anything else is a server error the client sees as ``internal error``.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from speeder_rt.runtime import Recommender
from speeder_rt.runtime.validation import ModelOutputError, RequestError

# The request contract's refusals (speeder_rt.runtime.validation), also raised here for the one input only the
# wire format has (the mask).
CLIENT_ERRORS: tuple[type[Exception], ...] = (RequestError,)
# A runtime's refusal to return a NaN / infinite score: a row of ONE request, so a merged batch is rerun per request.
MODEL_ERRORS: tuple[type[Exception], ...] = (ModelOutputError,)

Inputs = dict[str, np.ndarray]
Outputs = dict[str, np.ndarray]
Answer = Outputs | Exception


def histories(history_ids: np.ndarray, history_mask: np.ndarray) -> list[np.ndarray]:
    """Each row's real items (``history_ids`` where ``history_mask``), the mask checked: True for the history's
    items and False after them, like the exported graphs expect."""
    if history_ids.shape != history_mask.shape:
        raise RequestError("history_mask", f"shape {list(history_mask.shape)} differs from history_ids' "
                                           f"{list(history_ids.shape)}")
    mask = history_mask.astype(bool, copy=False)
    lengths = mask.sum(1)
    holes = np.flatnonzero((mask != (np.arange(mask.shape[1])[None, :] < lengths[:, None])).any(1))
    if holes.size:
        raise RequestError(f"history_mask[{holes[0]}]", "must be True for the history's items and False after "
                                                        "them (no False before a True)")
    return [row[:n] for row, n in zip(history_ids, lengths)]


def _scores_one(rec: Recommender, request: Inputs) -> Outputs:
    rows = histories(request["history_ids"], request["history_mask"])
    return {"scores": rec.recommend(rows, request["candidate_ids"])}


def _scores_merged(rec: Recommender, requests: list[Inputs]) -> list[Outputs] | None:
    """Every request's scores from one runtime call per candidate count, or None when some request is malformed
    in a way a merged call would not notice (no rows, no candidates, row counts that differ). Candidates are
    prompt tokens, so lists of different lengths never share a call (padding them would change the scores)."""
    rows = [histories(r["history_ids"], r["history_mask"]) for r in requests]
    candidates = [r["candidate_ids"] for r in requests]
    if any(c.ndim != 2 or c.shape[0] != len(h) or not len(h) or not c.shape[1] for c, h in zip(candidates, rows)):
        return None
    outputs: list[Outputs] = [{}] * len(requests)
    for k in sorted({c.shape[1] for c in candidates}):
        group = [i for i, c in enumerate(candidates) if c.shape[1] == k]
        scores = rec.recommend([h for i in group for h in rows[i]], np.concatenate([candidates[i] for i in group]))
        for i, part in zip(group, np.split(scores, np.cumsum([len(rows[i]) for i in group])[:-1])):
            outputs[i] = {"scores": part}
    return outputs


def _topk_one(rec: Recommender, request: Inputs) -> Outputs:
    ids, scores = rec.topk(histories(request["history_ids"], request["history_mask"]), k=rec.max_topk)
    return {"item_ids": ids, "scores": scores}


def _topk_merged(rec: Recommender, requests: list[Inputs]) -> list[Outputs] | None:
    rows = [histories(r["history_ids"], r["history_mask"]) for r in requests]
    if not all(rows):
        return None
    ids, scores = rec.topk([h for r in rows for h in r], k=rec.max_topk)
    ends = np.cumsum([len(h) for h in rows])[:-1]
    return [{"item_ids": i, "scores": s} for i, s in zip(np.split(ids, ends), np.split(scores, ends))]


GRAPHS: dict[str, tuple[Callable[[Recommender, Inputs], Outputs],
                        Callable[[Recommender, list[Inputs]], list[Outputs] | None]]] = {
    "scores": (_scores_one, _scores_merged),
    "topk": (_topk_one, _topk_merged),
}


def answer(rec: Recommender, graph: str, requests: list[Inputs]) -> Sequence[Answer]:
    """One answer per request: its outputs, or the exception that refused it (a ``CLIENT_ERRORS`` member for
    a bad request; anything else is a server fault)."""
    one, merged = GRAPHS[graph]
    if len(requests) > 1:
        try:
            outputs = merged(rec, requests)
        except CLIENT_ERRORS + MODEL_ERRORS:
            outputs = None
        if outputs is not None:
            return outputs
    answers: list[Answer] = []
    for request in requests:
        try:
            answers.append(one(rec, request))
        except Exception as e:  # noqa: BLE001 -- per request: one failure must not fail the others
            answers.append(e)
    return answers
