"""CUDA-event timing shared by the kernel benchmarks (kept free of heavy imports)."""
from __future__ import annotations

from collections.abc import Callable

import torch


def cuda_median_ms(step: Callable[[], object], warmup: int, rounds: int) -> float:
    """Median of ``rounds`` CUDA-event timings of ``step`` after ``warmup`` untimed calls, in milliseconds."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]
