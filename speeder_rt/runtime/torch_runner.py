"""``TorchRunner``: a Speeder model directory served by eager PyTorch, for ``Recommender.load`` (imported only for a
model directory: an export loads without PyTorch and the model)."""
from __future__ import annotations

from pathlib import Path

import torch

from speeder_rt.export.exporter import load_speeder
from speeder_rt.export.graph import ScoringGraph, TopKGraph
from speeder_rt.export.module_runner import ModuleRunner
from speeder_rt.model.speeder import SpeederModel


class TorchRunner(ModuleRunner):
    """Eager PyTorch on the exported graphs' modules (the reference the other engines are checked against)."""

    no_topk = "this runner has no top-k graph (topk_k=0)"

    def __init__(self, model: SpeederModel, topk_k: int, device: str = "cpu", backend: str = "sdpa") -> None:
        """The table is the model's own (``set_item_tokens`` replaces it, e.g. with rows appended)."""
        scores = ScoringGraph(model, backend=backend).to(device)
        topk = TopKGraph(model, topk_k, backend=backend).to(device) if topk_k else None
        super().__init__(scores, topk, topk_k, device)
        with torch.no_grad():
            self.set_item_tokens(model.item_token_table().float().cpu().numpy())


def load_model_runner(path: Path, max_topk: int, device: str, threads: int | None) -> tuple[TorchRunner, SpeederModel]:
    """(runner with top-k up to ``max_topk``, model) of a Speeder model directory; ``threads``: torch's intra-op
    threads (None leaves them)."""
    if threads is not None:
        torch.set_num_threads(threads)
    model = load_speeder(path)
    return TorchRunner(model, min(max_topk, model.num_items), device), model
