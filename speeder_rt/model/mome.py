"""MRC: the Mixture of Modality Experts that turns an item's features into ONE token.

For each modality m (item feature f_m of width d_m, availability a_m in {0, 1}, enabled flag e_m from
the MPO stage; active u_m = a_m * e_m):

    z_m = LayerNorm_m(f_m)
    x_m = W2_m GELU(W1_m z_m + b1_m) + b2_m                    (d_m -> d_e -> d_h)
    s   = W_g concat(u_1 z_1, ..., u_M z_M) + b_g               (M gate logits)
    s_m = -inf where u_m = 0;   g = softmax(s)
    token = sum_m g_m x_m                                       (exactly one token per item)

Inactive modalities are zeroed in the gate's input as well as masked in its output, so the token does
not depend in any way on the features of a missing or not-yet-enabled modality. An item with no active
modality gets the zero token.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


LN_EPS = 1e-5  # nn.LayerNorm's default, the experts' LayerNorm


class ModalityExpert(nn.Module):
    def __init__(self, d_in: int, d_expert: int, d_hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d_in, eps=LN_EPS)
        self.fc1 = nn.Linear(d_in, d_expert)
        self.fc2 = nn.Linear(d_expert, d_hidden)


class MixtureOfModalityExperts(nn.Module):
    """``modality_dims``: ordered {modality: d_m}. ``forward`` maps per-modality features to tokens."""

    def __init__(self, modality_dims: dict[str, int], d_expert: int, d_hidden: int) -> None:
        super().__init__()
        if not modality_dims:
            raise ValueError("MixtureOfModalityExperts needs at least one modality")
        self.modalities = list(modality_dims)
        self.experts = nn.ModuleDict({m: ModalityExpert(d, d_expert, d_hidden) for m, d in modality_dims.items()})
        self.gate = nn.Linear(sum(modality_dims.values()), len(modality_dims))

    def forward(self, features: dict[str, torch.Tensor], active: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """features[m]: [N, d_m]; active: bool [N, M] (available and enabled) -> (tokens [N, d_h], gates [N, M])."""
        experts = [self.experts[m] for m in self.modalities]
        params = [(e.norm.weight, e.norm.bias, e.fc1.weight, e.fc1.bias, e.fc2.weight, e.fc2.bias) for e in experts]
        return mome_tokens([features[m] for m in self.modalities], active, params, self.gate.weight, self.gate.bias)


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
