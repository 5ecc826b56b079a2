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

from typing import cast

import torch
from torch import nn

from speeder_rt.kernels.mome_math import LN_EPS, mome_tokens


class ModalityExpert(nn.Module):
    norm: nn.LayerNorm
    fc1: nn.Linear
    fc2: nn.Linear

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
        experts = [cast(ModalityExpert, self.experts[m]) for m in self.modalities]
        params = [(e.norm.weight, e.norm.bias, e.fc1.weight, e.fc1.bias, e.fc2.weight, e.fc2.bias) for e in experts]
        return mome_tokens([features[m] for m in self.modalities], active, params, self.gate.weight, self.gate.bias)
