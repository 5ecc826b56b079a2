"""NaN integrity: a NaN or an infinity in weights or item features is refused where it is loaded, fails the export's
parity check, and never comes back from a runtime as a score (nor ranks first in a top-k)."""
import re

import numpy as np
import pytest
import torch
from bad_requests import NUM_ITEMS, RANGES, TOPK, contract_model
from safetensors.numpy import load_file, save_file

from speeder_rt.data import ItemTable, SyntheticConfig, generate_synthetic
from speeder_rt.export.exporter import ExportError, ParityError, export_checkpoint, export_model
from speeder_rt.export.graph import check_parity, non_finite
from speeder_rt.model import BackboneConfig, SpeederConfig, SpeederModel
from speeder_rt.runtime import Recommender, TorchRunner
from speeder_rt.runtime.optimized import OptimizedSpeeder
from speeder_rt.runtime.validation import ModelOutputError, check_finite_topk

HISTORIES = [[3, 17, 5], [8], [40, 41]]
CANDIDATES = [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
REFUSED = "its weights or item features are not finite (a diverged training or a corrupt export), so no scores"


@pytest.fixture(scope="module")
def nan_model():
    """The contract model with one NaN weight in its head: every score is NaN."""
    model = contract_model()
    with torch.no_grad():
        model.head.weight[0, 0] = float("nan")
    return model


def nan_feature_model(item: int) -> SpeederModel:
    """A tiny model whose item ``item`` has one NaN text feature (written into the table's tensor directly, past
    ``set_modality``'s check): that item's token is NaN, and so is every score it takes part in."""
    _, table = generate_synthetic(SyntheticConfig(n_items=NUM_ITEMS, n_users=20, seed=3))
    table.features["text"][item, 0] = float("nan")
    torch.manual_seed(0)
    return SpeederModel(SpeederConfig(backbone=BackboneConfig(shape="tiny"), d_expert=32, max_history=8,
                                      modalities=["text", "image"]), table).eval()


def torch_recommender(model: SpeederModel) -> Recommender:
    runner = TorchRunner(model, TOPK)
    return Recommender(runner, model.num_items, RANGES, "torch")


# -- export parity ----------------------------------------------------------------------------------------------
def test_export_of_nan_weights_fails_parity_and_writes_nothing(nan_model, tmp_path):
    out = tmp_path / "onnx"
    message = (r"parity failed: the reference scored nan on valid inputs; the model's weights or item features are "
               r"not finite \(a diverged training\?\)")
    with pytest.raises(ParityError, match=message) as caught:
        export_model(nan_model, "onnx", out, ranges=RANGES, topk=0, device="cpu", log=lambda *_: None)  # one graph: quick
    assert not out.exists()
    report = caught.value.report
    assert not report.passed and all(c.non_finite == "reference nan" and not c.passed for c in report.scores)
    assert "FAIL (reference nan)" in report.table()


class NaNEngine:
    """A finite model's runner that returns NaN for one score (an engine that computes what the model does not)."""

    def __init__(self, model: SpeederModel) -> None:
        self.runner = TorchRunner(model, 0)
        self.topk_k = 0

    def scores(self, *inputs):
        scores = self.runner.scores(*inputs)
        scores[0, 0] = np.nan
        return scores


def test_parity_fails_when_only_the_engine_scores_nan():
    model = contract_model()
    report = check_parity(NaNEngine(model), model, RANGES, atol=1e-4)
    assert [c.non_finite for c in report.scores] == ["engine nan"] * len(report.scores)
    assert report.failure() == ("parity failed: the engine scored nan on valid inputs; the engine computes what the "
                                "model does not")


def test_top_k_parity_accepts_minus_inf_only_where_both_sides_exclude_an_item():
    want = np.array([[2.0, -np.inf]])
    assert non_finite(np.array([[2.0, -np.inf]]), want, excluded=True) == ""
    assert non_finite(np.array([[2.0, -np.inf]]), want) == "reference -inf"  # candidate scores: never
    assert non_finite(np.array([[-np.inf, -np.inf]]), want, excluded=True) == "engine -inf"
    assert non_finite(np.array([[np.nan, -np.inf]]), np.array([[np.nan, -np.inf]]), excluded=True) == "reference nan"


# -- runtimes ---------------------------------------------------------------------------------------------------
def test_recommender_refuses_to_return_nan_scores(nan_model):
    rec = torch_recommender(nan_model)
    with pytest.raises(ModelOutputError, match=rf"^history_ids\[0\]: the model scored candidate 0 nan; {re.escape(REFUSED)}"):
        rec.recommend(HISTORIES, CANDIDATES)
    with pytest.raises(ModelOutputError, match=r"^requests\[0\]: the model scored candidate 0 nan"):
        rec.recommend_batch([(h, c) for h, c in zip(HISTORIES, CANDIDATES)])
    with pytest.raises(ModelOutputError, match=r"^history_ids\[0\]: the model scored item \d+ \(rank 0\) nan"):
        rec.topk(HISTORIES, k=TOPK)


def test_one_nan_item_feature_is_never_ranked_nor_returned():
    model = nan_feature_model(item=50)
    rec = torch_recommender(model)
    scores = rec.recommend(HISTORIES, CANDIDATES)  # item 50 is no candidate: every score finite
    assert np.isfinite(scores).all()
    # the candidates are prompt tokens the PRED state attends to: item 50 among them makes its whole row NaN
    with pytest.raises(ModelOutputError, match=r"^requests\[1\]: the model scored candidate 0 nan"):
        rec.recommend_batch([([1], [2, 3]), ([4], [5, 6, 50]), ([7], [8])])
    # torch.topk puts NaN above every number: without the check item 50 would come first for every user
    with pytest.raises(ModelOutputError, match=r"^history_ids\[0\]: the model scored item 50 \(rank 0\) nan"):
        rec.topk(HISTORIES, k=3)
    fast = OptimizedSpeeder(model, use_cuda_graphs=False)
    with pytest.raises(ModelOutputError, match=r"^history_ids\[2\]: the model scored candidate 0 nan"):
        fast.recommend(HISTORIES, [[1, 2, 3], [4, 5, 6], [7, 50, 9]])
    history, length = torch.tensor([[3, 17], [8, -1]]), torch.tensor([2, 1])
    with pytest.raises(ModelOutputError, match=r"^history\[1\]: the model scored candidate 0 nan"):
        fast.scores(history, length, torch.tensor([[1, 2], [50, 4]]))


def test_top_k_passes_minus_inf_only_for_the_rows_own_history_items():
    history = np.array([[4, 7, -1], [9, -1, -1]])
    ids = np.array([[1, 4, 7], [2, 3, 9]])
    check_finite_topk(history, ids, np.array([[0.5, -np.inf, -np.inf], [0.2, 0.1, -np.inf]]))  # excluded items
    with pytest.raises(ModelOutputError, match=r"^history_ids\[1\]: the model scored item 3 \(rank 1\) -inf"):
        check_finite_topk(history, ids, np.array([[0.5, -np.inf, -np.inf], [0.2, -np.inf, -np.inf]]))
    with pytest.raises(ModelOutputError, match=r"^history_ids\[0\]: the model scored item 4 \(rank 1\) inf"):
        check_finite_topk(history, ids, np.array([[0.5, np.inf, -np.inf], [0.2, 0.1, -np.inf]]))


# -- loading ----------------------------------------------------------------------------------------------------
def test_a_model_directory_with_a_nan_weight_is_refused_by_every_loader(nan_model, tmp_path):
    path = nan_model.save_pretrained(tmp_path / "model")
    message = (rf"{re.escape(str(path / 'model.safetensors'))}: tensor 'head.weight' holds a non-finite value "
               r"\(nan at index \[0, 0\]\); refusing to load it")
    with pytest.raises(ValueError, match=message):
        Recommender.load(path)
    with pytest.raises(ExportError, match=message):
        export_checkpoint(path, "onnx", tmp_path / "export", log=lambda *_: None)
    assert not (tmp_path / "export").exists()


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_an_item_table_with_a_non_finite_feature_is_refused_naming_the_item(tmp_path, value):
    _, table = generate_synthetic(SyntheticConfig(n_items=60, n_users=10, seed=3))
    table.save(tmp_path / "items")
    file = tmp_path / "items" / "features.safetensors"
    tensors = load_file(file)
    tensors["image.features"][17, 2] = value
    save_file(tensors, str(file))
    key = table.item_keys[17]
    with pytest.raises(ValueError, match=rf"{re.escape(str(file))}: modality 'image' row 17 \(item '{key}'\) column 2 "
                                         rf"is {value}: every feature must be finite"):
        ItemTable.load(tmp_path / "items")
