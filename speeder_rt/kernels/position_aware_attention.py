"""Position-aware attention: FlashAttention-2 with an in-register relative item-distance bias.

For a batch ``b``, query head ``h`` (kv head ``h // G`` with ``G = Hq // Hkv``), query ``i`` and key ``j``:

    s[b, h, i, j] = scale * <q[b, h, i], k[b, h // G, j]> - slopes[h] * log2(1 + |idx[b, i] - idx[b, j]|)
    P[b, h, i, :] = softmax over the allowed keys j of s[b, h, i, :]
    out[b, h, i]  = sum_j P[b, h, i, j] * v[b, h // G, j]

Key ``j`` is allowed for query ``i`` when ``mask[b, j]`` (and ``j <= i`` if causal). Rows of padded queries
(``mask[b, i]`` False) and rows without any allowed key are exactly zero and receive no gradient.

The kernels follow FlashAttention-2: one program per (query block, batch, head) walks the key blocks with an
online softmax, keeping only the base-2 log-sum-exp per row; nothing of size L x L is materialised. They work in
base 2: with ``LOG2E = log2(e)``,

    s2 = s * LOG2E = (scale * LOG2E) * <q, k> - (slopes[h] * LOG2E) * log2(1 + |di|),    exp(s - m) = exp2(s2 - m2)

so both the dot-product scale and the slope are multiplied by ``LOG2E`` (the bias is a log2 *value*, not a
base-2 logit). The bias is recomputed in registers from the two index vectors in the forward and the backward.

Backward (``dS = P o (dP - delta)`` with ``dP = dO V^T`` and ``delta = rowsum(dO o O)``):

    dV = P^T dO,    dK = scale * dS^T Q,    dQ = scale * dS K,    dslopes[h] = -sum_{b,i,j} dS * log2(1 + |di|)

On sm90 the bias's log2 is one MUFU.LG2 per score (``lg2.approx``), fp32 inputs multiply in TF32, and every 16-bit
config in the autotune lists compiles to wgmma without spills (``python -m speeder_rt.tools.sm90_report``).
Registered as ``torch.ops.speeder_triton.position_aware_attention`` (+ ``_backward``) through ``torch.library``.
Offsets within one (batch, head) slice are 32-bit: L x (row stride) must stay below 2^31 (L * H * D for HF's
layout, ~1M tokens at H * D = 2048); batch and head offsets are 64-bit.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from speeder_rt.kernels._checks import (
    INTERPRET,
    SM90_SMEM_LIMIT,
    check_tensors_on_one_device,
    shape,
    unit_last_stride,
)
from speeder_rt.kernels._library import launch, register_op
from speeder_rt.kernels.determinism import deterministic_kernels

__all__ = ["position_aware_attention", "position_aware_attention_reference"]

# Tests set this to True: outputs and workspaces are then allocated filled with NaN instead of left
# uninitialised, so any element a kernel fails to write shows up.
DEBUG_POISON_OUTPUTS = False

_LOG2E = math.log2(math.e)
_LOG2E_TL: tl.constexpr = tl.constexpr(_LOG2E)  # the same value, readable inside the kernels
# fp32 inputs multiply on the tensor cores in TF32 (10-bit mantissa, fp32 accumulation): IEEE fp32 dots have no
# MMA instruction and compile to FMA loops that spill (sm90 report); 16-bit inputs ignore the setting.
_TF32: tl.constexpr = tl.constexpr("tf32")
_FAST_LOG2: tl.constexpr = tl.constexpr(not INTERPRET)  # the interpreter has no libdevice
_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
_INDEX_DTYPES = (torch.int32, torch.int64)
_SMEM_BUDGET = SM90_SMEM_LIMIT - 4096  # a margin for the estimate below


# --------------------------------------------------------------------------------------------------------------
# Autotuning. Per head dim, the configs the autotuner benchmarks, in order of preference: the first one the pruner
# keeps is also the deterministic mode's fixed config. Chosen from the sm90 report (python -m
# speeder_rt.tools.sm90_report; docs/kernels_sm90.md): no spill in 16-bit builds, wgmma everywhere. The CPU
# interpreter gets one small config with BLOCK_M != BLOCK_N so the diagonal / off-diagonal / tail split of every
# kernel is exercised by the CPU tests.
# --------------------------------------------------------------------------------------------------------------
def _config(block_m: int, block_n: int, num_warps: int, num_stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=num_warps, num_stages=num_stages)


def _key(config: triton.Config) -> tuple[int, int, int, int]:
    return config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps, config.num_stages


def _union(by_head_dim: dict[int, list[triton.Config]]) -> list[triton.Config]:
    """Every config of any head dim once (the autotuner's list; the pruner picks the head dim's own)."""
    return list({_key(c): c for configs in by_head_dim.values() for c in configs}.values())


# Query-major kernels (forward, dQ) need BLOCK_M % BLOCK_N == 0; the key-major dK/dV kernel BLOCK_N % BLOCK_M == 0.
if INTERPRET:
    _FWD_BY_D = {d: [_config(32, 16, 4, 1)] for d in _SUPPORTED_HEAD_DIMS}
    _DKDV_BY_D = {d: [_config(16, 32, 4, 1)] for d in _SUPPORTED_HEAD_DIMS}
    _DQ_BY_D = {d: [_config(32, 16, 4, 1)] for d in _SUPPORTED_HEAD_DIMS}
    _PREPROCESS_BLOCK_M = 32
else:
    # D <= 64: no listed 16-bit config spills (dK/dV's 64 x 64 tile spilled 8-16 B at D = 64, L <= 32: dropped).
    # D = 128: of 19 dK/dV configs tried, only the two listed (8 warps, 16 queries x 64 keys) are spill-free wgmma
    # builds under both Triton 3.9 and 3.6 (32-key tiles give mma.sync); fp32 (TF32) tiles take twice the shared
    # memory, the pruner keeps the smaller ones.
    _FWD_SMALL_D = [_config(128, 64, 8, 3), _config(128, 64, 8, 4), _config(64, 64, 4, 3), _config(64, 64, 4, 4)]
    _DKDV_SMALL_D = [_config(32, 128, 8, 3), _config(32, 128, 8, 2), _config(16, 128, 8, 3)]
    _DQ_SMALL_D = [_config(128, 64, 8, 2), _config(128, 64, 8, 3), _config(64, 64, 4, 3), _config(128, 32, 8, 3)]
    _FWD_BY_D = {16: _FWD_SMALL_D, 32: _FWD_SMALL_D, 64: _FWD_SMALL_D, 128: [
        _config(128, 64, 8, 3), _config(128, 64, 8, 2), _config(64, 64, 4, 3), _config(128, 32, 8, 3),
        _config(64, 32, 4, 3),
    ]}
    _DKDV_BY_D = {16: _DKDV_SMALL_D, 32: _DKDV_SMALL_D, 64: _DKDV_SMALL_D, 128: [
        _config(16, 64, 8, 2), _config(16, 64, 8, 1),
    ]}
    _DQ_BY_D = {16: _DQ_SMALL_D, 32: _DQ_SMALL_D, 64: _DQ_SMALL_D, 128: [
        _config(128, 64, 8, 2), _config(128, 64, 8, 3), _config(64, 64, 4, 3), _config(128, 32, 8, 3),
        _config(64, 64, 4, 2), _config(128, 32, 8, 2),
    ]}
    _PREPROCESS_BLOCK_M = 128

_FWD_CONFIGS, _DKDV_CONFIGS, _DQ_CONFIGS = _union(_FWD_BY_D), _union(_DKDV_BY_D), _union(_DQ_BY_D)
# The dslopes partial-sum buffer is sized before the autotuner picks BLOCK_M, so for the smallest one.
_MIN_DQ_BLOCK_M = min(c.kwargs["BLOCK_M"] for c in _DQ_CONFIGS)
# Tuned per sequence-length bucket, batch x heads bucket (the grid's second axis), GQA group, head dim, causality
# and mask; Triton adds the tensors' dtypes.
_AUTOTUNE_KEY = ["L_BUCKET", "BH_BUCKET", "group", "HEAD_DIM", "CAUSAL", "HAS_MASK"]
_UNSPECIALISED = ["L_BUCKET", "BH_BUCKET"]  # autotune keys only: no kernel specialisation of their own


def smem_estimate(kernel: str, config: triton.Config, head_dim: int, element_size: int) -> int:
    """Shared memory (bytes) of an attention kernel's config: the tiles that stay resident for the whole program
    plus ``num_stages`` copies of the tiles streamed through its loop, each ``rows x head_dim`` elements (forward:
    Q resident, K and V streamed; dK/dV: K, V resident, Q and dO streamed; dQ: Q, dO resident, K and V streamed).
    Within 2 KiB of what Triton allocates on sm90 for 16-bit tiles (checked by the sm90 report's tests; the budget
    keeps a 4 KiB margin); fp32 (TF32) builds allocate up to ~25% less than estimated."""
    block_m, block_n, _, stages = _key(config)
    resident, streamed = {"fwd": (block_m, 2 * block_n), "dkdv": (2 * block_n, 2 * block_m),
                          "dq": (2 * block_m, 2 * block_n)}[kernel]
    return (resident + stages * streamed) * head_dim * element_size


def _pruner(kernel: str, by_head_dim: dict[int, list[triton.Config]]):
    def prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
        """The head dim's configs that fit in shared memory for the inputs' dtype; short sequences (L <= 64) only
        the 64-wide tiles (a 128-row tile would be mostly padding). Never empty: the smallest fitting config is
        kept when no other is."""
        args = {**named_args, **kwargs}
        head_dim, element_size = args["HEAD_DIM"], args["Q"].element_size()
        available = {_key(c): c for c in configs}
        own = [available[_key(c)] for c in by_head_dim[head_dim] if _key(c) in available]
        fitting = [c for c in own if smem_estimate(kernel, c, head_dim, element_size) <= _SMEM_BUDGET] or own[-1:]
        short = [c for c in fitting if max(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) <= max(args["L_BUCKET"], 64)]
        return short or fitting[-1:]

    return prune


_FWD_PRUNE, _DKDV_PRUNE, _DQ_PRUNE = _pruner("fwd", _FWD_BY_D), _pruner("dkdv", _DKDV_BY_D), _pruner("dq", _DQ_BY_D)


@triton.jit
def _log2_1p_distance(idx_a, idx_b):
    """log2(1 + |idx_a - idx_b|) for broadcast index tiles, in fp32. On the GPU MUFU.LG2 (``lg2.approx``, relative
    error < 2^-22) replaces the correctly rounded ``log2f`` routine (~100 instructions per score, the largest part
    of the loops' non-matmul work): 1 + |d| >= 1 is a normal number, and the bias tolerates 1e-7 relative error."""
    x = tl.abs(idx_a - idx_b).to(tl.float32) + 1.0
    if _FAST_LOG2:
        return libdevice.fast_log2f(x)
    return tl.log2(x)


# --------------------------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------------------------
@triton.jit
def _fwd_key_loop(
    acc, l_i, m_i,
    q, idx_q, offs_m,
    k_base, v_base, idx_base, mask_base,
    stride_kl, stride_vl, stride_il, stride_ml,
    seq_len, lo, hi,
    qk_scale, bias_scale,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL_MASK: tl.constexpr, BOUNDS_MASK: tl.constexpr, HAS_MASK: tl.constexpr,
):
    """Online-softmax update of one query block over the key blocks [lo, hi), in base 2.

    For each key block:  s2 = qk_scale * q k^T - bias_scale * log2(1 + |idx_q - idx_k|)
                         m' = max(m, rowmax(s2)),  p = exp2(s2 - m'),  alpha = exp2(m - m')
                         l  = alpha * l + rowsum(p),  acc = alpha * acc + p v
    Masked entries are -inf; ``m_safe`` keeps a row whose keys are all masked so far at p = alpha = 0 (no NaN).
    CAUSAL_MASK is only set for the diagonal blocks, BOUNDS_MASK only for blocks that may cross ``seq_len``.
    """
    offs_d = tl.arange(0, HEAD_DIM)
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k_ptrs = k_base + offs_n[:, None] * stride_kl + offs_d[None, :]
        v_ptrs = v_base + offs_n[:, None] * stride_vl + offs_d[None, :]
        if BOUNDS_MASK:
            key_in = offs_n < seq_len
            k = tl.load(k_ptrs, mask=key_in[:, None], other=0.0)
            idx_k = tl.load(idx_base + offs_n * stride_il, mask=key_in, other=0)
        else:
            k = tl.load(k_ptrs)
            idx_k = tl.load(idx_base + offs_n * stride_il)

        qk = tl.dot(q, tl.trans(k), input_precision=_TF32)
        log_dist = _log2_1p_distance(idx_q[:, None], idx_k[None, :])
        s = qk * qk_scale - bias_scale * log_dist
        if CAUSAL_MASK:  # for rows < seq_len, j <= i also implies j < seq_len
            s = tl.where(offs_m[:, None] >= offs_n[None, :], s, float("-inf"))
        elif BOUNDS_MASK:
            s = tl.where(key_in[None, :], s, float("-inf"))
        if HAS_MASK:
            if BOUNDS_MASK:
                key_ok = tl.load(mask_base + offs_n * stride_ml, mask=key_in, other=0) != 0
            else:
                key_ok = tl.load(mask_base + offs_n * stride_ml) != 0
            s = tl.where(key_ok[None, :], s, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        if BOUNDS_MASK:
            v = tl.load(v_ptrs, mask=key_in[:, None], other=0.0)
        else:
            v = tl.load(v_ptrs)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=_TF32)
        m_i = m_new
    return acc, l_i, m_i


@triton.autotune(configs=_FWD_CONFIGS, key=_AUTOTUNE_KEY, prune_configs_by={"early_config_prune": _FWD_PRUNE})
@triton.jit(do_not_specialize=_UNSPECIALISED)
def _pa_attn_fwd_kernel(
    Q, K, V, IDX, SLOPES, MASK, OUT, LSE,
    stride_qb, stride_qh, stride_ql,
    stride_kb, stride_kh, stride_kl,
    stride_vb, stride_vh, stride_vl,
    stride_ob, stride_oh, stride_ol,
    stride_ib, stride_il,
    stride_mb, stride_ml,
    num_q_heads, group, seq_len, L_BUCKET, BH_BUCKET, qk_scale,
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Forward: one program per (query block, batch * query head).

    out[i] = sum_j exp2(s2[i, j] - lse2[i]) v[j],   lse2[i] = m2[i] + log2(l[i])   (base-2 log-sum-exp, saved)
    Causal: key blocks left of the diagonal run unmasked, the diagonal blocks with the causal mask, blocks to
    its right are skipped. Non-causal: full key blocks unmasked, then the ragged tail with the bounds mask.
    Padded query rows and rows with no allowed key store out = 0 and lse2 = +inf (so the backward gives P = 0).
    """
    tl.static_assert(BLOCK_M % BLOCK_N == 0)  # the diagonal starts on a key-block boundary
    pid_m = tl.program_id(0)
    if CAUSAL:  # the last query blocks do the most work: schedule them first
        pid_m = tl.num_programs(0) - 1 - pid_m
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // num_q_heads).to(tl.int64)
    off_h = pid_bh % num_q_heads
    off_hk = (off_h // group).to(tl.int64)

    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_in = offs_m < seq_len

    q_base = Q + off_b * stride_qb + off_h.to(tl.int64) * stride_qh
    k_base = K + off_b * stride_kb + off_hk * stride_kh
    v_base = V + off_b * stride_vb + off_hk * stride_vh
    idx_base = IDX + off_b * stride_ib
    mask_base = MASK + off_b * stride_mb

    q = tl.load(q_base + offs_m[:, None] * stride_ql + offs_d[None, :], mask=row_in[:, None], other=0.0)
    idx_q = tl.load(idx_base + offs_m * stride_il, mask=row_in, other=0)
    bias_scale = tl.load(SLOPES + off_h) * _LOG2E_TL  # slope * log2(e)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    if CAUSAL:
        acc, l_i, m_i = _fwd_key_loop(
            acc, l_i, m_i, q, idx_q, offs_m, k_base, v_base, idx_base, mask_base,
            stride_kl, stride_vl, stride_il, stride_ml, seq_len, 0, start_m, qk_scale, bias_scale,
            HEAD_DIM, BLOCK_N, False, False, HAS_MASK,
        )
        acc, l_i, m_i = _fwd_key_loop(
            acc, l_i, m_i, q, idx_q, offs_m, k_base, v_base, idx_base, mask_base,
            stride_kl, stride_vl, stride_il, stride_ml, seq_len, start_m, tl.minimum(start_m + BLOCK_M, seq_len),
            qk_scale, bias_scale,
            HEAD_DIM, BLOCK_N, True, True, HAS_MASK,
        )
    else:
        full_end = (seq_len // BLOCK_N) * BLOCK_N
        acc, l_i, m_i = _fwd_key_loop(
            acc, l_i, m_i, q, idx_q, offs_m, k_base, v_base, idx_base, mask_base,
            stride_kl, stride_vl, stride_il, stride_ml, seq_len, 0, full_end, qk_scale, bias_scale,
            HEAD_DIM, BLOCK_N, False, False, HAS_MASK,
        )
        acc, l_i, m_i = _fwd_key_loop(
            acc, l_i, m_i, q, idx_q, offs_m, k_base, v_base, idx_base, mask_base,
            stride_kl, stride_vl, stride_il, stride_ml, seq_len, full_end, seq_len, qk_scale, bias_scale,
            HEAD_DIM, BLOCK_N, False, True, HAS_MASK,
        )

    keep = l_i > 0.0  # l >= 1 whenever the row has an allowed key
    if HAS_MASK:
        keep = keep & (tl.load(mask_base + offs_m * stride_ml, mask=row_in, other=0) != 0)
    inv_l = tl.where(keep, 1.0 / tl.where(keep, l_i, 1.0), 0.0)
    out = acc * inv_l[:, None]
    lse = tl.where(keep, m_i + tl.log2(tl.where(keep, l_i, 1.0)), float("inf"))

    o_base = OUT + off_b * stride_ob + off_h.to(tl.int64) * stride_oh
    tl.store(o_base + offs_m[:, None] * stride_ol + offs_d[None, :], out.to(OUT.dtype.element_ty),
             mask=row_in[:, None])
    tl.store(LSE + pid_bh.to(tl.int64) * seq_len + offs_m, lse, mask=row_in)


# --------------------------------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------------------------------
@triton.jit
def _pa_attn_bwd_preprocess_kernel(
    OUT, DO, DELTA,
    stride_ob, stride_oh, stride_ol,
    stride_dob, stride_doh, stride_dol,
    num_q_heads, seq_len,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """delta[b, h, i] = sum_d dO[b, h, i, d] * O[b, h, i, d]  (fp32), the row term of dS = P o (dP - delta)."""
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // num_q_heads).to(tl.int64)
    off_h = (pid_bh % num_q_heads).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_in = offs_m < seq_len
    o = tl.load(OUT + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_ol + offs_d[None, :],
                mask=row_in[:, None], other=0.0)
    do = tl.load(DO + off_b * stride_dob + off_h * stride_doh + offs_m[:, None] * stride_dol + offs_d[None, :],
                 mask=row_in[:, None], other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(DELTA + pid_bh.to(tl.int64) * seq_len + offs_m, delta, mask=row_in)


@triton.jit
def _dkdv_query_loop(
    dk, dv,
    k, v, idx_k, offs_n,
    q_base, do_base, idx_base, lse_base, delta_base,
    stride_ql, stride_dol, stride_il,
    seq_len, lo, hi,
    qk_scale, bias_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
    CAUSAL_MASK: tl.constexpr, BOUNDS_MASK: tl.constexpr,
):
    """Accumulate dK, dV of one key block over the query blocks [lo, hi) of one query head (transposed tiles).

    s2^T = qk_scale * k q^T - bias_scale * log2(1 + |idx_k - idx_q|),  P^T = exp2(s2^T - lse2)
    dV += P^T dO,   dP^T = v dO^T,   dS^T = P^T o (dP^T - delta),   dK += dS^T q   (scale applied by the caller)
    Out-of-range query rows load lse2 = +inf, so P^T = 0 there without masking the tile.
    """
    offs_d = tl.arange(0, HEAD_DIM)
    for start_m in range(lo, hi, BLOCK_M):
        start_m = tl.multiple_of(start_m, BLOCK_M)
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q_ptrs = q_base + offs_m[:, None] * stride_ql + offs_d[None, :]
        do_ptrs = do_base + offs_m[:, None] * stride_dol + offs_d[None, :]
        if BOUNDS_MASK:
            row_in = offs_m < seq_len
            q = tl.load(q_ptrs, mask=row_in[:, None], other=0.0)
            idx_q = tl.load(idx_base + offs_m * stride_il, mask=row_in, other=0)
            lse = tl.load(lse_base + offs_m, mask=row_in, other=float("inf"))
        else:
            q = tl.load(q_ptrs)
            idx_q = tl.load(idx_base + offs_m * stride_il)
            lse = tl.load(lse_base + offs_m)

        qk_t = tl.dot(k, tl.trans(q), input_precision=_TF32)
        log_dist_t = _log2_1p_distance(idx_k[:, None], idx_q[None, :])
        p_t = tl.exp2(qk_t * qk_scale - bias_scale * log_dist_t - lse[None, :])
        if CAUSAL_MASK:
            p_t = tl.where(offs_m[None, :] >= offs_n[:, None], p_t, 0.0)

        if BOUNDS_MASK:
            do = tl.load(do_ptrs, mask=row_in[:, None], other=0.0)
            delta = tl.load(delta_base + offs_m, mask=row_in, other=0.0)
        else:
            do = tl.load(do_ptrs)
            delta = tl.load(delta_base + offs_m)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=_TF32)
        dp_t = tl.dot(v, tl.trans(do), input_precision=_TF32)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=_TF32)
    return dk, dv


@triton.autotune(configs=_DKDV_CONFIGS, key=_AUTOTUNE_KEY, prune_configs_by={"early_config_prune": _DKDV_PRUNE})
@triton.jit(do_not_specialize=_UNSPECIALISED)
def _pa_attn_bwd_dkdv_kernel(
    Q, K, V, DO, IDX, SLOPES, MASK, LSE, DELTA, DK, DV,
    stride_qb, stride_qh, stride_ql,
    stride_kb, stride_kh, stride_kl,
    stride_vb, stride_vh, stride_vl,
    stride_dob, stride_doh, stride_dol,
    stride_dkb, stride_dkh, stride_dkl,
    stride_dvb, stride_dvh, stride_dvl,
    stride_ib, stride_il,
    stride_mb, stride_ml,
    num_q_heads, num_kv_heads, group, seq_len, L_BUCKET, BH_BUCKET, qk_scale, scale,
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dK, dV: one program per (key block, batch * kv head); it loops over the kv head's ``group`` query heads,
    so GQA needs no atomics:  dV[j] = sum_{h in group} sum_i P[h, i, j] dO[h, i],
    dK[j] = scale * sum_{h in group} sum_i dS[h, i, j] q[h, i].

    Causal: the diagonal query blocks [n0, n0 + BLOCK_N) run with the causal mask, the ones below unmasked, the
    ragged last query block with bounds masks; queries before n0 never see these keys and are skipped.
    Non-causal: every query block, unmasked except the ragged last one. Padded keys are not masked per tile:
    row j of dK / dV depends only on key j, so those rows are zeroed once before the store.
    """
    tl.static_assert(BLOCK_N % BLOCK_M == 0)  # the diagonal starts on a query-block boundary
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // num_kv_heads).to(tl.int64)
    off_hk = (pid_bh % num_kv_heads).to(tl.int64)

    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    col_in = offs_n < seq_len

    idx_base = IDX + off_b * stride_ib
    k = tl.load(K + off_b * stride_kb + off_hk * stride_kh + offs_n[:, None] * stride_kl + offs_d[None, :],
                mask=col_in[:, None], other=0.0)
    v = tl.load(V + off_b * stride_vb + off_hk * stride_vh + offs_n[:, None] * stride_vl + offs_d[None, :],
                mask=col_in[:, None], other=0.0)
    idx_k = tl.load(idx_base + offs_n * stride_il, mask=col_in, other=0)

    # Query blocks are BLOCK_M-aligned and BLOCK_M divides BLOCK_N, so the full blocks end at the same aligned
    # boundary whether the walk starts at 0 or at the end of the diagonal.
    full_end = (seq_len // BLOCK_M) * BLOCK_M
    if CAUSAL:
        below_diag = start_n + BLOCK_N
    else:
        below_diag = 0
    tail_start = tl.maximum(below_diag, full_end)

    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    for g in range(0, group):
        off_h = off_hk * group + g
        off_qbh = off_b * num_q_heads + off_h
        q_base = Q + off_b * stride_qb + off_h * stride_qh
        do_base = DO + off_b * stride_dob + off_h * stride_doh
        lse_base = LSE + off_qbh * seq_len
        delta_base = DELTA + off_qbh * seq_len
        bias_scale = tl.load(SLOPES + off_h) * _LOG2E_TL
        if CAUSAL:
            dk, dv = _dkdv_query_loop(
                dk, dv, k, v, idx_k, offs_n, q_base, do_base, idx_base, lse_base, delta_base,
                stride_ql, stride_dol, stride_il, seq_len, start_n, tl.minimum(start_n + BLOCK_N, seq_len),
                qk_scale, bias_scale,
                HEAD_DIM, BLOCK_M, True, True,
            )
        dk, dv = _dkdv_query_loop(
            dk, dv, k, v, idx_k, offs_n, q_base, do_base, idx_base, lse_base, delta_base,
            stride_ql, stride_dol, stride_il, seq_len, below_diag, full_end, qk_scale, bias_scale,
            HEAD_DIM, BLOCK_M, False, False,
        )
        dk, dv = _dkdv_query_loop(
            dk, dv, k, v, idx_k, offs_n, q_base, do_base, idx_base, lse_base, delta_base,
            stride_ql, stride_dol, stride_il, seq_len, tail_start, seq_len, qk_scale, bias_scale,
            HEAD_DIM, BLOCK_M, False, True,
        )

    dk = dk * scale
    if HAS_MASK:
        key_ok = tl.load(MASK + off_b * stride_mb + offs_n * stride_ml, mask=col_in, other=0) != 0
        dk = tl.where(key_ok[:, None], dk, 0.0)
        dv = tl.where(key_ok[:, None], dv, 0.0)
    tl.store(DK + off_b * stride_dkb + off_hk * stride_dkh + offs_n[:, None] * stride_dkl + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=col_in[:, None])
    tl.store(DV + off_b * stride_dvb + off_hk * stride_dvh + offs_n[:, None] * stride_dvl + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=col_in[:, None])


@triton.jit
def _dq_key_loop(
    dq, dslope_rows,
    q, do, idx_q, lse, delta, offs_m,
    k_base, v_base, idx_base, mask_base,
    stride_kl, stride_vl, stride_il, stride_ml,
    seq_len, lo, hi,
    qk_scale, bias_scale,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL_MASK: tl.constexpr, BOUNDS_MASK: tl.constexpr, HAS_MASK: tl.constexpr,
):
    """Accumulate dQ and the dslopes row sums of one query block over the key blocks [lo, hi).

    P = exp2(s2 - lse2),  dP = dO v^T,  dS = P o (dP - delta),  dQ += dS k  (scale applied by the caller),
    dslope_rows[i] += sum_j dS[i, j] * log2(1 + |idx_i - idx_j|)   (the caller negates the total).
    """
    offs_d = tl.arange(0, HEAD_DIM)
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k_ptrs = k_base + offs_n[:, None] * stride_kl + offs_d[None, :]
        v_ptrs = v_base + offs_n[:, None] * stride_vl + offs_d[None, :]
        if BOUNDS_MASK:
            key_in = offs_n < seq_len
            k = tl.load(k_ptrs, mask=key_in[:, None], other=0.0)
            v = tl.load(v_ptrs, mask=key_in[:, None], other=0.0)
            idx_k = tl.load(idx_base + offs_n * stride_il, mask=key_in, other=0)
        else:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
            idx_k = tl.load(idx_base + offs_n * stride_il)

        qk = tl.dot(q, tl.trans(k), input_precision=_TF32)
        log_dist = _log2_1p_distance(idx_q[:, None], idx_k[None, :])
        p = tl.exp2(qk * qk_scale - bias_scale * log_dist - lse[:, None])
        if CAUSAL_MASK:
            p = tl.where(offs_m[:, None] >= offs_n[None, :], p, 0.0)
        elif BOUNDS_MASK:
            p = tl.where(key_in[None, :], p, 0.0)
        if HAS_MASK:
            if BOUNDS_MASK:
                key_ok = tl.load(mask_base + offs_n * stride_ml, mask=key_in, other=0) != 0
            else:
                key_ok = tl.load(mask_base + offs_n * stride_ml) != 0
            p = tl.where(key_ok[None, :], p, 0.0)

        dp = tl.dot(do, tl.trans(v), input_precision=_TF32)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=_TF32)
        dslope_rows += tl.sum(ds * log_dist, 1)
    return dq, dslope_rows


# Configs with different BLOCK_M write different slots of DSLOPES_PARTIAL: zero it between tuning runs.
@triton.autotune(configs=_DQ_CONFIGS, key=_AUTOTUNE_KEY, prune_configs_by={"early_config_prune": _DQ_PRUNE},
                 reset_to_zero=["DSLOPES_PARTIAL"])
@triton.jit(do_not_specialize=_UNSPECIALISED)
def _pa_attn_bwd_dq_kernel(
    Q, K, V, DO, IDX, SLOPES, MASK, LSE, DELTA, DQ, DSLOPES_PARTIAL,
    stride_qb, stride_qh, stride_ql,
    stride_kb, stride_kh, stride_kl,
    stride_vb, stride_vh, stride_vl,
    stride_dob, stride_doh, stride_dol,
    stride_dqb, stride_dqh, stride_dql,
    stride_ib, stride_il,
    stride_mb, stride_ml,
    num_q_heads, group, seq_len, partial_stride, L_BUCKET, BH_BUCKET, qk_scale, scale,
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dQ and dslopes: one program per (query block, batch * query head), key blocks walked as in the forward.

    dQ[i] = scale * sum_j dS[i, j] k[j].  The program's dslopes partial, -sum_{i in block, j} dS * log2(1 + |di|),
    goes to DSLOPES_PARTIAL[b, h, pid_m]; the host sums that [B, Hq, n_blocks] buffer (deterministic, no atomics).
    Padded query rows carry lse2 = +inf from the forward, hence P = dS = 0 and no gradient.
    """
    tl.static_assert(BLOCK_M % BLOCK_N == 0)
    pid_m = tl.program_id(0)
    if CAUSAL:
        pid_m = tl.num_programs(0) - 1 - pid_m
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // num_q_heads).to(tl.int64)
    off_h = pid_bh % num_q_heads
    off_hk = (off_h // group).to(tl.int64)

    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_in = offs_m < seq_len

    q = tl.load(Q + off_b * stride_qb + off_h.to(tl.int64) * stride_qh + offs_m[:, None] * stride_ql
                + offs_d[None, :], mask=row_in[:, None], other=0.0)
    do = tl.load(DO + off_b * stride_dob + off_h.to(tl.int64) * stride_doh + offs_m[:, None] * stride_dol
                 + offs_d[None, :], mask=row_in[:, None], other=0.0)
    idx_base = IDX + off_b * stride_ib
    idx_q = tl.load(idx_base + offs_m * stride_il, mask=row_in, other=0)
    lse = tl.load(LSE + pid_bh.to(tl.int64) * seq_len + offs_m, mask=row_in, other=float("inf"))
    delta = tl.load(DELTA + pid_bh.to(tl.int64) * seq_len + offs_m, mask=row_in, other=0.0)
    bias_scale = tl.load(SLOPES + off_h) * _LOG2E_TL

    k_base = K + off_b * stride_kb + off_hk * stride_kh
    v_base = V + off_b * stride_vb + off_hk * stride_vh
    mask_base = MASK + off_b * stride_mb

    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    dslope_rows = tl.zeros([BLOCK_M], dtype=tl.float32)
    if CAUSAL:
        dq, dslope_rows = _dq_key_loop(
            dq, dslope_rows, q, do, idx_q, lse, delta, offs_m, k_base, v_base, idx_base, mask_base,
            stride_kl, stride_vl, stride_il, stride_ml, seq_len, 0, start_m, qk_scale, bias_scale,
            HEAD_DIM, BLOCK_N, False, False, HAS_MASK,
        )
        dq, dslope_rows = _dq_key_loop(
            dq, dslope_rows, q, do, idx_q, lse, delta, offs_m, k_base, v_base, idx_base, mask_base,
            stride_kl, stride_vl, stride_il, stride_ml, seq_len, start_m, tl.minimum(start_m + BLOCK_M, seq_len),
            qk_scale, bias_scale,
            HEAD_DIM, BLOCK_N, True, True, HAS_MASK,
        )
    else:
        full_end = (seq_len // BLOCK_N) * BLOCK_N
        dq, dslope_rows = _dq_key_loop(
            dq, dslope_rows, q, do, idx_q, lse, delta, offs_m, k_base, v_base, idx_base, mask_base,
            stride_kl, stride_vl, stride_il, stride_ml, seq_len, 0, full_end, qk_scale, bias_scale,
            HEAD_DIM, BLOCK_N, False, False, HAS_MASK,
        )
        dq, dslope_rows = _dq_key_loop(
            dq, dslope_rows, q, do, idx_q, lse, delta, offs_m, k_base, v_base, idx_base, mask_base,
            stride_kl, stride_vl, stride_il, stride_ml, seq_len, full_end, seq_len, qk_scale, bias_scale,
            HEAD_DIM, BLOCK_N, False, True, HAS_MASK,
        )

    tl.store(DQ + off_b * stride_dqb + off_h.to(tl.int64) * stride_dqh + offs_m[:, None] * stride_dql
             + offs_d[None, :], (dq * scale).to(DQ.dtype.element_ty), mask=row_in[:, None])
    tl.store(DSLOPES_PARTIAL + pid_bh.to(tl.int64) * partial_stride + pid_m, -tl.sum(dslope_rows, 0))


# --------------------------------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------------------------------
def _validate(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    item_idx: torch.Tensor,
    slopes: torch.Tensor,
    attention_mask: torch.Tensor | None,
) -> None:
    """Raise ValueError naming the offending argument and its shape; nothing has been launched yet."""
    named = {"q": q, "k": k, "v": v, "item_idx": item_idx, "slopes": slopes}
    if attention_mask is not None:
        named["attention_mask"] = attention_mask
    check_tensors_on_one_device(named, "q")
    for name in ("q", "k", "v"):
        if named[name].dim() != 4:
            raise ValueError(f"{name} must have shape [B, H, L, D], got shape {shape(named[name])}")
    if q.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"q has unsupported dtype {q.dtype} (shape {shape(q)}); supported: {_SUPPORTED_DTYPES}")
    for name in ("k", "v"):
        if named[name].dtype != q.dtype:
            raise ValueError(f"{name} has dtype {named[name].dtype} (shape {shape(named[name])}), q has {q.dtype}")
    batch, num_q_heads, seq_len, head_dim = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got k {shape(k)} and v {shape(v)}")
    for name in ("k", "v"):
        t = named[name]
        if (t.shape[0], t.shape[2], t.shape[3]) != (batch, seq_len, head_dim):
            raise ValueError(
                f"{name} has shape {shape(t)}; B, L and D must match q's shape {shape(q)} ([B, H, L, D])"
            )
    num_kv_heads = k.shape[1]
    if num_kv_heads == 0 or num_q_heads % num_kv_heads != 0:
        raise ValueError(
            f"the number of query heads in q (shape {shape(q)}) must be a multiple of the number of kv heads "
            f"in k (shape {shape(k)})"
        )
    if head_dim not in _SUPPORTED_HEAD_DIMS:
        raise ValueError(f"q has head dim D={head_dim} (shape {shape(q)}); supported: {_SUPPORTED_HEAD_DIMS}")
    if item_idx.dtype not in _INDEX_DTYPES:
        raise ValueError(f"item_idx must be int32 or int64, got {item_idx.dtype} (shape {shape(item_idx)})")
    if tuple(item_idx.shape) != (batch, seq_len):
        raise ValueError(f"item_idx must have shape [B, L] = {[batch, seq_len]}, got shape {shape(item_idx)}")
    if not slopes.is_floating_point():
        raise ValueError(f"slopes must be a floating-point tensor, got {slopes.dtype} (shape {shape(slopes)})")
    if tuple(slopes.shape) != (num_q_heads,):
        raise ValueError(f"slopes must have shape [Hq] = {[num_q_heads]}, got shape {shape(slopes)}")
    if attention_mask is not None:
        if attention_mask.dtype != torch.bool:
            raise ValueError(
                f"attention_mask must be a bool tensor, got {attention_mask.dtype} (shape {shape(attention_mask)})"
            )
        if tuple(attention_mask.shape) != (batch, seq_len):
            raise ValueError(
                f"attention_mask must have shape [B, L] = {[batch, seq_len]}, got shape {shape(attention_mask)}"
            )


def _alloc_like(t: torch.Tensor) -> torch.Tensor:
    """Same shape, dtype and (for dense tensors) strides as ``t``, so e.g. the output keeps q's layout."""
    if DEBUG_POISON_OUTPUTS:
        return torch.full_like(t, float("nan"))
    return torch.empty_like(t)


def _alloc(shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    if DEBUG_POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=torch.float32, device=device)
    return torch.empty(shape, dtype=torch.float32, device=device)


def _mask_args(attention_mask: torch.Tensor | None, item_idx: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """The mask is read as uint8 (a free view of the bool tensor); without one, a dummy pointer and zero strides."""
    if attention_mask is None:
        return item_idx, 0, 0
    return attention_mask.view(torch.uint8), attention_mask.stride(0), attention_mask.stride(1)


def _strides3(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _attention_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, item_idx: torch.Tensor, slopes: torch.Tensor,
    attention_mask: torch.Tensor | None, causal: bool, scale: float, deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [B, Hq, L, D] in q's layout, lse2 [B, Hq, L] fp32); slopes fp32 [Hq]."""
    batch, num_q_heads, seq_len, head_dim = q.shape
    group = num_q_heads // k.shape[1]
    mask_arg, stride_mb, stride_ml = _mask_args(attention_mask, item_idx)
    out = _alloc_like(q)
    lse = _alloc((batch, num_q_heads, seq_len), q.device)

    def grid(meta):
        return triton.cdiv(seq_len, meta["BLOCK_M"]), batch * num_q_heads

    launch(_pa_attn_fwd_kernel, grid, (
        q, k, v, item_idx, slopes, mask_arg, out, lse,
        *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(out),
        item_idx.stride(0), item_idx.stride(1), stride_mb, stride_ml,
        num_q_heads, group, seq_len, triton.next_power_of_2(seq_len), triton.next_power_of_2(batch * num_q_heads),
        scale * _LOG2E,
    ), dict(HEAD_DIM=head_dim, CAUSAL=causal, HAS_MASK=attention_mask is not None), _FWD_CONFIGS, _FWD_PRUNE,
        deterministic)
    return out, lse


def _attention_backward(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    item_idx: torch.Tensor, slopes: torch.Tensor, attention_mask: torch.Tensor | None, causal: bool, scale: float,
    deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv in the layouts of q, k, v; dslopes fp32 [Hq])."""
    batch, num_q_heads, seq_len, head_dim = q.shape
    num_kv_heads = k.shape[1]
    group = num_q_heads // num_kv_heads
    has_mask = attention_mask is not None
    mask_arg, stride_mb, stride_ml = _mask_args(attention_mask, item_idx)
    seq_bucket = triton.next_power_of_2(seq_len)
    grad_out = unit_last_stride(grad_out)
    meta = dict(HEAD_DIM=head_dim, CAUSAL=causal, HAS_MASK=has_mask)

    delta = _alloc((batch, num_q_heads, seq_len), q.device)
    launch(_pa_attn_bwd_preprocess_kernel, (triton.cdiv(seq_len, _PREPROCESS_BLOCK_M), batch * num_q_heads), (
        out, grad_out, delta, *_strides3(out), *_strides3(grad_out), num_q_heads, seq_len,
    ), dict(HEAD_DIM=head_dim, BLOCK_M=_PREPROCESS_BLOCK_M))

    dk = _alloc_like(k)
    dv = _alloc_like(v)

    def dkdv_grid(meta):
        return triton.cdiv(seq_len, meta["BLOCK_N"]), batch * num_kv_heads

    launch(_pa_attn_bwd_dkdv_kernel, dkdv_grid, (
        q, k, v, grad_out, item_idx, slopes, mask_arg, lse, delta, dk, dv,
        *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(grad_out), *_strides3(dk), *_strides3(dv),
        item_idx.stride(0), item_idx.stride(1), stride_mb, stride_ml,
        num_q_heads, num_kv_heads, group, seq_len, seq_bucket, triton.next_power_of_2(batch * num_kv_heads),
        scale * _LOG2E, scale,
    ), meta, _DKDV_CONFIGS, _DKDV_PRUNE, deterministic)

    dq = _alloc_like(q)
    # Programs beyond the chosen BLOCK_M's block count leave their (zeroed) slots untouched.
    num_partials = triton.cdiv(seq_len, _MIN_DQ_BLOCK_M)
    dslopes_partial = torch.zeros((batch, num_q_heads, num_partials), dtype=torch.float32, device=q.device)

    def dq_grid(meta):
        return triton.cdiv(seq_len, meta["BLOCK_M"]), batch * num_q_heads

    launch(_pa_attn_bwd_dq_kernel, dq_grid, (
        q, k, v, grad_out, item_idx, slopes, mask_arg, lse, delta, dq, dslopes_partial,
        *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(grad_out), *_strides3(dq),
        item_idx.stride(0), item_idx.stride(1), stride_mb, stride_ml,
        num_q_heads, group, seq_len, num_partials, seq_bucket, triton.next_power_of_2(batch * num_q_heads),
        scale * _LOG2E, scale,
    ), meta, _DQ_CONFIGS, _DQ_PRUNE, deterministic)
    return dq, dk, dv, dslopes_partial.sum(dim=(0, 2))


_forward_op = register_op("position_aware_attention", _attention_forward)
_backward_op = register_op("position_aware_attention_backward", _attention_backward)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, item_idx, slopes, attention_mask, causal, scale, deterministic = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, item_idx, slopes, attention_mask)
    ctx.causal, ctx.scale, ctx.deterministic = causal, scale, deterministic


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, item_idx, slopes, attention_mask = ctx.saved_tensors
    dq, dk, dv, dslopes = _backward_op(grad_out, q, k, v, out, lse, item_idx, slopes, attention_mask, ctx.causal,
                                       ctx.scale, ctx.deterministic)
    return dq, dk, dv, None, dslopes, None, None, None, None


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def position_aware_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    item_idx: torch.Tensor,
    slopes: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    causal: bool = True,
    scale: float | None = None,
) -> torch.Tensor:
    """Fused attention with the relative item-distance bias ``-slopes[h] * log2(1 + |item_idx_i - item_idx_j|)``.

    Args:
        q: [B, Hq, L, D] (fp32 / fp16 / bf16; D a power of two in 16..128; any strides).
        k, v: [B, Hkv, L, D], same dtype; Hq must be a multiple of Hkv (query head h reads kv head h // (Hq/Hkv)).
        item_idx: int32 / int64 [B, L], the item index of every token (int32 is cheaper: |di| is computed per
            score in the index dtype).
        slopes: floating [Hq], per-head bias slope (differentiable).
        attention_mask: bool [B, L], True for real tokens (any pattern: left / right padding, holes), or None.
        causal: restrict query i to keys j <= i.
        scale: logit scale, default 1 / sqrt(D).

    Returns:
        [B, Hq, L, D] in q's dtype. Padded query rows and rows with no allowed key are zero. Differentiable
        w.r.t. q, k, v and slopes.
    """
    _validate(q, k, v, item_idx, slopes, attention_mask)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    q, k, v = unit_last_stride(q), unit_last_stride(k), unit_last_stride(v)
    out, _ = _forward_op(q, k, v, item_idx, slopes.to(torch.float32).contiguous(), attention_mask, bool(causal), scale,
                         deterministic_kernels())
    return out


def position_aware_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    item_idx: torch.Tensor,
    slopes: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    causal: bool = True,
    scale: float | None = None,
    upcast: bool = True,
) -> torch.Tensor:
    """Plain PyTorch reference that materialises the [B, Hq, L, L] bias, mask and probabilities.

    ``upcast=True`` computes in fp32 (fp64 inputs stay fp64); ``upcast=False`` computes in the input dtype, which
    gives the low-precision error baseline of the tests' tolerance rule. Differentiable by autograd w.r.t. q, k,
    v and slopes. Returns q's dtype.
    """
    num_q_heads, num_kv_heads = q.shape[1], k.shape[1]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    compute_dtype = torch.promote_types(q.dtype, torch.float32) if upcast else q.dtype
    group = num_q_heads // num_kv_heads
    qc = q.to(compute_dtype)
    kc = k.to(compute_dtype).repeat_interleave(group, dim=1)
    vc = v.to(compute_dtype).repeat_interleave(group, dim=1)

    dist = (item_idx[:, :, None].long() - item_idx[:, None, :].long()).abs().to(compute_dtype)  # [B, L, L]
    bias = -slopes.to(compute_dtype)[None, :, None, None] * torch.log2(1.0 + dist)[:, None]
    scores = scale * (qc @ kc.transpose(-2, -1)) + bias

    seq_len = q.shape[2]
    allowed = torch.ones(seq_len, seq_len, dtype=torch.bool, device=q.device)
    if causal:
        allowed = allowed.tril()
    allowed = allowed[None, None]
    if attention_mask is not None:
        allowed = allowed & attention_mask[:, None, None, :] & attention_mask[:, None, :, None]
    has_key = allowed.any(dim=-1, keepdim=True)
    scores = scores.masked_fill(~allowed, float("-inf")).masked_fill(~has_key, 0.0)
    probs = torch.softmax(scores, dim=-1).masked_fill(~has_key, 0.0)
    return (probs @ vc).to(q.dtype)
