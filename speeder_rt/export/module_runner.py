"""``ModuleRunner``: the ``Runner`` protocol over callables on torch tensors, the scoring graph and the optional
top-k and query graphs (numpy in, numpy out). The eager PyTorch runner and the AOTInductor packages are both this."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from speeder_rt.export.format import NO_QUERY, NO_TOPK


class ModuleRunner:
    """``scores``, ``topk`` and ``query`` of the graphs ``scores_graph`` / ``topk_graph`` / ``query_graph`` (None: no
    such graph), each called with its inputs as tensors on ``device``, the item tokens (``set_item_tokens``: moved
    there once per table) last."""

    no_topk = NO_TOPK  # the error of ``topk`` without one (TorchRunner names its own)

    def __init__(self, scores_graph: Callable[..., Any], topk_graph: Callable[..., Any] | None, topk_k: int,
                 device: str | torch.device, query_graph: Callable[..., Any] | None = None) -> None:
        self.device = torch.device(device)
        self.topk_k = topk_k
        self._scores = scores_graph
        self._topk = topk_graph
        self._query = query_graph
        self._table: torch.Tensor | None = None

    def set_item_tokens(self, tokens: np.ndarray) -> None:
        self._table = self._to(tokens)[0]

    def _item_tokens(self) -> torch.Tensor:
        if self._table is None:
            raise RuntimeError("no item tokens set (set_item_tokens)")
        return self._table

    def _to(self, *arrays: np.ndarray) -> list[torch.Tensor]:
        return [torch.from_numpy(np.ascontiguousarray(a)).to(self.device) for a in arrays]

    @torch.no_grad()
    def scores(self, history_ids: np.ndarray, history_mask: np.ndarray, candidate_ids: np.ndarray) -> np.ndarray:
        return self._scores(*self._to(history_ids, history_mask, candidate_ids), self._item_tokens()).cpu().numpy()

    @torch.no_grad()
    def topk(self, history_ids: np.ndarray, history_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self._topk is None:
            raise ValueError(self.no_topk)
        ids, scores = self._topk(*self._to(history_ids, history_mask), self._item_tokens())
        return ids.cpu().numpy(), scores.cpu().numpy()

    @torch.no_grad()
    def query(self, history_ids: np.ndarray, history_mask: np.ndarray) -> np.ndarray:
        if self._query is None:
            raise ValueError(NO_QUERY)
        return self._query(*self._to(history_ids, history_mask), self._item_tokens()).cpu().numpy()
