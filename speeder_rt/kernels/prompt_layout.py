"""The prompt layout ``[prefix] [h_1 .. h_n] [middle] [c_1 .. c_K] [suffix] [PRED]``, right-padded, and the plain
PyTorch reference of ``assemble_inputs_embeds`` built on it.

Every sample of a batch has history width ``W`` (right-padded, ``n_b <= W`` real items) and ``K``
candidates, so the batch's sequence length is static: ``L = P + W + Mi + K + S + 1``; sample ``b``
occupies positions ``0 .. T_b - 1`` with ``T_b = P + n_b + Mi + K + S + 1`` and the rest is padding.
Right padding keeps every real token's causal past free of padding, so a causal kernel without a padding
mask is exact for real tokens, and position ids are simply ``0 .. L-1``.

Item index (SPAE): prefix tokens 0; history item j (1-based) j; middle tokens n_b; candidates, suffix
and PRED n_b + 1; padding 0.

``layout`` computes, per position, where its embedding comes from in the concatenated source
``[template rows (P + Mi + S + 1)] [history tokens (W)] [candidate tokens (K)]`` of its sample; a
single gather then builds ``inputs_embeds``. It is pure tensor arithmetic (no Python loop over the
batch), so it traces and exports with dynamic batch, history width and candidate count. The model
(``speeder_rt.model.speeder``) builds its prompt with it; the Triton and C++ ``assemble_inputs_embeds`` are tested
against ``assemble_inputs_embeds_reference``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PromptLayout:
    source: torch.Tensor  # int64 [B, L]: row of the sample's source table feeding each position
    token_mask: torch.Tensor  # bool [B, L]: True = real token
    item_idx: torch.Tensor  # int32 [B, L]: SPAE item index
    pred_pos: torch.Tensor  # int64 [B]: position of PRED
    candidate_pos: torch.Tensor  # int64 [B, K]

    @property
    def length(self) -> int:
        return self.source.shape[1]


def layout(history_len: torch.Tensor, width: int, num_candidates: int, sizes: tuple[int, int, int]) -> PromptLayout:
    """Positions for histories of ``history_len`` [B] items (<= ``width``); ``sizes`` = (P, Mi, S)."""
    p, mi, s = sizes
    n = history_len.to(torch.int64)[:, None]
    k = num_candidates
    t0 = p + mi + s + 1
    length = p + width + mi + k + s + 1
    t = torch.arange(length, device=history_len.device, dtype=torch.int64)[None, :]
    end_hist = p + n
    end_mid = end_hist + mi
    end_cand = end_mid + k
    end_suf = end_cand + s
    source = torch.where(
        t < p, t,
        torch.where(t < end_hist, t0 + (t - p),
        torch.where(t < end_mid, p + (t - end_hist),
        torch.where(t < end_cand, t0 + width + (t - end_mid),
        torch.where(t < end_suf, p + mi + (t - end_cand),
        torch.where(t == end_suf, torch.full_like(t, p + mi + s), torch.zeros_like(t)))))))  # fmt: skip
    token_mask = t <= end_suf
    item_idx = torch.where(
        t < p, 0,
        torch.where(t < end_hist, t - p + 1,
        torch.where(t < end_mid, n, n + 1)))  # fmt: skip
    item_idx = torch.where(token_mask, item_idx, 0).to(torch.int32)
    cand_pos = end_mid + torch.arange(k, device=history_len.device)[None, :]
    return PromptLayout(source, token_mask, item_idx, end_suf[:, 0], cand_pos)


def gather_inputs_embeds(
    template_emb: torch.Tensor, history_tokens: torch.Tensor, candidate_tokens: torch.Tensor, lay: PromptLayout
) -> torch.Tensor:
    """inputs_embeds [B, L, d]: one gather from ``[template_emb; history_tokens[b]; candidate_tokens[b]]``.

    template_emb [P+Mi+S+1, d]; history_tokens [B, W, d] (recency already added); candidate_tokens
    [B, K, d] (candidate-type embedding already added). Padding positions are zero.
    """
    b = history_tokens.shape[0]
    source = torch.cat([template_emb.to(history_tokens.dtype).expand(b, -1, -1), history_tokens, candidate_tokens], dim=1)
    index = lay.source[..., None].expand(-1, -1, source.shape[-1])
    out = source.gather(1, index)
    return out * lay.token_mask[..., None].to(out.dtype)


def assemble_prompt(history_tokens: torch.Tensor, history_len: torch.Tensor, candidate_tokens: torch.Tensor,
                    recency: torch.Tensor | None, candidate_embedding: torch.Tensor, template_emb: torch.Tensor,
                    template_sizes: tuple[int, int, int]) -> tuple[torch.Tensor, PromptLayout]:
    """(inputs_embeds, layout) from item tokens: history slot j < n gets ``recency[n - 1 - j]`` (0 = the most
    recent item; ``recency`` None: nothing), every candidate ``candidate_embedding``; then one gather lays out
    the prompt."""
    width = history_tokens.shape[1]
    history_in = history_tokens
    if recency is not None:
        slot = torch.arange(width, device=history_len.device)[None, :]
        rows = (history_len[:, None].long() - 1 - slot).clamp(min=0)
        real = (slot < history_len[:, None])[..., None].to(history_tokens.dtype)
        history_in = history_tokens + recency[rows] * real
    lay = layout(history_len, width, candidate_tokens.shape[1], tuple(int(x) for x in template_sizes))
    return gather_inputs_embeds(template_emb, history_in, candidate_tokens + candidate_embedding, lay), lay


def assemble_inputs_embeds_reference(
    item_table: torch.Tensor, history: torch.Tensor, history_len: torch.Tensor, candidates: torch.Tensor,
    recency: torch.Tensor, candidate_embedding: torch.Tensor, template_ids: torch.Tensor, embed_weight: torch.Tensor,
    template_sizes: tuple[int, int, int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The inference prompt from a precomputed item-token table, in plain PyTorch: (inputs_embeds, item_idx,
    token_mask). The reference of the Triton and C++ ``assemble_inputs_embeds``."""
    history_tokens = item_table[history.clamp(min=0)] * (history >= 0)[..., None].to(item_table.dtype)
    embeds, lay = assemble_prompt(history_tokens, history_len, item_table[candidates], recency, candidate_embedding,
                                  embed_weight[template_ids.long()], template_sizes)
    return embeds, lay.item_idx, lay.token_mask
