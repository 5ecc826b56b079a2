"""pytest-benchmark: position_aware_attention against PyTorch attention paths (after flash-attention's
benchmarks/benchmark_alibi.py).

Sweep (CUDA only): B * L = 16384 tokens, L in {128, ..., 4096}, D in {64, 128}, (Hq, Hkv) in {(14, 2), (16, 16)},
bf16, causal; forward and forward + backward. Methods:

* ``position_aware``: this kernel (item-distance bias computed in registers; its backward also produces dslopes).
* ``sdpa_flash_nobias``: SDPA's flash backend with no bias at all -- the ceiling. K/V are expanded to Hq heads
  outside the timed region.
* ``sdpa_bias``: SDPA (memory-efficient backend) with the causal bias materialised as a [B, Hq, L, L] bf16
  attn_mask, built outside the timed region (it counts towards peak memory); no gradient for the bias.
* ``flex``: torch.compile'd FlexAttention, the same bias as a score_mod, a causal block mask, enable_gqa.

FLOPs (flash-attention's convention, per query head): forward = 2 matmuls of 2 * L^2 * D, halved by causality,
i.e. 4 * B * Hq * L^2 * D / 2 = 2 * B * Hq * L^2 * D; the backward has 5 matmuls (2.5x the forward), so forward +
backward = 3.5x the forward. ``benchmark.extra_info`` records TFLOP/s (from the median time) and peak memory.

Without CUDA only a tiny CPU smoke case (kernel under TRITON_INTERPRET=1 against the reference) runs; the sweep is
skipped with a reason. Run: ``pytest benchmarks/benchmark_position_aware_attention.py --benchmark-only``.
"""

from __future__ import annotations

import os
from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    # Triton runs on CPU only through its interpreter, which is chosen when the kernels are decorated (import).
    os.environ.setdefault("TRITON_INTERPRET", "1")

from speeder_rt.kernels import position_aware_attention, position_aware_attention_reference
from speeder_rt.kernels._checks import INTERPRET

TOKENS = 16384
SEQ_LENS = (128, 256, 512, 1024, 2048, 4096)
HEAD_DIMS = (64, 128)
HEAD_CONFIGS = ((14, 2), (16, 16))
METHODS = ("position_aware", "sdpa_flash_nobias", "sdpa_bias", "flex")
MODES = ("fwd", "fwd_bwd")
WARMUP_ROUNDS, ROUNDS = 5, 20


def causal_attention_flops(batch: int, q_heads: int, seq_len: int, head_dim: int, mode: str) -> float:
    forward = 4 * batch * q_heads * seq_len**2 * head_dim / 2  # QK^T and PV, half of the tiles (causal)
    return forward if mode == "fwd" else 3.5 * forward  # backward: 5 matmuls = 2.5x the forward


def _inputs(batch: int, q_heads: int, kv_heads: int, seq_len: int, head_dim: int, device: str, dtype: torch.dtype):
    gen = torch.Generator(device=device).manual_seed(seq_len * 1000 + head_dim + q_heads)

    def normal(heads):
        return torch.randn(batch, heads, seq_len, head_dim, generator=gen, device=device).to(dtype)

    q, k, v = normal(q_heads), normal(kv_heads), normal(kv_heads)
    steps = torch.randint(0, 3, (batch, seq_len), generator=gen, device=device)
    item_idx = steps.cumsum(dim=1).to(torch.int32)
    slopes = 0.05 + torch.rand(q_heads, generator=gen, device=device)
    return q, k, v, item_idx, slopes


def _materialised_bias(item_idx: torch.Tensor, slopes: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    seq_len = item_idx.shape[1]
    dist = (item_idx[:, :, None] - item_idx[:, None, :]).abs().float()
    bias = -slopes[None, :, None, None] * torch.log2(1.0 + dist)[:, None]
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=item_idx.device).tril()
    return bias.masked_fill(~causal, float("-inf")).to(dtype)


