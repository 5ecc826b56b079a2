"""Prompt assembly for inference: the whole ``inputs_embeds`` of a batch in one gather-and-add launch.

The layout is ``speeder_rt.kernels.prompt_layout.layout``'s: with template sizes (P, Mi, S_), history width W, K candidates
and ``L = P + W + Mi + K + S_ + 1``, sample b with ``n = history_len[b]`` real history items has, at position t,

    t < P                     embed_weight[template_ids[t]]                                        item_idx 0
    P <= t < P + n            item_table[history[b, j]] + recency[n - 1 - j],   j = t - P          item_idx j + 1
    .. < P + n + Mi           embed_weight[template_ids[P + (t - P - n)]]                          item_idx n
    .. < P + n + Mi + K       item_table[candidates[b, c]] + candidate_embedding,  c = t - P - n - Mi   n + 1
    .. < T_b - 1              embed_weight[template_ids[P + Mi + (t - P - n - Mi - K)]]            n + 1
    t = T_b - 1               embed_weight[template_ids[P + Mi + S_]]  (PRED)                      n + 1
    t >= T_b                  0 (padding, token_mask False)                                         0

with ``T_b = P + n + Mi + K + S_ + 1``. This is exactly what ``SpeederModel.prompt`` computes with a precomputed
item-token table (recency r = n - 1 - j for the 0-based history slot j, the candidate-type embedding on every
candidate), so the result is bit-identical to ``assemble_inputs_embeds_reference``: one add per history /
candidate element is the only arithmetic, done in fp32 and rounded once to the table dtype as torch does.
Padding is +0.0 (the reference's ``x * 0`` may give -0.0, which compares equal).

Launch: one program per (sample, block of ``BLOCK_T`` positions). It derives each position's source row (a
template token's embedding row, or an item row) and addend row (a recency row, the candidate embedding, or none)
from ``history_len`` in registers, then copies ``[BLOCK_T, BLOCK_D]`` tiles (BLOCK_D a power of two, at most 1024
columns per step with a loop beyond that, masked; a tile is 4 KiB, 4 warps). The column index is contiguous and
the row pointers are multiples of 16 bytes when the row strides and d are multiples of 16 elements (Triton
specialises such integers), so loads and stores are 16-byte vectors (``ld/st.global.v4`` in the sm90 PTX), and
each program writes ``BLOCK_T`` whole consecutive rows of the output. Each source table gets its own predicated
load (template row, item row, recency row, candidate embedding) and the values are selected: a ``where`` on the
row *pointers* would defeat Triton's alignment analysis and fall back to 2-byte loads. The same program writes
``item_idx`` and ``token_mask`` for its positions.

Inference only: no autograd. The outputs never carry a gradient (even if a table requires one); training builds the
prompt with ``SpeederModel.prompt``. Registered as ``torch.ops.speeder_triton.assemble_inputs_embeds`` through
``torch.library``, so torch.compile / torch.export trace it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from speeder_rt.kernels import prompt_layout
from speeder_rt.kernels._checks import INTERPRET, check_tensors_on_one_device, shape, unit_last_stride
from speeder_rt.kernels._library import launch, register_op

__all__ = ["assemble_inputs_embeds", "assemble_inputs_embeds_reference"]

# Tests set this to True: outputs are then allocated filled with NaN / sentinels instead of left uninitialised,
# so any element the kernel fails to write shows up.
DEBUG_POISON_OUTPUTS = False
POISON_ITEM_IDX = -(2**31) + 7
POISON_MASK_BYTE = 2  # neither False (0) nor True (1)

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INDEX_DTYPES = (torch.int32, torch.int64)
# Column chunk (a loop beyond it) and tile size. On sm90 a [BLOCK_T, BLOCK_D] tile is 4 KiB of the table dtype: two
# 16-byte vectors per thread and source at 4 warps, 48 registers in bf16 (ptxas, sm_90a), so ~10 resident programs
# per SM keep ~40 KiB of loads in flight; 8 KiB tiles needed 94 registers. The interpreter's are small so that the
# CPU tests' widths (up to 130) exercise the column loop, its masked tail and BLOCK_T > 1.
_MAX_BLOCK_D = 64 if INTERPRET else 1024
_TILE_BYTES = 256 if INTERPRET else 4096
_NUM_WARPS = 4


@triton.jit
def _assemble_kernel(
    ITEMS, stride_item, HIST, stride_hb, HLEN, CANDS, stride_cb, REC, stride_rec, CEMB, TIDS, EMB, stride_emb,
    OUT, stride_ob, stride_ot, IDX, MASK,
    L, K, D, P, MI, SUF,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Grid (B, cdiv(L, BLOCK_T)): rows t0 .. t0 + BLOCK_T - 1 of sample b (see the module docstring)."""
    b = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    in_l = t < L
    n = tl.load(HLEN + b).to(tl.int32)
    end_hist = P + n
    end_mid = end_hist + MI
    end_cand = end_mid + K
    end_suf = end_cand + SUF
    real = t <= end_suf  # implies t < L since n <= W
    is_hist = (t >= P) & (t < end_hist)
    is_cand = (t >= end_mid) & (t < end_cand)
    is_tmpl = real & ~is_hist & ~is_cand
    tmpl_row = tl.where(t < P, t, tl.where(t < end_mid, P + (t - end_hist),
                        tl.where(t < end_suf, P + MI + (t - end_cand), P + MI + SUF)))
    token = tl.load(TIDS + tmpl_row, mask=is_tmpl, other=0)
    j = t - P
    c = t - end_mid
    hist_id = tl.load(HIST + b * stride_hb + j, mask=is_hist, other=0)
    cand_id = tl.load(CANDS + b * stride_cb + c, mask=is_cand, other=0)
    item = tl.where(is_hist, hist_id, cand_id).to(tl.int64)
    is_item = is_hist | is_cand
    # One row pointer per source table and predicated loads, not a where() on pointers (see the module docstring).
    tmpl_src = EMB + token.to(tl.int64) * stride_emb
    item_src = ITEMS + item * stride_item
    rec_src = REC + (n - 1 - j).to(tl.int64) * stride_rec
    dst = OUT + b * stride_ob + t.to(tl.int64) * stride_ot

    for d0 in range(0, D, BLOCK_D):
        cols = tl.max_contiguous(tl.multiple_of(d0 + tl.arange(0, BLOCK_D), BLOCK_D), BLOCK_D)
        c_in = cols[None, :] < D
        from_tmpl = tl.load(tmpl_src[:, None] + cols[None, :], mask=is_tmpl[:, None] & c_in, other=0.0)
        from_item = tl.load(item_src[:, None] + cols[None, :], mask=is_item[:, None] & c_in, other=0.0)
        from_rec = tl.load(rec_src[:, None] + cols[None, :], mask=is_hist[:, None] & c_in, other=0.0)
        cand_emb = tl.load(CEMB + cols, mask=cols < D, other=0.0)
        addend = tl.where(is_hist[:, None], from_rec, cand_emb[None, :])
        summed = (from_item.to(tl.float32) + addend.to(tl.float32)).to(from_item.dtype)
        tl.store(dst[:, None] + cols[None, :], tl.where(is_item[:, None], summed, from_tmpl),
                 mask=in_l[:, None] & c_in)

    item_idx = tl.where(t < P, 0, tl.where(t < end_hist, j + 1, tl.where(t < end_mid, n, n + 1)))
    item_idx = tl.where(real, item_idx, 0)
    tl.store(IDX + b * L + t, item_idx.to(tl.int32), mask=in_l)
    tl.store(MASK + b * L + t, real.to(tl.uint8), mask=in_l)


