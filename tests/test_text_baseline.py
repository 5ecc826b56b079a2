import numpy as np
import pytest
import torch

from speeder_rt.baselines.text_item import IGNORE, TextBaselineConfig, TextItemBaseline
from speeder_rt.baselines.word_tokenizer import WordTokenizer
from speeder_rt.data import ItemTable, SplitConfig, SyntheticConfig, build_sequences, generate_synthetic
from speeder_rt.data.sequences import PAD, draw_candidates
from speeder_rt.model.backbone import BackboneConfig, LoraSettings


@pytest.fixture(scope="module")
def synthetic():
    inter, table = generate_synthetic(SyntheticConfig(n_items=40, n_users=150, min_seq_len=5, max_seq_len=12))
    data = build_sequences(inter, SplitConfig(history_len=3, num_candidates=5))
    draw_candidates(data, data.train, "train", seed=0)
    return data, table


@pytest.fixture(scope="module")
def model(synthetic):
    return TextItemBaseline(TextBaselineConfig(), synthetic[1])


def test_word_tokenizer_round_trip_newline_and_determinism():
    texts = ["amber iron 12", "Crimson  river: 7", "The user interacted with: ", "; "]
    tok = WordTokenizer(texts)
    for t in texts:
        assert tok.decode(tok.encode(t)) == t
    ids = tok.encode("amber\namber 12")
    assert tok.newline_id in ids and tok.decode(ids) == "amber\namber 12"
    assert tok.encode("amber zebra")[-1] == tok.unk_id
    assert WordTokenizer(reversed(texts)).pieces == tok.pieces
    # Digits are single tokens, so the vocabulary does not grow with the catalog.
    assert len(WordTokenizer([f"item {i}" for i in range(1000)])) < 30


