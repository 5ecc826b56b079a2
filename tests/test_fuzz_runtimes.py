"""Fuzzing kept as a test: seeded random requests, valid and invalid mixed, sent to every runtime (Recommender on ONNX
Runtime, AOTInductor and PyTorch, OptimizedSpeeder.recommend, CppRecommender), in a subprocess so that a crash or a
hang fails the test instead of killing the session. Asserted per request:

* only the contract's exception (RequestError) comes out, and an invalid request always raises it;
* every runtime that takes the request answers it alike: the same field and message, or a result;
* a valid request's result equals the PyTorch model's (the reference engine) within the export's tolerance
  (``max |got - reference| <= atol * max(1, max |reference|)``, atol from export.json); top-k ids are compared
  through the reference scores of the returned ids (equal-score items may come back in either order) and never
  include a history's own items.

Each runtime gets at least ``--fuzz-count`` requests (2000 by default: about half a minute on the 2-core machine);
``pytest tests/test_fuzz_runtimes.py --fuzz-count 20000`` runs longer. The worker is this file run as a script:
``python tests/test_fuzz_runtimes.py EXPORTS COUNT SEED REPORT.json``.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from speeder_rt.runtime.validation import RequestError

SEED = 0
VALID_SHARE = 0.4  # valid requests run the models; invalid ones are cheap
FAILURES_KEPT = 20


@pytest.mark.slow
def test_fuzzed_requests_get_the_contracts_answers_in_every_runtime(contract_exports, request, tmp_path):
    count = request.config.getoption("--fuzz-count")
    report_path = tmp_path / "fuzz.json"
    start = time.perf_counter()
    run = subprocess.run([sys.executable, __file__, str(contract_exports), str(count), str(SEED), str(report_path)],
                         capture_output=True, text=True, timeout=60 + count * 0.25, check=False)
    assert run.returncode == 0, f"the fuzz worker died (status {run.returncode}):\n{run.stderr[-4000:]}"
    report = json.loads(report_path.read_text())
    print(f"fuzz: {report['requests']} requests ({report['valid']} valid) in {time.perf_counter() - start:.1f}s, "
          f"per runtime {report['per_runtime']}")
    assert report["failures"] == [], "\n".join(report["failures"])
    assert min(report["per_runtime"].values()) >= count and len(report["per_runtime"]) >= 4
    assert abs(report["valid"] / report["requests"] - VALID_SHARE) < 0.1  # both kinds are exercised
    assert len(report["messages"]) >= 40  # many distinct refusals, not one repeated


# -- the worker ------------------------------------------------------------------------------------------------
BAD_IDS = [120, 500, -2, -(2**63), 2**63, 2**70, -(2**63) - 1, 1.5, 3.0, float("nan"), float("inf"), "3", "+3", None,
           True, False, [1], np.float32(2), np.uint64(2**63), np.bool_(True)]
BAD_K = [None, True, False, float("nan"), 2.0, 2**70, 0, -1, 6, 10**6, "3", np.float64(2), [2]]
BAD_CONTAINERS = [None, "1 2", 5, 2.5, {"ids": [1]}, np.array([1, 2]), np.zeros((1, 1, 1), dtype=np.int64)]


class Fuzzer:
    """Draws requests: a valid one in a random accepted form, or a valid one broken by one invalidating change."""

    def __init__(self, seed: int, num_items: int, max_history: int, max_candidates: int, max_topk: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.n, self.max_history, self.max_candidates, self.max_topk = num_items, max_history, max_candidates, max_topk

    def pick(self, options: list[Any]) -> Any:
        return options[int(self.rng.integers(len(options)))]

    def ids(self, length: int) -> list[int]:
        return self.rng.integers(0, self.n, size=length).tolist()

    def draw(self) -> tuple[str, tuple[Any, ...], bool]:
        """(method, args, valid)."""
        method = self.pick(["recommend"] * 5 + ["topk", "recommend_batch"])  # OptimizedSpeeder takes recommend only
        valid = self.rng.random() < VALID_SHARE
        batch = int(self.rng.integers(1, 6))  # beyond the 4 users per model call at times
        histories = [self.ids(int(self.rng.integers(1, self.max_history + 1))) for _ in range(batch)]
        if method == "recommend":
            count = int(self.rng.integers(1, self.max_candidates + 1))
            candidates = [self.ids(count) for _ in range(batch)]
            if not valid:
                histories, candidates = self.pick([self.break_histories, self.break_candidates])(histories, candidates)
            return method, (self.history_form(histories), self.candidate_form(candidates)), valid
        if method == "topk":
            k = int(self.rng.integers(1, self.max_topk + 1))
            k = self.pick([k, np.int64(k), np.int32(k)])
            if not valid:
                if self.rng.random() < 0.5:
                    k = self.pick(BAD_K)
                else:
                    histories, _ = self.break_histories(histories, None)
            return method, (self.history_form(histories), k), valid
        requests = [(h, self.ids(int(self.rng.integers(1, self.max_candidates + 1)))) for h in histories]
        if not valid:
            requests = self.break_requests(requests)
        return method, (self.pick([list, tuple])(requests) if isinstance(requests, list) else requests,), valid

    # accepted forms: lists, tuples, numpy integer scalars, row arrays, padded arrays / tensors of integer dtypes
    def dtypes(self, rows: list[list[int]]) -> list[Any] | None:
        """The numpy dtypes that hold ``rows`` exactly (None: keep them lists). Negative ids stay in lists: in a
        padded array they would be padding."""
        if not all(type(v) is int and 0 <= v < 2**31 for row in rows for v in row):
            return None
        return [np.int64, np.int32] + ([np.int16, np.uint8, np.uint64] if all(v < self.n for r in rows for v in r) else [])

    def history_form(self, histories: Any) -> Any:
        if not isinstance(histories, list) or not histories or not all(isinstance(h, list) and h for h in histories):
            return histories
        dtypes = self.dtypes(histories)
        if dtypes is None:
            return histories
        form = self.pick(["lists", "tuples", "scalars", "rows", "padded", "tensor"])
        if form == "tuples":
            return tuple(tuple(h) for h in histories)
        if form == "scalars":
            return [[self.pick(dtypes)(v) for v in h] for h in histories]
        if form == "rows":
            return [np.array(h, dtype=self.pick(dtypes)) for h in histories]
        if form in ("padded", "tensor"):
            width = max(map(len, histories)) + int(self.rng.integers(0, 3))
            padded = np.array([h + [-1] * (width - len(h)) for h in histories], dtype=self.pick([np.int32, np.int64]))
            return torch.from_numpy(padded) if form == "tensor" else padded
        return histories

    def candidate_form(self, candidates: Any) -> Any:
        if not isinstance(candidates, list) or not candidates or not all(isinstance(c, list) for c in candidates):
            return candidates
        dtypes = self.dtypes(candidates)
        if dtypes is None or len(set(map(len, candidates))) != 1:
            return candidates
        form = self.pick(["lists", "array", "tensor", "rows"])
        if form == "array":
            return np.array(candidates, dtype=self.pick(dtypes))
        if form == "tensor":
            return torch.tensor(candidates, dtype=self.pick([torch.int64, torch.int32]))
        if form == "rows":
            return [np.array(c, dtype=self.pick(dtypes)) for c in candidates]
        return candidates

    # invalidating changes
    def break_histories(self, histories: list[list[int]], candidates: Any) -> tuple[Any, Any]:
        row = int(self.rng.integers(len(histories)))
        change = self.pick(["id", "id", "empty row", "long row", "empty batch", "container", "row container",
                            "array dtype", "uint64 array", "late padding"])
        if change == "id":
            histories[row][int(self.rng.integers(len(histories[row])))] = self.pick(BAD_IDS)
        elif change == "empty row":
            histories[row] = []
        elif change == "long row":
            histories[row] = self.ids(int(self.rng.integers(self.max_history + 1, self.max_history + 5)))
        elif change == "empty batch":
            return [], candidates
        elif change == "container":
            return self.pick(BAD_CONTAINERS), candidates
        elif change == "row container":
            histories[row] = self.pick([3, "3", None, 1.5, {"a": 1}, np.zeros((1, 1), dtype=np.int64)])
        else:
            width = max(map(len, histories)) + 1
            padded = np.array([h + [-1] * (width - len(h)) for h in histories])
            if change == "array dtype":
                return padded.astype(self.pick([np.float64, np.float32, bool, object])), candidates
            if change == "uint64 array":
                padded = np.where(padded < 0, 0, padded).astype(np.uint64)
                padded[row, 0] = np.uint64(2**63 + int(self.rng.integers(0, 2**62)))
                return padded, candidates
            padded[row, 0] = -1  # padding before the row's other items (or a row of padding only: empty)
            return padded, candidates
        return histories, candidates

    def break_candidates(self, histories: Any, candidates: list[list[int]]) -> tuple[Any, Any]:
        row = int(self.rng.integers(len(candidates)))
        change = self.pick(["id", "id", "none", "too many", "ragged", "extra row", "missing row", "container",
                            "array dtype"])
        if change == "id":
            candidates[row][int(self.rng.integers(len(candidates[row])))] = self.pick(BAD_IDS)
        elif change == "none":
            candidates = [[] for _ in candidates]
        elif change == "too many":
            count = int(self.rng.integers(self.max_candidates + 1, self.max_candidates + 10))
            candidates = [self.ids(count) for _ in candidates]
        elif change == "ragged" and len(candidates) > 1:
            row = max(row, 1)
            candidates[row] = candidates[row][:-1] if len(candidates[row]) > 1 else candidates[row] + [1]
        elif change in ("extra row", "ragged"):
            candidates = candidates + [candidates[0]]
        elif change == "missing row":
            candidates = candidates[1:]
        elif change == "container":
            candidates = self.pick(BAD_CONTAINERS)
        else:
            candidates = np.array(candidates).astype(self.pick([np.float64, bool, object]))
        return histories, candidates

    def break_requests(self, requests: list[tuple[list[int], list[int]]]) -> Any:
        row = int(self.rng.integers(len(requests)))
        history, candidates = requests[row]
        change = self.pick(["history id", "candidate id", "empty history", "no candidates", "too many", "long history",
                            "pair", "empty batch", "container"])
        if change == "history id":
            history[int(self.rng.integers(len(history)))] = self.pick(BAD_IDS)
        elif change == "candidate id":
            candidates[int(self.rng.integers(len(candidates)))] = self.pick(BAD_IDS)
        elif change == "empty history":
            requests[row] = ([], candidates)
        elif change == "no candidates":
            requests[row] = (history, [])
        elif change == "too many":
            requests[row] = (history, self.ids(self.max_candidates + 1))
        elif change == "long history":
            requests[row] = (self.ids(self.max_history + 1), candidates)
        elif change == "pair":
            requests[row] = self.pick([(history,), (history, candidates, candidates), history, None])
        elif change == "empty batch":
            return []
        else:
            return self.pick(BAD_CONTAINERS)
        return requests


class Reference:
    """The PyTorch model's scores (float64) of a valid request, and the tolerance check against them."""

    def __init__(self, model: Any, atol: float) -> None:
        self.model, self.atol = model, atol
        self.table = model.item_token_table()

    def _inputs(self, histories: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(map(len, histories))
        padded = torch.tensor(np.array([np.pad(h, (0, width - len(h)), constant_values=-1) for h in histories]))
        return padded, torch.tensor([len(h) for h in histories])

    @torch.no_grad()
    def scores(self, histories: list[np.ndarray], candidates: np.ndarray) -> np.ndarray:
        history, history_len = self._inputs(histories)
        return self.model(history, history_len, torch.from_numpy(candidates), item_tokens=self.table).double().numpy()

    @torch.no_grad()
    def catalog(self, histories: list[np.ndarray]) -> np.ndarray:
        """Every item's score per user, the history's own items at -inf."""
        full = self.model.catalog_scores(*self._inputs(histories), self.table).double().numpy()
        for row, history in enumerate(histories):
            full[row, history] = -np.inf
        return full

    def close(self, got: np.ndarray, want: np.ndarray) -> bool:
        return got.shape == want.shape and bool(np.abs(got - want).max() <= self.atol * max(1.0, np.abs(want).max()))

    def check(self, method: str, parsed: Any, results: dict[str, Any]) -> list[str]:
        """What differs from the reference (computed once) in each runtime's result of one valid request."""
        if method == "recommend":
            want = self.scores(*parsed)
            return [f"{name}: scores differ from the reference" for name, got in results.items()
                    if not self.close(np.asarray(got, np.float64), want)]
        if method == "recommend_batch":  # the reference scores the requests of one candidate count together
            problems = []
            for count in {len(c) for _, c in parsed}:
                members = [i for i, (_, c) in enumerate(parsed) if len(c) == count]
                want = self.scores([parsed[i][0] for i in members], np.stack([parsed[i][1] for i in members]))
                problems += [f"{name}: scores of requests {members} differ from the reference"
                             for name, got in results.items()
                             if not self.close(np.stack([np.asarray(got[i], np.float64) for i in members]), want)]
            return problems
        histories, k = parsed
        full = self.catalog(histories)
        best = -np.sort(-full, axis=1)[:, :k]
        rows = np.arange(len(histories))[:, None]
        problems = []
        for name, (ids, got) in results.items():
            if ids.shape != (len(histories), k) or not ((ids >= 0) & (ids < full.shape[1])).all():
                problems.append(f"{name}: top-k ids of shape {ids.shape} or out of the catalog")
            elif not np.isfinite(full[rows, ids]).all():
                problems.append(f"{name}: top-k returned a history item")
            elif not (self.close(got.astype(np.float64), best) and self.close(got.astype(np.float64), full[rows, ids])):
                problems.append(f"{name}: top-k scores differ from the reference")
        return problems


def outcome(runtime: Any, method: str, args: tuple[Any, ...]) -> tuple[str, Any]:
    """("ok", result) | ("refused", "field | message") | ("crashed", traceback): an exception outside the contract."""
    try:
        return "ok", getattr(runtime, method)(*args)
    except RequestError as e:
        return "refused", f"{e.field} | {e}"
    except Exception:  # noqa: BLE001 -- any other exception is what the test reports
        return "crashed", traceback.format_exc(limit=4)


def fuzz(exports: Path, count: int, seed: int) -> dict[str, Any]:
    from bad_requests import NUM_ITEMS, RANGES, TOPK, contract_model, load_runtimes, takes

    torch.set_num_threads(1)  # fast and deterministic on a shared 2-core machine
    model = contract_model()
    runtimes = load_runtimes(exports, model)
    reference = Reference(model, json.loads((exports / "onnx" / "export.json").read_text())["atol"])
    contract = runtimes["onnx"].contract
    parse = {"recommend": contract.recommend, "topk": contract.topk, "recommend_batch": contract.requests}
    fuzzer = Fuzzer(seed, NUM_ITEMS, RANGES.max_history, RANGES.max_candidates, TOPK)
    per_runtime = dict.fromkeys(runtimes, 0)
    failures: list[str] = []
    messages: set[str] = set()
    requests = valid_count = 0
    while min(per_runtime.values()) < count:
        method, args, valid = fuzzer.draw()
        requests += 1
        valid_count += valid
        where = f"request {requests} ({method}, {'valid' if valid else 'invalid'}, args {args!r:.300})"
        answers = {}
        for name, runtime in runtimes.items():
            if takes(runtime, method):
                per_runtime[name] += 1
                answers[name] = outcome(runtime, method, args)
        kinds = {name: kind for name, (kind, _) in answers.items()}
        if "crashed" in kinds.values():
            failures += [f"{where}: {name} raised\n{value}" for name, (kind, value) in answers.items() if kind == "crashed"]
        elif set(kinds.values()) != {"ok" if valid else "refused"}:
            failures.append(f"{where}: answered {kinds} ({ {n: v for n, (k, v) in answers.items() if k != 'ok'} })")
        elif not valid:
            refusals = {value for _, value in answers.values()}
            messages |= refusals
            if len(refusals) != 1:
                failures.append(f"{where}: different refusals {refusals}")
        else:
            results = {name: result for name, (_, result) in answers.items()}
            failures += [f"{where}: {problem}" for problem in reference.check(method, parse[method](*args), results)]
        del failures[FAILURES_KEPT:]
    return {"requests": requests, "valid": valid_count, "per_runtime": per_runtime, "failures": failures,
            "messages": sorted(messages)}


if __name__ == "__main__":
    exports_dir, fuzz_count, fuzz_seed, report_file = sys.argv[1:]
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # bad_requests
    Path(report_file).write_text(json.dumps(fuzz(Path(exports_dir), int(fuzz_count), int(fuzz_seed)), indent=1))
