"""item_token_projection (Triton MoME) against its plain PyTorch reference (mome.py's ops).

On CPU the kernels run under TRITON_INTERPRET=1 (fp32 / fp16 only: the interpreter mishandles bf16); the GPU
cases (``@pytest.mark.gpu``) run the shapes the sm90 report compiles (the bench config's training batch and the
projection benchmark's, fp16 features) with bf16 and fp32 parameters, every autotune config forced in turn, and
the deterministic mode's bitwise reproducibility.

Tolerance rule: for the tokens and every gradient, the kernel's max error against an fp64 reference is at most
twice the max error of the same reference computed in the parameters' dtype, plus a small floor. fp32 parameters
multiply in TF32 on the GPU, so there the low-precision reference is the fp32 one with TF32 matmuls. The
high-precision reference sees the features rounded to the parameters' dtype, as mome.py does
(``features.to(fc1.weight.dtype)``), so it evaluates exactly the function the low-precision module defines.
"""

from __future__ import annotations

import importlib
import itertools
import os
import zlib
from dataclasses import dataclass

import pytest
import torch

from speeder_rt.kernels.determinism import use_deterministic_kernels
from speeder_rt.kernels.item_token_projection import (
    ExpertParams,
    item_token_projection,
    item_token_projection_reference,
    mome_parameters,
)
from speeder_rt.model.mome import MixtureOfModalityExperts
from speeder_rt.tools.sm90_report import PROJECTION_SHAPES

itp_module = importlib.import_module("speeder_rt.kernels.item_token_projection")

needs_triton_backend = pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
    reason="Triton needs a CUDA device or TRITON_INTERPRET=1",
)
pytestmark = needs_triton_backend

PARAM_NAMES = ExpertParams._fields


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    """Kernel outputs and workspaces start as NaN, so any element a kernel fails to write fails the test."""
    monkeypatch.setattr(itp_module, "DEBUG_POISON_OUTPUTS", True)


@dataclass(frozen=True)
class Case:
    seq: int
    dims: tuple[int, ...]
    d_e: int
    d_h: int
    feature_dtype: torch.dtype
    param_dtype: torch.dtype
    extra: bool
    num_items: int = 23

    @property
    def id(self) -> str:
        name = lambda t: str(t).removeprefix("torch.")  # noqa: E731
        dims = "x".join(map(str, self.dims))
        return (f"S{self.seq}-M{len(self.dims)}-dm{dims}-de{self.d_e}-dh{self.d_h}-f{name(self.feature_dtype)}-"
                f"p{name(self.param_dtype)}-{'extra' if self.extra else 'noextra'}")


