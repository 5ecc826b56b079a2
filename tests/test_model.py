"""The Speeder reference model: MRC, prompt layout, SPAE bias, attention backends, MPO, training, CLIs."""
import copy
import json
import math
import os

import numpy as np
import pytest
import torch

from speeder_rt.data import SyntheticConfig, build_sequences, generate_synthetic
from speeder_rt.data.sequences import draw_candidates
from speeder_rt.model import BackboneConfig, SpeederConfig, SpeederModel
from speeder_rt.model.attention import relative_bias
from speeder_rt.model.mpo import MPOStage, validate_schedule
from speeder_rt.model.speeder import batch_tensors
from speeder_rt.train.config import run_config_from_dict
from speeder_rt.train.trainer import Trainer

SMALL = SyntheticConfig(n_items=120, n_users=80, seed=1)


@pytest.fixture(scope="module")
def small():
    inter, table = generate_synthetic(SMALL)
    table.set_modality("collab", np.random.default_rng(0).normal(size=(len(table), 6)))
    return build_sequences(inter), table


def make_model(table, **kw) -> SpeederModel:
    torch.manual_seed(0)
    return SpeederModel(SpeederConfig(backbone=BackboneConfig(shape="tiny"), d_expert=32, **kw), table)


def test_masked_or_disabled_modality_features_change_nothing(small):
    data, table = small
    model = make_model(table).eval()
    h, hl, c, _ = batch_tensors(data.test.subset(slice(0, 6)), "cpu")
    # image unavailable for some items already; disable collab too
    model.set_enabled_modalities(["text", "image"])
    before = model(h, hl, c)
    model.features_collab.normal_()  # disabled modality
    unavailable = ~model.available[:, model.cfg.modalities.index("image")]
    assert unavailable.any()
    model.features_image[unavailable] = torch.randn_like(model.features_image[unavailable]) * 100  # missing rows
    after = model(h, hl, c)
    torch.testing.assert_close(before, after, rtol=0, atol=0)
    # sanity: an enabled, available modality does matter
    model.features_text.add_(1.0)
    assert not torch.allclose(before, model(h, hl, c))


def test_gates_are_a_softmax_over_active_modalities(small):
    _, table = small
    model = make_model(table)
    feats = {m: getattr(model, f"features_{m}")[:10] for m in model.cfg.modalities}
    active = torch.tensor([[True, False, True]] * 5 + [[False, False, False]] * 5)
    tokens, gates = model.mome(feats, active)
    torch.testing.assert_close(gates[:5].sum(1), torch.ones(5))
    assert (gates[:5, 1] == 0).all()
    assert (gates[5:] == 0).all() and (tokens[5:] == 0).all()


def test_prompt_length_and_layout(small):
    data, table = small
    model = make_model(table)
    s = data.train.subset(np.arange(0, 40, 3))  # histories of 1..10 items
    draw_candidates(data, s, "train", seed=0)
    h, hl, c, _ = batch_tensors(s, "cpu")
    embeds, lay, _ = model.prompt(h, hl, c)
    p, mi, suf = model.template_sizes
    k = c.shape[1]
    expected = p + hl + mi + k + suf + 1
    assert torch.equal(lay.token_mask.sum(1), expected)
    assert torch.equal(lay.pred_pos + 1, expected)
    assert embeds.shape == (len(s), p + h.shape[1] + mi + k + suf + 1, model.hidden_size)
    assert (embeds[~lay.token_mask] == 0).all()
    # item indices: history j -> j, candidates / PRED -> n + 1
    for b in range(len(s)):
        n = int(hl[b])
        idx = lay.item_idx[b, : int(expected[b])].tolist()
        assert idx[:p] == [0] * p
        assert idx[p : p + n] == list(range(1, n + 1))
        assert idx[p + n : p + n + mi] == [n] * mi
        assert idx[p + n + mi :] == [n + 1] * (k + suf + 1)
        assert torch.equal(lay.candidate_pos[b], torch.arange(p + n + mi, p + n + mi + k))


def test_history_tokens_carry_recency_and_candidates_the_type_embedding(small):
    data, table = small
    model = make_model(table)
    s = data.test.subset(slice(0, 3))
    h, hl, c, _ = batch_tensors(s, "cpu")
    embeds, lay, cand_tok = model.prompt(h, hl, c)
    p = model.template_sizes[0]
    b, n = 0, int(hl[0])
    tok = model.item_tokens(h[b, :n])
    for j in range(n):  # j-th oldest is n-1-j from the end
        torch.testing.assert_close(embeds[b, p + j], tok[j] + model.recency.weight[n - 1 - j])
    torch.testing.assert_close(embeds[b, lay.candidate_pos[b]], cand_tok[b] + model.candidate_embedding)


