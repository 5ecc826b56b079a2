"""``model.recency: false``: no recency table anywhere (model, prompt, fused kernel path, export graphs)."""
import os

import numpy as np
import pytest
import torch

from speeder_rt.data import SyntheticConfig, build_sequences, generate_synthetic
from speeder_rt.export.exporter import export_model
from speeder_rt.export.format import Ranges
from speeder_rt.export.graph import ScoringGraph, TopKGraph
from speeder_rt.model import BackboneConfig, SpeederConfig, SpeederModel
from speeder_rt.model.mpo import select_parameters
from speeder_rt.model.speeder import batch_tensors


@pytest.fixture(scope="module")
def small():
    inter, table = generate_synthetic(SyntheticConfig(n_items=120, n_users=60, seed=5))
    return build_sequences(inter), table


def make(table, recency: bool) -> SpeederModel:
    torch.manual_seed(0)
    model = SpeederModel(SpeederConfig(backbone=BackboneConfig(shape="tiny"), d_expert=32, max_history=12,
                                       modalities=["text", "image"], recency=recency), table).eval()
    with torch.no_grad():  # drawn so that the bias and the candidate embedding matter
        model.slopes.uniform_(0.1, 1.0)
        model.candidate_embedding.normal_(std=0.02)
    return model


@pytest.fixture(scope="module")
def pair(small):
    """(recency on, recency off with every other weight copied from the first)."""
    _, table = small
    on, off = make(table, True), make(table, False)
    state = {k: v for k, v in on.state_dict().items() if not k.startswith("recency.")}
    off.load_state_dict(state, strict=True)
    return on, off


def batch(small, rows=5):
    data, _ = small
    h, hl, c, _ = batch_tensors(data.test.subset(slice(0, rows)), "cpu")
    assert (hl > 1).all()  # histories of several items: every slot would get its own recency row
    return h, hl, c


def test_off_has_no_recency_table_and_adds_nothing(small, pair):
    on, off = pair
    assert off.recency is None and not any(k.startswith("recency") for k in off.state_dict())
    assert "recency.weight" in select_parameters(on, ["spae"], ["text"])
    assert not any(n.startswith("recency") for n in select_parameters(off, ["spae"], ["text"]))
    h, hl, c = batch(small)
    p = off.template_sizes[0]
    table = off.item_token_table()
    for item_tokens, tokens in ((None, off.item_tokens(h)), (table, table[h.clamp(min=0)])):  # training, inference
        embeds, _, _ = off.prompt(h, hl, c, item_tokens)
        for b in range(len(h)):
            n = int(hl[b])
            torch.testing.assert_close(embeds[b, p : p + n], tokens[b, :n], rtol=0, atol=0)
    # and on the same weights, the recency model's history slots differ by exactly its rows
    embeds_on, _, _ = on.prompt(h, hl, c)
    embeds_off, _, _ = off.prompt(h, hl, c)
    n = int(hl[0])
    torch.testing.assert_close(embeds_on[0, p : p + n] - embeds_off[0, p : p + n], on.recency.weight[:n].flip(0))


def test_off_scores_equal_a_zero_recency_table(small, pair):
    on, off = pair
    h, hl, c = batch(small)
    with torch.no_grad():
        assert not torch.allclose(on(h, hl, c), off(h, hl, c))  # the table matters when it is there
        zeroed = on.recency.weight.clone()
        on.recency.weight.zero_()
        try:
            torch.testing.assert_close(off(h, hl, c), on(h, hl, c), rtol=0, atol=0)
        finally:
            on.recency.weight.copy_(zeroed)


@pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                    reason="the Triton kernels need CUDA or TRITON_INTERPRET=1")
def test_off_through_the_fused_inference_kernel(small, pair):
    _, off = pair
    h, hl, c = batch(small, rows=3)
    with torch.no_grad():
        want = off(h, hl, c)
        off.set_backend("triton")
        try:
            got = off(h, hl, c, item_tokens=off.item_token_table())  # assemble_inputs_embeds with zero rows
        finally:
            off.set_backend("reference")
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)


def test_off_round_trips_and_its_graphs_match_the_model(small, pair, tmp_path):
    _, off = pair
    off.save_pretrained(tmp_path / "model")
    loaded = SpeederModel.from_pretrained(tmp_path / "model")
    assert loaded.cfg.recency is False and loaded.recency is None
    h, hl, c = batch(small)
    with torch.no_grad():
        want = off(h, hl, c, item_tokens=off.item_token_table())
        torch.testing.assert_close(loaded(h, hl, c, item_tokens=loaded.item_token_table()), want, rtol=0, atol=0)
        mask = torch.arange(h.shape[1])[None, :] < hl[:, None]
        table = off.item_token_table()
        torch.testing.assert_close(ScoringGraph(off)(h, mask, c, table), want, rtol=1e-5, atol=1e-5)
        ids, scores = TopKGraph(off, k=5)(h, mask, table)
        want_ids, want_scores = off.topk(h, hl, 5, off.item_token_table())
    torch.testing.assert_close(scores, want_scores, rtol=1e-5, atol=1e-5)
    assert torch.equal(ids, want_ids)


def test_off_exports_to_onnx_within_parity(pair, tmp_path):
    """The scoring graph through ONNX Runtime (the top-k graph shares its prompt; checked eagerly above)."""
    _, off = pair
    result = export_model(off, "onnx", tmp_path / "onnx", ranges=Ranges(max_batch=3, max_history=12, max_candidates=20),
                          topk=0, log=lambda *_: None)
    summary = result.report.summary()
    assert result.report.passed and len(summary["scores"]["cases"]) >= 3
    assert np.isfinite(summary["scores"]["max_abs_error"]) and summary["scores"]["max_abs_error"] < 1e-4
