"""The text-item baseline (LLaRA-style): every item is written as its title tokens on the Speeder backbone.

Prompt: ``[bos] prefix h_1; h_2; ...; h_n middle c_1; ...; c_K suffix`` with each item its (truncated)
title, optionally followed by one LLaRA-style item-embedding token (a linear projection of the item's
feature vector). Training is teacher-forced causal-LM cross-entropy on ``target title + newline``;
inference is batched greedy decoding with a KV cache until a newline (or the token cap); an output is
valid iff exactly one candidate title occurs in it, and VHR@1 = valid and correct / total.

Pieces are tokenized separately (titles once, at construction) and concatenated, so training and
generation see the same ids. Batches are left-padded; position ids count real tokens only. The model
underneath stays a plain transformers causal LM (optionally peft-wrapped), called with ``input_ids`` or
``inputs_embeds``, ``attention_mask``, ``position_ids`` and ``cache`` exactly as a benchmark would.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from speeder_rt.baselines.word_tokenizer import WordTokenizer
from speeder_rt.data.item_table import ItemTable
from speeder_rt.data.sequences import SequenceData
from speeder_rt.eval.metrics import ranking_metrics
from speeder_rt.model.backbone import BackboneConfig, apply_lora, load_backbone
from speeder_rt.model.pretrained import PretrainedModel
from speeder_rt.utils.progress import progress_bar

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IGNORE = -100
_SLOT = -1  # placeholder id of an item-embedding token while a prompt row is assembled

IdArray = torch.Tensor | np.ndarray
# Recent transformers call the KV cache argument and output field ``cache`` (formerly ``past_key_values``).
_CACHE = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


@dataclass
class TextBaselineConfig:
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    max_title_tokens: int = 32  # titles are truncated to this many tokens
    max_new_tokens: int = 40  # generation cap
    item_embedding_token: bool = False  # LLaRA: one projected feature token after each title
    embedding_modality: str = "collab"  # falls back to the table's first modality when absent
    template_prefix: str = "The user interacted with: "
    template_middle: str = " Candidates: "
    template_suffix: str = " The user will choose: "
    item_separator: str = "; "

    def __post_init__(self) -> None:
        if isinstance(self.backbone, dict):
            self.backbone = BackboneConfig(**self.backbone)
        if self.max_title_tokens < 1 or self.max_new_tokens < 1:
            raise ValueError(f"TextBaselineConfig: max_title_tokens ({self.max_title_tokens}) and max_new_tokens "
                             f"({self.max_new_tokens}) must be >= 1")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TextPrompts:
    """A left-padded batch. ``labels`` (-100 outside target + newline) only when built with targets;
    ``embedding_slots`` marks the item-embedding positions, filled in row-major order by
    ``embedding_items``' projected features (both None without item-embedding tokens)."""

    input_ids: torch.Tensor  # int64 [B, L]
    attention_mask: torch.Tensor  # int64 [B, L]
    position_ids: torch.Tensor  # int64 [B, L]
    labels: torch.Tensor | None = None  # int64 [B, L]
    embedding_slots: torch.Tensor | None = None  # bool [B, L]
    embedding_items: torch.Tensor | None = None  # int64 [S]

    def to(self, device: torch.device | str) -> TextPrompts:
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return TextPrompts(*(move(getattr(self, f)) for f in self.__dataclass_fields__))


