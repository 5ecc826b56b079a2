"""A tiny transformers model directory (Llama layout, word-level tokenizer) standing in for a pretrained backbone:
what ``model.backbone.pretrained`` loads, built offline in a second from the synthetic catalog's words."""
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from speeder_rt.model.prompt import TemplateConfig

SPECIAL = ["<unk>", "<pad>", "</s>"]


def write_tiny_pretrained(directory: Path, texts: list[str]) -> Path:
    """Save a 2-layer, 32-wide Llama and a tokenizer over the words of ``texts`` and Speeder's template."""
    template = TemplateConfig()
    words = sorted({w for t in [*texts, *vars(template).values()] if isinstance(t, str) for w in t.split()})
    vocab = {w: i for i, w in enumerate([*SPECIAL, *words, "\n", ".", ","])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", pad_token="<pad>", eos_token="</s>")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         eos_token_id=vocab["</s>"], pad_token_id=vocab["<pad>"], bos_token_id=None)
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
