"""``TorchRunner``: a Speeder model directory served by eager PyTorch, for ``Recommender.load`` (imported only for a
model directory: an export loads without PyTorch and the model)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from speeder_rt.export.exporter import load_speeder
from speeder_rt.export.graph import ScoringGraph, TopKGraph
from speeder_rt.model.speeder import SpeederModel


class TorchRunner:
    """Eager PyTorch on the exported graphs' modules (the reference the other engines are checked against)."""

    def __init__(self, model: SpeederModel, topk_k: int, device: str = "cpu", backend: str = "sdpa") -> None:
        self.device = torch.device(device)
        self.topk_k = topk_k
        self._scores = ScoringGraph(model, backend=backend).to(self.device)
        self._topk = TopKGraph(model, topk_k, backend=backend).to(self.device) if topk_k else None

    def _to(self, *arrays: np.ndarray) -> list[torch.Tensor]:
        return [torch.from_numpy(a).to(self.device) for a in arrays]

    @torch.no_grad()
    def scores(self, history_ids: np.ndarray, history_mask: np.ndarray, candidate_ids: np.ndarray) -> np.ndarray:
        return self._scores(*self._to(history_ids, history_mask, candidate_ids)).cpu().numpy()

    @torch.no_grad()
    def topk(self, history_ids: np.ndarray, history_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self._topk is None:
            raise ValueError("this runner has no top-k graph (topk_k=0)")
        ids, scores = self._topk(*self._to(history_ids, history_mask))
        return ids.cpu().numpy(), scores.cpu().numpy()


def load_model_runner(path: Path, max_topk: int, device: str, threads: int | None) -> tuple[TorchRunner, SpeederModel]:
    """(runner with top-k up to ``max_topk``, model) of a Speeder model directory; ``threads``: torch's intra-op
    threads (None leaves them)."""
    if threads is not None:
        torch.set_num_threads(threads)
    model = load_speeder(path)
    return TorchRunner(model, min(max_topk, model.num_items), device), model