def test_relative_bias_matches_brute_force():
    gen = torch.Generator().manual_seed(0)
    idx = torch.sort(torch.randint(0, 9, (2, 13), generator=gen), dim=1).values
    slopes = torch.rand(3, generator=gen)
    bias = relative_bias(idx, slopes)
    for b in range(2):
        for h in range(3):
            for i in range(13):
                for j in range(13):
                    want = -slopes[h].item() * math.log2(1 + abs(idx[b, i].item() - idx[b, j].item()))
                    assert bias[b, h, i, j].item() == pytest.approx(want, abs=1e-6)


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_backends_match_reference(small, backend):
    data, table = small
    model = make_model(table).eval()
    with torch.no_grad():
        model.slopes.uniform_(0.1, 1.0)
    h, hl, c, _ = batch_tensors(data.test.subset(slice(0, 5)), "cpu")
    ref = model(h, hl, c)
    model.set_backend(backend)
    torch.testing.assert_close(model(h, hl, c), ref, rtol=1e-4, atol=1e-4)


def test_flash_backend_needs_bias_off_and_matches_reference_without_bias(small):
    data, table = small
    with pytest.raises(ValueError, match="relative_bias"):
        make_model(table).set_backend("flash")
    model = make_model(table, relative_bias=False).eval()
    h, hl, c, _ = batch_tensors(data.test.subset(slice(0, 5)), "cpu")
    ref = model(h, hl, c)
    model.set_backend("flash")
    torch.testing.assert_close(model(h, hl, c), ref, rtol=1e-4, atol=1e-4)


def test_reference_attention_matches_hf_eager_when_slopes_are_zero(small):
    data, table = small
    model = make_model(table).eval()
    with torch.no_grad():
        model.slopes.zero_()
    h, hl, c, _ = batch_tensors(data.test.subset(slice(0, 5)), "cpu")
    embeds, lay, _ = model.prompt(h, hl, c)
    ours = model.decoder(inputs_embeds=embeds, spae_item_idx=lay.item_idx, spae_token_mask=lay.token_mask,
                         spae_slopes=model.slopes).last_hidden_state
    for module in model.decoder.modules():
        if hasattr(getattr(module, "config", None), "_attn_implementation"):
            module.config._attn_implementation = "eager"
    hf = model.decoder(inputs_embeds=embeds, attention_mask=lay.token_mask.long()).last_hidden_state
    mask = lay.token_mask
    torch.testing.assert_close(ours[mask], hf[mask], rtol=1e-5, atol=1e-5)


def test_item_token_table_path_equals_training_path(small):
    data, table = small
    model = make_model(table).eval()
    h, hl, c, _ = batch_tensors(data.test.subset(slice(0, 4)), "cpu")
    torch.testing.assert_close(model(h, hl, c, item_tokens=model.item_token_table()), model(h, hl, c))
    ids, scores = model.topk(h, hl, 5, model.item_token_table())
    assert ids.shape == (4, 5) and (scores[:, :-1] >= scores[:, 1:]).all()
    for b in range(4):
        assert not set(ids[b].tolist()) & set(h[b, : hl[b]].tolist())


def test_bad_model_inputs_and_configs(small):
    data, table = small
    with pytest.raises(ValueError, match=r"modalities \['audio'\] are not in the ItemTable"):
        SpeederModel(SpeederConfig(modalities=["text", "audio"]), table)
    model = make_model(table)
    h, hl, c, _ = batch_tensors(data.test.subset(slice(0, 2)), "cpu")
    with pytest.raises(ValueError, match="candidate ids must be in 0..119"):
        model(h, hl, c + 1000)
    with pytest.raises(ValueError, match="unknown modality 'video'"):
        validate_schedule([MPOStage("s", ["text", "video"])], model.cfg.modalities)
    with pytest.raises(ValueError, match="unknown trainable set 'decoder'"):
        validate_schedule([MPOStage("s", ["text"], trainable=["decoder"])], model.cfg.modalities)
    with pytest.raises(ValueError, match="model: unknown key 'hiden'"):
        run_config_from_dict({"model": {"hiden": 3}})
    with pytest.raises(ValueError, match="attn_backend must be one of"):
        run_config_from_dict({"model": {"attn_backend": "cuda"}})


