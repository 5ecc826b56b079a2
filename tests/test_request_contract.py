"""The request contract (speeder_rt.runtime.validation): every runtime -- Recommender on ONNX Runtime, AOTInductor and
PyTorch, OptimizedSpeeder.recommend, the C++ runtime through CppRecommender and through its bare binding -- refuses
each bad request of tests/bad_requests.py with the same RequestError (field and message), and takes the integer
forms the contract accepts (numpy and torch integer types of any width, tuples, padded arrays) with equal scores."""
import pickle

import numpy as np
import pytest
import torch
from bad_requests import CONTRACT_CASES, NUM_ITEMS, TOPK, contract_model, load_runtimes, takes

from speeder_rt.runtime.validation import INT64_MAX, INT64_MIN, RequestError

pytestmark = pytest.mark.slow  # the exports


@pytest.fixture(scope="module")
def model():
    return contract_model()


@pytest.fixture(scope="module")
def runtimes(contract_exports, model):
    return load_runtimes(contract_exports, model)


def reference_scores(model, histories, candidates):
    """float64 [B, K] of the PyTorch model on the real items of each history."""
    width = max(map(len, histories))
    history = torch.tensor([list(h) + [-1] * (width - len(h)) for h in histories])
    with torch.no_grad():
        scores = model(history, torch.tensor([len(h) for h in histories]), torch.as_tensor(np.asarray(candidates)),
                       item_tokens=model.item_token_table())
    return scores.double().numpy()


@pytest.mark.parametrize("case", CONTRACT_CASES, ids=[f"{c.method}-{c.message}" for c in CONTRACT_CASES])
def test_every_runtime_refuses_a_bad_request_with_the_same_error(runtimes, case):
    served = [name for name, runtime in runtimes.items() if takes(runtime, case.method)]
    assert len(served) >= (4 if case.method == "recommend" else 3)
    for name in served:
        with pytest.raises(RequestError) as caught:
            getattr(runtimes[name], case.method)(*case.args)
        assert (type(caught.value), str(caught.value), caught.value.field) == (RequestError, case.message, case.field), name


def _int64(value):
    return type(value) is int and INT64_MIN <= value <= INT64_MAX


def _ids(value):
    return isinstance(value, (list, tuple)) and all(map(_int64, value))


def _rows(value):
    return isinstance(value, (list, tuple)) and all(map(_ids, value))


def sendable_from_cpp(case):
    """Whether the C++ binding's types (int64 rows, an int64 k, (history, candidates) pairs) carry the case's args."""
    if case.method == "recommend":
        return _rows(case.args[0]) and _rows(case.args[1])
    if case.method == "topk":
        return _rows(case.args[0]) and _int64(case.args[1])
    requests = case.args[0]
    return isinstance(requests, list) and all(isinstance(r, tuple) and len(r) == 2 and _ids(r[0]) and _ids(r[1])
                                              for r in requests)


def test_the_cpp_library_refuses_with_the_python_contracts_messages(runtimes):
    """The bare binding (no Python parse stage): every table case C++ callers can send, the same RequestError."""
    if "cpp" not in runtimes:
        pytest.skip("speeder_rt._C is not built (make test, or pip install --no-build-isolation -e .)")
    native = runtimes["cpp"]._native
    sendable = [case for case in CONTRACT_CASES if sendable_from_cpp(case)]
    assert len(sendable) >= 20  # the check stage: counts, ranges, empty inputs of every method
    for case in sendable:
        with pytest.raises(RequestError) as caught:
            getattr(native, case.method)(*case.args)
        assert (str(caught.value), caught.value.field) == (case.message, case.field)


HISTORIES = [[3, 17, 5], [8], [0, 1, 2, 3, 4, 5, 6, 7], [44, 0], [9, 9, 10], [119]]  # 6 users > max batch 4
CANDIDATES = np.random.default_rng(0).integers(0, NUM_ITEMS, size=(6, 7))


def accepted_forms():
    """The same request (HISTORIES, CANDIDATES) in every form the contract takes."""
    padded = np.array([h + [-1] * (8 - len(h)) for h in HISTORIES])
    return {
        "lists": (HISTORIES, CANDIDATES.tolist()),
        "tuples": (tuple(tuple(h) for h in HISTORIES), tuple(map(tuple, CANDIDATES.tolist()))),
        "numpy scalars": ([[np.int64(i) for i in h] for h in HISTORIES], [[np.uint8(i) for i in c] for c in CANDIDATES]),
        "row arrays": ([np.array(h, dtype=np.int16) for h in HISTORIES], [np.array(c, dtype=np.uint64) for c in CANDIDATES]),
        "padded int32 array": (padded.astype(np.int32), CANDIDATES.astype(np.uint16)),
        "padded tensor": (torch.from_numpy(padded), torch.from_numpy(CANDIDATES).to(torch.int32)),
        "uint8 tensor rows": ([torch.tensor(h, dtype=torch.uint8) for h in HISTORIES], torch.from_numpy(CANDIDATES)),
    }


def test_every_integer_form_is_taken_with_the_reference_scores(runtimes, model, contract_exports):
    want = reference_scores(model, HISTORIES, CANDIDATES)
    for form, (history, candidates) in accepted_forms().items():
        for name, runtime in runtimes.items():
            got = runtime.recommend(history, candidates)
            assert got.dtype == np.float32 and got.shape == (6, 7), (form, name)
            assert np.abs(got - want).max() <= 1e-4 * max(1.0, np.abs(want).max()), (form, name)


def test_topk_and_recommend_batch_take_numpy_integers(runtimes):
    ids, scores = runtimes["onnx"].topk(HISTORIES, TOPK)
    requests = [(np.array(h, dtype=np.int32), CANDIDATES[i, : 2 + i]) for i, h in enumerate(HISTORIES)]
    for name, runtime in runtimes.items():
        if not takes(runtime, "topk"):
            continue
        got_ids, got_scores = runtime.topk([np.array(h) for h in HISTORIES], np.int64(3))
        np.testing.assert_array_equal(got_ids, ids[:, :3])
        np.testing.assert_allclose(got_scores, scores[:, :3], rtol=1e-4, atol=1e-4)
        batch = runtime.recommend_batch(requests)
        assert [len(s) for s in batch] == [2 + i for i in range(6)], name
        for (history, candidates), row in zip(requests, batch):
            np.testing.assert_allclose(row, runtime.recommend([history], [candidates])[0], rtol=1e-5, atol=1e-5)


def test_request_error_carries_its_field_through_pickle():
    error = pickle.loads(pickle.dumps(RequestError("history_ids[2]", "empty history (at least one item is needed)")))
    assert isinstance(error, ValueError)
    assert (error.field, error.reason, str(error)) == ("history_ids[2]", "empty history (at least one item is needed)",
                                                       "history_ids[2]: empty history (at least one item is needed)")
