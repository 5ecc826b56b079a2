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
def sample_ranks(scorer: Scorer, data: SequenceData, split: str = "test", full_catalog: bool = False,
                 batch_size: int = 512, rows: slice = slice(None)) -> np.ndarray:
    """0-based rank of the target for the split's samples ``rows`` (contiguous), scored in batches of
    ``batch_size`` from ``rows.start``: a distributed evaluation gives each rank a block that starts on a batch
    boundary, so its batches are the ones a single process scores."""
    samples = data.split(split)
    start, stop, _ = rows.indices(len(samples))
    ranks = [np.zeros(0, dtype=np.int64)]
    for a in range(start, stop, batch_size):
        b = min(a + batch_size, stop)
        part = samples.subset(slice(a, b))
        if full_catalog:
            scores = scorer.score(part, None)
            exclude = seen_before_target(data, split, slice(a, b))
            ranks.append(ranks_from_scores(scores, torch.from_numpy(part.target), exclude))
        else:
            scores = scorer.score(part, torch.from_numpy(part.candidates))
            ranks.append(ranks_from_scores(scores, torch.from_numpy(part.label)))
    return np.concatenate(ranks)


def evaluate(scorer: Scorer, data: SequenceData, split: str = "test", full_catalog: bool = False,
             ks: tuple[int, ...] = DEFAULT_KS, batch_size: int = 512) -> dict[str, float]:
    return ranking_metrics(sample_ranks(scorer, data, split, full_catalog, batch_size), ks)