def tiny_run(tmp_path, **train):
    return run_config_from_dict({
        "out_dir": str(tmp_path),
        "data": {"source": "synthetic", "synthetic": {"n_items": 120, "n_users": 80, "seed": 1},
                 "split": {"short_users": "drop"}, "collab_features": False},
        "model": {"backbone": {"shape": "tiny"}, "modalities": ["text", "image"], "d_expert": 32},
        "mpo": [{"name": "text", "modalities": ["text"], "epochs": 1, "lr": 0.003},
                {"name": "text+image", "modalities": ["text", "image"], "epochs": 1, "lr": 0.003, "warmup_steps": 3,
                 "trainable": ["gate", "head"]}],
        "train": {"batch_size": 32, "max_train_samples_per_epoch": 128, "progress": False, **train},
    })


def prepared(cfg):
    from speeder_rt.train.data import prepare

    return prepare(cfg, log=lambda *_: None)


def test_parameters_outside_the_stage_trainable_set_stay_bit_identical(tmp_path):
    cfg = tiny_run(tmp_path)
    trainer = Trainer("speeder", cfg, *prepared(cfg), log=lambda *_: None)
    model, schedule = trainer.model, trainer.phases
    trainer.phases = schedule[:1]  # stage 1 only
    trainer.run()
    snap = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.phases = schedule  # then stage 2: image warm-up (expert + gate), then gate and head
    trainer._start_phase(trainer.progress.phase)
    trainer.run()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, snap[n])}
    allowed = {n for n, _ in model.named_parameters() if n.startswith(("mome.gate", "head", "mome.experts.image"))}
    assert changed, "stage 2 trained nothing"
    assert changed <= allowed, sorted(changed - allowed)
    assert any(n.startswith("mome.experts.image") for n in changed)  # the warm-up trained the new expert