def _words(n: int) -> list[str]:
    return ["x" + chr(97 + i % 26) + chr(97 + i // 26 % 26) for i in range(n)]


def test_word_tokenizer_too_large_names_both_sizes():
    texts = _words(40)
    need = len(WordTokenizer(texts))
    with pytest.raises(ValueError, match=rf"{need} tokens.*vocab_size is 16"):
        WordTokenizer(texts, vocab_size=16)


def test_baseline_rejects_catalog_beyond_backbone_vocab():
    table = ItemTable([f"k{i}" for i in range(600)], titles=_words(600))
    with pytest.raises(ValueError, match="vocab_size is 512"):
        TextItemBaseline(TextBaselineConfig(), table)


def test_prompt_layout_left_padding_and_labels(model, synthetic):
    data, table = synthetic
    cfg, tok = model.cfg, model.tokenizer
    history = np.array([[3, 7, 11], [5, PAD, PAD]])
    history_len = np.array([3, 1])
    candidates = data.test.candidates[:2]
    target = np.array([7, 2])
    p = model.build_prompts(history, history_len, candidates, target)
    n = lambda s: len(tok.encode(s))  # noqa: E731
    sep = n(cfg.item_separator)
    for r in range(2):
        hist = history[r, : history_len[r]]
        expected_prompt = (1 + n(cfg.template_prefix) + sum(n(table.titles[i]) for i in hist) + (len(hist) - 1) * sep
                           + n(cfg.template_middle) + sum(n(table.titles[i]) for i in candidates[r])
                           + (len(candidates[r]) - 1) * sep + n(cfg.template_suffix))
        expected_target = n(table.titles[target[r]]) + 1
        mask = p.attention_mask[r]
        real = int(mask.sum())
        assert real == expected_prompt + expected_target
        assert mask[-real:].all() and not mask[:-real].any()  # left padding: real tokens end the row
        assert p.position_ids[r, -real:].tolist() == list(range(real))
        labelled = p.labels[r] != IGNORE
        assert int(labelled.sum()) == expected_target and labelled[-expected_target:].all()
        assert tok.decode(p.labels[r, labelled].tolist()) == table.titles[target[r]] + "\n"
        text = (cfg.template_prefix + cfg.item_separator.join(table.titles[i] for i in hist) + cfg.template_middle
                + cfg.item_separator.join(table.titles[i] for i in candidates[r]) + cfg.template_suffix
                + table.titles[target[r]] + "\n")
        assert tok.decode(p.input_ids[r, -real:].tolist()) == text
    # Without targets every row ends with the template suffix (the next token is the first generated one).
    q = model.build_prompts(history, history_len, candidates)
    suffix = torch.tensor(tok.encode(cfg.template_suffix))
    assert (q.input_ids[:, -len(suffix):] == suffix).all() and q.labels is None


def test_loss_matches_full_logits_loss(model, synthetic):
    data, _ = synthetic
    b = data.test.subset(slice(0, 6))
    p = model.build_prompts(b.history, b.history_len, b.candidates, b.target)
    ref = model.lm(input_ids=p.input_ids, attention_mask=p.attention_mask, position_ids=p.position_ids, labels=p.labels).loss
    assert torch.allclose(model.loss(b.history, b.history_len, b.candidates, b.target), ref, atol=1e-5)


def test_titles_truncated_to_max_title_tokens(synthetic):
    _, table = synthetic
    m = TextItemBaseline(TextBaselineConfig(max_title_tokens=2), table)
    assert max(len(m.title_tokens(i)) for i in range(len(table))) == 2
    assert m.match_title(5) == " ".join(table.titles[5].split()[:2])


def test_choose_rule(model, synthetic):
    data, table = synthetic
    cands = data.test.candidates[:4]
    t = lambda r, k: table.titles[cands[r, k]]  # noqa: E731
    texts = [f"  {t(0, 3)} ", "nothing like a title", f"{t(2, 0)}; {t(2, 1)}", f"I pick {t(3, 4)}"]
    chosen, valid = model.choose(texts, cands)
    assert chosen.tolist() == [3, -1, -1, 4]
    assert valid.tolist() == [True, False, False, True]


def test_evaluate_vhr_on_fixed_generations(model, synthetic, monkeypatch):
    data, table = synthetic
    s = data.test
    lab = s.label[:6]
    right = [table.titles[s.candidates[r, lab[r]]] for r in range(6)]
    wrong = [table.titles[s.candidates[r, (lab[r] + 1) % 5]] for r in range(6)]
    texts = [right[0], wrong[1], f"{right[2]}; {wrong[2]}", "", f"the answer is {right[4]}", right[5]]

    def fake_generate(history, history_len, candidates, max_new_tokens=None):
        assert len(history) == 6 and (candidates == s.candidates[:6]).all()
        return texts, [4, 5, 6, 40, 8, 4]

    monkeypatch.setattr(model, "generate", fake_generate)
    out = model.evaluate(data, "test", batch_size=16, limit=6)
    assert out == pytest.approx({"VHR@1": 3 / 6, "valid_ratio": 4 / 6, "mean_generated_tokens": 67 / 6})


def _randomize(m: TextItemBaseline, prompts) -> None:
    """Large random weights, so an untrained model's greedy outputs vary across rows and steps; then the
    newline's (tied) embedding copies the token row 0 writes 5th, so row 0 stops early and the others don't."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in m.lm.parameters():
            if p.ndim == 2:
                p.normal_(0, 1.5 / p.shape[1] ** 0.5, generator=g)
        tokens, _ = m.generate_tokens(prompts, 8)
        embed = m.lm.get_input_embeddings().weight
        embed[m.tokenizer.newline_id] = embed[tokens[0, 4]]


@pytest.mark.parametrize("embedding_token", [False, True])
def test_kv_cache_generation_matches_full_recompute(synthetic, embedding_token):
    data, table = synthetic
    m = TextItemBaseline(TextBaselineConfig(item_embedding_token=embedding_token), table).eval()
    b = data.test.subset(slice(0, 5))
    b.history_len = np.array([3, 1, 2, 3, 1])  # rows of different lengths: real left padding
    prompts = m.build_prompts(b.history, b.history_len, b.candidates)
    _randomize(m, prompts)
    tokens, counts = m.generate_tokens(prompts, 12)
    assert len(set(tokens.flatten().tolist())) > 10  # not a degenerate constant output
    assert counts[0] <= 5 and (counts == 12).any()  # one row stopped at its newline, others ran to the cap

    with torch.no_grad():
        embed = m.lm.get_input_embeddings()
        x = m.model_inputs(prompts).get("inputs_embeds", embed(prompts.input_ids))
        mask = prompts.attention_mask
        ref = []
        for _ in range(tokens.shape[1]):
            pos = (mask.cumsum(1) - 1).clamp(min=0)
            nxt = m.lm(inputs_embeds=x, attention_mask=mask, position_ids=pos, use_cache=False).logits[:, -1].argmax(-1)
            ref.append(nxt)
            x = torch.cat([x, embed(nxt[:, None])], 1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    ref = torch.stack(ref, 1)
    assert torch.equal(tokens, ref)
    stop = torch.tensor([t == m.tokenizer.newline_id or t == m.tokenizer.eos_id for t in ref.flatten().tolist()]).view_as(ref)
    expected = torch.where(stop.any(1), stop.int().argmax(1) + 1, torch.tensor(ref.shape[1]))
    assert torch.equal(counts, expected)


def test_generate_is_deterministic_and_cut_at_newline(synthetic):
    data, table = synthetic
    m = TextItemBaseline(TextBaselineConfig(max_new_tokens=8), table)
    b = data.test.subset(slice(0, 4))
    prompts = m.build_prompts(b.history, b.history_len, b.candidates)
    _randomize(m, prompts)
    tokens, _ = m.generate_tokens(prompts, 8)
    texts, counts = m.generate(b.history, b.history_len, b.candidates)
    assert (texts, counts) == m.generate(b.history, b.history_len, b.candidates)
    assert m.training  # generate restores the mode
    assert counts[0] <= 5 and texts[0] == m.tokenizer.decode(tokens[0, : counts[0] - 1].tolist())
    assert all("\n" not in t for t in texts) and all(1 <= c <= 8 for c in counts)


def test_item_embedding_token_trains_projection(synthetic):
    data, table = synthetic
    m = TextItemBaseline(TextBaselineConfig(item_embedding_token=True), table)
    assert m.embedding_modality == "text"  # no "collab" in the synthetic table: the first modality
    b = data.train.subset(slice(0, 4))
    p = m.build_prompts(b.history, b.history_len, b.candidates, b.target)
    assert p.embedding_slots.sum(1).tolist() == (b.history_len + b.candidates.shape[1]).tolist()
    assert (p.labels[p.embedding_slots] == IGNORE).all()
    loss = m.loss(b.history, b.history_len, b.candidates, b.target)
    loss.backward()
    assert torch.isfinite(loss)
    assert m.item_projection.weight.grad is not None and m.item_projection.weight.grad.abs().sum() > 0

    with_collab = ItemTable(table.item_keys, table.titles)
    with_collab.set_modality("text", table.features["text"])
    with_collab.set_modality("collab", torch.randn(len(table), 8))
    m2 = TextItemBaseline(TextBaselineConfig(item_embedding_token=True), with_collab)
    assert m2.embedding_modality == "collab" and m2.item_projection.in_features == 8


def test_lora_and_bf16(synthetic):
    data, table = synthetic
    cfg = TextBaselineConfig(backbone=BackboneConfig(dtype="bfloat16", lora=LoraSettings(rank=4)), item_embedding_token=True)
    m = TextItemBaseline(cfg, table)
    b = data.train.subset(slice(0, 4))
    loss = m.loss(b.history, b.history_len, b.candidates, b.target)
    loss.backward()
    assert torch.isfinite(loss)
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("item_projection") for n in trainable)
    assert all(p.grad is None for n, p in m.named_parameters() if n not in trainable)
    texts, counts = m.generate(b.history, b.history_len, b.candidates, max_new_tokens=3)
    assert len(texts) == 4 and all(1 <= c <= 3 for c in counts)


def test_hf_tokenizer_backbone_stops_on_merged_newline(synthetic, tmp_path):
    """A pretrained-directory backbone with a byte-level BPE that merges "\n" into ".\n" / "2.\n" tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    data, table = synthetic
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator([t + ".\n" for t in table.titles] * 3, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>")
    merged = tok.convert_tokens_to_ids(bpe.encode("2.\n").tokens[-1])
    assert tok.decode([merged]) == "2.\n"
    LlamaForCausalLM(LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                 intermediate_size=128, vocab_size=len(tok), tie_word_embeddings=True)).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)

    m = TextItemBaseline(TextBaselineConfig(backbone=BackboneConfig(pretrained=str(tmp_path))), table).eval()
    assert m.tokenizer is not None and not isinstance(m.tokenizer, WordTokenizer)
    b = data.test.subset(slice(0, 4))
    prompts = m.build_prompts(b.history, b.history_len, b.candidates, b.target)
    assert tok.decode(prompts.labels[0, prompts.labels[0] != IGNORE].tolist()) == table.titles[b.target[0]] + "\n"
    assert torch.isfinite(m.loss(b.history, b.history_len, b.candidates, b.target))
    prompts = m.build_prompts(b.history, b.history_len, b.candidates)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in m.lm.parameters():
            if p.ndim == 2:
                p.normal_(0, 1.5 / p.shape[1] ** 0.5, generator=g)
        tokens, _ = m.generate_tokens(prompts, 8)
        embed = m.lm.get_input_embeddings().weight
        embed[merged] = 2 * embed[tokens[0, 3]]  # row 0 now writes the merged token 4th (or earlier)
    tokens, counts = m.generate_tokens(prompts, 8)
    assert counts[0] <= 4 and tokens[0, counts[0] - 1] == merged
    texts, _ = m.generate(b.history, b.history_len, b.candidates, max_new_tokens=8)
    assert texts[0] == tok.decode(tokens[0, : counts[0]].tolist())[: -1] and texts[0].endswith("2.")

    # its model directory carries the tokenizer and the LM config: it loads with the source directory gone
    m.save_pretrained(tmp_path / "saved")
    for f in tmp_path.iterdir():
        if f.is_file():
            f.unlink()
    again = TextItemBaseline.from_pretrained(tmp_path / "saved")
    assert type(again.tokenizer) is type(tok) and again.tokenizer.get_vocab() == tok.get_vocab()
    assert torch.equal(again.generate_tokens(prompts, 8)[0], tokens)


def test_save_pretrained_round_trip_with_lora_tied_embeddings_and_item_tokens(synthetic, tmp_path):
    data, table = synthetic
    cfg = TextBaselineConfig(backbone=BackboneConfig(lora=LoraSettings(rank=4)), item_embedding_token=True)
    torch.manual_seed(0)
    m = TextItemBaseline(cfg, table)
    with torch.no_grad():  # LoRA's B starts at zero: give the adapters an effect
        for name, p in m.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    m.eval()
    path = m.save_pretrained(tmp_path / "m")
    again = TextItemBaseline.from_pretrained(path)
    a, b = m.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert again.lm.get_output_embeddings().weight is again.lm.get_input_embeddings().weight  # still tied
    batch = data.test.subset(slice(0, 4))
    assert again.generate(batch.history, batch.history_len, batch.candidates) == \
        m.generate(batch.history, batch.history_len, batch.candidates)
    merged = TextItemBaseline.from_pretrained(m.save_pretrained(tmp_path / "merged", merge_lora=True))
    assert merged.cfg.backbone.lora is None
    prompts = m.build_prompts(batch.history, batch.history_len, batch.candidates)
    with torch.no_grad():
        want = m.lm(**m.model_inputs(prompts), attention_mask=prompts.attention_mask).logits
        got = merged.lm(**merged.model_inputs(prompts), attention_mask=prompts.attention_mask).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_short_training_lowers_loss_and_yields_valid_outputs(synthetic):
    data, table = synthetic
    torch.manual_seed(0)
    m = TextItemBaseline(TextBaselineConfig(), table)
    steps = 500  # copying candidate titles emerges at 200-400 steps, depending on the seed
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / steps)
    rng = np.random.default_rng(0)
    losses = []
    for _ in range(steps):
        b = data.train.subset(rng.choice(len(data.train), 16, replace=False))
        loss = m.loss(b.history, b.history_len, b.candidates, b.target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    first, last = np.mean(losses[:5]), np.mean(losses[-10:])
    assert last < 0.15 * first, (first, last)
    out = m.evaluate(data, "test", batch_size=64)
    # Chance: a random catalog title is a valid answer for 5/40 of the samples, a correct one for 1/40.
    # Seeds 0-5 give valid_ratio 0.45-0.61 and VHR@1 0.29-0.40.
    assert out["valid_ratio"] > 0.3 and out["VHR@1"] > 0.2, out
    assert out["mean_generated_tokens"] < 8, out  # titles are 3-5 tokens + newline: it learned to stop
