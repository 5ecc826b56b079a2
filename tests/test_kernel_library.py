"""The Triton ops as torch.library ops: torch.compile (fullgraph) and torch.export trace through them, their fake
(meta) implementations give the real outputs' metadata without a launch, opcheck accepts their registrations, and
the deterministic switch launches the fixed config.

On CPU the kernels run under TRITON_INTERPRET=1, where the ops are opaque custom ops (interpreted kernels cannot be
traced); on a GPU they are triton_ops that Inductor can inline (``test_inductor_compiles_the_ops_gpu``).
"""
from __future__ import annotations

import os

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from speeder_rt.kernels import (
    ExpertParams,
    assemble_inputs_embeds,
    deterministic_kernels,
    item_token_projection,
    position_aware_attention,
    use_deterministic_kernels,
)

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
    reason="Triton needs a CUDA device or TRITON_INTERPRET=1",
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
OPS = torch.ops.speeder_triton


def _attention_args(gen: torch.Generator, dtype=torch.float32) -> dict:
    b, hq, hkv, length, d = 2, 4, 2, 19, 16
    q = torch.randn(b, length, hq, d, generator=gen).to(DEVICE, dtype).transpose(1, 2)  # HF's layout
    k, v = (torch.randn(b, length, hkv, d, generator=gen).to(DEVICE, dtype).transpose(1, 2) for _ in range(2))
    mask = torch.ones(b, length, dtype=torch.bool, device=DEVICE)
    mask[1, 15:] = False
    item_idx = torch.randint(0, 3, (b, length), generator=gen).cumsum(1).to(DEVICE, torch.int32)
    return dict(q=q, k=k, v=v, item_idx=item_idx, slopes=torch.rand(hq, generator=gen).to(DEVICE),
                attention_mask=mask)


def _projection_args(gen: torch.Generator) -> dict:
    dims, d_e, d_h, n, s = (24, 40), 48, 40, 23, 21

    def randn(*shape):
        return (0.3 * torch.randn(*shape, generator=gen)).to(DEVICE)

    ids = torch.randint(-1, n, (s,), generator=gen).to(DEVICE)
    experts = [ExpertParams(1 + randn(d), randn(d), randn(d_e, d), randn(d_e), randn(d_h, d_e), randn(d_h))
               for d in dims]
    return dict(ids=ids, features=[randn(n, d) for d in dims],
                active=(torch.rand(n, len(dims), generator=gen) > 0.3).to(DEVICE), experts=experts,
                gate_w=randn(len(dims), sum(dims)), gate_b=randn(len(dims)), extra_table=randn(5, d_h),
                extra_idx=torch.randint(-1, 5, (s,), generator=gen).to(DEVICE), validate=False)


def _prompt_args(gen: torch.Generator) -> dict:
    batch, width, k, d, sizes = 3, 6, 4, 24, (2, 1, 2)
    history_len = torch.randint(1, width + 1, (batch,), generator=gen)
    history = torch.randint(0, 30, (batch, width), generator=gen)
    history = history.masked_fill(torch.arange(width)[None] >= history_len[:, None], -1)
    table = lambda rows: torch.randn(rows, d, generator=gen).to(DEVICE)  # noqa: E731
    return dict(item_table=table(30), history=history.to(DEVICE), history_len=history_len.to(DEVICE),
                candidates=torch.randint(0, 30, (batch, k), generator=gen).to(DEVICE), recency=table(width),
                candidate_embedding=table(1)[0], template_ids=torch.randint(0, 40, (sum(sizes) + 1,),
                                                                             generator=gen).to(DEVICE),
                embed_weight=table(40), template_sizes=sizes, validate=False)


def _attention_loss(q, k, v, item_idx, slopes, attention_mask):
    return position_aware_attention(q, k, v, item_idx, slopes, attention_mask).square().sum()


def _projection_loss(ids, features, active, experts, gate_w, gate_b, extra_table, extra_idx, validate):
    return item_token_projection(ids, features, active, experts, gate_w, gate_b, extra_table, extra_idx,
                                 validate=validate).square().sum()


