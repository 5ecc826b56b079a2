"""The MoME math of ``speeder_rt.model.mome`` (its docstring has the formulas) on explicit parameters, in plain
PyTorch: what ``MixtureOfModalityExperts`` computes and what the fused ``item_token_projection`` is tested against."""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

LN_EPS = 1e-5  # nn.LayerNorm's default, the experts' LayerNorm


def mome_tokens(features: Sequence[torch.Tensor], active: torch.Tensor,
                experts: Sequence[tuple[torch.Tensor, ...]], gate_w: torch.Tensor,
                gate_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The MoME math on explicit parameters: features[m] [N, d_m], active bool [N, M], experts[m] =
    (ln_weight, ln_bias, w1, b1, w2, b2) -> (tokens [N, d_h], gates [N, M]). Computed in the parameters' dtype
    with the gate softmax in at least fp32; the module above and the fused kernel's reference both call it."""
    dtype = experts[0][2].dtype
    normed, outputs = [], []
    for j, (f, (ln_weight, ln_bias, w1, b1, w2, b2)) in enumerate(zip(features, experts)):
        z = F.layer_norm(f.to(dtype), (f.shape[1],), ln_weight, ln_bias, LN_EPS)
        z = z * active[:, j : j + 1].to(z.dtype)
        normed.append(z)
        outputs.append(F.linear(F.gelu(F.linear(z, w1, b1)), w2, b2))
    logits = F.linear(torch.cat(normed, dim=-1), gate_w, gate_b)
    logits = logits.to(torch.promote_types(dtype, torch.float32)).masked_fill(~active, float("-inf"))
    gates = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # all-inactive rows -> zero gates
    stacked = torch.stack(outputs, dim=1)  # [N, M, d_h]
    # where() rather than multiply, so an inactive expert's (possibly non-finite) output cannot leak.
    stacked = torch.where(active[..., None], stacked, torch.zeros((), dtype=stacked.dtype, device=stacked.device))
    tokens = torch.einsum("nm,nmd->nd", gates.to(stacked.dtype), stacked)
    return tokens, gates
