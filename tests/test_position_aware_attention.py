"""position_aware_attention (Triton, FA2-style) against its plain PyTorch reference.

On CPU the kernels run under TRITON_INTERPRET=1 (fp32 / fp16 only: the interpreter mishandles bf16; its dots are
exact fp32). The GPU cases (``@pytest.mark.gpu``) run the model's specialisations, the ones the sm90 report
compiles (``speeder_rt.tools.sm90_report``: D in 16..128, L in 1 / 17 / 64 / 94 / 1024, GQA 14 / 2, causal,
right padding, int32 item indices, HF's transposed [B, L, H, D] layout) in bf16 and fp32, every autotune config
forced in turn, and the deterministic mode's bitwise reproducibility.

Tolerance rule (flash-attention's tests): for the output and every gradient, the kernel's max error against an
fp64 reference is at most twice the max error of the same reference computed in the input precision, plus a small
floor for values that are ~0 in both. fp32 inputs multiply in TF32 on the GPU (10-bit mantissa, fp32
accumulation), so there "the input precision" is the fp32 reference with TF32 matmuls
(``torch.backends.cuda.matmul.allow_tf32``): the kernel may be at most twice as far from fp64 as that.
"""

from __future__ import annotations

import contextlib
import importlib
import itertools
import math
import os
import zlib
from dataclasses import dataclass

import pytest
import torch
import triton

from speeder_rt.kernels import (
    position_aware_attention,
    position_aware_attention_reference,
    use_deterministic_kernels,
)
from speeder_rt.tools.sm90_report import ATTENTION_SEQ_LENS, HEAD_DIMS, MODEL_HEADS

# The package re-exports the function under the module's name, so fetch the module itself explicitly.
paa_module = importlib.import_module("speeder_rt.kernels.position_aware_attention")

HEAD_CONFIGS = ((7, 1), (4, 2), (2, 2))  # (Hq, Hkv): GQA group sizes 7, 2, 1
PADDINGS = ("none", "left", "right", "all_pad_row", "scattered")
GRAD_NAMES = ("dq", "dk", "dv", "dslopes")

needs_triton_backend = pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
    reason="Triton needs a CUDA device or TRITON_INTERPRET=1",
)
pytestmark = needs_triton_backend


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    """Kernel outputs and workspaces start as NaN, so any element a kernel fails to write fails the test."""
    monkeypatch.setattr(paa_module, "DEBUG_POISON_OUTPUTS", True)


@dataclass(frozen=True)
class Case:
    batch: int
    q_heads: int
    kv_heads: int
    seq_len: int
    head_dim: int
    causal: bool
    padding: str
    dtype: torch.dtype
    idx_dtype: torch.dtype = torch.int64

    @property
    def id(self) -> str:
        dtype = str(self.dtype).removeprefix("torch.")
        return (
            f"B{self.batch}-H{self.q_heads}x{self.kv_heads}-L{self.seq_len}-D{self.head_dim}-"
            f"{'causal' if self.causal else 'full'}-{self.padding}-{dtype}-{str(self.idx_dtype).removeprefix('torch.')}"
        )


