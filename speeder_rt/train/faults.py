"""How training stops early: divergence, preemption (SIGTERM / SIGINT) and a checkpoint that cannot be written.

Each is a :class:`TrainingStopped` carrying the process's exit status and ONE line for the user (the train CLI
prints it on rank 0, without a traceback):

- :class:`Diverged` (status 1): the step's loss or gradient norm is not finite. It is raised before the optimizer
  step, so the weights (and every checkpoint) keep the last finite state; a checkpoint whose weights are not finite
  (a step that overflowed them) is refused before anything is written.
- :class:`Preempted` (status 128 + signal: 143 for SIGTERM, 130 for SIGINT): a stop signal arrived; the step in
  flight finished, ``last/`` was written at it, and the line says how to resume.
- :class:`CheckpointFailed` (status 1): a checkpoint could not be written (no space left on the device, a read-only
  directory); the previous one is intact (writes are atomic).

Under torchrun every rank must stop at the same step, or the others wait forever in the next collective:
:func:`agree` all-reduces the per-step flags (non-finite, stop requested) over the host group once per step, and
a checkpoint's outcome on rank 0 (the writer) likewise, so every rank raises the same exception at the same point.
A stop signal only sets a flag (:class:`StopRequest`); SLURM and Kubernetes send SIGTERM, then SIGKILL after a
grace period (30 s by default), so a step plus one checkpoint must fit in it.
"""
from __future__ import annotations

import contextlib
import math
import signal
from collections.abc import Iterator
from types import FrameType

import torch
import torch.distributed as dist

from speeder_rt.train.distributed import World

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class TrainingStopped(Exception):
    """Training ended before the run's end: ``status`` is the exit status, ``str(self)`` the one line to print."""

    status = 1


class Diverged(TrainingStopped):
    """A non-finite loss, gradient norm or weight."""


class CheckpointFailed(TrainingStopped):
    """A checkpoint could not be written; the previous one is intact."""


class Preempted(TrainingStopped):
    """A stop signal: ``last/`` holds the step it arrived in."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.status = 128 + signum


class StopRequest:
    """The first stop signal (SIGTERM or SIGINT) received while :meth:`installed`; polled once per step."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is None:
            self.signum = signum

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopRequest]:
        """SIGTERM and SIGINT set this request instead of ending the process (a repeated signal too: torchrun
        forwards the one it receives, so a rank may get two); the previous handlers come back on exit."""
        previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


def agree(world: World, *values: int) -> list[int]:
    """Each value's maximum over the ranks (one all-reduce over the host group; the values as they are in one
    process): a flag set on any rank, or the stop signal any rank received (0: none)."""
    if not world.distributed:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.int64)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=world.host_group)
    return tensor.tolist()


def total_norm(norm: torch.Tensor) -> float:
    """The gradient norm ``clip_grad_norm_`` returned, as a float (under FSDP2 a DTensor: its full value)."""
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def finite(*values: float) -> bool:
    return all(math.isfinite(v) for v in values)


def stop_signal_name(signum: int) -> str:
    return signal.Signals(signum).name


__all__ = ["STOP_SIGNALS", "CheckpointFailed", "Diverged", "Preempted", "StopRequest", "TrainingStopped", "agree",
           "finite", "stop_signal_name", "total_norm"]
