"""Argument checks shared by the kernels' public functions (run before any launch), and the target's limits."""
from __future__ import annotations

import os

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Shared memory one block may use on sm_90 (H100 / H200): 227 KiB. Configs are pruned and checked against it.
SM90_SMEM_LIMIT = 232448


def shape(t: torch.Tensor) -> list[int]:
    return list(t.shape)


def check_tensors_on_one_device(named: dict[str, torch.Tensor], anchor: str) -> None:
    """Every value is a tensor on ``named[anchor]``'s device, which is CUDA (or any under TRITON_INTERPRET=1);
    otherwise a ValueError naming the argument and its shape."""
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    device = named[anchor].device
    for name, t in named.items():
        if t.device != device:
            raise ValueError(f"{name} (shape {shape(t)}) is on {t.device} but {anchor} is on {device}")
    if device.type != "cuda" and not INTERPRET:
        raise ValueError(f"{anchor} (shape {shape(named[anchor])}) is on {device}; the kernels need CUDA tensors or "
                         "TRITON_INTERPRET=1")


def unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when its last dimension is contiguous (or it is a scalar), else a contiguous copy: the
    kernels address the last dimension with unit stride and take every other stride as given, so e.g.
    transposed [B, L, H, D] attention views are used in place."""
    return t if t.dim() == 0 or t.stride(-1) == 1 else t.contiguous()