def _validate(
    item_table: torch.Tensor,
    history: torch.Tensor,
    history_len: torch.Tensor,
    candidates: torch.Tensor,
    recency: torch.Tensor,
    candidate_embedding: torch.Tensor,
    template_ids: torch.Tensor,
    embed_weight: torch.Tensor,
    template_sizes: tuple[int, int, int],
    validate: bool,
) -> None:
    """Shapes, dtypes and devices (no synchronisation); with ``validate`` also the index ranges (one sync)."""
    named = {"item_table": item_table, "history": history, "history_len": history_len, "candidates": candidates,
             "recency": recency, "candidate_embedding": candidate_embedding, "template_ids": template_ids,
             "embed_weight": embed_weight}
    check_tensors_on_one_device(named, "item_table")
    device = item_table.device
    if item_table.dim() != 2 or item_table.shape[1] == 0:
        raise ValueError(f"item_table must have shape [N, d] with d >= 1, got shape {shape(item_table)}")
    dtype, (num_items, d) = item_table.dtype, item_table.shape
    if dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"item_table has unsupported dtype {dtype} (shape {shape(item_table)}); "
                         f"supported: {_SUPPORTED_DTYPES}")
    for name in ("recency", "candidate_embedding", "embed_weight"):
        if named[name].dtype != dtype:
            raise ValueError(f"{name} has dtype {named[name].dtype} (shape {shape(named[name])}), item_table has "
                             f"{dtype}")
    if history.dim() != 2 or history.dtype != torch.int64:
        raise ValueError(f"history must be an int64 tensor [B, W], got {history.dtype} of shape {shape(history)}")
    batch, width = history.shape
    if history_len.dtype not in _INDEX_DTYPES or tuple(history_len.shape) != (batch,):
        raise ValueError(f"history_len must be an int32 / int64 tensor of shape [B] = [{batch}], got "
                         f"{history_len.dtype} of shape {shape(history_len)}")
    if candidates.dim() != 2 or candidates.dtype != torch.int64 or candidates.shape[0] != batch:
        raise ValueError(f"candidates must be an int64 tensor [B={batch}, K], got {candidates.dtype} of shape "
                         f"{shape(candidates)}")
    if recency.dim() != 2 or recency.shape[1] != d or recency.shape[0] < width:
        raise ValueError(f"recency must have shape [R, d={d}] with R >= W={width}, got shape {shape(recency)}")
    if tuple(candidate_embedding.shape) != (d,):
        raise ValueError(f"candidate_embedding must have shape [d] = [{d}], got shape {shape(candidate_embedding)}")
    if embed_weight.dim() != 2 or embed_weight.shape[1] != d:
        raise ValueError(f"embed_weight must have shape [V, d={d}], got shape {shape(embed_weight)}")
    if len(template_sizes) != 3 or any(int(s) < 0 for s in template_sizes):
        raise ValueError(f"template_sizes must be (P, Mi, S) >= 0, got {template_sizes}")
    num_template = sum(int(s) for s in template_sizes) + 1
    if template_ids.dtype not in _INDEX_DTYPES or tuple(template_ids.shape) != (num_template,):
        raise ValueError(f"template_ids must be an int32 / int64 tensor of shape [P + Mi + S + 1] = [{num_template}] "
                         f"(template_sizes {tuple(template_sizes)}), got {template_ids.dtype} of shape "
                         f"{shape(template_ids)}")
    if not validate or batch == 0:
        return
    slots = torch.arange(width, device=device)[None, :] < history_len[:, None]
    vocab = embed_weight.shape[0]
    checks = torch.stack([
        ((history_len < 0) | (history_len > width)).any(),
        (slots & ((history < 0) | (history >= num_items))).any(),
        ((candidates < 0) | (candidates >= num_items)).any(),
        ((template_ids < 0) | (template_ids >= vocab)).any(),
    ]).tolist()
    if checks[0]:
        raise ValueError(f"history_len (shape {shape(history_len)}) must be in 0..W={width}")
    if checks[1]:
        raise ValueError(f"history (shape {shape(history)}): the first history_len ids of each row must be in "
                         f"0..{num_items - 1}")
    if checks[2]:
        raise ValueError(f"candidates (shape {shape(candidates)}) must be in 0..{num_items - 1}")
    if checks[3]:
        raise ValueError(f"template_ids (shape {shape(template_ids)}) must be in 0..{vocab - 1}")


