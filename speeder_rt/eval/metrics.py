"""Ranking metrics for next-item prediction, candidate-list and full-catalog modes.

A sample's rank is the number of competitors scored strictly above the target plus the number tied with
it (pessimistic ties, so a constant scorer never looks good). With 0-based rank ``r``:
``HR@k = [r < k]``, ``NDCG@k = [r < k] / log2(r + 2)``, ``MRR = 1 / (r + 1)``, averaged over samples.
``VHR@1`` (LLaRA) = (output valid and correct) / total; for scoring models every output is valid, so it
equals HR@1, while generative models pass their validity flags.
"""
from __future__ import annotations

import numpy as np
import torch

DEFAULT_KS = (1, 5, 10, 20)


def ranks_from_scores(scores: torch.Tensor | np.ndarray, label: torch.Tensor | np.ndarray,
                      exclude: torch.Tensor | np.ndarray | None = None) -> np.ndarray:
    """0-based pessimistic rank of column ``label[s]`` in each row of ``scores`` [S, C].

    ``exclude`` (bool [S, C]) removes competitors (e.g. already-seen items in full-catalog mode); the
    target's own column is never excluded.
    """
    scores = torch.as_tensor(scores, dtype=torch.float64)
    label = torch.as_tensor(label, dtype=torch.int64)
    if scores.ndim != 2 or label.shape != (scores.shape[0],):
        raise ValueError(f"scores must be [S, C] and label [S], got {list(scores.shape)} and {list(label.shape)}")
    if label.numel() and (label.min() < 0 or label.max() >= scores.shape[1]):
        raise ValueError(f"label out of range 0..{scores.shape[1] - 1}")
    if torch.isnan(scores).any():
        raise ValueError("scores contain NaN")
    target = scores.gather(1, label[:, None])
    beats = scores >= target
    beats.scatter_(1, label[:, None], False)
    if exclude is not None:
        beats &= ~torch.as_tensor(exclude, dtype=torch.bool)
    return beats.sum(1).numpy()


def ranking_metrics(ranks: np.ndarray, ks: tuple[int, ...] = DEFAULT_KS, valid: np.ndarray | None = None) -> dict[str, float]:
    """HR@k, NDCG@k for each k, MRR and VHR@1 from 0-based ranks (``valid``: generation validity flags)."""
    ranks = np.asarray(ranks)
    if ranks.size == 0:
        raise ValueError("no samples to evaluate")
    valid_flags = np.ones(len(ranks), dtype=bool) if valid is None else np.asarray(valid, dtype=bool)
    out = {"VHR@1": float(np.mean(valid_flags & (ranks == 0)))}
    for k in ks:
        hit = ranks < k
        out[f"HR@{k}"] = float(hit.mean())
        out[f"NDCG@{k}"] = float(np.where(hit, 1.0 / np.log2(ranks + 2.0), 0.0).mean())
    out["MRR"] = float(np.mean(1.0 / (ranks + 1.0)))
    return out


def format_table(rows: dict[str, dict[str, float]], columns: list[str]) -> str:
    """A fixed-width text table: one row per model, one column per metric name (timings, columns ending in
    ``_s`` / ``_ms``, with 2 decimals; metrics with 4)."""

    def cell(column: str, value) -> str:
        if not isinstance(value, float):
            return f"  {str(value if value is not None else '-'):>10}"
        return f"  {value:>10.2f}" if column.endswith(("_s", "_ms")) else f"  {value:>10.4f}"

    name_w = max(len("model"), *(len(n) for n in rows))
    head = "model".ljust(name_w) + "".join(f"  {c:>10}" for c in columns)
    lines = [head, "-" * len(head)]
    for name, vals in rows.items():
        lines.append(name.ljust(name_w) + "".join(cell(c, vals.get(c)) for c in columns))
    return "\n".join(lines)
