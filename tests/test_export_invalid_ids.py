"""The exported graphs never score an invalid id plausibly: NaN (top-k: NaN and item id -1) for out-of-range or
negative candidates, for ids under the mask outside the catalog, masks with holes or no item, and shapes past the
export's ranges -- checked on the ONNX graphs in onnxruntime directly (what Triton's ONNX Runtime and TensorRT
backends serve, with nothing in front) and on the AOTInductor packages. Valid rows of the same batch keep their
scores, and parity with the PyTorch model still holds."""
import json

import numpy as np
import pytest
import torch
from tiny_model import tiny_speeder

from speeder_rt.export.exporter import export_model
from speeder_rt.export.format import Ranges
from speeder_rt.export.items import read_item_tokens

N_ITEMS, RANGES, K = 120, Ranges(max_batch=8, max_history=8, max_candidates=20), 5  # the model's max_history is 12


@pytest.fixture(scope="module")
def model():
    return tiny_speeder(N_ITEMS)


def export(model, engine, tmp_path_factory):
    out = tmp_path_factory.mktemp(engine) / "export"
    export_model(model, engine, out, ranges=RANGES, topk=K, log=lambda *_: None)
    return out


@pytest.fixture(scope="module")
def onnx_graphs(model, tmp_path_factory):
    import onnxruntime as ort

    out = export(model, "onnx", tmp_path_factory)
    assert json.loads((out / "parity.json").read_text())["passed"]  # the checks change nothing on valid input
    # without item_tokens: the graphs' default, the export-time table (what Triton's own ONNX Runtime backend serves)
    sessions = {g: ort.InferenceSession(str(out / "model_repository" / name / "1" / "model.onnx"),
                                        providers=["CPUExecutionProvider"])
                for g, name in (("scores", "speeder"), ("topk", "speeder_topk"))}

    def scores(ids, mask, cands):
        return sessions["scores"].run(None, {"history_ids": ids, "history_mask": mask, "candidate_ids": cands})[0]

    def topk(ids, mask):
        return tuple(sessions["topk"].run(None, {"history_ids": ids, "history_mask": mask}))

    return scores, topk


@pytest.fixture(scope="module")
def aoti_graphs(model, tmp_path_factory):
    out = export(model, "aoti", tmp_path_factory)
    assert json.loads((out / "parity.json").read_text())["passed"]
    packages = {g: torch._inductor.aoti_load_package(str(out / f"{g}.pt2")) for g in ("scores", "topk")}
    table = read_item_tokens(out).tokens

    def run(graph, *arrays):
        with torch.no_grad():
            out = packages[graph](*[torch.from_numpy(a) for a in (*arrays, table)])
        return out.numpy() if graph == "scores" else tuple(o.numpy() for o in out)

    return (lambda ids, mask, cands: run("scores", ids, mask, cands)), (lambda ids, mask: run("topk", ids, mask))


def batch(rows, width=6):
    """(history_ids padded with -1, history_mask) of ragged rows; a row given as (ids, mask) is taken as is."""
    ids = np.full((len(rows), width), -1, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=bool)
    for i, row in enumerate(rows):
        row_ids, row_mask = row if isinstance(row, tuple) else (row, [True] * len(row))
        ids[i, : len(row_ids)] = row_ids
        mask[i, : len(row_mask)] = row_mask
    return ids, mask


VALID = [[3, 17, 5], [8], [0, 1, 2, 3, 4, 5]]
INVALID_ROWS = {  # history rows the graphs must refuse
    "negative id under the mask": [3, -1, 5],
    "id past the catalog": [3, N_ITEMS],
    "hole in the mask": ([3, 4, 5], [True, False, True]),
    "no item": ([], []),
    "mask starting False": ([3, 4], [False, True]),
}
ENGINES = ["onnx", pytest.param("aoti", marks=pytest.mark.slow)]


def graphs(engine, request):
    return request.getfixturevalue(f"{engine}_graphs")


@pytest.mark.parametrize("engine", ENGINES)
def test_valid_inputs_score_finitely_and_masked_ids_are_ignored(engine, request, model):
    scores, topk = graphs(engine, request)
    ids, mask = batch(VALID)
    cands = np.random.default_rng(0).integers(0, N_ITEMS, size=(3, 7))
    got = scores(ids, mask, cands)
    table = model.item_token_table()
    with torch.no_grad():
        want = model(torch.from_numpy(ids), torch.from_numpy(mask.sum(1)), torch.from_numpy(cands), item_tokens=table)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-4)
    garbage = np.where(mask, ids, 10**6)  # ids under a False mask are never read, whatever they are
    np.testing.assert_array_equal(scores(garbage, mask, cands), got)
    item_ids, top = topk(garbage, mask)
    assert np.isfinite(top).all() and ((item_ids >= 0) & (item_ids < N_ITEMS)).all()
    np.testing.assert_array_equal((item_ids, top), topk(ids, mask))


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("case", sorted(INVALID_ROWS))
def test_an_invalid_history_row_scores_nan_and_leaves_the_others(engine, case, request):
    scores, topk = graphs(engine, request)
    cands = np.random.default_rng(1).integers(0, N_ITEMS, size=(4, 5))
    ids, mask = batch(VALID + [INVALID_ROWS[case]])
    got = scores(ids, mask, cands)
    assert np.isnan(got[3]).all()
    alone = scores(*batch(VALID), cands[:3])
    np.testing.assert_allclose(got[:3], alone, rtol=1e-5, atol=1e-6)
    item_ids, top = topk(ids, mask)
    assert np.isnan(top[3]).all() and (item_ids[3] == -1).all()
    valid_ids, valid_top = topk(*batch(VALID))
    np.testing.assert_array_equal(item_ids[:3], valid_ids)
    np.testing.assert_allclose(top[:3], valid_top, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("engine", ENGINES)
def test_an_invalid_candidate_scores_nan_only_itself(engine, request):
    scores, _ = graphs(engine, request)
    ids, mask = batch(VALID)
    cands = np.array([[1, 2, 3], [4, -1, 6], [7, 8, N_ITEMS]])
    got = scores(ids, mask, cands)
    bad = np.array([[False, False, False], [False, True, False], [False, False, True]])
    assert np.isnan(got[bad]).all() and np.isfinite(got[~bad]).all()
    # candidates are prompt tokens, so the others' scores depend on it: it runs as item 0 (in range, then dropped)
    as_item_0 = scores(ids, mask, np.where(bad, 0, cands))
    np.testing.assert_allclose(got[~bad], as_item_0[~bad], rtol=1e-5, atol=1e-6)
    assert np.isfinite(as_item_0).all()


def test_shapes_past_the_export_ranges_score_nan_instead_of_failing(onnx_graphs):
    scores, topk = onnx_graphs
    for width in (RANGES.max_history + 1, 13):  # past the export's range; past the model's own (a gather error before)
        ids, mask = batch([list(range(width))], width)
        assert np.isnan(scores(ids, mask, np.array([[1, 2]]))).all()
        item_ids, top = topk(ids, mask)
        assert np.isnan(top).all() and (item_ids == -1).all()
    ids, mask = batch(VALID)
    too_many = np.tile(np.arange(RANGES.max_candidates + 1), (3, 1))  # K=21 > the exported 20
    assert np.isnan(scores(ids, mask, too_many)).all()
    assert np.isfinite(scores(ids, mask, too_many[:, :RANGES.max_candidates])).all()