def _cpu_cases() -> list[Case]:
    """Every (L, causal, padding) combination once, with heads, D, dtype and index dtype rotating at different
    periods: the 40 cases contain every pair of values of any two of these seven factors."""
    cases = []
    for n, (seq_len, causal, padding) in enumerate(itertools.product((1, 7, 33, 129), (True, False), PADDINGS)):
        q_heads, kv_heads = HEAD_CONFIGS[n % 3]
        cases.append(
            Case(
                batch=2,
                q_heads=q_heads,
                kv_heads=kv_heads,
                seq_len=seq_len,
                head_dim=(16, 64)[(n // 3) % 2],
                causal=causal,
                padding=padding,
                dtype=(torch.float32, torch.float16)[(n // 2) % 2],
                idx_dtype=(torch.int64, torch.int32)[(n // 7) % 2],
            )
        )
    return cases


def _gpu_cases() -> list[Case]:
    """Every (D, L) of the sm90 report's attention workloads, bf16 and fp32, at its GQA heads; right padding (as
    prompts are padded), int32 indices."""
    q_heads, kv_heads = MODEL_HEADS
    return [
        Case(2, q_heads, kv_heads, seq_len, head_dim, True, "right", dtype, torch.int32)
        for dtype in (torch.bfloat16, torch.float32) for head_dim in HEAD_DIMS for seq_len in ATTENTION_SEQ_LENS
    ]


CPU_CASES = _cpu_cases()
GPU_CASES = _gpu_cases()


def _generator(seed_text: str, device: torch.device | str) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(zlib.crc32(seed_text.encode()))


def _make_mask(padding: str, batch: int, seq_len: int, gen: torch.Generator, device) -> torch.Tensor | None:
    if padding == "none":
        return None
    mask = torch.ones(batch, seq_len, dtype=torch.bool, device=device)
    n_pad = torch.randint(0, seq_len, (batch,), generator=gen, device=device).tolist()  # keep >= 1 real token
    for b in range(batch):
        if padding == "left" or (padding == "all_pad_row" and b % 2 == 0):
            mask[b, : n_pad[b]] = False
        elif padding == "right":
            mask[b, seq_len - n_pad[b]:] = False
        elif padding == "all_pad_row":
            mask[b] = False
        elif padding == "scattered":
            mask[b] = torch.rand(seq_len, generator=gen, device=device) > 0.35
        else:
            raise AssertionError(padding)
    return mask


def _make_inputs(case: Case, device: torch.device | str):
    """Fresh random inputs per case: normal q/k/v and dO, non-decreasing item indices with repeats (several
    tokens of one item), positive slopes."""
    gen = _generator(case.id, device)
    b, hq, hkv, seq_len, d = case.batch, case.q_heads, case.kv_heads, case.seq_len, case.head_dim

    def normal(*shape):
        return torch.randn(*shape, generator=gen, device=device, dtype=torch.float32).to(case.dtype)

    q, k, v = normal(b, hq, seq_len, d), normal(b, hkv, seq_len, d), normal(b, hkv, seq_len, d)
    grad_out = normal(b, hq, seq_len, d)
    steps = torch.randint(0, 4, (b, seq_len), generator=gen, device=device)  # 0 = same item again
    start = torch.randint(0, 1000, (b, 1), generator=gen, device=device)
    item_idx = (start + steps.cumsum(dim=1)).to(case.idx_dtype)
    slopes = 0.05 + 1.5 * torch.rand(hq, generator=gen, device=device)
    mask = _make_mask(case.padding, b, seq_len, gen, device)
    return q, k, v, item_idx, slopes, mask, grad_out


def _forward_backward(fn, q, k, v, item_idx, slopes, mask, causal, grad_out, **kwargs):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, slopes)]
    out = fn(leaves[0], leaves[1], leaves[2], item_idx, leaves[3], mask, causal, **kwargs)
    grads = torch.autograd.grad(out, leaves, grad_out.to(out.dtype))
    return out.detach(), dict(zip(GRAD_NAMES, grads))


def _max_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return (x.double() - ref.double()).abs().max().item()


def _assert_tolerance_rule(name: str, kernel, low_ref, high_ref, floor: float) -> None:
    """max|kernel - high_ref| <= 2 * max|low_ref - high_ref| + floor."""
    assert torch.isfinite(kernel).all(), f"{name}: non-finite values (unwritten poisoned elements?)"
    kernel_err, ref_err = _max_err(kernel, high_ref), _max_err(low_ref, high_ref)
    bound = 2 * ref_err + floor
    assert kernel_err <= bound, f"{name}: kernel error {kernel_err:.3e} > {bound:.3e} (reference error {ref_err:.3e})"


def _hf_layout(t: torch.Tensor) -> torch.Tensor:
    """[B, H, L, D] values as the transposed view of a contiguous [B, L, H, D] tensor (what HF's projections give)."""
    return t.transpose(1, 2).contiguous().transpose(1, 2)


def _references(case: Case, inputs) -> tuple:
    """(low-precision, fp64) reference outputs and gradients; the low one in the input dtype, or for fp32 on a GPU
    with TF32 matmuls (the kernels' fp32 dots are TF32 there)."""
    q, k, v, item_idx, slopes, mask, grad_out = inputs
    tf32 = q.is_cuda and q.dtype == torch.float32
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        low = _forward_backward(position_aware_attention_reference, q, k, v, item_idx, slopes, mask, case.causal,
                                grad_out, upcast=tf32)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    up = [t.double() for t in (q, k, v, slopes, grad_out)]
    high = _forward_backward(position_aware_attention_reference, up[0], up[1], up[2], item_idx, up[3], mask,
                             case.causal, up[4])
    return low, high


def _assert_matches(case: Case, inputs, result, references, floor: float) -> None:
    q, mask = inputs[0], inputs[5]
    out, grads = result
    (low_out, low_grads), (high_out, high_grads) = references
    assert out.dtype == q.dtype and out.shape == q.shape
    _assert_tolerance_rule("out", out, low_out, high_out, floor)
    for name in GRAD_NAMES:
        _assert_tolerance_rule(name, grads[name], low_grads[name], high_grads[name], floor)
    if mask is not None:  # padded queries: zero rows, no gradient; padded keys: no dK / dV
        query_pad = ~mask[:, None, :, None]
        assert (out.masked_select(query_pad) == 0).all()
        assert (grads["dq"].masked_select(query_pad) == 0).all()
        assert (grads["dk"].masked_select(query_pad) == 0).all()
        assert (grads["dv"].masked_select(query_pad) == 0).all()


def _kernel_result(case: Case, inputs):
    q, k, v, item_idx, slopes, mask, grad_out = inputs
    return _forward_backward(position_aware_attention, q, k, v, item_idx, slopes, mask, case.causal, grad_out)


def _check_against_reference(case: Case, device: str, floor: float) -> None:
    inputs = _make_inputs(case, device)
    _assert_matches(case, inputs, _kernel_result(case, inputs), _references(case, inputs), floor)


@pytest.mark.parametrize("case", CPU_CASES, ids=lambda c: c.id)
def test_matches_reference(case):
    # fp64 is the high-precision reference. The absolute floor covers values that are ~0 in both (e.g. dq at L=1,
    # exactly 0 in the references but fp32 rounding noise in the kernel) and fp32 summation-order noise.
    _check_against_reference(case, "cpu", floor=1e-5)


# The dK/dV kernel does not mask padded keys per tile (their rows are zeroed before the store), so the huge k/v
# planted at padded positions overflow inside those discarded rows; numpy reports that under the interpreter.
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("padding", ["left", "scattered"])
def test_padded_keys_get_no_weight(padding):
    case = Case(2, 4, 2, 33, 16, False, padding, torch.float32)
    q, k, v, item_idx, slopes, mask, grad_out = _make_inputs(case, "cpu")
    out, grads = _forward_backward(position_aware_attention, q, k, v, item_idx, slopes, mask, False, grad_out)
    key_pad = ~mask[:, None, :, None]
    k2 = torch.where(key_pad, 100.0 * torch.randn_like(k), k)
    v2 = torch.where(key_pad, 100.0 * torch.randn_like(v), v)
    out2, grads2 = _forward_backward(position_aware_attention, q, k2, v2, item_idx, slopes, mask, False, grad_out)
    assert torch.equal(out, out2)
    for name in GRAD_NAMES:
        assert torch.equal(grads[name], grads2[name]), name


def test_fully_padded_sequence_is_zero():
    """A fully padded sequence (every key masked: the empty-softmax path, l = 0) returns zeros and zero, finite
    gradients; the padded prefix of a left-padded causal sequence (whose first query sees only a padded key) too."""
    case = Case(2, 2, 2, 7, 16, True, "none", torch.float32)
    q, k, v, item_idx, slopes, _, grad_out = _make_inputs(case, "cpu")
    mask = torch.tensor([[False] * 7, [False, False, True, True, True, True, True]])
    out, grads = _forward_backward(position_aware_attention, q, k, v, item_idx, slopes, mask, True, grad_out)
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads.values())
    assert (out[0] == 0).all() and (out[1, :, :2] == 0).all() and (out[1, :, 2:] != 0).any()
    assert (grads["dq"][0] == 0).all() and (grads["dk"][0] == 0).all() and (grads["dv"][0] == 0).all()


def test_bias_is_exact_in_exp2_space():
    """With scale=0 the weights are the bias alone: softmax_j(-s * log2(1 + d_ij)) = (1 + d_ij)^(-s / ln 2),
    normalised. A missing or doubled log2(e) factor in the kernel's exp2 domain changes these weights."""
    seq_len, head_dim = 33, 16
    gen = _generator("bias-exp2", "cpu")
    q, k, v = (torch.randn(1, 2, seq_len, head_dim, generator=gen) for _ in range(3))
    item_idx = torch.randint(0, 5, (1, seq_len), generator=gen).cumsum(dim=1)
    slopes = torch.tensor([0.7, 2.5])
    out = position_aware_attention(q, k, v, item_idx, slopes, causal=True, scale=0.0)

    dist = (item_idx[0, :, None] - item_idx[0, None, :]).abs().double()
    weights = (1.0 + dist)[None] ** (-slopes.double()[:, None, None] / math.log(2.0))
    weights = weights.tril()
    expected = (weights / weights.sum(dim=-1, keepdim=True)) @ v[0].double()
    torch.testing.assert_close(out[0].double(), expected, rtol=1e-5, atol=1e-5)


def test_strided_inputs():
    """q/k/v as transposed views of [B, L, H, D] (HF layout), and a head dim that is not unit-stride."""
    case = Case(2, 4, 2, 33, 32, True, "right", torch.float32, torch.int32)
    q, k, v, item_idx, slopes, mask, grad_out = _make_inputs(case, "cpu")
    expected, expected_grads = _forward_backward(
        position_aware_attention, q, k, v, item_idx, slopes, mask, True, grad_out
    )
    q_view = q.transpose(1, 2).contiguous().transpose(1, 2)
    k_view = k.transpose(-1, -2).contiguous().transpose(-1, -2)  # stride(-1) != 1: copied by the wrapper
    v_view = v.transpose(1, 2).contiguous().transpose(1, 2)
    item_idx_view = item_idx.t().contiguous().t()
    assert not q_view.is_contiguous() and k_view.stride(-1) != 1
    out, grads = _forward_backward(
        position_aware_attention, q_view, k_view, v_view, item_idx_view, slopes, mask, True, grad_out
    )
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    for name in GRAD_NAMES:
        torch.testing.assert_close(grads[name], expected_grads[name], rtol=1e-5, atol=1e-5)


def test_unsorted_large_item_indices():
    """The bias only needs |idx_i - idx_j|: indices need not be sorted, and large int64 distances are fine."""
    case = Case(2, 2, 1, 33, 16, False, "none", torch.float32)
    q, k, v, _, slopes, _, grad_out = _make_inputs(case, "cpu")
    item_idx = torch.randint(0, 3_000_000_000, (2, 33), generator=_generator("large-idx", "cpu"))
    out, grads = _forward_backward(position_aware_attention, q, k, v, item_idx, slopes, None, False, grad_out)
    ref, ref_grads = _forward_backward(
        position_aware_attention_reference, q.double(), k.double(), v.double(), item_idx, slopes.double(), None,
        False, grad_out.double(),
    )
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    for name in GRAD_NAMES:
        torch.testing.assert_close(grads[name].double(), ref_grads[name], rtol=1e-4, atol=1e-4)


def _valid_args() -> dict:
    return dict(
        q=torch.randn(2, 4, 8, 16), k=torch.randn(2, 2, 8, 16), v=torch.randn(2, 2, 8, 16),
        item_idx=torch.arange(8).repeat(2, 1), slopes=torch.ones(4), attention_mask=torch.ones(2, 8, dtype=torch.bool),
    )


def _kv(*shape: int, dtype: torch.dtype = torch.float32) -> dict:
    return dict(k=torch.randn(*shape, dtype=dtype), v=torch.randn(*shape, dtype=dtype))


# kind -> (overrides of the valid arguments, regex the ValueError message must match)
MISUSE = {
    "heads_not_multiple": (_kv(2, 3, 8, 16), r"kv heads in k \(shape \[2, 3, 8, 16\]\)"),
    "k_batch": (_kv(1, 2, 8, 16), r"k has shape \[1, 2, 8, 16\]"),
    "k_len": (_kv(2, 2, 9, 16), r"k has shape \[2, 2, 9, 16\]"),
    "k_head_dim": (_kv(2, 2, 8, 32), r"k has shape \[2, 2, 8, 32\]"),
    "v_shape": (dict(v=torch.randn(2, 2, 9, 16)), r"k and v .* v \[2, 2, 9, 16\]"),
    "q_rank": (dict(q=torch.randn(2, 4, 8)), r"q must have shape \[B, H, L, D\], got shape \[2, 4, 8\]"),
    "head_dim_not_pow2": (dict(q=torch.randn(2, 4, 8, 24), **_kv(2, 2, 8, 24)), r"q has head dim D=24"),
    "head_dim_too_big": (dict(q=torch.randn(2, 4, 8, 256), **_kv(2, 2, 8, 256)), r"q has head dim D=256"),
    "dtype": (
        dict(q=torch.randn(2, 4, 8, 16, dtype=torch.float64), **_kv(2, 2, 8, 16, dtype=torch.float64)),
        r"q has unsupported dtype torch.float64",
    ),
    "kv_dtype_mismatch": (dict(k=torch.randn(2, 2, 8, 16).half()), r"k has dtype torch.float16"),
    "item_idx_float": (dict(item_idx=torch.zeros(2, 8)), r"item_idx must be int32 or int64.*\[2, 8\]"),
    "item_idx_shape": (dict(item_idx=torch.zeros(2, 7, dtype=torch.long)), r"item_idx must have shape.*\[2, 7\]"),
    "slopes_shape": (dict(slopes=torch.ones(2)), r"slopes must have shape \[Hq\] = \[4\], got shape \[2\]"),
    "slopes_int": (dict(slopes=torch.ones(4, dtype=torch.long)), r"slopes must be a floating-point"),
    "mask_shape": (
        dict(attention_mask=torch.ones(2, 9, dtype=torch.bool)), r"attention_mask must have shape.*\[2, 9\]"
    ),
    "mask_dtype": (dict(attention_mask=torch.ones(2, 8)), r"attention_mask must be a bool tensor"),
    "device": (dict(slopes=torch.ones(4, device="meta")), r"slopes \(shape \[4\]\) is on meta"),
}


@pytest.mark.parametrize("kind", list(MISUSE))
def test_misuse_raises_value_error(kind, monkeypatch):
    def no_launch(*args, **kwargs):
        raise AssertionError("validation must happen before any launch")

    monkeypatch.setattr(paa_module, "_forward_op", no_launch)
    overrides, pattern = MISUSE[kind]
    with pytest.raises(ValueError, match=pattern):
        position_aware_attention(**{**_valid_args(), **overrides})


# --------------------------------------------------------------------------------------------------------------
# GPU. Every case is one of the sm90 report's specialisations, so after gpu_check.sh's precompile these tests load
# compiled kernels and never wait on the compiler (tests/test_sm90_report.py checks that on CPU).
# --------------------------------------------------------------------------------------------------------------
def hf_inputs(case: Case, device: torch.device | str = "cuda"):
    """Fresh inputs with q, k, v and dO in HF's transposed [B, L, H, D] layout."""
    q, k, v, item_idx, slopes, mask, grad_out = _make_inputs(case, device)
    return _hf_layout(q), _hf_layout(k), _hf_layout(v), item_idx, slopes, mask, _hf_layout(grad_out)


# kernel -> (the module's per-head-dim config table, its pruner, the autotuner's list)
_TUNED_KERNELS = {
    "fwd": ("_FWD_BY_D", "_FWD_PRUNE", "_FWD_CONFIGS"),
    "dkdv": ("_DKDV_BY_D", "_DKDV_PRUNE", "_DKDV_CONFIGS"),
    "dq": ("_DQ_BY_D", "_DQ_PRUNE", "_DQ_CONFIGS"),
}


def kept_configs(case: Case, q: torch.Tensor) -> dict[str, list[triton.Config]]:
    """kernel -> the configs its pruner keeps for this case: what the autotuner benchmarks, in the order of the
    head dim's list (the first is the deterministic mode's fixed config)."""
    args = {"HEAD_DIM": case.head_dim, "Q": q, "L_BUCKET": triton.next_power_of_2(case.seq_len)}
    return {kernel: getattr(paa_module, prune)(getattr(paa_module, configs), args)
            for kernel, (_, prune, configs) in _TUNED_KERNELS.items()}


def _forced_rounds(case: Case, q: torch.Tensor) -> list[dict[str, triton.Config]]:
    """Rounds of one config per kernel such that every kept config of every kernel runs in some round."""
    kept = kept_configs(case, q)
    rounds = max(len(configs) for configs in kept.values())
    return [{kernel: configs[min(i, len(configs) - 1)] for kernel, configs in kept.items()} for i in range(rounds)]


@contextlib.contextmanager
def _forced(monkeypatch: pytest.MonkeyPatch, head_dim: int, configs: dict[str, triton.Config]):
    """Within the block every op call launches exactly ``configs`` (the deterministic mode launches the first config
    of the head dim's list, here the only one)."""
    with monkeypatch.context() as patch:
        for kernel, config in configs.items():
            patch.setitem(getattr(paa_module, _TUNED_KERNELS[kernel][0]), head_dim, [config])
        use_deterministic_kernels(True)
        try:
            yield
        finally:
            use_deterministic_kernels(False)


def _config_names(configs: dict[str, triton.Config]) -> str:
    return ", ".join(f"{kernel} {paa_module._key(c)}" for kernel, c in configs.items())


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: c.id)
def test_every_config_matches_reference_gpu(case, monkeypatch):
    """Every config the pruner keeps for the case, forced in turn (not only the one the autotuner happens to pick),
    against the references: the tolerance rule, zero padded rows, finite (written) outputs."""
    inputs = hf_inputs(case)
    references = _references(case, inputs)
    for configs in _forced_rounds(case, inputs[0]):
        with _forced(monkeypatch, case.head_dim, configs):
            result = _kernel_result(case, inputs)
        try:
            # The floor only matters for ~0 values (dq at L = 1).
            _assert_matches(case, inputs, result, references, floor=1e-5)
        except AssertionError as err:
            raise AssertionError(f"configs {_config_names(configs)}: {err}") from err


AUTOTUNED_CASES = [c for c in GPU_CASES if c.head_dim in (16, 128) and c.seq_len in (17, 1024)]


@pytest.mark.gpu
@pytest.mark.parametrize("case", AUTOTUNED_CASES, ids=lambda c: c.id)
def test_autotuned_matches_reference_gpu(case):
    """The autotuner's own path (benchmark the kept configs, launch the fastest), short and long prompts."""
    inputs = hf_inputs(case)
    _assert_matches(case, inputs, _kernel_result(case, inputs), _references(case, inputs), floor=1e-5)


DETERMINISM_CASES = [c for c in GPU_CASES if c.head_dim in (64, 128) and c.seq_len == 1024]


@pytest.mark.gpu
@pytest.mark.parametrize("case", DETERMINISM_CASES, ids=lambda c: c.id)
def test_deterministic_is_bitwise_reproducible_gpu(case):
    """deterministic=True: the output and every gradient are the same bits on every run, from copies of the inputs
    at other addresses too, whatever the autotuner picked before; and they are the bits of the first kept config."""
    inputs = hf_inputs(case)
    _kernel_result(case, inputs)  # autotune first: the fixed config must not depend on the tuner's state
    use_deterministic_kernels(True)
    try:
        runs = [_kernel_result(case, tuple(t if t is None else t.clone() for t in inputs)) for _ in range(3)]
    finally:
        use_deterministic_kernels(False)
    for out, grads in runs[1:]:
        assert torch.equal(out, runs[0][0])
        for name in GRAD_NAMES:
            assert torch.equal(grads[name], runs[0][1][name]), name
    with pytest.MonkeyPatch.context() as monkeypatch, _forced(monkeypatch, case.head_dim,
                                                              _forced_rounds(case, inputs[0])[0]):
        first_out, first_grads = _kernel_result(case, inputs)
    assert torch.equal(first_out, runs[0][0])
    for name in GRAD_NAMES:
        assert torch.equal(first_grads[name], runs[0][1][name]), name