def assemble_inputs_embeds(
    item_table: torch.Tensor,
    history: torch.Tensor,
    history_len: torch.Tensor,
    candidates: torch.Tensor,
    recency: torch.Tensor,
    candidate_embedding: torch.Tensor,
    template_ids: torch.Tensor,
    embed_weight: torch.Tensor,
    template_sizes: tuple[int, int, int],
    *,
    validate: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Build ``(inputs_embeds [B, L, d], item_idx int32 [B, L], token_mask bool [B, L])`` in one launch.

    Args:
        item_table: [N, d] precomputed item tokens (fp32 / fp16 / bf16; the output dtype).
        history: int64 [B, W], right-padded (slots >= history_len are not read).
        history_len: int32 / int64 [B], 0..W real items per row.
        candidates: int64 [B, K] (K = 0 for the full-catalog top-k prompt).
        recency: [R, d], R >= W; history slot j of a row with n items gets recency[n - 1 - j].
        candidate_embedding: [d], added to every candidate row.
        template_ids: int [P + Mi + S + 1] = prefix + middle + suffix + PRED token ids.
        embed_weight: [V, d], the backbone's input embedding table.
        template_sizes: (P, Mi, S).
        validate: check on the host (one synchronisation) that history_len <= W, the real history ids and the
            candidates are in 0..N-1 and the template ids in 0..V-1; unchecked, bad ids read out of bounds.

    Returns the tensors of ``layout()`` + ``prompt.assemble_inputs_embeds_reference``, bit-exactly. Inference only.
    """
    _validate(item_table, history, history_len, candidates, recency, candidate_embedding, template_ids,
              embed_weight, template_sizes, validate)
    item_table, recency, embed_weight, history, candidates = (
        unit_last_stride(t.detach()) for t in (item_table, recency, embed_weight, history, candidates))
    out, item_idx, mask = _assemble_op(
        item_table, history, history_len.detach().contiguous(), candidates, recency,
        candidate_embedding.detach().contiguous(), template_ids.detach().contiguous(), embed_weight,
        *(int(s) for s in template_sizes))
    return out, item_idx, mask.view(torch.bool)


def _assemble(
    item_table: torch.Tensor, history: torch.Tensor, history_len: torch.Tensor, candidates: torch.Tensor,
    recency: torch.Tensor, candidate_embedding: torch.Tensor, template_ids: torch.Tensor, embed_weight: torch.Tensor,
    prefix: int, middle: int, suffix: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(inputs_embeds, item_idx int32, token_mask as uint8) from checked inputs with unit last strides."""
    batch, width = history.shape
    num_candidates = candidates.shape[1]
    d = item_table.shape[1]
    length = prefix + width + middle + num_candidates + suffix + 1
    device = item_table.device
    # Empty [B, 0] id tensors may have no storage: give the kernel a real (never read) pointer instead.
    if width == 0 or num_candidates == 0:
        dummy = torch.zeros((max(batch, 1), 1), dtype=torch.int64, device=device)
        history = dummy if width == 0 else history
        candidates = dummy if num_candidates == 0 else candidates

    if DEBUG_POISON_OUTPUTS:
        out = torch.full((batch, length, d), float("nan"), dtype=item_table.dtype, device=device)
        item_idx = torch.full((batch, length), POISON_ITEM_IDX, dtype=torch.int32, device=device)
        mask = torch.full((batch, length), POISON_MASK_BYTE, dtype=torch.uint8, device=device)
    else:
        out = torch.empty((batch, length, d), dtype=item_table.dtype, device=device)
        item_idx = torch.empty((batch, length), dtype=torch.int32, device=device)
        mask = torch.empty((batch, length), dtype=torch.uint8, device=device)
    if batch == 0:
        return out, item_idx, mask

    block_d = min(triton.next_power_of_2(d), _MAX_BLOCK_D)
    block_t = max(1, _TILE_BYTES // item_table.element_size() // block_d)
    launch(_assemble_kernel, (batch, triton.cdiv(length, block_t)), (
        item_table, item_table.stride(0), history, history.stride(0), history_len, candidates,
        candidates.stride(0), recency, recency.stride(0), candidate_embedding, template_ids, embed_weight,
        embed_weight.stride(0), out, out.stride(0), out.stride(1), item_idx, mask,
        length, num_candidates, d, prefix, middle, suffix,
    ), dict(BLOCK_T=block_t, BLOCK_D=block_d, num_warps=_NUM_WARPS))
    return out, item_idx, mask


_assemble_op = register_op("assemble_inputs_embeds", _assemble)


def assemble_inputs_embeds_reference(
    item_table: torch.Tensor,
    history: torch.Tensor,
    history_len: torch.Tensor,
    candidates: torch.Tensor,
    recency: torch.Tensor,
    candidate_embedding: torch.Tensor,
    template_ids: torch.Tensor,
    embed_weight: torch.Tensor,
    template_sizes: tuple[int, int, int],
    *,
    validate: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``prompt_layout.assemble_inputs_embeds_reference`` (the plain PyTorch definition); ``validate`` is accepted
    for signature parity and ignored."""
    return prompt_layout.assemble_inputs_embeds_reference(item_table, history, history_len, candidates, recency,
                                                          candidate_embedding, template_ids, embed_weight,
                                                          template_sizes)