def _leaves(args: dict, names) -> list[torch.Tensor]:
    leaves = []
    for name in names:
        value = args[name]
        for t in (value if isinstance(value, list) else [value]):
            for leaf in (t if isinstance(t, ExpertParams) else [t]):
                leaf.requires_grad_()
                leaves.append(leaf)
    return leaves


def _grads(loss_fn, args: dict, names) -> tuple[torch.Tensor, list[torch.Tensor]]:
    leaves = _leaves(args, names)
    loss = loss_fn(**args)
    return loss.detach(), list(torch.autograd.grad(loss, leaves))


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compile_fullgraph_matches_eager(backend):
    """No graph break through any op, forward and backward (AOTAutograd traces the registered autograd formula and
    the backward op), and the same values as eager."""
    gen = torch.Generator().manual_seed(0)
    torch._dynamo.reset()
    for loss_fn, args, names in (
        (_attention_loss, _attention_args(gen), ("q", "k", "v", "slopes")),
        (_projection_loss, _projection_args(gen), ("experts", "gate_w", "gate_b", "extra_table")),
    ):
        expected, expected_grads = _grads(loss_fn, args, names)
        loss, grads = _grads(torch.compile(loss_fn, fullgraph=True, backend=backend), args, names)
        torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
        for got, want in zip(grads, expected_grads):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    args = _prompt_args(gen)
    compiled = torch.compile(assemble_inputs_embeds, fullgraph=True, backend=backend)
    for got, want in zip(compiled(**args), assemble_inputs_embeds(**args)):
        assert torch.equal(got, want)


class _Scorer(torch.nn.Module):
    """The three ops in one module, as an exported scoring graph would hold them."""

    def forward(self, q, k, v, item_idx, slopes, attention_mask, ids, features_0, features_1, active, flat,
                gate_w, gate_b, prompt):
        attn = position_aware_attention(q, k, v, item_idx, slopes, attention_mask)
        experts = [ExpertParams(*flat[6 * m: 6 * m + 6]) for m in range(2)]
        tokens = item_token_projection(ids, [features_0, features_1], active, experts, gate_w, gate_b,
                                       validate=False)
        embeds, _, mask = assemble_inputs_embeds(**prompt)
        return attn.sum() + tokens.sum() + (embeds * mask[..., None]).sum()


def _scorer_inputs(gen: torch.Generator) -> tuple:
    a, p = _attention_args(gen), _projection_args(gen)
    flat = [t for e in p["experts"] for t in e]
    return (a["q"], a["k"], a["v"], a["item_idx"], a["slopes"], a["attention_mask"], p["ids"], *p["features"],
            p["active"], flat, p["gate_w"], p["gate_b"], _prompt_args(gen))


def test_export_keeps_the_ops():
    """torch.export traces the module into a graph with the speeder_triton ops (nothing opaque to it), and the
    exported program computes what the module does."""
    inputs = _scorer_inputs(torch.Generator().manual_seed(1))
    exported = torch.export.export(_Scorer(), inputs)
    targets = {str(node.target) for node in exported.graph.nodes if node.op == "call_function"}
    for name in ("position_aware_attention", "item_token_projection", "assemble_inputs_embeds"):
        assert f"speeder_triton.{name}.default" in targets, sorted(targets)
    torch.testing.assert_close(exported.module()(*inputs), _Scorer()(*inputs), rtol=1e-6, atol=1e-6)


def test_fake_tensors_give_output_metadata_without_a_launch(monkeypatch):
    """Under FakeTensorMode (what torch.compile / torch.export trace with) the ops produce outputs of the real
    shapes, dtypes and strides; no kernel runs."""
    gen = torch.Generator().manual_seed(2)
    args = dict(attention=_attention_args(gen), projection=_projection_args(gen), prompt=_prompt_args(gen))
    real = dict(attention=position_aware_attention(**args["attention"]),
                projection=item_token_projection(**args["projection"]),
                prompt=assemble_inputs_embeds(**args["prompt"]))
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake_args = {op: {k: _fakeify(mode, v) for k, v in a.items()} for op, a in args.items()}
        fake = dict(attention=position_aware_attention(**fake_args["attention"]),
                    projection=item_token_projection(**fake_args["projection"]),
                    prompt=assemble_inputs_embeds(**fake_args["prompt"]))
    for op in real:
        for got, want in zip(_flat(fake[op]), _flat(real[op])):
            assert (got.shape, got.dtype, got.stride()) == (want.shape, want.dtype, want.stride()), op


