"""Evaluate any scorer on a split, in candidate-list or full-catalog mode."""
from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

from speeder_rt.data.sequences import Samples, SequenceData
from speeder_rt.eval.metrics import DEFAULT_KS, ranking_metrics, ranks_from_scores


class Scorer(Protocol):
    def score(self, samples: Samples, candidates: torch.Tensor | None) -> torch.Tensor:
        """Scores [S, K] for ``candidates`` [S, K], or [S, N] over the whole catalog when it is None."""


def seen_before_target(data: SequenceData, split: str, rows: slice = slice(None)) -> torch.Tensor:
    """bool [S, N] for the split's samples ``rows``: items the user interacted with before the target
    (the ranking never excludes the target's own column)."""
    samples = data.split(split).subset(rows)
    offset = {"valid": 2, "test": 1}[split]
    mask = torch.zeros(len(samples), data.num_items, dtype=torch.bool)
    for r, u in enumerate(samples.users):
        seq = data.sequences[int(u)]
        mask[r, torch.from_numpy(seq[: len(seq) - offset])] = True
    return mask


@torch.no_grad()
def evaluate(scorer: Scorer, data: SequenceData, split: str = "test", full_catalog: bool = False,
             ks: tuple[int, ...] = DEFAULT_KS, batch_size: int = 512) -> dict[str, float]:
    samples = data.split(split)
    ranks = []
    for a in range(0, len(samples), batch_size):
        part = samples.subset(slice(a, a + batch_size))
        if full_catalog:
            scores = scorer.score(part, None)
            exclude = seen_before_target(data, split, slice(a, a + batch_size))
            ranks.append(ranks_from_scores(scores, torch.from_numpy(part.target), exclude))
        else:
            scores = scorer.score(part, torch.from_numpy(part.candidates))
            ranks.append(ranks_from_scores(scores, torch.from_numpy(part.label)))
    return ranking_metrics(np.concatenate(ranks), ks)
