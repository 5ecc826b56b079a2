"""pytest-benchmark: one training step of Speeder vs the text-item baseline on the same backbone, batch, dtype.

A step = forward, backward and an AdamW step over the trainable parameters (LoRA: the adapters, plus Speeder's
MoME, SPAE and head; full: everything), from the same request batch: ``--bench-train-batch`` users, each with a
``--bench-history`` item history and 20 candidates. Speeder: ``SpeederModel.loss`` (listwise CE over the
candidates, one token per item, attention backend triton on CUDA / sdpa on CPU). Baseline:
``TextItemBaseline.loss`` (teacher-forced CE on the target title + newline after a prompt of
``--bench-title-tokens``-token titles; its prompt assembly from pre-tokenized titles is part of the step).

``extra_info``: peak memory (CUDA max_memory_allocated; CPU peak RSS), prompt tokens, trainable parameters.
Run: ``pytest benchmarks/benchmark_training.py --benchmark-only``.
"""
from __future__ import annotations

import common
import pytest
import torch

CASES = [(finetune, method) for finetune in ("lora", "full") for method in ("speeder", "text_baseline")]


@pytest.mark.parametrize("finetune, method", CASES, ids=[f"{f}-{m}" for f, m in CASES])
def test_train_step(benchmark, settings: common.Settings, history: int, finetune: str, method: str) -> None:
    lora = finetune == "lora"
    batch = settings.train_batch
    hist, hist_len, cand, label = common.requests(batch, history)
    model = common.train_model(method, settings, lora)
    if method == "speeder":
        args = (hist, hist_len, cand, label)
        prompt_tokens = common.speeder_prompt_tokens(model, history)
    else:
        args = (hist, hist_len, cand, cand.gather(1, label[:, None])[:, 0])  # target item ids
        prompt_tokens = model.build_prompts(*args).input_ids.shape[1]  # prompt + target title + newline
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        model.loss(*args).backward()
        optimizer.step()
        common.sync()

    common.run(benchmark, step, "training", method, finetune, batch, history, prompt_tokens=prompt_tokens,
               trainable_params=sum(p.numel() for p in params))
