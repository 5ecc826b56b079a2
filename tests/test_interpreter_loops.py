"""A kernel loop over runtime bounds -- the form of every key / row loop in speeder_rt's kernels -- runs and sums
what it should, compiled on a GPU and under TRITON_INTERPRET=1. The interpreter of Triton < 3.7 (the GPU image has
3.6) fails it with numpy >= 2.4 unless speeder_rt.kernels' backport is applied (kernels/_checks.py; docs/kernels.md)."""
from __future__ import annotations

import os

import pytest
import torch
import triton
import triton.language as tl

import speeder_rt.kernels  # noqa: F401  (what every kernel import does: the interpreter backport, where needed)

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
    reason="Triton needs a CUDA device or TRITON_INTERPRET=1",
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@triton.jit
def _block_sums_kernel(X, OUT, lo, hi, BLOCK: tl.constexpr):
    """OUT[j] = sum over the blocks starting at lo, lo + BLOCK, ... < hi of X[start + j] (masked at hi)."""
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(lo, hi, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        acc += tl.load(X + offs, mask=offs < hi, other=0.0)
    tl.store(OUT + tl.arange(0, BLOCK), acc)


@pytest.mark.parametrize("lo, hi", [(0, 0), (0, 37), (16, 64), (5, 6), (3, 100)])
def test_loop_over_runtime_bounds(lo, hi):
    x = torch.arange(100, dtype=torch.float32, device=DEVICE)
    out = torch.full((16,), float("nan"), device=DEVICE)
    _block_sums_kernel[(1,)](x, out, lo, hi, BLOCK=16)
    assert out.sum().item() == x[lo:hi].sum().item()