@pytest.fixture
def one_thread():
    """Resume is bit-exact with one intra-op thread (see speeder_rt.train.trainer)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def interrupted_and_resumed(tmp_path, every, stop):
    """(uninterrupted trainer, trainer resumed from the last/ written at global step ``stop``)."""
    cfg_a = tiny_run(tmp_path / "a", checkpoint_every=every)
    a = Trainer("speeder", cfg_a, *prepared(cfg_a), log=lambda *_: None)
    a.run()
    cfg_b = tiny_run(tmp_path / "b", checkpoint_every=every)
    data_b = prepared(cfg_b)
    b1 = Trainer("speeder", cfg_b, *data_b, log=lambda *_: None)
    b1.run(stop_after_steps=stop)
    assert b1.progress.global_step == stop
    b2 = Trainer("speeder", cfg_b, *data_b, log=lambda *_: None)
    b2.resume(tmp_path / "b" / "speeder" / "last")
    b2.run()
    assert b2.progress.global_step == a.progress.global_step
    return a, b2


# stage 1 has 4 steps and stage 2's warm-up 3: stop inside the warm-up, and right at its last step
@pytest.mark.parametrize("every, stop", [(3, 6), (7, 7)])
def test_resume_with_one_thread_reproduces_uninterrupted_run_bit_for_bit(tmp_path, one_thread, every, stop):
    a, b = interrupted_and_resumed(tmp_path, every, stop)
    for (n, pa), (_, pb) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert torch.equal(pa, pb), n
    assert b.last_metrics == a.last_metrics


def test_resume_with_two_threads_matches_to_fp32_rounding(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        a, b = interrupted_and_resumed(tmp_path, 3, 6)
    finally:
        torch.set_num_threads(threads)
    for (n, pa), (_, pb) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        torch.testing.assert_close(pb, pa, rtol=1e-4, atol=1e-5, msg=n)


def test_resume_of_a_finished_run_says_so_and_trains_nothing(tmp_path, capsys):
    from speeder_rt.train import __main__ as cli

    cfg = tiny_run(tmp_path)
    cfg.mpo = cfg.mpo[:1]
    trainer = Trainer("speeder", cfg, *prepared(cfg), log=lambda *_: None)
    final = trainer.run()
    last = tmp_path / "speeder" / "last"
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "speeder").iterdir()}
    config = tmp_path / "run.yaml"
    import yaml

    config.write_text(yaml.safe_dump(cfg.to_dict()))
    assert cli.main(["--config", str(config), "--resume", str(last)]) == 0
    out = capsys.readouterr().out
    assert f"{last}: the run is complete (1 phases, 4 steps); nothing to train" in out
    assert json.loads(out[out.index("{"):]) == {"checkpoint": str(last.parent / "best"), "last_valid": final}
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "speeder").iterdir()} == before


def test_checkpoint_errors(tmp_path):
    from speeder_rt.model.pretrained import read_model_config

    cfg = tiny_run(tmp_path)
    trainer = Trainer("speeder", cfg, *prepared(cfg), log=lambda *_: None)
    trainer._start_phase(0)
    path = trainer.save("last")
    with pytest.raises(ValueError, match="a 'speeder' model, expected 'text_baseline'"):
        read_model_config(path, "text_baseline")
    with pytest.raises(ValueError, match=r"best: holds weights only .*--resume needs a run's last/ directory"):
        trainer.resume(trainer.save("best"))
    other = copy.deepcopy(cfg)
    other.model.d_expert = 48
    wider = Trainer("speeder", other, *prepared(cfg), log=lambda *_: None)
    with pytest.raises(ValueError, match="last: trained with model.d_expert = 32; this run's config has 48"):
        wider.resume(path)
    trainer.progress.phase = 4  # e.g. a run of a longer schedule
    trainer.save("last")
    again = Trainer("speeder", cfg, *prepared(cfg), log=lambda *_: None)
    with pytest.raises(ValueError, match="checkpointed in phase 4; this run's schedule has 3 phases"):
        again.resume(path)


@pytest.mark.slow
def test_short_training_lifts_hr1_well_above_chance(tmp_path):
    from speeder_rt.eval.protocol import evaluate

    cfg = tiny_run(tmp_path)
    cfg.train.max_train_samples_per_epoch = None
    for s in cfg.mpo:
        s.epochs = 2
    data, table = prepared(cfg)
    trainer = Trainer("speeder", cfg, data, table, log=lambda *_: None)
    trainer.run()
    hr1 = evaluate(trainer.model, data, "test")["HR@1"]
    assert hr1 > 3 * (1 / 20), hr1


@pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                    reason="the Triton kernel needs CUDA or TRITON_INTERPRET=1")
def test_triton_backend_matches_reference(small):
    data, table = small
    model = make_model(table).eval()
    with torch.no_grad():
        model.slopes.uniform_(0.1, 1.0)
    s = data.test.subset(slice(0, 3))
    h, hl, c, label = batch_tensors(s, "cpu")
    ref = model(h, hl, c)
    ref_loss = model.loss(h, hl, c, label)
    ref_loss.backward()
    ref_grad = model.slopes.grad.clone()
    ref_fc1 = model.mome.experts["text"].fc1.weight.grad.clone()
    model.zero_grad()
    model.set_backend("triton")
    torch.testing.assert_close(model(h, hl, c), ref, rtol=1e-3, atol=1e-3)
    model.loss(h, hl, c, label).backward()
    torch.testing.assert_close(model.slopes.grad, ref_grad, rtol=1e-3, atol=1e-4)
    # the MoME weights get their gradients through item_token_projection
    torch.testing.assert_close(model.mome.experts["text"].fc1.weight.grad, ref_fc1, rtol=1e-3, atol=1e-4)
    # inference from the item-token table goes through assemble_inputs_embeds
    with torch.no_grad():
        torch.testing.assert_close(model(h, hl, c, item_tokens=model.item_token_table()), ref, rtol=1e-3, atol=1e-3)


def test_topk_excludes_every_history_item_in_padded_rows(small):
    _, table = small
    model = make_model(table).eval()
    history = torch.tensor([[0, 5, -1, -1], [7, 0, 3, -1]])
    history_len = torch.tensor([2, 3])
    k = model.num_items - 3
    ids, scores = model.topk(history, history_len, k, model.item_token_table())
    assert not {0, 5} & set(ids[0].tolist())
    assert not {7, 0, 3} & set(ids[1].tolist())
    assert torch.isfinite(scores).all()


def test_input_checks_and_topk_edge_cases(small):
    _, table = small
    model = make_model(table).eval()
    tokens = model.item_token_table()
    history = torch.tensor([[4, 9, -1], [-1, -1, -1]])
    ids, _ = model.topk(history, torch.tensor([2, 0]), 5, tokens)  # an empty history is allowed
    assert not {4, 9} & set(ids[0].tolist())
    with pytest.raises(ValueError, match=r"k=118: must be in 1..117"):
        model.topk(torch.tensor([[1, 2, 3]]), torch.tensor([3]), 118, tokens)
    cands = torch.tensor([[1, 2]])
    with pytest.raises(ValueError, match="history_len must be in 0..3"):
        model(torch.tensor([[1, 2, 3]]), torch.tensor([4]), cands)
    with pytest.raises(ValueError, match="within history_len"):
        model(torch.tensor([[1, -1, 3]]), torch.tensor([3]), cands)


def test_cached_item_token_table_follows_the_weights(small):
    _, table = small
    model = make_model(table)
    first = model.cached_item_token_table()
    assert model.cached_item_token_table() is first
    with torch.no_grad():
        model.mome.experts["text"].fc2.bias.add_(1.0)
    assert not torch.equal(model.cached_item_token_table(), first)