class _HFCodec:
    """A transformers tokenizer behind the small interface the baseline uses (the one WordTokenizer has)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self.eos_id: int | None = tokenizer.eos_token_id
        pad = tokenizer.pad_token_id
        self.pad_id: int = pad if pad is not None else (self.eos_id if self.eos_id is not None else 0)
        plain = tokenizer.encode("a", add_special_tokens=False)
        full = tokenizer.encode("a", add_special_tokens=True)
        # The special ids the tokenizer itself puts before a text (e.g. Llama's BOS; none for GPT-2 / Qwen).
        self.start_ids: list[int] = full[: len(full) - len(plain)] if full[len(full) - len(plain):] == plain else []

    def __len__(self) -> int:
        return len(self.tokenizer)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def token_texts(self) -> list[str]:
        return self.tokenizer.batch_decode([[i] for i in range(len(self.tokenizer))])


class _WordCodec:
    """WordTokenizer behind the same interface."""

    def __init__(self, tokenizer: WordTokenizer) -> None:
        self.tokenizer = tokenizer
        self.eos_id: int | None = tokenizer.eos_id
        self.pad_id: int = tokenizer.pad_id
        self.start_ids: list[int] = [tokenizer.bos_id]

    def __len__(self) -> int:
        return len(self.tokenizer)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.tokenizer.encode(t) for t in texts]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    def token_texts(self) -> list[str]:
        return [self.tokenizer.decode([i]) for i in range(len(self.tokenizer))]


def _as_numpy(x: IdArray) -> np.ndarray:
    return (x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)).astype(np.int64, copy=False)


class TextItemBaseline(PretrainedModel, nn.Module):
    """Items as title tokens on the backbone's causal LM (``self.lm``); see the module docstring."""

    model_kind = "text_baseline"
    config_class = TextBaselineConfig

    def __init__(self, cfg: TextBaselineConfig, table: ItemTable, backbone: tuple[nn.Module, Any] | None = None) -> None:
        """``backbone``: an already built (causal LM, tokenizer or None) to use instead of loading
        ``cfg.backbone`` (a model directory builds its own from its files)."""
        super().__init__()
        self.cfg = cfg
        self.item_table = table
        lm, hf_tokenizer = backbone or load_backbone(cfg.backbone, attn_implementation="sdpa")
        self.lm_config = lm.config
        if hf_tokenizer is not None:
            self.codec: _HFCodec | _WordCodec = _HFCodec(hf_tokenizer)
        else:
            texts = [*table.titles, cfg.template_prefix, cfg.template_middle, cfg.template_suffix, cfg.item_separator]
            self.codec = _WordCodec(WordTokenizer(texts, vocab_size=cfg.backbone.vocab_size))
        self.tokenizer = self.codec.tokenizer
        self.lm = apply_lora(lm, cfg.backbone.lora) if cfg.backbone.lora is not None else lm

        enc = lambda s: np.asarray(self.codec.encode(s), dtype=np.int64)  # noqa: E731
        self._start = np.asarray(self.codec.start_ids, dtype=np.int64)
        self._prefix, self._middle = enc(cfg.template_prefix), enc(cfg.template_middle)
        self._suffix, self._sep, self._newline = enc(cfg.template_suffix), enc(cfg.item_separator), enc("\n")
        titles = [t[: cfg.max_title_tokens] for t in self.codec.encode_batch(list(table.titles))]
        self.title_offsets = np.zeros(len(titles) + 1, dtype=np.int64)
        np.cumsum([len(t) for t in titles], out=self.title_offsets[1:])
        self.title_ids = np.fromiter((i for t in titles for i in t), dtype=np.int64, count=int(self.title_offsets[-1]))
        self._match_titles: dict[int, str] = {}
        self._stop: torch.Tensor | None = None

        self.item_projection: nn.Linear | None = None
        self.embedding_modality: str | None = None
        if cfg.item_embedding_token:
            if not table.modalities:
                raise ValueError("TextBaselineConfig.item_embedding_token: the item table has no feature modality")
            modality = cfg.embedding_modality if cfg.embedding_modality in table.features else table.modalities[0]
            self.embedding_modality = modality
            self.register_buffer("item_features", table.features[modality].clone(), persistent=False)
            embed = self.lm.get_input_embeddings().weight
            self.item_projection = nn.Linear(table.width(modality), embed.shape[1], dtype=embed.dtype)
            with torch.no_grad():  # outputs on the scale of the token embeddings
                nn.init.normal_(self.item_projection.weight, std=float(embed.std()) / table.width(modality) ** 0.5)
                nn.init.zeros_(self.item_projection.bias)

    @property
    def device(self) -> torch.device:
        return next(self.lm.parameters()).device

    def title_tokens(self, item: int) -> torch.Tensor:
        """The cached (truncated) title token ids of ``item``."""
        return torch.from_numpy(self._title(item))

    def _title(self, item: int) -> np.ndarray:
        return self.title_ids[self.title_offsets[item] : self.title_offsets[item + 1]]

    def _items(self, items: np.ndarray, parts: list[np.ndarray], slot_items: list[int]) -> None:
        slot = np.array([_SLOT], dtype=np.int64)
        for j, item in enumerate(items):
            if j:
                parts.append(self._sep)
            parts.append(self._title(int(item)))
            if self.item_projection is not None:
                parts.append(slot)
                slot_items.append(int(item))

    def build_prompts(self, history: IdArray, history_len: IdArray, candidates: IdArray,
                      target: IdArray | None = None) -> TextPrompts:
        """Left-padded prompt batch (CPU tensors); with ``target``, the target title + newline follow the
        prompt and ``labels`` cover exactly them."""
        history, history_len, candidates = _as_numpy(history), _as_numpy(history_len), _as_numpy(candidates)
        targets = None if target is None else _as_numpy(target)
        rows, label_lens, slot_items = [], [], []
        for r in range(len(history)):
            parts = [self._start, self._prefix]
            self._items(history[r, : history_len[r]], parts, slot_items)
            parts.append(self._middle)
            self._items(candidates[r], parts, slot_items)
            parts.append(self._suffix)
            if targets is not None:
                answer = [self._title(int(targets[r])), self._newline]
                parts += answer
                label_lens.append(sum(len(a) for a in answer))
            rows.append(np.concatenate(parts))
        width = max(len(row) for row in rows)
        ids = np.full((len(rows), width), _SLOT, dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for r, row in enumerate(rows):
            ids[r, width - len(row):] = row
            mask[r, width - len(row):] = 1
        slots = (ids == _SLOT) & (mask == 1)
        ids[ids == _SLOT] = self.codec.pad_id
        input_ids, attention_mask = torch.from_numpy(ids), torch.from_numpy(mask)
        prompts = TextPrompts(input_ids, attention_mask, (attention_mask.cumsum(1) - 1).clamp(min=0))
        if targets is not None:
            labels = torch.full_like(input_ids, IGNORE)
            for r, n in enumerate(label_lens):
                labels[r, width - n:] = input_ids[r, width - n:]
            prompts.labels = labels
        if self.item_projection is not None:
            prompts.embedding_slots = torch.from_numpy(slots)
            prompts.embedding_items = torch.tensor(slot_items, dtype=torch.int64)
        return prompts

    def model_inputs(self, prompts: TextPrompts) -> dict[str, torch.Tensor]:
        """The LM's token input: ``input_ids``, or ``inputs_embeds`` with the item-embedding tokens in place."""
        if prompts.embedding_slots is None:
            return {"input_ids": prompts.input_ids}
        embeds = self.lm.get_input_embeddings()(prompts.input_ids)
        tokens = self.item_projection(self.item_features[prompts.embedding_items].to(embeds.dtype))
        return {"inputs_embeds": embeds.masked_scatter(prompts.embedding_slots[..., None], tokens)}

    def loss(self, history: IdArray, history_len: IdArray, candidates: IdArray, target: IdArray) -> torch.Tensor:
        """Mean token cross-entropy of the teacher-forced target title + newline (prompt tokens unscored)."""
        prompts = self.build_prompts(history, history_len, candidates, target).to(self.device)
        labels = prompts.labels
        keep = int((labels != IGNORE).sum(1).max()) + 1  # every scored token lies in the last keep - 1 positions
        out = self.lm(**self.model_inputs(prompts), attention_mask=prompts.attention_mask,
                      position_ids=prompts.position_ids, use_cache=False, logits_to_keep=keep)
        logits = out.logits[:, :-1].float()
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, -keep + 1:].reshape(-1), ignore_index=IGNORE)

    def _stop_table(self, vocab: int, device: torch.device) -> torch.Tensor:
        """bool [vocab]: tokens whose text contains a newline (whatever they merge it with), and EOS."""
        if self._stop is None or self._stop.numel() != vocab:
            stop = torch.zeros(max(vocab, len(self.codec)), dtype=torch.bool)
            stop[: len(self.codec)] = torch.tensor(["\n" in t for t in self.codec.token_texts()])
            if self.codec.eos_id is not None:
                stop[self.codec.eos_id] = True
            self._stop = stop[:vocab]
        self._stop = self._stop.to(device)
        return self._stop

    @torch.no_grad()
    def generate_tokens(self, prompts: TextPrompts, max_new_tokens: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Greedy decoding with a KV cache: one prefill, then one single-token step per new token, until
        every row has produced a stop token or the cap. Returns (tokens [B, T], generated count per row
        [B], the stop token included). ``prompts`` must already be on the model's device."""
        cap = self.cfg.max_new_tokens if max_new_tokens is None else max_new_tokens
        if cap < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {cap}")
        mask, pos = prompts.attention_mask, prompts.position_ids
        out = self.lm(**self.model_inputs(prompts), attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
        stop = self._stop_table(out.logits.shape[-1], mask.device)
        batch = mask.shape[0]
        done = torch.zeros(batch, dtype=torch.bool, device=mask.device)
        counts = torch.full((batch,), cap, dtype=torch.int64, device=mask.device)
        tokens = []
        for step in range(cap):
            nxt = out.logits[:, -1].argmax(-1)
            tokens.append(nxt)
            hit = stop[nxt] & ~done
            counts = torch.where(hit, step + 1, counts)
            done |= hit
            if step + 1 == cap or bool(done.all()):
                break
            mask = torch.cat([mask, mask.new_ones(batch, 1)], 1)
            pos = pos[:, -1:] + 1
            out = self.lm(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos, use_cache=True,
                          **{_CACHE: getattr(out, _CACHE)})
        return torch.stack(tokens, 1), counts

    def generate(self, history: IdArray, history_len: IdArray, candidates: IdArray,
                 max_new_tokens: int | None = None) -> tuple[list[str], list[int]]:
        """Greedy outputs (text up to the first newline) and generated token counts, one per row."""
        was_training = self.training
        self.eval()
        try:
            prompts = self.build_prompts(history, history_len, candidates).to(self.device)
            tokens, counts = self.generate_tokens(prompts, max_new_tokens)
        finally:
            self.train(was_training)
        tokens, counts = tokens.cpu().tolist(), counts.cpu().tolist()
        texts = [self.codec.decode(row[:n]).split("\n", 1)[0] for row, n in zip(tokens, counts)]
        return texts, counts

    def match_title(self, item: int) -> str:
        """The title as the model writes it (truncated, decoded, stripped): what ``choose`` looks for."""
        title = self._match_titles.get(item)
        if title is None:
            title = self._match_titles[item] = self.codec.decode(self._title(item).tolist()).strip()
        return title

    def choose(self, texts: list[str], candidates: IdArray) -> tuple[torch.Tensor, torch.Tensor]:
        """LLaRA's rule: valid iff exactly one candidate title occurs in the stripped text (an empty title
        never counts); chosen = that candidate's index in its row, -1 when invalid."""
        candidates = _as_numpy(candidates)
        chosen = torch.full((len(texts),), -1, dtype=torch.int64)
        for r, text in enumerate(texts):
            text = text.strip()
            hits = [k for k, item in enumerate(candidates[r]) if (t := self.match_title(int(item))) and t in text]
            if len(hits) == 1:
                chosen[r] = hits[0]
        return chosen, chosen >= 0

    def evaluate(self, data: SequenceData, split: str = "test", batch_size: int = 16,
                 limit: int | None = None, progress: bool = True) -> dict[str, float]:
        """VHR@1 (valid and correct / total), valid_ratio and mean_generated_tokens on the split's fixed
        candidates (its first ``limit`` samples when given); ``progress`` shows a bar over the users."""
        samples = data.split(split)
        if samples.candidates is None or samples.label is None:
            raise ValueError(f"split {split!r} has no candidates; the text baseline evaluates on candidate lists")
        n = len(samples) if limit is None else min(limit, len(samples))
        if n < 1:
            raise ValueError(f"split {split!r}: no samples to evaluate (limit={limit})")
        chosen, valid, counts = [], [], []
        with progress_bar(total=n, desc=f"text-item generation ({split})", unit="user", enabled=progress) as bar:
            for start in range(0, n, batch_size):
                part = samples.subset(slice(start, min(start + batch_size, n)))
                texts, generated = self.generate(part.history, part.history_len, part.candidates)
                c, v = self.choose(texts, part.candidates)
                chosen.append(c.numpy())
                valid.append(v.numpy())
                counts += generated
                bar.update(len(part))
        chosen_all, valid_all = np.concatenate(chosen), np.concatenate(valid)
        ranks = np.where(chosen_all == samples.label[:n], 0, 1)
        return {
            "VHR@1": ranking_metrics(ranks, ks=(), valid=valid_all)["VHR@1"],
            "valid_ratio": float(valid_all.mean()),
            "mean_generated_tokens": float(np.mean(counts)),
        }
