"""pytest-benchmark: one recommendation request (history + 20 candidates -> the chosen item), Speeder vs the
text-item baseline on the same backbone, dtype and batch (1, 16, 128 on CUDA; 1 and 16 on CPU).

* ``speeder``: one forward pass of ``SpeederModel`` with the precomputed item-token table (computed once, outside
  the timed region), candidate scoring and argmax -> chosen item ids. Attention backend triton on CUDA, sdpa on CPU.
* ``text_baseline``: ``TextItemBaseline.generate_tokens``: prefill of the title prompt, then greedy decoding with a
  KV cache until every row emitted a newline / EOS or ``--bench-max-new-tokens`` (an untrained model rarely emits a
  newline, so the cap decides; ``extra_info['mean_generated_tokens']`` says). Prompts are built before timing and
  the title matching of the output (CPU string work) is not timed: both favour the baseline.

Run: ``pytest benchmarks/benchmark_inference.py --benchmark-only``.
"""
from __future__ import annotations

import common
import pytest
import torch

BATCHES = pytest.mark.parametrize("batch", common.INFERENCE_BATCHES, ids=lambda b: f"b{b}")


@BATCHES
def test_speeder_request(benchmark, settings: common.Settings, history: int, batch: int) -> None:
    hist, hist_len, cand, _ = common.requests(batch, history)
    model = common.eval_model("speeder", settings)
    table = model.item_token_table()

    @torch.no_grad()
    def request() -> None:
        scores = model(hist, hist_len, cand, item_tokens=table)
        cand.gather(1, scores.argmax(1, keepdim=True))
        common.sync()

    common.run(benchmark, request, "inference", "speeder", "request", batch, history,
               prompt_tokens=common.speeder_prompt_tokens(model, history))


@BATCHES
def test_text_baseline_request(benchmark, settings: common.Settings, history: int, batch: int) -> None:
    hist, hist_len, cand, _ = common.requests(batch, history)
    model = common.eval_model("text_baseline", settings)
    prompts = model.build_prompts(hist, hist_len, cand).to(common.DEVICE)
    counts: list[torch.Tensor] = []

    def generate() -> None:
        counts.append(model.generate_tokens(prompts, settings.max_new_tokens)[1])
        common.sync()

    common.run(benchmark, generate, "inference", "text_baseline", "request", batch, history, slow=True,
               after=lambda: {"mean_generated_tokens": float(torch.cat(counts).float().mean())},
               prompt_tokens=prompts.input_ids.shape[1], max_new_tokens=settings.max_new_tokens)
