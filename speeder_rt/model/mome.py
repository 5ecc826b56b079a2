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

import torch
import torch.nn.functional as F
from torch import nn


class ModalityExpert(nn.Module):
    def __init__(self, d_in: int, d_expert: int, d_hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d_in)
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
        normed, outputs = [], []
        for j, m in enumerate(self.modalities):
            expert = self.experts[m]
            z = expert.norm(features[m].to(expert.fc1.weight.dtype))
            z = z * active[:, j : j + 1].to(z.dtype)
            normed.append(z)
            outputs.append(expert.fc2(F.gelu(expert.fc1(z))))
        logits = self.gate(torch.cat(normed, dim=-1)).float().masked_fill(~active, float("-inf"))
        gates = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # all-inactive rows -> zero gates
        stacked = torch.stack(outputs, dim=1)  # [N, M, d_h]
        # where() rather than multiply, so an inactive expert's (possibly non-finite) output cannot leak.
        stacked = torch.where(active[..., None], stacked, torch.zeros((), dtype=stacked.dtype, device=stacked.device))
        tokens = torch.einsum("nm,nmd->nd", gates.to(stacked.dtype), stacked)
        return tokens, gates
