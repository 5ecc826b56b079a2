"""Triton kernels, each with its plain PyTorch reference beside it (``torch.ops.speeder_triton.*``), and the plain
PyTorch definitions the model computes with and the kernels are tested against: ``prompt_layout`` (the prompt
layout and the ``assemble_inputs_embeds`` reference) and ``mome_math`` (the MoME math). ``kernels`` imports nothing
of speeder_rt above it. The kernels need Triton; ``prompt_layout``, ``mome_math`` and ``determinism`` need only
PyTorch, so the model imports them where Triton is not installed (its fused paths import the kernels when used)."""
from importlib.util import find_spec

from speeder_rt.kernels.determinism import deterministic_kernels, use_deterministic_kernels

if find_spec("triton") is not None:
    from speeder_rt.kernels.assemble_inputs_embeds import assemble_inputs_embeds, assemble_inputs_embeds_reference
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
