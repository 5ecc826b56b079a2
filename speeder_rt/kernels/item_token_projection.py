"""Item-token projection: the MRC Mixture of Modality Experts (``speeder_rt.model.mome``) fused into Triton kernels.

For every row ``s`` of a batch of item ids (``ids[s] = -1`` is padding) and every modality ``m`` of width ``d_m``
(features ``F_m [N, d_m]``, activity ``u_m = active[ids[s], m]`` -- available AND enabled -- and ``u_m = 0`` for a
padding row), with the backbone's parameter dtype ``p`` (fp32 / fp16 / bf16):

    f_m    = F_m[ids[s]] rounded to p                                   (mome.py: ``features.to(fc1.weight.dtype)``)
    z_m    = u_m * (gamma_m o (f_m - mean(f_m)) / sqrt(var(f_m) + 1e-5) + beta_m)          (LayerNorm, biased var)
    a_m    = W1_m z_m + b1_m                          [d_e]
    x_m    = W2_m GELU(a_m) + b2_m                    [d_h]      GELU(a) = a * Phi(a) = a/2 (1 + erf(a / sqrt 2))
    l      = W_g concat(z_1, ..., z_M) + b_g          [M]
    g      = softmax(l masked to -inf where u_m = 0)  (a row without any active modality gets g = 0)
    token  = sum_{m: u_m = 1} g_m x_m  (+ extra_table[extra_idx[s]] when extra_idx[s] >= 0 and ids[s] >= 0)

Inactive experts are selected away (never multiplied by zero), so a missing modality's features -- even
non-finite ones -- change nothing; a padding row is the zero token and gets no gradient (its extra row is not added
either: the caller's recency / candidate row belongs to a real item only).

Forward launch structure (two launches for the whole modality set; every arithmetic step accumulates in fp32):

* ``_fwd_norm_up_kernel``, grid (row blocks, d_e tiles, M): gathers the rows' features, LayerNorms them in three
  passes over ``BLOCK_K``-wide column chunks (mean, then the exact centred variance, then normalise) so that no row
  of width d_m has to live in registers, and streams ``W1`` tiles through ``tl.dot`` into the pre-activation
  ``a_m`` of its ``BLOCK_S x BLOCK_E`` tile. The programs of d_e tile 0 also store ``z_m`` (needed by the backward
  and by nothing else), the LayerNorm statistics and the modality's share of the gate logits
  (``z_m @ W_g[:, cols_m]^T`` as a ``tl.dot`` against the gate rows padded to 16). Outputs: ``H = GELU(a)`` in p
  (the down kernel's operand) and, only when a gradient is needed, ``A = a`` in fp32 (the backward's GELU').
  Splitting d_e over the grid gives S/BLOCK_S * d_e/BLOCK_E * M programs (15 * 8 * 3 = 360 at S = 480 with 32 x 128
  tiles) instead of one per row block; the LayerNorm recomputed by each d_e tile re-reads BLOCK_S x d_m features.
* ``_fwd_down_mix_kernel``, grid (row blocks, d_h tiles): finishes the gate softmax for its rows (tiny, recomputed
  per tile), then for each modality streams ``H_m`` and ``W2_m`` tiles through ``tl.dot`` into an fp32
  ``BLOCK_S x BLOCK_H`` accumulator, adds b2, and folds ``g_m * x_m`` into the token accumulator, so the
  ``[S, M, d_h]`` expert outputs are never materialised. The extra row is added and the token is stored in p.

Backward (``dT`` = the token gradient; ``G_m = dT W2_m`` is the gradient of ``H_m`` before the gate scaling):

    dx_m = g_m dT,   dg_m = <dT, x_m> = <G_m, GELU(a_m)> + <dT, b2_m>,   ds = g o (dg - <g, dg>)   (softmax)
    da_m = g_m G_m o GELU'(a_m),        GELU'(a) = Phi(a) + a phi(a)
    dW2_m = dT^T (g_m GELU(a_m)),  db2_m = g_m^T dT,  dW1_m = da_m^T z_m,  db1_m = sum_s da_m
    dW_g = ds^T concat(z),  db_g = sum_s ds,   dz_m = u_m (da_m W1_m + ds W_g[:, cols_m])
    dgamma_m = sum_s dz_m o xhat_m,   dbeta_m = sum_s dz_m                 (features get no gradient)
    d extra_table[extra_idx[s]] += dT[s]

* ``_bwd_dh_kernel`` (Triton), grid (row blocks, d_e tiles, M): ``G_m`` tile by ``tl.dot`` over d_h chunks, then
  ``da_m`` and ``P_m = g_m GELU(a_m)`` in p, per-tile partial sums of dg (``dT . b2`` included), db1 and db2 (fp32,
  one slot per tile: deterministic, no atomics).
* ``_bwd_dz_kernel`` (Triton), grid (row blocks, d_m tiles, M): the softmax backward ``ds`` from the dg partials,
  ``dz_m`` (``da_m W1_m`` by ``tl.dot`` over d_e plus the fp32 gate term), and the LayerNorm parameter partials
  against the recomputed ``xhat``.
* torch (cuBLAS) for the weight gradients, which reduce over the S rows: ``dW2_m = dT^T P_m``, ``dW1_m = da_m^T z_m``,
  ``dW_g = ds^T concat(z)``; ``.sum`` over the partial slots; ``index_put_(accumulate=True)`` for the extra table
  (sorted, no atomics on CUDA). With ``speeder_rt.kernels.use_deterministic_kernels`` every Triton kernel runs its
  first config instead of the autotuner's pick, so every summation order is fixed by the shapes.

Addressing: every offset that involves the row count S is 64-bit (``z``, the partial buffers, the outputs), so S x
width may pass 2^31; weight rows are addressed with their own row stride (any view with a unit last stride: a
slice ``w[:, :d]``, a transposed-then-sliced view).

Registered as ``torch.ops.speeder_triton.item_token_projection`` (+ ``_backward``) through ``torch.library``.

Largest intermediates: ``A`` (fp32), ``H``, ``da``, ``P`` (p), each ``[M, S, d_e]`` -- i.e. [S, d_e] per modality --
and ``z`` ``[S, sum d_m]``. Up to ``MAX_MODALITIES`` = 4 modalities: each kernel holds one unrolled code path per
modality, since the widths d_m are compile-time constants.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from speeder_rt.kernels._checks import INTERPRET, check_tensors_on_one_device, shape, unit_last_stride
from speeder_rt.kernels._library import launch, register_op
from speeder_rt.kernels.determinism import deterministic_kernels
from speeder_rt.kernels.mome_math import LN_EPS, mome_tokens

__all__ = ["ExpertParams", "item_token_projection", "item_token_projection_reference", "mome_parameters"]

# Tests set this to True: outputs and workspaces are then allocated filled with NaN instead of left
# uninitialised, so any element a kernel fails to write shows up.
DEBUG_POISON_OUTPUTS = False

MAX_MODALITIES = 4  # the kernels unroll one code path per modality
_M_PAD = 16  # gate width padded to tl.dot's minimum
_SQRT1_2: tl.constexpr = tl.constexpr(1.0 / math.sqrt(2.0))
_INV_SQRT_2PI: tl.constexpr = tl.constexpr(1.0 / math.sqrt(2.0 * math.pi))
# fp32 parameters multiply on the tensor cores in TF32 (10-bit mantissa, fp32 accumulation): IEEE fp32 dots have
# no MMA instruction and compile to FMA loops that spill (sm90 report); 16-bit operands ignore the setting.
_TF32: tl.constexpr = tl.constexpr("tf32")
_PARAM_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_FEATURE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INDEX_DTYPES = (torch.int32, torch.int64)


class ExpertParams(NamedTuple):
    """One modality expert: LayerNorm(d_m) -> Linear(d_m, d_e) -> GELU -> Linear(d_e, d_h)."""

    ln_weight: torch.Tensor  # [d_m]
    ln_bias: torch.Tensor  # [d_m]
    w1: torch.Tensor  # [d_e, d_m]
    b1: torch.Tensor  # [d_e]
    w2: torch.Tensor  # [d_h, d_e]
    b2: torch.Tensor  # [d_h]

    @classmethod
    def from_module(cls, expert) -> ExpertParams:
        """From a ``speeder_rt.model.mome.ModalityExpert`` (its parameters themselves, so gradients reach it)."""
        return cls(expert.norm.weight, expert.norm.bias, expert.fc1.weight, expert.fc1.bias, expert.fc2.weight,
                   expert.fc2.bias)


def mome_parameters(mome) -> tuple[list[ExpertParams], torch.Tensor, torch.Tensor]:
    """(experts, gate_w, gate_b) of a ``MixtureOfModalityExperts``, in its modality order."""
    return [ExpertParams.from_module(mome.experts[m]) for m in mome.modalities], mome.gate.weight, mome.gate.bias


# --------------------------------------------------------------------------------------------------------------
# Configs. The fixed block sizes of the backward kernels size their partial-sum buffers (one slot per tile), so
# only the inner-loop tile, warps and stages are tuned there. sm90 lists (python -m speeder_rt.tools.sm90_report):
# row tiles of at least 64, since one wgmma covers 64 rows per warp group of 4 warps (32-row tiles compile to
# Ampere's mma.sync), K chunks of 64 (one 128-byte line of a bf16 row); the first config is the deterministic
# mode's. The interpreter gets 16-wide tiles so that the CPU tests' odd sizes (d_m 24 / 40, d_e 48, d_h 40, S 33)
# exercise every ragged tail.
# --------------------------------------------------------------------------------------------------------------
def _cfg(num_warps: int, num_stages: int, **blocks: int) -> triton.Config:
    return triton.Config(blocks, num_warps=num_warps, num_stages=num_stages)


if INTERPRET:
    _NORM_UP_CONFIGS = [_cfg(4, 1, BLOCK_S=16, BLOCK_E=16, BLOCK_K=16)]
    _DOWN_CONFIGS = [_cfg(4, 1, BLOCK_S=16, BLOCK_H=16, BLOCK_E=16)]
    _DH_CONFIGS = [_cfg(4, 1, BLOCK_H=16)]
    _DZ_CONFIGS = [_cfg(4, 1, BLOCK_E=16)]
    _BWD_BLOCK_S, _BWD_BLOCK_E, _BWD_BLOCK_K = 16, 16, 16
else:
    _NORM_UP_CONFIGS = [
        _cfg(8, 3, BLOCK_S=64, BLOCK_E=128, BLOCK_K=64),
        _cfg(4, 3, BLOCK_S=64, BLOCK_E=64, BLOCK_K=64),
        _cfg(8, 3, BLOCK_S=128, BLOCK_E=64, BLOCK_K=64),
    ]
    _DOWN_CONFIGS = [
        _cfg(8, 3, BLOCK_S=64, BLOCK_H=128, BLOCK_E=64),
        _cfg(4, 3, BLOCK_S=64, BLOCK_H=64, BLOCK_E=64),
        _cfg(4, 4, BLOCK_S=64, BLOCK_H=64, BLOCK_E=64),
        _cfg(8, 3, BLOCK_S=128, BLOCK_H=64, BLOCK_E=64),
    ]
    _DH_CONFIGS = [_cfg(4, 3, BLOCK_H=64), _cfg(4, 4, BLOCK_H=64), _cfg(4, 3, BLOCK_H=128)]
    _DZ_CONFIGS = [_cfg(4, 3, BLOCK_E=64), _cfg(4, 3, BLOCK_E=128), _cfg(4, 4, BLOCK_E=64)]
    _BWD_BLOCK_S, _BWD_BLOCK_E, _BWD_BLOCK_K = 64, 64, 64

_DIM_KEY = ["S_BUCKET", "D_E", "D_H", "NUM_MOD", "D0", "D1", "D2", "D3"]


# --------------------------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------------------------
@triton.jit
def _gelu_fp32(a):
    return 0.5 * a * (1.0 + tl.erf(a * _SQRT1_2))


@triton.jit
def _column(x, offs_j, j: tl.constexpr):
    """Column j of a [BLOCK_S, M_PAD] tile as a [BLOCK_S] vector."""
    return tl.sum(tl.where(offs_j[None, :] == j, x, 0.0), 1)


@triton.jit
def _row_activity(IDS, ACTIVE, stride_an, offs_s, S, m):
    """(row in range, u_m) for the rows offs_s: padding ids (< 0) are inactive and never index ACTIVE."""
    row_in = offs_s < S
    ids = tl.load(IDS + offs_s, mask=row_in, other=-1)
    act = tl.load(ACTIVE + ids * stride_an + m, mask=ids >= 0, other=0) != 0
    return row_in, ids, act


@triton.jit
def _load_features(F, stride_f, ids, act, offs_k, D: tl.constexpr, P_TY: tl.constexpr):
    """Feature chunk [BLOCK_S, BLOCK_K] rounded to the parameter dtype, in fp32; 0 for inactive rows / tail columns."""
    f = tl.load(F + ids[:, None] * stride_f + offs_k[None, :], mask=act[:, None] & (offs_k < D)[None, :], other=0.0)
    return f.to(P_TY).to(tl.float32)


# --------------------------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------------------------
@triton.jit
def _norm_up_modality(
    pid_s, pid_e, m: tl.constexpr,
    IDS, ACTIVE, stride_an, F, stride_f, LNW, LNB, W1, stride_w1, B1, GW, stride_gw,
    A, H, Z, stride_z, LOGIT_PART, STATS,
    S, D_E, col_off, eps,
    D: tl.constexpr, NUM_MOD: tl.constexpr, STORE_A: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, M_PAD: tl.constexpr,
):
    """LayerNorm + up-projection of modality m for one BLOCK_S x BLOCK_E tile (d_e tile 0 also: z, stats, logits)."""
    P_TY = W1.dtype.element_ty
    offs_s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    rows = offs_s.to(tl.int64)  # row offsets in 64 bits: [S, ...] buffers may pass 2^31 elements
    row_in, ids, act = _row_activity(IDS, ACTIVE, stride_an, offs_s, S, m)

    # Pass 1 and 2: mean and the centred (exact two-pass) biased variance, in fp32.
    total = tl.zeros([BLOCK_S], dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        total += tl.sum(_load_features(F, stride_f, ids, act, offs_k, D, P_TY), 1)
    mean = total / D
    sq = tl.zeros([BLOCK_S], dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        f = _load_features(F, stride_f, ids, act, offs_k, D, P_TY)
        xc = tl.where((offs_k < D)[None, :], f - mean[:, None], 0.0)
        sq += tl.sum(xc * xc, 1)
    rstd = 1.0 / tl.sqrt(sq / D + eps)

    # Pass 3: normalise a chunk, feed it to the W1 tile (and, on d_e tile 0, to z and the gate logits).
    offs_e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    e_in = offs_e < D_E
    offs_j = tl.arange(0, M_PAD)
    acc = tl.zeros([BLOCK_S, BLOCK_E], dtype=tl.float32)
    logits = tl.zeros([BLOCK_S, M_PAD], dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_in = offs_k < D
        f = _load_features(F, stride_f, ids, act, offs_k, D, P_TY)
        gamma = tl.load(LNW + offs_k, mask=k_in, other=0.0).to(tl.float32)
        beta = tl.load(LNB + offs_k, mask=k_in, other=0.0).to(tl.float32)
        z = (f - mean[:, None]) * rstd[:, None] * gamma[None, :] + beta[None, :]
        z = tl.where(act[:, None] & k_in[None, :], z, 0.0).to(P_TY)
        w1 = tl.load(W1 + offs_e[:, None] * stride_w1 + offs_k[None, :], mask=e_in[:, None] & k_in[None, :],
                     other=0.0)
        acc = tl.dot(z, tl.trans(w1), acc, input_precision=_TF32)
        if pid_e == 0:
            tl.store(Z + rows[:, None] * stride_z + col_off + offs_k[None, :], z,
                     mask=row_in[:, None] & k_in[None, :])
            gw = tl.load(GW + offs_j[None, :] * stride_gw + col_off + offs_k[:, None],
                         mask=k_in[:, None] & (offs_j < NUM_MOD)[None, :], other=0.0)
            logits = tl.dot(z, gw, logits, input_precision=_TF32)

    a = acc + tl.load(B1 + offs_e, mask=e_in, other=0.0).to(tl.float32)[None, :]
    tile = (m * S + rows[:, None]) * D_E + offs_e[None, :]
    tile_mask = row_in[:, None] & e_in[None, :]
    tl.store(H + tile, _gelu_fp32(a).to(H.dtype.element_ty), mask=tile_mask)
    if STORE_A:
        tl.store(A + tile, a, mask=tile_mask)
    if pid_e == 0:
        tl.store(LOGIT_PART + (m * S + rows[:, None]) * M_PAD + offs_j[None, :], logits, mask=row_in[:, None])
        tl.store(STATS + m * S + rows, mean, mask=row_in)
        tl.store(STATS + (NUM_MOD + m) * S + rows, rstd, mask=row_in)


@triton.autotune(configs=_NORM_UP_CONFIGS, key=_DIM_KEY)
@triton.jit
def _fwd_norm_up_kernel(
    IDS, ACTIVE, stride_an, GW, stride_gw,
    F0, F1, F2, F3, stride_f0, stride_f1, stride_f2, stride_f3,
    LNW0, LNW1, LNW2, LNW3, LNB0, LNB1, LNB2, LNB3,
    W1_0, W1_1, W1_2, W1_3, stride_w1_0, stride_w1_1, stride_w1_2, stride_w1_3, B1_0, B1_1, B1_2, B1_3,
    A, H, Z, stride_z, LOGIT_PART, STATS,
    S, S_BUCKET, D_E, D_H, eps,
    D0: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr, D3: tl.constexpr,
    NUM_MOD: tl.constexpr, STORE_A: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, M_PAD: tl.constexpr,
):
    """Grid (row blocks, d_e tiles, M): program (i, j, m) runs modality m's code path (one per modality, unrolled
    because the feature widths are compile-time constants)."""
    pid_s = tl.program_id(0)
    pid_e = tl.program_id(1)
    pid_m = tl.program_id(2)
    if pid_m == 0:
        _norm_up_modality(pid_s, pid_e, 0, IDS, ACTIVE, stride_an, F0, stride_f0, LNW0, LNB0, W1_0, stride_w1_0,
                          B1_0, GW, stride_gw, A, H, Z, stride_z, LOGIT_PART, STATS, S, D_E, 0, eps,
                          D0, NUM_MOD, STORE_A, BLOCK_S, BLOCK_E, BLOCK_K, M_PAD)
    if NUM_MOD > 1:
        if pid_m == 1:
            _norm_up_modality(pid_s, pid_e, 1, IDS, ACTIVE, stride_an, F1, stride_f1, LNW1, LNB1, W1_1, stride_w1_1,
                              B1_1, GW, stride_gw, A, H, Z, stride_z, LOGIT_PART, STATS, S, D_E, D0, eps,
                              D1, NUM_MOD, STORE_A, BLOCK_S, BLOCK_E, BLOCK_K, M_PAD)
    if NUM_MOD > 2:
        if pid_m == 2:
            _norm_up_modality(pid_s, pid_e, 2, IDS, ACTIVE, stride_an, F2, stride_f2, LNW2, LNB2, W1_2, stride_w1_2,
                              B1_2, GW, stride_gw, A, H, Z, stride_z, LOGIT_PART, STATS, S, D_E, D0 + D1, eps,
                              D2, NUM_MOD, STORE_A, BLOCK_S, BLOCK_E, BLOCK_K, M_PAD)
    if NUM_MOD > 3:
        if pid_m == 3:
            _norm_up_modality(pid_s, pid_e, 3, IDS, ACTIVE, stride_an, F3, stride_f3, LNW3, LNB3, W1_3, stride_w1_3,
                              B1_3, GW, stride_gw, A, H, Z, stride_z, LOGIT_PART, STATS, S, D_E, D0 + D1 + D2, eps,
                              D3, NUM_MOD, STORE_A, BLOCK_S, BLOCK_E, BLOCK_K, M_PAD)


@triton.jit
def _down_modality(
    out_acc, g, act, offs_s, row_in, offs_h, h_in, m: tl.constexpr,
    H, W2, stride_w2, B2, S, D_E,
    BLOCK_S: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """out_acc += where(u_m, g_m * (H_m W2_m^T + b2_m), 0) on one BLOCK_S x BLOCK_H tile."""
    live = row_in & act
    h_rows = H + (m * S + offs_s.to(tl.int64)) * D_E
    x = tl.zeros([BLOCK_S, BLOCK_H], dtype=tl.float32)
    for e0 in range(0, D_E, BLOCK_E):
        offs_e = e0 + tl.arange(0, BLOCK_E)
        e_in = offs_e < D_E
        h = tl.load(h_rows[:, None] + offs_e[None, :], mask=live[:, None] & e_in[None, :], other=0.0)
        w2 = tl.load(W2 + offs_h[:, None] * stride_w2 + offs_e[None, :], mask=h_in[:, None] & e_in[None, :],
                     other=0.0)
        x = tl.dot(h, tl.trans(w2), x, input_precision=_TF32)
    x = x + tl.load(B2 + offs_h, mask=h_in, other=0.0).to(tl.float32)[None, :]
    return out_acc + tl.where(live[:, None], g[:, None] * x, 0.0)


@triton.autotune(configs=_DOWN_CONFIGS, key=_DIM_KEY)
@triton.jit
def _fwd_down_mix_kernel(
    IDS, ACTIVE, stride_an, LOGIT_PART, GB, H,
    W2_0, W2_1, W2_2, W2_3, stride_w2_0, stride_w2_1, stride_w2_2, stride_w2_3, B2_0, B2_1, B2_2, B2_3,
    EXTRA, stride_x, EXTRA_IDX, OUT, stride_o, GATES,
    S, S_BUCKET, D_E, D_H,
    D0: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr, D3: tl.constexpr,
    NUM_MOD: tl.constexpr, HAS_EXTRA: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_E: tl.constexpr, M_PAD: tl.constexpr,
):
    """Grid (row blocks, d_h tiles): gate softmax, the M down-projections and the mixture of one token tile.

    g = softmax(where(u, sum_m logit_part_m + b_g, -inf)), zero for rows with no active modality (stored by the
    programs of d_h tile 0 for the backward).
    """
    pid_s = tl.program_id(0)
    pid_h = tl.program_id(1)
    offs_s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    rows = offs_s.to(tl.int64)
    row_in = offs_s < S
    ids = tl.load(IDS + offs_s, mask=row_in, other=-1)
    valid = ids >= 0
    offs_j = tl.arange(0, M_PAD)
    j_in = offs_j < NUM_MOD
    act = tl.load(ACTIVE + ids[:, None] * stride_an + offs_j[None, :], mask=valid[:, None] & j_in[None, :],
                  other=0) != 0

    logits = tl.zeros([BLOCK_S, M_PAD], dtype=tl.float32)
    for m in tl.static_range(NUM_MOD):
        logits += tl.load(LOGIT_PART + (m * S + rows[:, None]) * M_PAD + offs_j[None, :], mask=row_in[:, None],
                          other=0.0)
    logits += tl.load(GB + offs_j, mask=j_in, other=0.0).to(tl.float32)[None, :]
    logits = tl.where(act, logits, float("-inf"))
    row_max = tl.max(logits, 1)
    row_max = tl.where(row_max == float("-inf"), 0.0, row_max)
    p = tl.exp(logits - row_max[:, None])  # exp(-inf) = 0 for inactive modalities
    denom = tl.sum(p, 1)
    g = p / tl.where(denom > 0.0, denom, 1.0)[:, None]
    if pid_h == 0:
        tl.store(GATES + rows[:, None] * NUM_MOD + offs_j[None, :], g, mask=row_in[:, None] & j_in[None, :])

    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    h_in = offs_h < D_H
    out = tl.zeros([BLOCK_S, BLOCK_H], dtype=tl.float32)
    out = _down_modality(out, _column(g, offs_j, 0), _column(act.to(tl.float32), offs_j, 0) != 0, offs_s, row_in,
                         offs_h, h_in, 0, H, W2_0, stride_w2_0, B2_0, S, D_E, BLOCK_S, BLOCK_H, BLOCK_E)
    if NUM_MOD > 1:
        out = _down_modality(out, _column(g, offs_j, 1), _column(act.to(tl.float32), offs_j, 1) != 0, offs_s,
                             row_in, offs_h, h_in, 1, H, W2_1, stride_w2_1, B2_1, S, D_E, BLOCK_S, BLOCK_H, BLOCK_E)
    if NUM_MOD > 2:
        out = _down_modality(out, _column(g, offs_j, 2), _column(act.to(tl.float32), offs_j, 2) != 0, offs_s,
                             row_in, offs_h, h_in, 2, H, W2_2, stride_w2_2, B2_2, S, D_E, BLOCK_S, BLOCK_H, BLOCK_E)
    if NUM_MOD > 3:
        out = _down_modality(out, _column(g, offs_j, 3), _column(act.to(tl.float32), offs_j, 3) != 0, offs_s,
                             row_in, offs_h, h_in, 3, H, W2_3, stride_w2_3, B2_3, S, D_E, BLOCK_S, BLOCK_H, BLOCK_E)
    if HAS_EXTRA:
        extra_idx = tl.load(EXTRA_IDX + offs_s, mask=row_in, other=-1)
        use = valid & (extra_idx >= 0)
        extra = tl.load(EXTRA + extra_idx[:, None].to(tl.int64) * stride_x + offs_h[None, :],
                        mask=use[:, None] & h_in[None, :], other=0.0)
        out += extra.to(tl.float32)
    tl.store(OUT + rows[:, None] * stride_o + offs_h[None, :], out.to(OUT.dtype.element_ty),
             mask=row_in[:, None] & h_in[None, :])


# --------------------------------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------------------------------
@triton.jit
def _dh_modality(
    pid_s, pid_e, m: tl.constexpr,
    DT, stride_dt, A, GATES, W2, stride_w2, B2, DA, P, DG_PART, DB1_PART, DB2_PART,
    S, D_E, D_H,
    NUM_MOD: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """One BLOCK_S x BLOCK_E tile of modality m: G = dT W2_m, da = g G GELU'(a), P = g GELU(a) and the partials
    dg (sum over the tile's columns of G GELU(a), plus dT . b2 on tile 0), db1 (column sums of da) and, on d_e
    tile 0, db2 (column sums of g dT). Rows with g_m = 0 (inactive, padding) skip their loads: their da, P are 0
    and their dg is multiplied by g_m = 0 in the softmax backward."""
    offs_s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    rows = offs_s.to(tl.int64)
    row_in = offs_s < S
    g = tl.load(GATES + rows * NUM_MOD + m, mask=row_in, other=0.0)
    live = row_in & (g > 0.0)
    offs_e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    e_in = offs_e < D_E

    grad_h = tl.zeros([BLOCK_S, BLOCK_E], dtype=tl.float32)
    b2_dot = tl.zeros([BLOCK_S], dtype=tl.float32)
    for h0 in range(0, D_H, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        h_in = offs_h < D_H
        dt = tl.load(DT + rows[:, None] * stride_dt + offs_h[None, :],
                     mask=live[:, None] & h_in[None, :], other=0.0)
        w2 = tl.load(W2 + offs_h[:, None] * stride_w2 + offs_e[None, :], mask=h_in[:, None] & e_in[None, :],
                     other=0.0)
        grad_h = tl.dot(dt, w2, grad_h, input_precision=_TF32)
        if pid_e == 0:
            dt32 = dt.to(tl.float32)
            b2 = tl.load(B2 + offs_h, mask=h_in, other=0.0).to(tl.float32)
            b2_dot += tl.sum(dt32 * b2[None, :], 1)
            tl.store(DB2_PART + (pid_s * NUM_MOD + m).to(tl.int64) * D_H + offs_h, tl.sum(dt32 * g[:, None], 0),
                     mask=h_in)

    tile = (m * S + rows[:, None]) * D_E + offs_e[None, :]
    tile_mask = row_in[:, None] & e_in[None, :]
    a = tl.load(A + tile, mask=live[:, None] & e_in[None, :], other=0.0)
    cdf = 0.5 * (1.0 + tl.erf(a * _SQRT1_2))
    gelu = a * cdf
    dgelu = cdf + a * tl.exp(-0.5 * a * a) * _INV_SQRT_2PI
    da = g[:, None] * grad_h * dgelu
    tl.store(DA + tile, da.to(DA.dtype.element_ty), mask=tile_mask)
    tl.store(P + tile, (g[:, None] * gelu).to(P.dtype.element_ty), mask=tile_mask)
    tl.store(DG_PART + (pid_e * NUM_MOD + m).to(tl.int64) * S + rows, tl.sum(grad_h * gelu, 1) + b2_dot, mask=row_in)
    tl.store(DB1_PART + (pid_s * NUM_MOD + m).to(tl.int64) * D_E + offs_e, tl.sum(da, 0), mask=e_in)


@triton.autotune(configs=_DH_CONFIGS, key=_DIM_KEY)
@triton.jit
def _bwd_dh_kernel(
    DT, stride_dt, A, GATES,
    W2_0, W2_1, W2_2, W2_3, stride_w2_0, stride_w2_1, stride_w2_2, stride_w2_3, B2_0, B2_1, B2_2, B2_3,
    DA, P, DG_PART, DB1_PART, DB2_PART,
    S, S_BUCKET, D_E, D_H,
    D0: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr, D3: tl.constexpr,
    NUM_MOD: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """Grid (row blocks, d_e tiles, M)."""
    pid_s = tl.program_id(0)
    pid_e = tl.program_id(1)
    pid_m = tl.program_id(2)
    if pid_m == 0:
        _dh_modality(pid_s, pid_e, 0, DT, stride_dt, A, GATES, W2_0, stride_w2_0,
                     B2_0, DA, P, DG_PART, DB1_PART, DB2_PART,
                     S, D_E, D_H, NUM_MOD, BLOCK_S, BLOCK_E, BLOCK_H)
    if NUM_MOD > 1:
        if pid_m == 1:
            _dh_modality(pid_s, pid_e, 1, DT, stride_dt, A, GATES, W2_1, stride_w2_1,
                         B2_1, DA, P, DG_PART, DB1_PART, DB2_PART,
                         S, D_E, D_H, NUM_MOD, BLOCK_S, BLOCK_E, BLOCK_H)
    if NUM_MOD > 2:
        if pid_m == 2:
            _dh_modality(pid_s, pid_e, 2, DT, stride_dt, A, GATES, W2_2, stride_w2_2,
                         B2_2, DA, P, DG_PART, DB1_PART, DB2_PART,
                         S, D_E, D_H, NUM_MOD, BLOCK_S, BLOCK_E, BLOCK_H)
    if NUM_MOD > 3:
        if pid_m == 3:
            _dh_modality(pid_s, pid_e, 3, DT, stride_dt, A, GATES, W2_3, stride_w2_3,
                         B2_3, DA, P, DG_PART, DB1_PART, DB2_PART,
                         S, D_E, D_H, NUM_MOD, BLOCK_S, BLOCK_E, BLOCK_H)


@triton.jit
def _dz_modality(
    pid_s, pid_k, m: tl.constexpr,
    IDS, ACTIVE, stride_an, F, stride_f, W1, stride_w1, GW, stride_gw, STATS, GATES, DG_PART, DA, LN_PART, DS,
    S, D_E, num_e_tiles, sum_d, col_off,
    D: tl.constexpr, NUM_MOD: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr, M_PAD: tl.constexpr,
):
    """Softmax backward for the block's rows, then one BLOCK_S x BLOCK_K tile of dz_m and its LayerNorm partials."""
    P_TY = W1.dtype.element_ty
    offs_s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    rows = offs_s.to(tl.int64)
    row_in, ids, act = _row_activity(IDS, ACTIVE, stride_an, offs_s, S, m)

    offs_j = tl.arange(0, M_PAD)
    j_in = offs_j < NUM_MOD
    sj_mask = row_in[:, None] & j_in[None, :]
    g = tl.load(GATES + rows[:, None] * NUM_MOD + offs_j[None, :], mask=sj_mask, other=0.0)
    dg = tl.zeros([BLOCK_S, M_PAD], dtype=tl.float32)
    for t in range(num_e_tiles):
        dg += tl.load(DG_PART + (t * NUM_MOD + offs_j[None, :]).to(tl.int64) * S + rows[:, None], mask=sj_mask,
                      other=0.0)
    ds = g * (dg - tl.sum(g * dg, 1)[:, None])
    if m == 0:
        if pid_k == 0:
            tl.store(DS + rows[:, None] * NUM_MOD + offs_j[None, :], ds, mask=sj_mask)

    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    k_in = offs_k < D
    live = row_in & act
    da_rows = DA + (m * S + rows) * D_E
    dz = tl.zeros([BLOCK_S, BLOCK_K], dtype=tl.float32)
    for e0 in range(0, D_E, BLOCK_E):
        offs_e = e0 + tl.arange(0, BLOCK_E)
        e_in = offs_e < D_E
        da = tl.load(da_rows[:, None] + offs_e[None, :], mask=live[:, None] & e_in[None, :], other=0.0)
        w1 = tl.load(W1 + offs_e[:, None] * stride_w1 + offs_k[None, :], mask=e_in[:, None] & k_in[None, :],
                     other=0.0)
        dz = tl.dot(da, w1, dz, input_precision=_TF32)
    gw = tl.load(GW + offs_j[:, None] * stride_gw + col_off + offs_k[None, :], mask=j_in[:, None] & k_in[None, :],
                 other=0.0).to(tl.float32)
    dz = tl.dot(ds, gw, dz, input_precision="ieee")  # the gate's share, in fp32
    dz = tl.where(live[:, None] & k_in[None, :], dz, 0.0)

    mean = tl.load(STATS + m * S + rows, mask=row_in, other=0.0)
    rstd = tl.load(STATS + (NUM_MOD + m) * S + rows, mask=row_in, other=0.0)
    xhat = (_load_features(F, stride_f, ids, act, offs_k, D, P_TY) - mean[:, None]) * rstd[:, None]
    ln_part = LN_PART + pid_s.to(tl.int64) * 2 * sum_d + col_off + offs_k
    tl.store(ln_part, tl.sum(dz * xhat, 0), mask=k_in)
    tl.store(ln_part + sum_d, tl.sum(dz, 0), mask=k_in)


@triton.autotune(configs=_DZ_CONFIGS, key=_DIM_KEY)
@triton.jit
def _bwd_dz_kernel(
    IDS, ACTIVE, stride_an, GW, stride_gw, STATS, GATES, DG_PART, DA, LN_PART, DS,
    F0, F1, F2, F3, stride_f0, stride_f1, stride_f2, stride_f3,
    W1_0, W1_1, W1_2, W1_3, stride_w1_0, stride_w1_1, stride_w1_2, stride_w1_3,
    S, S_BUCKET, D_E, D_H, num_e_tiles, sum_d,
    D0: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr, D3: tl.constexpr,
    NUM_MOD: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr, M_PAD: tl.constexpr,
):
    """Grid (row blocks, cdiv(max d_m, BLOCK_K), M); tiles beyond modality m's width d_m do nothing."""
    pid_s = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    k0 = pid_k * BLOCK_K
    if pid_m == 0:
        if k0 < D0:
            _dz_modality(pid_s, pid_k, 0, IDS, ACTIVE, stride_an, F0, stride_f0, W1_0, stride_w1_0,
                         GW, stride_gw, STATS, GATES, DG_PART, DA, LN_PART, DS, S, D_E, num_e_tiles, sum_d, 0,
                         D0, NUM_MOD, BLOCK_S, BLOCK_K, BLOCK_E, M_PAD)
    if NUM_MOD > 1:
        if pid_m == 1:
            if k0 < D1:
                _dz_modality(pid_s, pid_k, 1, IDS, ACTIVE, stride_an, F1, stride_f1, W1_1, stride_w1_1,
                             GW, stride_gw, STATS, GATES, DG_PART, DA, LN_PART, DS, S, D_E, num_e_tiles, sum_d, D0,
                             D1, NUM_MOD, BLOCK_S, BLOCK_K, BLOCK_E, M_PAD)
    if NUM_MOD > 2:
        if pid_m == 2:
            if k0 < D2:
                _dz_modality(pid_s, pid_k, 2, IDS, ACTIVE, stride_an, F2, stride_f2, W1_2, stride_w1_2,
                             GW, stride_gw, STATS, GATES, DG_PART, DA, LN_PART, DS, S, D_E, num_e_tiles, sum_d, D0 + D1,
                             D2, NUM_MOD, BLOCK_S, BLOCK_K, BLOCK_E, M_PAD)
    if NUM_MOD > 3:
        if pid_m == 3:
            if k0 < D3:
                _dz_modality(pid_s, pid_k, 3, IDS, ACTIVE, stride_an, F3, stride_f3, W1_3, stride_w1_3,
                             GW, stride_gw, STATS,
                             GATES, DG_PART, DA, LN_PART, DS, S, D_E, num_e_tiles, sum_d, D0 + D1 + D2,
                             D3, NUM_MOD, BLOCK_S, BLOCK_K, BLOCK_E, M_PAD)


# --------------------------------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------------------------------
def _validate(
    ids: torch.Tensor,
    features: Sequence[torch.Tensor],
    active: torch.Tensor,
    experts: Sequence[ExpertParams],
    gate_w: torch.Tensor,
    gate_b: torch.Tensor,
    extra_table: torch.Tensor | None,
    extra_idx: torch.Tensor | None,
) -> None:
    """Raise ValueError naming the offending argument and its shape; nothing has been launched yet."""
    if not isinstance(features, (list, tuple)) or not isinstance(experts, (list, tuple)):
        raise ValueError("features and experts must be sequences (one entry per modality)")
    num_mod = len(features)
    if not 1 <= num_mod <= MAX_MODALITIES:
        raise ValueError(f"features has {num_mod} modalities; supported: 1..{MAX_MODALITIES}")
    if len(experts) != num_mod:
        raise ValueError(f"experts has {len(experts)} entries but features has {num_mod} modalities")
    named: dict[str, torch.Tensor] = {"ids": ids, "active": active, "gate_w": gate_w, "gate_b": gate_b}
    for m, (f, e) in enumerate(zip(features, experts)):
        named[f"features[{m}]"] = f
        if not isinstance(e, tuple) or len(e) != len(ExpertParams._fields):
            raise ValueError(f"experts[{m}] must be an ExpertParams {ExpertParams._fields}, got {type(e).__name__}")
        for field, t in zip(ExpertParams._fields, e):
            named[f"experts[{m}].{field}"] = t
    if extra_table is not None:
        named["extra_table"] = extra_table
    if extra_idx is not None:
        named["extra_idx"] = extra_idx
    check_tensors_on_one_device(named, "ids")
    if ids.dim() != 1 or ids.dtype != torch.int64:
        raise ValueError(f"ids must be a 1-D int64 tensor [S], got {ids.dtype} of shape {shape(ids)}")

    num_items = None
    for m, f in enumerate(features):
        if f.dim() != 2:
            raise ValueError(f"features[{m}] must have shape [N, d_m], got shape {shape(f)}")
        if f.dtype not in _FEATURE_DTYPES:
            raise ValueError(f"features[{m}] has unsupported dtype {f.dtype} (shape {shape(f)}); "
                             f"supported: {_FEATURE_DTYPES}")
        if num_items is None:
            num_items = f.shape[0]
        elif f.shape[0] != num_items:
            raise ValueError(f"features[{m}] has shape {shape(f)} but features[0] has {num_items} rows")
    if active.dtype != torch.bool or tuple(active.shape) != (num_items, num_mod):
        raise ValueError(f"active must be a bool tensor of shape [N, M] = {[num_items, num_mod]}, got {active.dtype} "
                         f"of shape {shape(active)}")

    dtype = experts[0].w1.dtype
    if dtype not in _PARAM_DTYPES:
        raise ValueError(f"experts[0].w1 has unsupported dtype {dtype} (shape {shape(experts[0].w1)}); "
                         f"supported: {_PARAM_DTYPES}")
    if experts[0].w1.dim() != 2 or experts[0].w2.dim() != 2:
        raise ValueError(f"experts[0].w1 / w2 must be 2-D, got shapes {shape(experts[0].w1)} and "
                         f"{shape(experts[0].w2)}")
    d_e, d_h = experts[0].w1.shape[0], experts[0].w2.shape[0]
    if min(d_e, d_h) < 1:
        raise ValueError(f"d_e and d_h must be positive: experts[0].w1 {shape(experts[0].w1)}, "
                         f"w2 {shape(experts[0].w2)}")
    for m, (f, e) in enumerate(zip(features, experts)):
        d_m = f.shape[1]
        expected = {"ln_weight": (d_m,), "ln_bias": (d_m,), "w1": (d_e, d_m), "b1": (d_e,), "w2": (d_h, d_e),
                    "b2": (d_h,)}
        if d_m < 1:
            raise ValueError(f"features[{m}] has shape {shape(f)}: d_m must be positive")
        for field, t in zip(ExpertParams._fields, e):
            if tuple(t.shape) != expected[field]:
                raise ValueError(f"experts[{m}].{field} must have shape {list(expected[field])} (features[{m}] has "
                                 f"d_m={d_m}, d_e={d_e}, d_h={d_h}), got shape {shape(t)}")
            if t.dtype != dtype:
                raise ValueError(f"experts[{m}].{field} has dtype {t.dtype} (shape {shape(t)}), experts[0].w1 "
                                 f"has {dtype}: all parameters must share one dtype")
    sum_d = sum(f.shape[1] for f in features)
    for name, t, want in (("gate_w", gate_w, (num_mod, sum_d)), ("gate_b", gate_b, (num_mod,))):
        if tuple(t.shape) != want:
            raise ValueError(f"{name} must have shape {list(want)} (M={num_mod}, sum d_m={sum_d}), "
                             f"got shape {shape(t)}")
        if t.dtype != dtype:
            raise ValueError(f"{name} has dtype {t.dtype} (shape {shape(t)}), the experts have {dtype}")

    if (extra_table is None) != (extra_idx is None):
        given = "extra_idx" if extra_table is None else "extra_table"
        missing = "extra_table" if extra_table is None else "extra_idx"
        given_shape = shape(extra_idx if extra_table is None else extra_table)
        raise ValueError(f"{given} (shape {given_shape}) was given without {missing}")
    if extra_table is not None:
        if extra_table.dim() != 2 or extra_table.shape[1] != d_h:
            raise ValueError(f"extra_table must have shape [R, d_h={d_h}], got shape {shape(extra_table)}")
        if extra_table.dtype != dtype:
            raise ValueError(f"extra_table has dtype {extra_table.dtype} (shape {shape(extra_table)}), "
                             f"the experts have {dtype}")
        if extra_idx.dtype not in _INDEX_DTYPES or tuple(extra_idx.shape) != tuple(ids.shape):
            raise ValueError(f"extra_idx must be an int32 / int64 tensor of shape [S] = {shape(ids)}, got "
                             f"{extra_idx.dtype} of shape {shape(extra_idx)}")


def _validate_ranges(ids: torch.Tensor, num_items: int, extra_idx: torch.Tensor | None, num_extra: int) -> None:
    """Index ranges, checked on the host with one synchronisation."""
    if ids.numel() == 0:
        return
    checks = [ids.min() < -1, ids.max() >= num_items]
    if extra_idx is not None:
        checks += [extra_idx.min() < -1, extra_idx.max() >= num_extra]
    bad = torch.stack(checks).tolist()
    if bad[0] or bad[1]:
        raise ValueError(f"ids (shape {shape(ids)}) must be in -1..{num_items - 1} (-1 = padding)")
    if extra_idx is not None and (bad[2] or bad[3]):
        raise ValueError(f"extra_idx (shape {shape(extra_idx)}) must be in -1..{num_extra - 1} (-1 = none)")


def _alloc(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if DEBUG_POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _pad4(items: Sequence, fill):
    items = list(items)
    return items + [fill] * (MAX_MODALITIES - len(items))


def _unpack(features: list[torch.Tensor], params: list[torch.Tensor]):
    """(features with unit last strides, ExpertParams per modality, d_m per modality, d_e, d_h)."""
    experts = [ExpertParams(*params[6 * m: 6 * m + 6]) for m in range(len(features))]
    features = [unit_last_stride(f) for f in features]
    return features, experts, [f.shape[1] for f in features], experts[0].w1.shape[0], experts[0].w2.shape[0]


def _projection_forward(
    ids: torch.Tensor, features: list[torch.Tensor], active: torch.Tensor, params: list[torch.Tensor],
    gate_w: torch.Tensor, gate_b: torch.Tensor, extra_table: torch.Tensor | None, extra_idx: torch.Tensor | None,
    needs_grad: bool, deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(tokens [S, d_h], z [S, sum d_m], gates fp32 [S, M], LayerNorm stats fp32 [2, M, S], pre-activations fp32
    [M, S, d_e] -- empty [0] unless ``needs_grad``); ``params``: the experts' six tensors each, flattened."""
    num_mod = len(features)
    features, experts, dims, d_e, d_h = _unpack(features, params)
    device, dtype, seq = ids.device, gate_w.dtype, ids.shape[0]
    active_u8 = active.view(torch.uint8)

    out = _alloc((seq, d_h), dtype, device)
    z = _alloc((seq, sum(dims)), dtype, device)
    gates = _alloc((seq, num_mod), torch.float32, device)
    stats = _alloc((2, num_mod, seq), torch.float32, device)
    acts = _alloc((num_mod, seq, d_e) if needs_grad else (0,), torch.float32, device)
    if seq == 0:
        return out, z, gates, stats, acts
    hidden = _alloc((num_mod, seq, d_e), dtype, device)
    logit_part = _alloc((num_mod, seq, _M_PAD), torch.float32, device)
    dim_args = dict(zip(("D0", "D1", "D2", "D3"), _pad4(dims, 0)))
    ex4 = _pad4(experts, experts[0])
    s_bucket = triton.next_power_of_2(seq)

    def grid_up(meta):
        return triton.cdiv(seq, meta["BLOCK_S"]), triton.cdiv(d_e, meta["BLOCK_E"]), num_mod

    launch(_fwd_norm_up_kernel, grid_up, (
        ids, active_u8, active_u8.stride(0), gate_w, gate_w.stride(0),
        *_pad4(features, features[0]), *_pad4([f.stride(0) for f in features], 0),
        *(e.ln_weight for e in ex4), *(e.ln_bias for e in ex4),
        *(e.w1 for e in ex4), *(e.w1.stride(0) for e in ex4), *(e.b1 for e in ex4),
        acts if needs_grad else hidden, hidden, z, z.stride(0), logit_part, stats,
        seq, s_bucket, d_e, d_h, LN_EPS,
    ), dict(**dim_args, NUM_MOD=num_mod, STORE_A=needs_grad, M_PAD=_M_PAD), _NORM_UP_CONFIGS,
        deterministic=deterministic)

    def grid_down(meta):
        return triton.cdiv(seq, meta["BLOCK_S"]), triton.cdiv(d_h, meta["BLOCK_H"])

    has_extra = extra_table is not None
    launch(_fwd_down_mix_kernel, grid_down, (
        ids, active_u8, active_u8.stride(0), logit_part, gate_b, hidden,
        *(e.w2 for e in ex4), *(e.w2.stride(0) for e in ex4), *(e.b2 for e in ex4),
        extra_table if has_extra else out, extra_table.stride(0) if has_extra else 0,
        extra_idx if has_extra else ids, out, out.stride(0), gates,
        seq, s_bucket, d_e, d_h,
    ), dict(**dim_args, NUM_MOD=num_mod, HAS_EXTRA=has_extra, M_PAD=_M_PAD), _DOWN_CONFIGS,
        deterministic=deterministic)
    return out, z, gates, stats, acts


def _projection_backward(
    grad_out: torch.Tensor, ids: torch.Tensor, features: list[torch.Tensor], active: torch.Tensor,
    params: list[torch.Tensor], gate_w: torch.Tensor, extra_table: torch.Tensor | None,
    extra_idx: torch.Tensor | None, z: torch.Tensor, gates: torch.Tensor, stats: torch.Tensor, acts: torch.Tensor,
    deterministic: bool,
) -> list[torch.Tensor]:
    """[d gate_w, d gate_b, d extra_table (an empty [0] without one), *d params] in the parameters' dtype."""
    num_mod = len(features)
    features, experts, dims, d_e, d_h = _unpack(features, params)
    device, dtype, seq = ids.device, gate_w.dtype, ids.shape[0]
    sum_d = sum(dims)
    offsets = [sum(dims[:m]) for m in range(num_mod)]
    grad_out = unit_last_stride(grad_out.to(dtype))
    active_u8 = active.view(torch.uint8)

    # The extra rows' gradient: a sorted, atomic-free accumulation (index_put with accumulate is deterministic on
    # CUDA) in fp32. Padding rows and rows without an extra row add nothing.
    d_extra = torch.zeros((0,), dtype=dtype, device=device)
    if extra_table is not None:
        use = ((extra_idx >= 0) & (ids >= 0))[:, None]
        d_extra = torch.zeros(extra_table.shape, dtype=torch.float32, device=device).index_put_(
            (extra_idx.clamp(min=0).long(),), grad_out.float() * use, accumulate=True).to(dtype)
    if seq == 0:
        return [torch.zeros_like(gate_w), torch.zeros(num_mod, dtype=dtype, device=device), d_extra,
                *(torch.zeros_like(t) for t in params)]

    dim_args = dict(zip(("D0", "D1", "D2", "D3"), _pad4(dims, 0)))
    ex4 = _pad4(experts, experts[0])
    s_bucket = triton.next_power_of_2(seq)
    n_s, n_e = triton.cdiv(seq, _BWD_BLOCK_S), triton.cdiv(d_e, _BWD_BLOCK_E)

    da = _alloc((num_mod, seq, d_e), dtype, device)
    p = _alloc((num_mod, seq, d_e), dtype, device)
    dg_part = _alloc((n_e, num_mod, seq), torch.float32, device)
    db1_part = _alloc((n_s, num_mod, d_e), torch.float32, device)
    db2_part = _alloc((n_s, num_mod, d_h), torch.float32, device)
    launch(_bwd_dh_kernel, (n_s, n_e, num_mod), (
        grad_out, grad_out.stride(0), acts, gates,
        *(e.w2 for e in ex4), *(e.w2.stride(0) for e in ex4), *(e.b2 for e in ex4),
        da, p, dg_part, db1_part, db2_part,
        seq, s_bucket, d_e, d_h,
    ), dict(**dim_args, NUM_MOD=num_mod, BLOCK_S=_BWD_BLOCK_S, BLOCK_E=_BWD_BLOCK_E), _DH_CONFIGS,
        deterministic=deterministic)

    ln_part = _alloc((n_s, 2, sum_d), torch.float32, device)
    ds = _alloc((seq, num_mod), torch.float32, device)
    launch(_bwd_dz_kernel, (n_s, triton.cdiv(max(dims), _BWD_BLOCK_K), num_mod), (
        ids, active_u8, active_u8.stride(0), gate_w, gate_w.stride(0), stats, gates, dg_part, da, ln_part, ds,
        *_pad4(features, features[0]), *_pad4([f.stride(0) for f in features], 0),
        *(e.w1 for e in ex4), *(e.w1.stride(0) for e in ex4),
        seq, s_bucket, d_e, d_h, n_e, sum_d,
    ), dict(**dim_args, NUM_MOD=num_mod, BLOCK_S=_BWD_BLOCK_S, BLOCK_K=_BWD_BLOCK_K, M_PAD=_M_PAD), _DZ_CONFIGS,
        deterministic=deterministic)

    # Reductions over the S rows: cuBLAS GEMMs for the weights, sums over the per-tile partial slots.
    ln_sums = ln_part.sum(0).to(dtype)  # [2, sum_d]
    db1 = db1_part.sum(0).to(dtype)  # [M, d_e]
    db2 = db2_part.sum(0).to(dtype)  # [M, d_h]
    grad_t = grad_out.t()
    param_grads = []
    for m in range(num_mod):
        cols = slice(offsets[m], offsets[m] + dims[m])
        param_grads += [
            ln_sums[0, cols].clone(), ln_sums[1, cols].clone(),
            torch.mm(da[m].t(), z[:, cols]), db1[m].clone(),
            torch.mm(grad_t, p[m]), db2[m].clone(),
        ]
    d_gw = torch.mm(ds.t(), z.float()).to(dtype)
    return [d_gw, ds.sum(0).to(dtype), d_extra, *param_grads]


_forward_op = register_op("item_token_projection", _projection_forward)
_backward_op = register_op("item_token_projection_backward", _projection_backward)


def _setup_context(ctx, inputs, output) -> None:
    ids, features, active, params, gate_w, gate_b, extra_table, extra_idx, needs_grad, deterministic = inputs
    _, z, gates, stats, acts = output
    ctx.num_mod, ctx.deterministic = len(features), deterministic
    ctx.save_for_backward(ids, active, gate_w, extra_table, extra_idx, z, gates, stats, acts, *features, *params)


def _backward(ctx, grad_out, *unused_grads):
    ids, active, gate_w, extra_table, extra_idx, z, gates, stats, acts, *rest = ctx.saved_tensors
    features, params = rest[:ctx.num_mod], rest[ctx.num_mod:]
    d_gw, d_gb, d_extra, *param_grads = _backward_op(grad_out, ids, features, active, params, gate_w, extra_table,
                                                     extra_idx, z, gates, stats, acts, ctx.deterministic)
    return (None, [None] * ctx.num_mod, None, param_grads, d_gw, d_gb, None if extra_table is None else d_extra, None,
            None, None)


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def item_token_projection(
    ids: torch.Tensor,
    features: Sequence[torch.Tensor],
    active: torch.Tensor,
    experts: Sequence[ExpertParams],
    gate_w: torch.Tensor,
    gate_b: torch.Tensor,
    extra_table: torch.Tensor | None = None,
    extra_idx: torch.Tensor | None = None,
    *,
    validate: bool = True,
) -> torch.Tensor:
    """One MoME token per id: ``tokens [S, d_h]`` (see the module docstring for the math and launch structure).

    Args:
        ids: int64 [S] item ids into the feature tables; -1 = padding (zero token, no gradient, no extra row).
        features: M (1..4) tensors [N, d_m] (fp32 / fp16 / bf16, any row stride); frozen, no gradient.
        active: bool [N, M], modality m of item n is available AND enabled (the caller combines the two).
        experts: M ``ExpertParams`` (ln_weight [d_m], ln_bias [d_m], w1 [d_e, d_m], b1 [d_e], w2 [d_h, d_e],
            b2 [d_h]); every parameter in one dtype (fp32 / fp16 / bf16), the output dtype.
        gate_w: [M, sum d_m], gate_b: [M] (the gate over the concatenated normalised features).
        extra_table: [R, d_h] in the parameters' dtype, rows added to the tokens (recency rows, the candidate-type
            row); needs ``extra_idx``.
        extra_idx: int32 / int64 [S], row of ``extra_table`` added to token s, -1 = none.
        validate: also check on the host (one synchronisation) that ids are in -1..N-1 and extra_idx in -1..R-1;
            out-of-range indices are otherwise read out of bounds.

    Returns:
        [S, d_h] in the parameters' dtype; differentiable w.r.t. every expert / gate parameter and extra_table
        (fp32 accumulation throughout, intermediates stored in the parameters' dtype except the fp32
        pre-activations kept for the backward).
    """
    _validate(ids, features, active, experts, gate_w, gate_b, extra_table, extra_idx)
    if validate:
        _validate_ranges(ids, features[0].shape[0], extra_idx, 0 if extra_table is None else extra_table.shape[0])
    flat = [unit_last_stride(t) for e in experts for t in e]
    gate_w, gate_b = unit_last_stride(gate_w), unit_last_stride(gate_b)
    if extra_table is not None:
        extra_table = unit_last_stride(extra_table)
        extra_idx = extra_idx.contiguous()
    ids = ids.contiguous()
    differentiable = [gate_w, gate_b, *flat] + ([extra_table] if extra_table is not None else [])
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in differentiable)
    tokens, *_ = _forward_op(ids, list(features), active.contiguous(), flat, gate_w, gate_b, extra_table, extra_idx,
                             needs_grad, deterministic_kernels())
    return tokens


def item_token_projection_reference(
    ids: torch.Tensor,
    features: Sequence[torch.Tensor],
    active: torch.Tensor,
    experts: Sequence[ExpertParams],
    gate_w: torch.Tensor,
    gate_b: torch.Tensor,
    extra_table: torch.Tensor | None = None,
    extra_idx: torch.Tensor | None = None,
    *,
    validate: bool = True,
) -> torch.Tensor:
    """Plain PyTorch: ``SpeederModel.item_tokens``'s gather, then ``speeder_rt.kernels.mome_math.mome_tokens`` (the very
    function ``MixtureOfModalityExperts.forward`` runs), computed in the parameters' dtype (fp64 parameters give the
    high-precision reference; the gate logits in at least fp32). Gradients by autograd. ``validate`` checks the
    index ranges; no other argument checks (any floating dtype, any device)."""
    if validate:
        _validate_ranges(ids, features[0].shape[0], extra_idx, 0 if extra_table is None else extra_table.shape[0])
    safe = ids.clamp(min=0)
    tokens, _ = mome_tokens([f[safe] for f in features], active[safe] & (ids >= 0)[:, None], experts, gate_w, gate_b)
    if extra_table is not None:
        use = (extra_idx >= 0) & (ids >= 0)
        tokens = torch.where(use[:, None], tokens + extra_table[extra_idx.clamp(min=0).long()], tokens)
    return tokens
