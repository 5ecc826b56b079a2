"""The C++ / CUDA speeder ops (``torch.ops.speeder.*`` from the ``speeder_rt._C`` extension, csrc/ops), plain PyTorch
references, and wrappers that run the extension when it is built and otherwise the Triton kernel (CUDA) or the
reference. The ops carry C++ Meta kernels (csrc/ops/meta.cpp), so ``torch.export``, ``torch.compile`` and
AOTInductor trace them, with dynamic shapes, wherever the extension is loaded.

    embeds, item_idx, token_mask = assemble_inputs_embeds(item_table, history, history_len, candidates, recency,
                                                           candidate_embedding, template_ids, embed_weight, (P, Mi, S))
    ids, scores = score_topk(query, item_table, k, exclude_ids)   # full catalog, best first
    scores = score_candidates(query, item_table, candidates)      # [B, K]

Semantics, the same in every implementation:

- ``assemble_inputs_embeds``: ``prompt_layout.layout`` + ``prompt_layout.assemble_inputs_embeds_reference`` with a precomputed
  item-token table, i.e. what ``SpeederModel.prompt`` builds: history slot j (< n = history_len[b]) gets
  ``item_table[history[b, j]] + recency[n - 1 - j]``, candidates ``item_table[c] + candidate_embedding``, template
  positions ``embed_weight[template_ids[.]]``, padding zeros; the sums computed in float32 and rounded once, so
  the result is bit-identical to the reference. Ids past history_len are not read.
- ``score_topk``: scores ``query.float() @ item_table.float().T``; ids in ``exclude_ids`` [B, E] (negative entries
  = none) are never returned; results best first, equal scores lower id first. k < 1, k > N, an exclude id >= N,
  or k above a row's count of non-excluded items is a ValueError. Memory: the C++ kernels keep per-block partial
  top-k lists, never the B x N score matrix (the reference does materialise it). CUDA: k <= 1024.
- ``score_candidates``: ``einsum("bd,bkd->bk", query.float(), item_table[candidates].float())``.

Bad arguments raise ValueError. The extension is built by ``pip install --no-build-isolation -e .`` (``make test``
does it); ``implementation(op, device)`` says which implementation a wrapper runs.
"""
from __future__ import annotations

import torch

from speeder_rt.kernels import prompt_layout

try:
    import speeder_rt._C  # noqa: F401  registers torch.ops.speeder.* (must come after torch)

    HAS_EXTENSION = True
except ImportError:
    HAS_EXTENSION = False

try:
    from speeder_rt.kernels.assemble_inputs_embeds import assemble_inputs_embeds as triton_assemble_inputs_embeds
except ImportError:  # no triton
    triton_assemble_inputs_embeds = None

__all__ = ["HAS_EXTENSION", "assemble_inputs_embeds", "has_kernel", "implementation",
           "score_candidates", "score_candidates_reference", "score_topk", "score_topk_reference"]

OPS = ("assemble_inputs_embeds", "score_topk", "score_candidates")


def has_kernel(op: str, device: torch.device | str) -> bool:
    """Whether the extension has a kernel of ``op`` for ``device``'s type (CUDA kernels exist in CUDA builds only)."""
    key = "CUDA" if torch.device(device).type == "cuda" else "CPU"
    return HAS_EXTENSION and torch._C._dispatch_has_kernel_for_dispatch_key(f"speeder::{op}", key)


def implementation(op: str, device: torch.device | str) -> str:
    """'cpp' (the extension), 'triton' (assemble_inputs_embeds on CUDA without the CUDA extension) or 'reference'."""
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; one of {list(OPS)}")
    if has_kernel(op, device):
        return "cpp"
    on_cuda = torch.device(device).type == "cuda"
    if op == "assemble_inputs_embeds" and on_cuda and triton_assemble_inputs_embeds is not None:
        return "triton"
    return "reference"


# -- assemble_inputs_embeds --------------------------------------------------------------------------------------
def assemble_inputs_embeds(item_table: torch.Tensor, history: torch.Tensor, history_len: torch.Tensor,
                           candidates: torch.Tensor, recency: torch.Tensor, candidate_embedding: torch.Tensor,
                           template_ids: torch.Tensor, embed_weight: torch.Tensor, template_sizes: tuple[int, int, int]
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(inputs_embeds [B, L, d] in item_table's dtype, item_idx int32 [B, L], token_mask bool [B, L]).

    item_table [N, d]; history int64 [B, W] right-padded; history_len int [B] (0..W); candidates int64 [B, K];
    recency [R >= W, d]; candidate_embedding [d]; template_ids int [P + Mi + S + 1]; embed_weight [V, d];
    template_sizes (P, Mi, S). Inference only (no autograd).
    """
    impl = implementation("assemble_inputs_embeds", item_table.device)
    args = (item_table, history, history_len, candidates, recency, candidate_embedding, template_ids, embed_weight)
    if impl == "cpp":
        return torch.ops.speeder.assemble_inputs_embeds(*args, *(int(s) for s in template_sizes))
    if impl == "triton":
        return triton_assemble_inputs_embeds(*args, tuple(template_sizes))
    return prompt_layout.assemble_inputs_embeds_reference(*args, template_sizes)


# -- scoring -----------------------------------------------------------------------------------------------------
def score_topk(query: torch.Tensor, item_table: torch.Tensor, k: int, exclude_ids: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids int64 [B, k], scores float32 [B, k]) of ``query [B, d] . item_table [N, d]^T``, best first."""
    if implementation("score_topk", item_table.device) == "cpp":
        return torch.ops.speeder.score_topk(query, item_table, k, exclude_ids)
    return score_topk_reference(query, item_table, k, exclude_ids)


def score_topk_reference(query: torch.Tensor, item_table: torch.Tensor, k: int, exclude_ids: torch.Tensor | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    num_items = item_table.shape[0]
    if k < 1:
        raise ValueError(f"score_topk: k must be >= 1, got {k}")
    if k > num_items:
        raise ValueError(f"score_topk: k={k} exceeds the catalog size {num_items}")
    scores = query.float() @ item_table.float().T
    if exclude_ids is not None and exclude_ids.numel():
        if (exclude_ids >= num_items).any():
            raise ValueError(f"score_topk: exclude_ids must be < {num_items} (negative = none)")
        # Negative entries write into an extra column that is dropped.
        index = torch.where(exclude_ids >= 0, exclude_ids, num_items)
        seen = torch.zeros(scores.shape[0], num_items + 1, dtype=torch.bool, device=scores.device)
        seen = seen.scatter(1, index, True)[:, :num_items]
        left = num_items - seen.sum(1)
        if (left < k).any():
            row = int(left.argmin())
            raise ValueError(f"score_topk: k={k} but row {row} has only {int(left[row])} items left after excluding "
                             f"{num_items - int(left[row])} of {num_items}")
        scores = scores.masked_fill(seen, float("-inf"))
    top = torch.sort(scores, dim=1, descending=True, stable=True)  # stable: equal scores keep the lower id first
    return top.indices[:, :k], top.values[:, :k]


def score_candidates(query: torch.Tensor, item_table: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """float32 [B, K]: ``query[b] . item_table[candidates[b, c]]``."""
    if implementation("score_candidates", item_table.device) == "cpp":
        return torch.ops.speeder.score_candidates(query, item_table, candidates)
    return score_candidates_reference(query, item_table, candidates)


def score_candidates_reference(query: torch.Tensor, item_table: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    return torch.einsum("bd,bkd->bk", query.float(), item_table[candidates].float())
