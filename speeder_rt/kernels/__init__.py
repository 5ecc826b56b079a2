"""Triton kernels of speeder_rt, each next to its plain PyTorch reference."""

from speeder_rt.kernels.position_aware_attention import (
    position_aware_attention,
    position_aware_attention_reference,
)
