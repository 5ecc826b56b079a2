"""pytest-benchmark: item_token_projection (Triton MoME) against the eager PyTorch MoME (mome.py's module).

Sweep (CUDA only): modalities text / collab / image of widths 384 / 64 / 48, d_e = 1024, d_h = 896 (Qwen2-0.5B), bf16
parameters, fp16 features of a 20k-item catalog; S rows in {480 (training: 16 prompts x 30 items), 1920, 8192
(an inference chunk of ``item_token_table``, forward only)}; ~10% padding ids, ~25% inactive (item, modality)
pairs, an extra row (recency / candidate type) on ~90% of the rows. Methods:

* ``triton``: ``item_token_projection`` (``validate=False``: the eager path does not check ids either).
* ``eager``: what ``SpeederModel.item_tokens`` + the recency / candidate adds do: gather the rows' features and
  activity, ``MixtureOfModalityExperts.forward`` on the same parameters, ``where(use, tokens + extra[idx], tokens)``.

Both get the [N, M] activity (available AND enabled) precomputed. Modes: ``fwd`` (under no_grad) and ``fwd_bwd``
(gradients of every parameter and the extra table). ``benchmark.extra_info`` records peak memory, and for the
``triton`` method ``speedup_vs_eager`` measured in the same test with CUDA events (target >= 3x on fwd_bwd at the
training shape; reported, not asserted).

Without CUDA only a tiny CPU smoke case (the kernels under TRITON_INTERPRET=1 against the reference) runs; the sweep
is skipped with a reason. Run: ``pytest benchmarks/benchmark_item_token_projection.py --benchmark-only``.
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
from speeder_rt.kernels.item_token_projection import (
    ExpertParams,
    item_token_projection,
    item_token_projection_reference,
    mome_parameters,
)
from speeder_rt.model.mome import MixtureOfModalityExperts

MODALITY_DIMS = {"text": 384, "collab": 64, "image": 48}
D_EXPERT, D_HIDDEN, NUM_ITEMS, NUM_EXTRA = 1024, 896, 20000, 51
ROWS = (480, 1920, 8192)
METHODS = ("triton", "eager")
MODES = ("fwd", "fwd_bwd")
WARMUP_ROUNDS, ROUNDS = 5, 30


def _setup(rows: int, device: str, param_dtype: torch.dtype, feature_dtype: torch.dtype, dims=MODALITY_DIMS,
           d_e=D_EXPERT, d_h=D_HIDDEN, num_items=NUM_ITEMS, num_extra=NUM_EXTRA):
    gen = torch.Generator(device=device).manual_seed(rows)
    torch.manual_seed(rows)
    mome = MixtureOfModalityExperts(dims, d_e, d_h).to(device=device, dtype=param_dtype)
    features = [torch.randn(num_items, d, generator=gen, device=device).to(feature_dtype) for d in dims.values()]
    active = torch.rand(num_items, len(dims), generator=gen, device=device) > 0.25
    ids = torch.randint(0, num_items, (rows,), generator=gen, device=device)
    ids[torch.rand(rows, generator=gen, device=device) < 0.1] = -1
    extra_table = (0.02 * torch.randn(num_extra, d_h, generator=gen, device=device)).to(param_dtype).requires_grad_()
    extra_idx = torch.randint(-1, num_extra, (rows,), generator=gen, device=device)
    return mome, features, active, ids, extra_table, extra_idx


def _eager(mome, features, active, ids, extra_table, extra_idx):
    safe = ids.clamp(min=0)
    feats = {m: f[safe] for m, f in zip(mome.modalities, features)}
    tokens, _ = mome(feats, active[safe] & (ids >= 0)[:, None])
    use = (extra_idx >= 0) & (ids >= 0)
    return torch.where(use[:, None], tokens + extra_table[extra_idx.clamp(min=0)], tokens)


def _make_forward(method: str, mome, features, active, ids, extra_table, extra_idx):
    if method == "triton":
        experts, gate_w, gate_b = mome_parameters(mome)
        return lambda: item_token_projection(ids, features, active, experts, gate_w, gate_b, extra_table, extra_idx,
                                             validate=False)
    if method == "eager":
        return lambda: _eager(mome, features, active, ids, extra_table, extra_idx)
    raise AssertionError(method)


def _make_step(forward, leaves, mode: str, grad_out: torch.Tensor):
    if mode == "fwd":
        def step():
            with torch.no_grad():
                forward()
    else:
        def step():
            torch.autograd.grad(forward(), leaves, grad_out)
    return step


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the sweep needs a CUDA device (bf16 at real sizes)")
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("rows", ROWS, ids=lambda s: f"S{s}")
def test_mome_sweep(benchmark, rows, method, mode):
    if mode == "fwd_bwd" and rows == ROWS[-1]:
        pytest.skip("the 8192-row inference chunk is forward-only")
    mome, features, active, ids, extra_table, extra_idx = _setup(rows, "cuda", torch.bfloat16, torch.float16)
    leaves = [*mome.parameters(), extra_table]
    grad_out = torch.randn(rows, D_HIDDEN, device="cuda", dtype=torch.bfloat16)
    step = _make_step(_make_forward(method, mome, features, active, ids, extra_table, extra_idx), leaves, mode,
                      grad_out)

    def timed():
        step()
        torch.cuda.synchronize()

    benchmark.group = f"mome-{mode}-S{rows}"
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    benchmark.pedantic(timed, rounds=ROUNDS, iterations=1, warmup_rounds=WARMUP_ROUNDS)
    benchmark.extra_info.update(method=method, mode=mode, rows=rows, d_expert=D_EXPERT, d_hidden=D_HIDDEN,
                                modality_dims=list(MODALITY_DIMS.values()),
                                peak_memory_gib=torch.cuda.max_memory_allocated() / 2**30)
    if method == "triton":
        eager_step = _make_step(_make_forward("eager", mome, features, active, ids, extra_table, extra_idx), leaves,
                                mode, grad_out)
        triton_ms, eager_ms = cuda_median_ms(step, WARMUP_ROUNDS, ROUNDS), cuda_median_ms(eager_step, WARMUP_ROUNDS, ROUNDS)
        benchmark.extra_info.update(triton_ms=triton_ms, eager_ms=eager_ms, speedup_vs_eager=eager_ms / triton_ms)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU smoke case; the CUDA sweep covers this machine")
@pytest.mark.skipif(not INTERPRET, reason="speeder_rt.kernels was imported without TRITON_INTERPRET=1")
def test_cpu_smoke(benchmark):
    mome, features, active, ids, extra_table, extra_idx = _setup(
        9, "cpu", torch.float32, torch.float16, dims={"text": 24, "image": 40}, d_e=48, d_h=40, num_items=30,
        num_extra=5)
    experts, gate_w, gate_b = mome_parameters(mome)
    assert isinstance(experts[0], ExpertParams)

    def forward_backward():
        out = item_token_projection(ids, features, active, experts, gate_w, gate_b, extra_table, extra_idx)
        return out, torch.autograd.grad(out.sum(), [gate_w, extra_table])

    out, grads = benchmark.pedantic(forward_backward, rounds=1, iterations=1, warmup_rounds=0)
    expected = item_token_projection_reference(ids, features, active, experts, gate_w, gate_b, extra_table, extra_idx)
    expected_grads = torch.autograd.grad(expected.sum(), [gate_w, extra_table])
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