def _fakeify(mode: FakeTensorMode, value):
    if isinstance(value, torch.Tensor):
        return mode.from_tensor(value)
    if isinstance(value, list):
        return [_fakeify(mode, v) for v in value]
    if isinstance(value, ExpertParams):
        return ExpertParams(*(_fakeify(mode, v) for v in value))
    return value


def _flat(out) -> list[torch.Tensor]:
    return list(out) if isinstance(out, tuple) else [out]


@pytest.mark.parametrize("op", ["position_aware_attention", "item_token_projection", "assemble_inputs_embeds"])
def test_opcheck(op):
    """torch.library's own checks of the registration: schema (no hidden mutation or aliasing), the fake
    implementation against the real one, and the autograd registration."""
    gen = torch.Generator().manual_seed(3)
    if op == "position_aware_attention":
        a = _attention_args(gen)
        args = (a["q"].requires_grad_(), a["k"], a["v"], a["item_idx"], a["slopes"].requires_grad_(),
                a["attention_mask"], True, 0.25, False)
    elif op == "item_token_projection":
        p = _projection_args(gen)
        flat = [t.requires_grad_() for e in p["experts"] for t in e]
        args = (p["ids"], p["features"], p["active"], flat, p["gate_w"], p["gate_b"], p["extra_table"],
                p["extra_idx"], True, False)
    else:
        a = _prompt_args(gen)
        args = (a["item_table"], a["history"], a["history_len"], a["candidates"], a["recency"],
                a["candidate_embedding"], a["template_ids"], a["embed_weight"], *a["template_sizes"])
    torch.library.opcheck(getattr(OPS, op), args,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_deterministic_switch():
    """use_deterministic_kernels and torch.use_deterministic_algorithms both turn the fixed-config launches on; the
    fixed config gives the same bits run after run."""
    assert not deterministic_kernels()
    gen = torch.Generator().manual_seed(4)
    args = _attention_args(gen)
    autotuned = _grads(_attention_loss, dict(args), ("q", "k", "v", "slopes"))
    try:
        use_deterministic_kernels(True)
        assert deterministic_kernels()
        runs = [_grads(_attention_loss, dict(args), ("q", "k", "v", "slopes")) for _ in range(2)]
    finally:
        use_deterministic_kernels(False)
    for loss, grads in runs:
        assert torch.equal(loss, runs[0][0]) and all(torch.equal(g, h) for g, h in zip(grads, runs[0][1]))
    # the interpreter has one config per kernel, so there the fixed and the tuned launch are the same computation
    if not torch.cuda.is_available():
        assert torch.equal(runs[0][0], autotuned[0])
        assert all(torch.equal(g, h) for g, h in zip(runs[0][1], autotuned[1]))
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert deterministic_kernels()
    finally:
        torch.use_deterministic_algorithms(previous)
    assert not deterministic_kernels()


@pytest.mark.gpu
def test_inductor_compiles_the_ops_gpu():
    """On a GPU the ops are triton_ops: Inductor inlines their kernels (no opaque call) and matches eager."""
    gen = torch.Generator().manual_seed(5)
    args = _attention_args(gen, torch.bfloat16)
    use_deterministic_kernels(True)  # one config per kernel: Inductor compiles just those
    try:
        expected, expected_grads = _grads(_attention_loss, dict(args), ("q", "k", "v", "slopes"))
        torch._dynamo.reset()
        loss, grads = _grads(torch.compile(_attention_loss, fullgraph=True), dict(args), ("q", "k", "v", "slopes"))
    finally:
        use_deterministic_kernels(False)
    torch.testing.assert_close(loss.float(), expected.float(), rtol=2e-2, atol=1e-2)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)
