"""pytest-benchmark: assemble_inputs_embeds (one Triton launch) against the PyTorch reference and a plain copy.

Sweep (CUDA only): B = 128 prompts, d = 896 (Qwen2-0.5B), bf16, a 20k-item token table and a 151936-row embedding
table; layouts ``scoring`` (template 4 / 2 / 3, W = 20, K = 20: L = 50) and ``topk`` (template 9 / 0 / 10, W = 30,
K = 0: L = 50), plus B = 512 of the scoring layout. Methods:

* ``triton``: ``assemble_inputs_embeds(..., validate=False)`` (the host-side id check synchronises; it is measured
  separately as ``triton_validated``).
* ``reference``: ``assemble_inputs_embeds_reference`` (item gathers, recency / candidate adds, ``layout()`` and
  prompt.py's single gather, as ``SpeederModel.prompt`` does).
* ``copy``: ``out.copy_(src)`` of a tensor with as many bytes as ``inputs_embeds`` -- the bandwidth ceiling.

``benchmark.extra_info`` records ``gbps``: bytes moved / median time, where the kernel moves the output once
(written) plus every real row's source row and every history / candidate row's addend (read), and the copy moves
its tensor twice (read + write); for ``triton`` also ``fraction_of_copy_bandwidth`` against a copy timed in the
same test with CUDA events (target >= 0.7; reported, not asserted).

Without CUDA only a tiny CPU smoke case (the kernel under TRITON_INTERPRET=1 against the reference) runs; the sweep is
skipped with a reason. Run: ``pytest benchmarks/benchmark_assemble_inputs_embeds.py --benchmark-only``.
"""

from __future__ import annotations

import os

import pytest
import torch
from timing import cuda_median_ms

if not torch.cuda.is_available():
    # Triton runs on CPU only through its interpreter, which is chosen when the kernels are decorated (import).
    os.environ.setdefault("TRITON_INTERPRET", "1")

from speeder_rt.kernels._checks import INTERPRET
from speeder_rt.kernels.assemble_inputs_embeds import (
    assemble_inputs_embeds,
    assemble_inputs_embeds_reference,
)

D, NUM_ITEMS, VOCAB = 896, 20000, 151936
LAYOUTS = {  # name -> (B, W, K, (P, Mi, S))
    "scoring": (128, 20, 20, (4, 2, 3)),
    "topk": (128, 30, 0, (9, 0, 10)),
    "scoring_B512": (512, 20, 20, (4, 2, 3)),
}
METHODS = ("triton", "triton_validated", "reference", "copy")
WARMUP_ROUNDS, ROUNDS = 10, 50


def _inputs(batch: int, width: int, num_candidates: int, sizes, d: int, device: str, dtype: torch.dtype,
            num_items: int = NUM_ITEMS, vocab: int = VOCAB) -> dict:
    gen = torch.Generator(device=device).manual_seed(batch * 100 + width)
    history_len = torch.randint(1, width + 1, (batch,), generator=gen, device=device)
    history = torch.randint(0, num_items, (batch, width), generator=gen, device=device)
    history = history.masked_fill(torch.arange(width, device=device)[None, :] >= history_len[:, None], -1)
    return dict(
        item_table=torch.randn(num_items, d, generator=gen, device=device).to(dtype),
        history=history,
        history_len=history_len,
        candidates=torch.randint(0, num_items, (batch, num_candidates), generator=gen, device=device),
        recency=torch.randn(max(width, 50), d, generator=gen, device=device).to(dtype),
        candidate_embedding=torch.randn(d, generator=gen, device=device).to(dtype),
        template_ids=torch.randint(0, vocab, (sum(sizes) + 1,), generator=gen, device=device),
        embed_weight=torch.randn(vocab, d, generator=gen, device=device).to(dtype),
        template_sizes=sizes,
    )


def kernel_bytes(args: dict) -> int:
    """Bytes the kernel must move: the output written once, a source row read per real position, an addend row
    read per history / candidate position (ids and the item-index vectors are ~1% and left out)."""
    batch, width = args["history"].shape
    num_candidates = args["candidates"].shape[1]
    d, elem = args["item_table"].shape[1], args["item_table"].element_size()
    length = sum(args["template_sizes"]) + 1 + width + num_candidates
    real_rows = int(args["history_len"].sum()) + batch * (sum(args["template_sizes"]) + 1 + num_candidates)
    add_rows = int(args["history_len"].sum()) + batch * num_candidates
    return (batch * length + real_rows + add_rows) * d * elem


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the sweep needs a CUDA device (bf16 at real sizes)")
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("layout_name", list(LAYOUTS))
def test_assemble_sweep(benchmark, layout_name, method):
    batch, width, num_candidates, sizes = LAYOUTS[layout_name]
    args = _inputs(batch, width, num_candidates, sizes, D, "cuda", torch.bfloat16)
    length = sum(sizes) + 1 + width + num_candidates
    out_bytes = batch * length * D * 2
    copy_src = torch.randn(batch, length, D, device="cuda").to(torch.bfloat16)
    copy_dst = torch.empty_like(copy_src)

    if method == "triton":
        step = lambda: assemble_inputs_embeds(**args, validate=False)  # noqa: E731
    elif method == "triton_validated":
        step = lambda: assemble_inputs_embeds(**args, validate=True)  # noqa: E731
    elif method == "reference":
        step = lambda: assemble_inputs_embeds_reference(**args)  # noqa: E731
    elif method == "copy":
        step = lambda: copy_dst.copy_(copy_src)  # noqa: E731
    else:
        raise AssertionError(method)

    def timed():
        step()
        torch.cuda.synchronize()

    benchmark.group = f"assemble-{layout_name}"
    benchmark.pedantic(timed, rounds=ROUNDS, iterations=1, warmup_rounds=WARMUP_ROUNDS)
    moved = 2 * out_bytes if method == "copy" else kernel_bytes(args)
    benchmark.extra_info.update(method=method, batch=batch, seq_len=length, d=D, bytes_moved=moved)
    if benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["gbps"] = moved / benchmark.stats.stats.median / 1e9
    if method == "triton":
        ms = cuda_median_ms(step, WARMUP_ROUNDS, ROUNDS)
        copy_ms = cuda_median_ms(lambda: copy_dst.copy_(copy_src), WARMUP_ROUNDS, ROUNDS)
        kernel_gbps, copy_gbps = moved / ms / 1e6, 2 * out_bytes / copy_ms / 1e6
        benchmark.extra_info.update(kernel_ms=ms, copy_ms=copy_ms, kernel_gbps_events=kernel_gbps,
                                    copy_gbps_events=copy_gbps, fraction_of_copy_bandwidth=kernel_gbps / copy_gbps)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU smoke case; the CUDA sweep covers this machine")
@pytest.mark.skipif(not INTERPRET, reason="speeder_rt.kernels was imported without TRITON_INTERPRET=1")
def test_cpu_smoke(benchmark):
    args = _inputs(3, 5, 4, (2, 1, 2), 40, "cpu", torch.float32, num_items=30, vocab=50)
    got = benchmark.pedantic(assemble_inputs_embeds, kwargs=args, rounds=1, iterations=1, warmup_rounds=0)
    expected = assemble_inputs_embeds_reference(**args)
    for g, e in zip(got, expected):
        assert torch.equal(g, e)
