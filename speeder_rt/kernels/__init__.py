"""Triton kernels, each with its plain PyTorch reference beside it (``torch.ops.speeder_triton.*``)."""
from speeder_rt.kernels.assemble_inputs_embeds import assemble_inputs_embeds, assemble_inputs_embeds_reference
from speeder_rt.kernels.determinism import deterministic_kernels, use_deterministic_kernels
from speeder_rt.kernels.item_token_projection import (
    ExpertParams,
    item_token_projection,
    item_token_projection_reference,
    mome_parameters,
)
from speeder_rt.kernels.position_aware_attention import (
    position_aware_attention,
    position_aware_attention_reference,
)

__all__ = [
    "ExpertParams",
    "assemble_inputs_embeds",
    "assemble_inputs_embeds_reference",
    "deterministic_kernels",
    "item_token_projection",
    "item_token_projection_reference",
    "mome_parameters",
    "position_aware_attention",
    "position_aware_attention_reference",
    "use_deterministic_kernels",
]
