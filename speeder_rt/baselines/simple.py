"""Popularity and random scorers: the floors every model must clear."""
from __future__ import annotations

import torch

from speeder_rt.data.sequences import Samples, SequenceData


class PopularityScorer:
    """Score = number of training interactions of the item."""

    def __init__(self, data: SequenceData) -> None:
        self.counts = torch.from_numpy(data.train_counts()).double()

    def score(self, samples: Samples, candidates: torch.Tensor | None) -> torch.Tensor:
        if candidates is None:
            return self.counts.expand(len(samples), -1)
        return self.counts[candidates]


class RandomScorer:
    """Independent uniform scores, fixed by seed."""

    def __init__(self, num_items: int, seed: int = 0) -> None:
        self.num_items = num_items
        self.generator = torch.Generator().manual_seed(seed)

    def score(self, samples: Samples, candidates: torch.Tensor | None) -> torch.Tensor:
        shape = (len(samples), self.num_items) if candidates is None else tuple(candidates.shape)
        return torch.rand(shape, generator=self.generator, dtype=torch.float64)