def _make_forward(method: str, q, k, v, item_idx, slopes):
    """(zero-argument forward of ``method``, the tensors it differentiates, the backend context to run it in)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if method == "position_aware":
        return (lambda: position_aware_attention(q, k, v, item_idx, slopes, causal=True)), (q, k, v), nullcontext()

    if method in ("sdpa_flash_nobias", "sdpa_bias"):
        group = q.shape[1] // k.shape[1]
        k_full, v_full = (t.detach().repeat_interleave(group, dim=1).requires_grad_(t.requires_grad) for t in (k, v))
        if method == "sdpa_flash_nobias":
            return (
                (lambda: F.scaled_dot_product_attention(q, k_full, v_full, is_causal=True)),
                (q, k_full, v_full),
                sdpa_kernel(SDPBackend.FLASH_ATTENTION),
            )
        bias = _materialised_bias(item_idx, slopes, q.dtype)
        return (
            (lambda: F.scaled_dot_product_attention(q, k_full, v_full, attn_mask=bias)),
            (q, k_full, v_full),
            sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION),
        )

    if method == "flex":
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        def score_mod(score, b, h, q_idx, kv_idx):
            dist = (item_idx[b, q_idx] - item_idx[b, kv_idx]).abs().to(torch.float32)
            return score - slopes[h] * torch.log2(1.0 + dist)

        def causal(b, h, q_idx, kv_idx):
            return q_idx >= kv_idx

        seq_len = q.shape[2]
        block_mask = create_block_mask(causal, B=None, H=None, Q_LEN=seq_len, KV_LEN=seq_len, device=q.device)
        compiled = torch.compile(flex_attention, dynamic=False)
        # Every swept shape recompiles; past dynamo's default limit of 8 it would silently fall back to eager.
        return (
            (lambda: compiled(q, k, v, score_mod=score_mod, block_mask=block_mask, enable_gqa=True)),
            (q, k, v),
            torch._dynamo.config.patch(recompile_limit=4 * len(SEQ_LENS) * len(HEAD_DIMS) * len(HEAD_CONFIGS)),
        )
    raise AssertionError(method)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the sweep needs a CUDA device (bf16 at real sizes)")
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("heads", HEAD_CONFIGS, ids=lambda h: f"H{h[0]}x{h[1]}")
@pytest.mark.parametrize("head_dim", HEAD_DIMS, ids=lambda d: f"D{d}")
@pytest.mark.parametrize("seq_len", SEQ_LENS, ids=lambda n: f"L{n}")
def test_causal_sweep(benchmark, seq_len, head_dim, heads, method, mode):
    q_heads, kv_heads = heads
    batch = TOKENS // seq_len
    q, k, v, item_idx, slopes = _inputs(batch, q_heads, kv_heads, seq_len, head_dim, "cuda", torch.bfloat16)
    if mode == "fwd_bwd":
        q, k, v = (t.requires_grad_() for t in (q, k, v))
    forward, leaves, backend = _make_forward(method, q, k, v, item_idx, slopes)

    if mode == "fwd":

        def step():
            with torch.no_grad():
                forward()
            torch.cuda.synchronize()

    else:
        grad_out = torch.randn_like(q)

        def step():
            torch.autograd.grad(forward(), leaves, grad_out)
            torch.cuda.synchronize()

    benchmark.group = f"{mode}-L{seq_len}-D{head_dim}-H{q_heads}x{kv_heads}"
    with backend:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        benchmark.pedantic(step, rounds=ROUNDS, iterations=1, warmup_rounds=WARMUP_ROUNDS)
    benchmark.extra_info.update(
        method=method, mode=mode, batch=batch, seq_len=seq_len, head_dim=head_dim, q_heads=q_heads,
        kv_heads=kv_heads, peak_memory_gib=torch.cuda.max_memory_allocated() / 2**30,
    )
    if benchmark.stats is not None:  # None under --benchmark-disable
        flops = causal_attention_flops(batch, q_heads, seq_len, head_dim, mode)
        benchmark.extra_info["tflops"] = flops / benchmark.stats.stats.median / 1e12


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU smoke case; the CUDA sweep covers this machine")
@pytest.mark.skipif(not INTERPRET, reason="speeder_rt.kernels was imported without TRITON_INTERPRET=1")
def test_cpu_smoke(benchmark):
    q, k, v, item_idx, slopes = _inputs(1, 4, 2, 33, 16, "cpu", torch.float32)
    mask = torch.ones(1, 33, dtype=torch.bool)
    mask[0, :5] = False

    out = benchmark.pedantic(
        position_aware_attention, args=(q, k, v, item_idx, slopes, mask), rounds=1, iterations=1, warmup_rounds=0
    )
    expected = position_aware_attention_reference(q, k, v, item_idx, slopes, mask)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
