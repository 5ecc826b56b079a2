"""Attention backends registered with transformers' attention interface (the HF decoder stays unmodified).

SPAE's relative bias enters every layer's logits:

    logits[b, h, i, j] = scale * q_i . k_j - slope[layer, h] * log2(1 + |idx[b, i] - idx[b, j]|)

causal (j <= i), padded keys excluded, padded query rows returning zeros. The model passes
``spae_item_idx`` [B, L], ``spae_token_mask`` [B, L] and ``spae_slopes`` [layers, Hq] as forward kwargs;
transformers hands them to the registered function, which picks its layer's slopes by
``module.layer_idx``. Backends (``attn_backend``):

- ``reference``: plain PyTorch in fp32 with the bias materialised (the definition; default on CPU).
- ``sdpa``: the same bias materialised as SDPA's float ``attn_mask``.
- ``eager``: transformers' own eager attention with the bias as its additive mask.
- ``flash``: no relative bias (``relative_bias=False`` models, and the text-item baseline): the
  ``flash_attn`` package when installed, otherwise SDPA restricted to its FlashAttention backend on CUDA.
  Exact for real tokens because prompts are right-padded and attention is causal.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv
from transformers.masking_utils import AttentionMaskInterface
from transformers.models.llama.modeling_llama import eager_attention_forward

BACKENDS = ("reference", "sdpa", "eager", "flash", "triton")
_PREFIX = "speeder_"


def implementation_name(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"attn_backend must be one of {list(BACKENDS)}, got {backend!r}")
    return _PREFIX + backend


def relative_bias(item_idx: torch.Tensor, slopes: torch.Tensor) -> torch.Tensor:
    """[B, H, L, L] float32: ``-slopes[h] * log2(1 + |idx_i - idx_j|)``."""
    idx = item_idx.to(torch.float32)
    dist = torch.log2(1.0 + (idx[:, :, None] - idx[:, None, :]).abs())
    return -slopes.to(torch.float32)[None, :, None, None] * dist[:, None]


def allowed_keys(token_mask: torch.Tensor, causal: bool = True) -> torch.Tensor:
    """bool [B, 1, L, L]: key j visible to query i. A padded query sees only itself (its output is zeroed),
    so no row is empty and no softmax produces NaN."""
    length = token_mask.shape[1]
    pos = torch.arange(length, device=token_mask.device)
    allowed = token_mask[:, None, None, :].expand(-1, 1, length, -1)
    if causal:
        allowed = allowed & (pos[None, None, None, :] <= pos[None, None, :, None])
    return allowed | (~token_mask[:, None, :, None] & torch.eye(length, dtype=torch.bool, device=token_mask.device))


def additive_mask(item_idx: torch.Tensor, token_mask: torch.Tensor, slopes: torch.Tensor | None, causal: bool = True) -> torch.Tensor:
    """The float mask [B, H or 1, L, L] = bias where allowed, -inf elsewhere."""
    allowed = allowed_keys(token_mask, causal)
    bias = relative_bias(item_idx, slopes) if slopes is not None else torch.zeros(allowed.shape, device=allowed.device)
    return bias.masked_fill(~allowed, float("-inf"))


def _layer_slopes(module, kwargs) -> torch.Tensor | None:
    slopes = kwargs.get("spae_slopes")
    return None if slopes is None else slopes[module.layer_idx]


def _zero_padded_queries(out: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
    """out [B, L, H, D] (HF's output layout)."""
    return out * token_mask[:, :, None, None].to(out.dtype)


def reference_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    token_mask, item_idx = kwargs["spae_token_mask"], kwargs["spae_item_idx"]
    groups = query.shape[1] // key.shape[1]
    k, v = repeat_kv(key, groups).float(), repeat_kv(value, groups).float()
    scale = scaling if scaling is not None else 1.0 / math.sqrt(query.shape[-1])
    logits = torch.matmul(query.float(), k.transpose(-1, -2)) * scale
    logits = logits + additive_mask(item_idx, token_mask, _layer_slopes(module, kwargs))
    probs = F.dropout(torch.softmax(logits, dim=-1), p=dropout, training=module.training)
    out = torch.matmul(probs, v).to(query.dtype).transpose(1, 2)
    return _zero_padded_queries(out, token_mask), None


def sdpa_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    token_mask, item_idx = kwargs["spae_token_mask"], kwargs["spae_item_idx"]
    mask = additive_mask(item_idx, token_mask, _layer_slopes(module, kwargs)).to(query.dtype)
    groups = query.shape[1] // key.shape[1]
    out = F.scaled_dot_product_attention(query, repeat_kv(key, groups), repeat_kv(value, groups), attn_mask=mask,
                                         dropout_p=dropout if module.training else 0.0, scale=scaling)
    return _zero_padded_queries(out.transpose(1, 2), token_mask), None


def eager_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    token_mask, item_idx = kwargs["spae_token_mask"], kwargs["spae_item_idx"]
    mask = additive_mask(item_idx, token_mask, _layer_slopes(module, kwargs)).to(query.dtype)
    scale = scaling if scaling is not None else 1.0 / math.sqrt(query.shape[-1])
    out, weights = eager_attention_forward(module, query, key, value, mask, scaling=scale, dropout=dropout)
    return _zero_padded_queries(out, token_mask), weights


def flash_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    if kwargs.get("spae_slopes") is not None:
        raise ValueError("attn_backend='flash' has no relative bias; use it with relative_bias=False")
    token_mask = kwargs["spae_token_mask"]
    p = dropout if module.training else 0.0
    try:
        from flash_attn import flash_attn_func
    except ImportError:
        flash_attn_func = None
    if flash_attn_func is not None and query.is_cuda and query.dtype in (torch.float16, torch.bfloat16):
        out = flash_attn_func(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), dropout_p=p,
                              softmax_scale=scaling, causal=True)
    else:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        use_flash = query.is_cuda and query.dtype in (torch.float16, torch.bfloat16)
        backends = [SDPBackend.FLASH_ATTENTION]
        if not use_flash:
            backends += [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
        with sdpa_kernel(backends):
            out = F.scaled_dot_product_attention(query, key, value, dropout_p=p, is_causal=True, scale=scaling,
                                                 enable_gqa=True).transpose(1, 2)
    return _zero_padded_queries(out, token_mask), None


def triton_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    from speeder_rt.kernels import position_aware_attention

    if dropout and module.training:
        raise ValueError("attn_backend='triton' does not implement attention dropout; set attention_dropout=0")
    token_mask = kwargs["spae_token_mask"]
    slopes = _layer_slopes(module, kwargs)
    if slopes is None:
        slopes = torch.zeros(query.shape[1], device=query.device, dtype=torch.float32)
    out = position_aware_attention(query, key, value, kwargs["spae_item_idx"], slopes.float(), attention_mask=token_mask,
                                   causal=True, scale=scaling)
    return out.transpose(1, 2), None


def _no_mask(*args, **kwargs):
    """Our backends build their mask from the SPAE kwargs; transformers need not build one."""
    return None


_FUNCTIONS = {"reference": reference_attention, "sdpa": sdpa_attention, "eager": eager_attention,
              "flash": flash_attention, "triton": triton_attention}
for _name, _fn in _FUNCTIONS.items():
    AttentionInterface.register(_PREFIX + _name, _fn)
    AttentionMaskInterface.register(_PREFIX + _name, _no_mask)