def _cpu_cases() -> list[Case]:
    """Every (S, M) pair; feature dtype, parameter dtype and the extra table rotate so that every pair of their
    values occurs."""
    all_dims = (24, 40, 20)
    cases = []
    for n, (seq, num_mod) in enumerate(itertools.product((1, 7, 33), (1, 2, 3))):
        cases.append(Case(
            seq=seq, dims=all_dims[:num_mod], d_e=48, d_h=40,
            feature_dtype=(torch.float32, torch.float16)[n % 2],
            param_dtype=(torch.float32, torch.float16)[(n // 2) % 2],
            extra=(True, True, False)[n % 3],
        ))
    return cases


CPU_CASES = _cpu_cases()
GPU_CASES = [  # sm90_report.PROJECTION_SHAPES' bench_qwen2_0p5b and benchmark_mome, fp16 features (ItemTable's)
    Case(480, dims, d_e, d_h, torch.float16, param_dtype, extra, num_items=960)
    for name, dims, d_e, d_h, rows, extra, grad in PROJECTION_SHAPES if name in ("bench_qwen2_0p5b", "benchmark_mome")
    for param_dtype in (torch.bfloat16, torch.float32)
]


def _generator(seed_text: str, device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(zlib.crc32(seed_text.encode()))


@dataclass
class Inputs:
    ids: torch.Tensor
    features: list[torch.Tensor]
    active: torch.Tensor
    experts: list[ExpertParams]
    gate_w: torch.Tensor
    gate_b: torch.Tensor
    extra_table: torch.Tensor | None
    extra_idx: torch.Tensor | None
    grad_out: torch.Tensor


def _make_inputs(case: Case, device) -> Inputs:
    """Fresh random inputs per case: features with a non-zero mean, ~30% inactive (item, modality) pairs, item 0
    with no active modality, item 1 with all, ~15% padding ids, duplicated ids, extra_idx mixing -1 and valid rows."""
    gen = _generator(case.id, device)

    def randn(*shape, scale=1.0, shift=0.0):
        return shift + scale * torch.randn(*shape, generator=gen, device=device)

    n_items, dims, d_e, d_h, dtype = case.num_items, case.dims, case.d_e, case.d_h, case.param_dtype
    features = [randn(n_items, d, scale=1.5, shift=0.3).to(case.feature_dtype) for d in dims]
    active = torch.rand(n_items, len(dims), generator=gen, device=device) > 0.3
    active[0] = False
    active[1] = True
    ids = torch.randint(0, n_items, (case.seq,), generator=gen, device=device)
    ids[torch.rand(case.seq, generator=gen, device=device) < 0.15] = -1
    ids[0] = 1  # S = 1 cases still have a real, fully active item
    if case.seq >= 7:
        ids[1], ids[2], ids[3], ids[4] = 0, 5, 5, 5  # an all-inactive item, duplicates
        ids[6] = -1
    experts = [
        ExpertParams(randn(d, scale=0.2, shift=1.0), randn(d, scale=0.1), randn(d_e, d, scale=d ** -0.5),
                     randn(d_e, scale=0.1), randn(d_h, d_e, scale=d_e ** -0.5), randn(d_h, scale=0.1))
        for d in dims
    ]
    experts = [ExpertParams(*(t.to(dtype) for t in e)) for e in experts]
    gate_w = randn(len(dims), sum(dims), scale=sum(dims) ** -0.5).to(dtype)
    gate_b = randn(len(dims), scale=0.5).to(dtype)
    extra_table = extra_idx = None
    if case.extra:
        extra_table = randn(6, d_h, scale=0.5).to(dtype)
        extra_idx = torch.randint(-1, 6, (case.seq,), generator=gen, device=device)
    grad_out = randn(case.seq, d_h).to(dtype)
    return Inputs(ids, features, active, experts, gate_w, gate_b, extra_table, extra_idx, grad_out)


def _forward_backward(fn, inp: Inputs, dtype: torch.dtype | None = None, features=None, grad_out=None):
    """(tokens, {name: grad}) of ``fn`` with every parameter (cast to ``dtype``) a fresh leaf."""
    dtype = dtype or inp.gate_w.dtype
    leaf = lambda t: t.detach().to(dtype).clone().requires_grad_()  # noqa: E731
    experts = [ExpertParams(*(leaf(t) for t in e)) for e in inp.experts]
    gate_w, gate_b = leaf(inp.gate_w), leaf(inp.gate_b)
    extra_table = None if inp.extra_table is None else leaf(inp.extra_table)
    out = fn(inp.ids, features if features is not None else inp.features, inp.active, experts, gate_w, gate_b,
             extra_table, inp.extra_idx)
    leaves = {f"{name}[{m}]": t for m, e in enumerate(experts) for name, t in zip(PARAM_NAMES, e)}
    leaves.update(gate_w=gate_w, gate_b=gate_b)
    if extra_table is not None:
        leaves["extra_table"] = extra_table
    grad_out = inp.grad_out if grad_out is None else grad_out
    grads = torch.autograd.grad(out, list(leaves.values()), grad_out.to(out.dtype))
    return out.detach(), dict(zip(leaves, grads))


def _max_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return (x.double() - ref.double()).abs().max().item() if x.numel() else 0.0


def _assert_tolerance_rule(name: str, kernel, low_ref, high_ref, floor: float) -> None:
    """max|kernel - high_ref| <= 2 * max|low_ref - high_ref| + floor."""
    assert torch.isfinite(kernel).all(), f"{name}: non-finite values (unwritten poisoned elements?)"
    kernel_err, ref_err = _max_err(kernel, high_ref), _max_err(low_ref, high_ref)
    bound = 2 * ref_err + floor
    assert kernel_err <= bound, f"{name}: kernel error {kernel_err:.3e} > {bound:.3e} (reference error {ref_err:.3e})"


def _references(case: Case, inp: Inputs) -> tuple:
    """(low-precision, fp64) references: the low one in the parameters' dtype (with TF32 matmuls for fp32 on a GPU,
    as the kernels' fp32 dots are there)."""
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = inp.ids.is_cuda and case.param_dtype == torch.float32
    try:
        low = _forward_backward(item_token_projection_reference, inp)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    rounded = [f.to(case.param_dtype) for f in inp.features]  # what mome.py feeds its LayerNorm
    return low, _forward_backward(item_token_projection_reference, inp, torch.float64, features=rounded)


def _assert_matches(case: Case, inp: Inputs, result, references, floor: float) -> None:
    out, grads = result
    (low_out, low_grads), (high_out, high_grads) = references
    assert out.dtype == case.param_dtype and out.shape == (case.seq, case.d_h)
    assert set(grads) == set(high_grads)
    _assert_tolerance_rule("tokens", out, low_out, high_out, floor)
    for name in grads:
        assert grads[name].dtype == case.param_dtype, name
        _assert_tolerance_rule(name, grads[name], low_grads[name], high_grads[name], floor)
    pad = inp.ids < 0
    assert (out[pad] == 0).all(), "padding rows must be zero tokens"
    no_active = (~inp.active[inp.ids.clamp(min=0)]).all(1) & ~pad
    if inp.extra_idx is not None:
        no_active &= inp.extra_idx < 0
    assert (out[no_active] == 0).all(), "rows without an active modality (and no extra row) must be zero"


def _check_against_reference(case: Case, device, floor: float) -> None:
    inp = _make_inputs(case, device)
    _assert_matches(case, inp, _forward_backward(item_token_projection, inp), _references(case, inp), floor)


@pytest.mark.parametrize("case", CPU_CASES, ids=lambda c: c.id)
def test_matches_reference(case):
    # The floor covers fp32 summation-order noise on values that are ~0 in both references.
    _check_against_reference(case, "cpu", floor=1e-5)


def test_reference_is_mome_module():
    """The reference reproduces SpeederModel.item_tokens + MixtureOfModalityExperts.forward bit for bit."""
    torch.manual_seed(3)
    mome = MixtureOfModalityExperts({"text": 24, "collab": 40, "image": 20}, d_expert=48, d_hidden=40)
    for p in mome.parameters():
        torch.nn.init.normal_(p, std=0.3)
    inp = _make_inputs(Case(33, (24, 40, 20), 48, 40, torch.float32, torch.float32, False), "cpu")
    experts, gate_w, gate_b = mome_parameters(mome)
    safe = inp.ids.clamp(min=0)
    feats = {m: f[safe] for m, f in zip(mome.modalities, inp.features)}
    expected, _ = mome(feats, inp.active[safe] & (inp.ids >= 0)[:, None])
    got = item_token_projection_reference(inp.ids, inp.features, inp.active, experts, gate_w, gate_b)
    assert torch.equal(got, expected)
    kernel = item_token_projection(inp.ids, inp.features, inp.active, experts, gate_w, gate_b)
    torch.testing.assert_close(kernel, expected, rtol=1e-5, atol=1e-5)
    kernel.sum().backward()  # gradients reach the module's own parameters
    assert all(p.grad is not None for p in mome.parameters())


def test_inactive_features_change_nothing():
    """Features of inactive (item, modality) pairs -- even NaN / huge ones -- change neither the tokens nor any
    gradient, bit for bit; so do the features of items that are not in the batch."""
    case = Case(33, (24, 40, 20), 48, 40, torch.float32, torch.float32, True)
    inp = _make_inputs(case, "cpu")
    out, grads = _forward_backward(item_token_projection, inp)
    changed = []
    for m, f in enumerate(inp.features):
        noise = torch.where(torch.rand_like(f) < 0.5, torch.full_like(f, float("nan")), 1e4 * torch.randn_like(f))
        changed.append(torch.where(~inp.active[:, m:m + 1], noise, f))
    out2, grads2 = _forward_backward(item_token_projection, inp, features=changed)
    assert torch.equal(out, out2)
    for name in grads:
        assert torch.equal(grads[name], grads2[name]), name
    # sanity: an active feature does matter
    bumped = [f.clone() for f in inp.features]
    bumped[0][inp.ids[inp.active[inp.ids.clamp(min=0), 0] & (inp.ids >= 0)][0]] += 1.0
    assert not torch.equal(out, _forward_backward(item_token_projection, inp, features=bumped)[0])


def test_padding_rows_get_no_gradient():
    """The token gradient at padding rows (ids = -1, even with extra_idx >= 0 there) reaches no parameter."""
    case = Case(33, (24, 40), 48, 40, torch.float32, torch.float32, True)
    inp = _make_inputs(case, "cpu")
    pad = inp.ids < 0
    assert pad.any()
    inp.extra_idx[pad] = 2
    zeroed = inp.grad_out.masked_fill(pad[:, None], 0.0)
    _, grads = _forward_backward(item_token_projection, inp, grad_out=zeroed)
    _, grads_pad = _forward_backward(item_token_projection, inp, grad_out=inp.grad_out.masked_fill(pad[:, None], 1e3))
    for name in grads:
        assert torch.equal(grads[name], grads_pad[name]), name


def test_no_grad_path_matches():
    """Without autograd (inference: no pre-activations are stored) the tokens are the same bits."""
    case = Case(33, (24, 40, 20), 48, 40, torch.float16, torch.float32, True)
    inp = _make_inputs(case, "cpu")
    out, _ = _forward_backward(item_token_projection, inp)
    with torch.no_grad():
        out2 = item_token_projection(inp.ids, inp.features, inp.active, inp.experts, inp.gate_w, inp.gate_b,
                                     inp.extra_table, inp.extra_idx)
    assert not out2.requires_grad
    assert torch.equal(out, out2)


def test_empty_batch():
    case = Case(1, (24,), 48, 40, torch.float32, torch.float32, True)
    inp = _make_inputs(case, "cpu")
    inp.ids, inp.extra_idx, inp.grad_out = inp.ids[:0], inp.extra_idx[:0], inp.grad_out[:0]
    out, grads = _forward_backward(item_token_projection, inp)
    assert out.shape == (0, 40)
    assert all((g == 0).all() for g in grads.values())


def _valid_args() -> dict:
    inp = _make_inputs(Case(7, (24, 40), 48, 40, torch.float32, torch.float32, True), "cpu")
    return dict(ids=inp.ids, features=inp.features, active=inp.active, experts=inp.experts, gate_w=inp.gate_w,
                gate_b=inp.gate_b, extra_table=inp.extra_table, extra_idx=inp.extra_idx)


def _expert(m: int, **overrides) -> dict:
    """Overrides of experts[m]'s fields."""
    def patch(args):
        experts = list(args["experts"])
        experts[m] = experts[m]._replace(**{k: v(experts[m]) for k, v in overrides.items()})
        return dict(experts=experts)
    return patch


# kind -> (overrides of the valid arguments, or a function of them returning overrides; regex of the ValueError)
MISUSE = {
    "ids_2d": (dict(ids=torch.zeros(7, 1, dtype=torch.long)), r"ids must be a 1-D int64 tensor .*\[7, 1\]"),
    "ids_int32": (dict(ids=torch.zeros(7, dtype=torch.int32)),
                  r"ids must be a 1-D int64 tensor \[S\], got torch.int32"),
    "ids_range": (dict(ids=torch.full((7,), 23)), r"ids \(shape \[7\]\) must be in -1..22"),
    "extra_idx_range": (dict(extra_idx=torch.full((7,), 6)), r"extra_idx \(shape \[7\]\) must be in -1..5"),
    "feature_width": (lambda a: dict(features=[a["features"][0][:, :20], a["features"][1]]),
                      r"experts\[0\].ln_weight must have shape \[20\].* got shape \[24\]"),
    "w1_shape": (_expert(1, w1=lambda e: e.w1[:, :39]), r"experts\[1\].w1 must have shape \[48, 40\].*\[48, 39\]"),
    "w2_shape": (_expert(1, w2=lambda e: e.w2[:30]), r"experts\[1\].w2 must have shape \[40, 48\].*\[30, 48\]"),
    "feature_rows": (lambda a: dict(features=[a["features"][0], a["features"][1][:5]]),
                     r"features\[1\] has shape \[5, 40\] but features\[0\] has 23 rows"),
    "feature_dtype": (lambda a: dict(features=[a["features"][0].double(), a["features"][1]]),
                      r"features\[0\] has unsupported dtype torch.float64"),
    "active_shape": (lambda a: dict(active=a["active"][:, :1]), r"active must be a bool tensor of shape \[N, M\] = "
                     r"\[23, 2\], got torch.bool of shape \[23, 1\]"),
    "active_dtype": (lambda a: dict(active=a["active"].float()), r"active must be a bool tensor .*torch.float32"),
    "num_experts": (lambda a: dict(experts=a["experts"][:1]), r"experts has 1 entries but features has 2"),
    "gate_w_shape": (lambda a: dict(gate_w=a["gate_w"][:, :10]), r"gate_w must have shape \[2, 64\].*\[2, 10\]"),
    "gate_b_shape": (dict(gate_b=torch.zeros(3)), r"gate_b must have shape \[2\].*\[3\]"),
    "extra_idx_alone": (dict(extra_table=None), r"extra_idx \(shape \[7\]\) was given without extra_table"),
    "extra_table_alone": (dict(extra_idx=None), r"extra_table \(shape \[6, 40\]\) was given without extra_idx"),
    "extra_table_width": (dict(extra_table=torch.zeros(6, 41)), r"extra_table must have shape \[R, d_h=40\]"),
    "param_dtype": (lambda a: {"experts": [ExpertParams(*(t.double() for t in e)) for e in a["experts"]],
                               "gate_w": a["gate_w"].double(), "gate_b": a["gate_b"].double()},
                    r"experts\[0\].w1 has unsupported dtype torch.float64"),
    "mixed_param_dtype": (_expert(1, b2=lambda e: e.b2.half()), r"experts\[1\].b2 has dtype torch.float16"),
    "device": (dict(gate_b=torch.zeros(2, device="meta")), r"gate_b \(shape \[2\]\) is on meta"),
    "too_many_modalities": (lambda a: dict(features=a["features"] * 3, experts=a["experts"] * 3),
                            r"features has 6 modalities; supported: 1..4"),
}


@pytest.mark.parametrize("kind", list(MISUSE))
def test_misuse_raises_value_error(kind, monkeypatch):
    def no_launch(*args, **kwargs):
        raise AssertionError("validation must happen before any launch")

    monkeypatch.setattr(itp_module, "_forward_op", no_launch)
    args = _valid_args()
    overrides, pattern = MISUSE[kind]
    if callable(overrides):
        overrides = overrides(args)
    with pytest.raises(ValueError, match=pattern):
        item_token_projection(**{**args, **overrides})


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: c.id)
def test_matches_reference_gpu(case):
    _check_against_reference(case, "cuda", floor=1e-4)


_CONFIG_LISTS = ("_NORM_UP_CONFIGS", "_DOWN_CONFIGS", "_DH_CONFIGS", "_DZ_CONFIGS")


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: c.id)
def test_every_config_gpu(case, monkeypatch):
    """Every config of every kernel forced in turn (the deterministic mode launches the first of each list)."""
    inp = _make_inputs(case, "cuda")
    references = _references(case, inp)
    lists = {name: list(getattr(itp_module, name)) for name in _CONFIG_LISTS}
    use_deterministic_kernels(True)
    try:
        for i in range(max(len(configs) for configs in lists.values())):
            for name, configs in lists.items():
                monkeypatch.setattr(itp_module, name, [configs[min(i, len(configs) - 1)]])
            _assert_matches(case, inp, _forward_backward(item_token_projection, inp), references, floor=1e-4)
    finally:
        use_deterministic_kernels(False)


@pytest.mark.gpu
def test_deterministic_is_bitwise_reproducible_gpu():
    """deterministic=True: tokens and every gradient (the extra table's, with its repeated rows, included) are the
    same bits run after run."""
    case = next(c for c in GPU_CASES if c.extra and c.param_dtype == torch.bfloat16)
    inp = _make_inputs(case, "cuda")
    use_deterministic_kernels(True)
    try:
        runs = [_forward_backward(item_token_projection, inp) for _ in range(3)]
    finally:
        use_deterministic_kernels(False)
    for out, grads in runs[1:]:
        assert torch.equal(out, runs[0][0])
        for name in grads:
            assert torch.equal(grads[name], runs[0][1][name]), name


def _row_strided(t: torch.Tensor) -> torch.Tensor:
    """The same values as a view into a wider buffer whose extra columns are NaN (a row stride > the width); 1-D
    tensors become every other element of a NaN-interleaved buffer. Reading past the view shows up as NaN."""
    if t.dim() == 1:
        wide = torch.full((2 * t.shape[0],), float("nan"), dtype=t.dtype)
        wide[::2] = t
        return wide[::2]
    wide = torch.full((t.shape[0], t.shape[1] + 13), float("nan"), dtype=t.dtype)
    wide[:, : t.shape[1]] = t
    return wide[:, : t.shape[1]]


def _transposed_sliced(t: torch.Tensor) -> torch.Tensor:
    """The same values as a slice of a transposed buffer (unit row stride, non-unit last stride)."""
    if t.dim() == 1:
        return _row_strided(t)
    buffer = torch.full((t.shape[1] + 5, t.shape[0] + 3), float("nan"), dtype=t.dtype)
    buffer[: t.shape[1], : t.shape[0]] = t.t()
    return buffer.t()[: t.shape[0], : t.shape[1]]


@pytest.mark.parametrize("make_view", [_row_strided, _transposed_sliced], ids=["row_strided", "transposed_sliced"])
def test_strided_weights_are_exact(make_view):
    """Every parameter (and the extra table) passed as a strided view gives the same tokens and gradients, bit for
    bit, as its contiguous copy."""
    case = Case(33, (24, 40, 20), 48, 40, torch.float32, torch.float32, True)
    inp = _make_inputs(case, "cpu")
    expected, expected_grads = _forward_backward(item_token_projection, inp)

    views = {}

    def view_leaf(name, t):
        views[name] = make_view(t.detach()).requires_grad_()
        assert not views[name].is_contiguous(), name
        return views[name]

    experts = [ExpertParams(*(view_leaf(f"{field}[{m}]", t) for field, t in zip(PARAM_NAMES, e)))
               for m, e in enumerate(inp.experts)]
    gate_w, gate_b = view_leaf("gate_w", inp.gate_w), view_leaf("gate_b", inp.gate_b)
    extra_table = view_leaf("extra_table", inp.extra_table)
    out = item_token_projection(inp.ids, inp.features, inp.active, experts, gate_w, gate_b, extra_table, inp.extra_idx)
    grads = torch.autograd.grad(out, list(views.values()), inp.grad_out)
    assert torch.equal(out, expected)
    for name, grad in zip(views, grads):
        assert torch.equal(grad, expected_grads[name]), name


def test_model_parameter_views_are_exact():
    """The MoME module's own parameters, re-seated as row-strided views (as a parameter sliced out of a larger
    one is), through mome_parameters: tokens and every parameter's .grad match the contiguous module exactly."""
    torch.manual_seed(5)
    dims = {"text": 24, "collab": 40, "image": 20}
    reference = MixtureOfModalityExperts(dims, d_expert=48, d_hidden=40)
    for p in reference.parameters():
        torch.nn.init.normal_(p, std=0.3)
    strided = MixtureOfModalityExperts(dims, d_expert=48, d_hidden=40)
    for name, p_ref in reference.named_parameters():
        module_name, _, attr = name.rpartition(".")
        setattr(strided.get_submodule(module_name), attr, torch.nn.Parameter(_row_strided(p_ref.detach())))
    assert any(p.stride(0) != p.shape[-1] for p in strided.parameters() if p.dim() == 2)
    inp = _make_inputs(Case(33, tuple(dims.values()), 48, 40, torch.float32, torch.float32, False), "cpu")
    tokens = {}
    for name, module in (("reference", reference), ("strided", strided)):
        tokens[name] = item_token_projection(inp.ids, inp.features, inp.active, *mome_parameters(module))
        tokens[name].backward(inp.grad_out)
    assert torch.equal(tokens["strided"], tokens["reference"])
    for (name, p_ref), p_strided in zip(reference.named_parameters(), strided.parameters()):
        assert torch.equal(p_strided.grad, p_ref.grad), name
