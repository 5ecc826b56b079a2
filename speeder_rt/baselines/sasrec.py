"""SASRec (Kang & McAuley, 2018): causal self-attention over item ids.

Used as the classical accuracy floor and as the source of collaborative item features. Ids are shifted by
one so that 0 is padding; sequences are left-padded to ``max_len``. Training predicts every next item of
each user's training part with softmax cross-entropy over the whole catalog (sampled softmax whose
sample is the catalog; exact and cheap at recommendation-catalog sizes on CPU). The prediction for a
history is the last position's hidden state dotted with the item embeddings.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from speeder_rt.data.sequences import PAD, Samples, SequenceData
from speeder_rt.utils.progress import progress_bar
from speeder_rt.utils.schema import (
    DropoutRate,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    check,
    invalid,
)


@dataclass(frozen=True)
class SASRecConfig:
    hidden: PositiveInt = 64
    num_blocks: PositiveInt = 2
    num_heads: PositiveInt = 1
    max_len: PositiveInt = 50  # most recent items SASRec reads
    dropout: DropoutRate = 0.2
    lr: PositiveFloat = 1e-3
    weight_decay: NonNegativeFloat = 0.0
    batch_size: PositiveInt = 128
    epochs: PositiveInt = 40
    eval_every: PositiveInt = 5  # epochs between validations (the best is kept)
    seed: NonNegativeInt = 0

    def __post_init__(self) -> None:
        check(self)
        if self.hidden % self.num_heads:
            raise invalid(self, "num_heads", f"{self.num_heads} does not divide hidden {self.hidden}")


class SASRec(nn.Module):
    def __init__(self, num_items: int, cfg: SASRecConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or SASRecConfig()
        self.num_items = num_items
        self.item_emb = nn.Embedding(num_items + 1, cfg.hidden, padding_idx=0)
        self.pos_emb = nn.Embedding(cfg.max_len, cfg.hidden)
        layer = nn.TransformerEncoderLayer(cfg.hidden, cfg.num_heads, cfg.hidden * 4, cfg.dropout,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, cfg.num_blocks, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.hidden)
        self.drop = nn.Dropout(cfg.dropout)
        nn.init.normal_(self.item_emb.weight, std=cfg.hidden**-0.5)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()

    def hidden_states(self, seq: torch.Tensor) -> torch.Tensor:
        """seq: [B, T] left-padded shifted ids (0 = pad), T <= max_len -> [B, T, hidden]."""
        t = seq.shape[1]
        pos = torch.arange(self.cfg.max_len - t, self.cfg.max_len, device=seq.device)
        x = self.drop(self.item_emb(seq) * self.cfg.hidden**0.5 + self.pos_emb(pos))
        causal = torch.triu(torch.ones(t, t, dtype=torch.bool, device=seq.device), 1)
        pad = seq == 0
        # A fully padded prefix row would attend to nothing; let padded queries see themselves.
        h = self.encoder(x, mask=causal, src_key_padding_mask=pad & ~pad.all(1, keepdim=True))
        return self.norm(h)

    def item_embeddings(self) -> torch.Tensor:
        """[num_items, hidden]: the learned item vectors (the collaborative features)."""
        return self.item_emb.weight[1:].detach()

    @staticmethod
    def left_pad(history: np.ndarray, history_len: np.ndarray, max_len: int) -> torch.Tensor:
        """Right-padded PAD histories -> left-padded shifted ids of each row's last ``max_len`` real items."""
        width = min(history.shape[1], max_len)
        out = np.zeros((len(history), width), dtype=np.int64)
        for r, n in enumerate(history_len):
            keep = min(int(n), width)
            out[r, width - keep :] = history[r, n - keep : n] + 1
        return torch.from_numpy(out)

    @torch.no_grad()
    def score(self, samples: Samples, candidates: torch.Tensor | None) -> torch.Tensor:
        self.eval()
        seq = self.left_pad(samples.history, samples.history_len, self.cfg.max_len)
        last = self.hidden_states(seq)[:, -1]
        table = self.item_emb.weight[1:]
        if candidates is None:
            return last @ table.T
        return torch.einsum("bd,bkd->bk", last, table[candidates])


def _training_sequences(data: SequenceData, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-item targets over each user's training part (all but the last two items)."""
    inputs, targets = [], []
    for seq in data.sequences:
        part = seq[:-2][-(max_len + 1) :]
        if len(part) < 2:
            continue
        x = np.zeros(max_len, dtype=np.int64)
        y = np.full(max_len, PAD, dtype=np.int64)
        x[max_len - len(part) + 1 :] = part[:-1] + 1
        y[max_len - len(part) + 1 :] = part[1:]
        inputs.append(x)
        targets.append(y)
    if not inputs:
        raise ValueError("no user has a training part of 2 or more items to train SASRec on")
    return torch.from_numpy(np.stack(inputs)), torch.from_numpy(np.stack(targets))


def train_sasrec(data: SequenceData, cfg: SASRecConfig | None = None, log=print, progress: bool = True,
                 step_losses: list[float] | None = None) -> SASRec:
    """Train on the training split; keep the weights with the best validation NDCG@10. ``log`` gets a line at
    every validation (with the time left), ``progress`` shows a bar over the steps, ``step_losses`` (a list)
    gets every step's training loss."""
    from speeder_rt.eval.protocol import evaluate

    cfg = cfg or SASRecConfig()
    torch.manual_seed(cfg.seed)
    model = SASRec(data.num_items, cfg)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    inputs, targets = _training_sequences(data, cfg.max_len)
    gen = torch.Generator().manual_seed(cfg.seed)
    best, best_state = -1.0, None
    start = time.perf_counter()
    steps_per_epoch = -(-len(inputs) // cfg.batch_size)
    with progress_bar(total=cfg.epochs * steps_per_epoch, desc="SASRec", unit="step", enabled=progress) as bar:
        for epoch in range(1, cfg.epochs + 1):
            model.train()
            total = 0.0
            for idx in torch.randperm(len(inputs), generator=gen).split(cfg.batch_size):
                h = model.hidden_states(inputs[idx])
                y = targets[idx]
                keep = y != PAD
                logits = h[keep] @ model.item_emb.weight[1:].T
                loss = F.cross_entropy(logits, y[keep])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                value = loss.item()
                total += value * len(idx)
                if step_losses is not None:
                    step_losses.append(value)
                bar.update(1)
            bar.set_postfix(epoch=epoch, loss=f"{total / len(inputs):.4f}", refresh=False)
            if epoch % cfg.eval_every == 0 or epoch == cfg.epochs:
                ndcg = evaluate(model, data, "valid")["NDCG@10"]
                elapsed = time.perf_counter() - start
                with bar.external_write_mode():  # the line above the bar, not through it
                    log(f"sasrec epoch {epoch:3d}/{cfg.epochs}  loss {total / len(inputs):.4f}  valid NDCG@10 "
                        f"{ndcg:.4f}  ({elapsed:.1f}s, ~{elapsed / epoch * (cfg.epochs - epoch):.0f}s left)")
                if ndcg > best:
                    best, best_state = ndcg, copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    model.eval()
    return model


def add_collab_features(table, model: SASRec) -> None:
    """Store SASRec's item embeddings in ``table`` as the ``collab`` modality (every item available)."""
    emb = model.item_embeddings().float()
    if emb.shape[0] != len(table):
        raise ValueError(f"SASRec knows {emb.shape[0]} items but the ItemTable has {len(table)}")
    table.set_modality("collab", emb, source="SASRec item embeddings")
