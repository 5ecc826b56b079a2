"""The switch that makes the kernels bitwise reproducible: one fixed config per shape instead of the autotuner's
pick (which is timed, so it can differ between runs and ranks, and with it the summation order of dQ, dslopes and
the projection's partial sums), and no atomics (the projection's extra-table gradient is a sorted index_put).

On when ``use_deterministic_kernels(True)`` was called or ``torch.use_deterministic_algorithms(True)`` is in
effect; the ops read it at each call (under torch.compile it is a guarded global)."""
from __future__ import annotations

import torch

_enabled = False


def use_deterministic_kernels(enabled: bool = True) -> None:
    """Every later call of the Triton ops uses its fixed config (``enabled=False`` returns to autotuning)."""
    global _enabled
    _enabled = bool(enabled)


def deterministic_kernels() -> bool:
    """True when the ops run their fixed, reproducible configs."""
    return _enabled or torch.are_deterministic_algorithms_enabled()
