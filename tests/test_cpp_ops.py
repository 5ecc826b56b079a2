"""The C++ speeder ops (speeder_rt._C, csrc/ops) against the PyTorch references and the Triton kernel, their Meta
kernels under torch.export / torch.compile / AOTInductor, and the wrappers' dispatch.

The extension is built by ``make test`` (``pip install --no-build-isolation -e .``); without it the tests that
need it are skipped with a reason. The CUDA kernels are compile-checked by csrc/check_cuda_compile.sh; the
``gpu`` tests run them where a CUDA build of the extension and a device exist.
"""
import os

import pytest
import torch

from speeder_rt.kernels import cpp_ops
from speeder_rt.kernels.prompt_layout import assemble_inputs_embeds_reference

needs_ext = pytest.mark.skipif(not cpp_ops.HAS_EXTENSION,
                               reason="speeder_rt._C is not built (make test, or pip install --no-build-isolation -e .)")
TRITON_RUNS = torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def needs_kernel(op, device):
    if not cpp_ops.has_kernel(op, device):
        pytest.skip(f"speeder_rt._C has no {device} kernel of {op} (a CUDA build of the extension is needed)")


def prompt_case(dtype, batch=3, width=5, num_candidates=4, dim=37, sizes=(2, 1, 3), num_items=50, vocab=20, seed=0,
                device="cpu"):
    """Random assemble_inputs_embeds arguments: ragged lengths (0, W, in between), -1 padding."""
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=gen).to(dtype)  # noqa: E731
    history_len = torch.randint(0, width + 1, (batch,), generator=gen)
    history_len[0] = width
    if batch > 1:
        history_len[1] = 0
    slots = torch.arange(width)[None, :]
    history = torch.randint(0, num_items, (batch, width), generator=gen)
    history = torch.where(slots < history_len[:, None], history, -1)
    candidates = torch.randint(0, num_items, (batch, num_candidates), generator=gen)
    if num_candidates > 1:
        candidates[:, 1] = candidates[:, 0]  # a duplicate candidate
    template_ids = torch.randint(0, vocab, (sum(sizes) + 1,), generator=gen)
    args = (rand(num_items, dim), history, history_len, candidates, rand(width + 2, dim), rand(dim), template_ids,
            rand(vocab, dim))
    return tuple(a.to(device) for a in args), sizes


def assert_same(got, want):
    embeds, item_idx, token_mask = got
    assert embeds.dtype == want[0].dtype and item_idx.dtype == torch.int32 and token_mask.dtype == torch.bool
    assert torch.equal(token_mask, want[2]) and torch.equal(item_idx, want[1])
    assert torch.equal(embeds, want[0])  # one rounding per element everywhere: bit-exact


# -- assemble_inputs_embeds ----------------------------------------------------------------------------------------
@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", [
    dict(),
    dict(batch=1, width=1, num_candidates=1, dim=64),
    dict(batch=5, width=7, num_candidates=0, sizes=(3, 2, 0)),
    dict(batch=2, width=3, num_candidates=2, sizes=(0, 0, 0), dim=1),
    dict(batch=9, width=13, num_candidates=11, dim=130, num_items=300, vocab=1000),
])
def test_assemble_inputs_embeds_matches_every_implementation(device, dtype, shape):
    if device == "cuda" and dtype == torch.float64:
        pytest.skip("the CUDA kernel takes float32 / float16 / bfloat16")
    needs_kernel("assemble_inputs_embeds", device)
    args, sizes = prompt_case(dtype, device=device, **shape)
    want = assemble_inputs_embeds_reference(*args, sizes)
    assert_same(torch.ops.speeder.assemble_inputs_embeds(*args, *sizes), want)
    assert cpp_ops.implementation("assemble_inputs_embeds", device) == "cpp"
    assert_same(cpp_ops.assemble_inputs_embeds(*args, sizes), want)
    # the Triton kernel (the CPU interpreter mishandles bf16; it has no fp64)
    if TRITON_RUNS and dtype in (torch.float32, torch.float16) and cpp_ops.triton_assemble_inputs_embeds is not None:
        assert_same(cpp_ops.triton_assemble_inputs_embeds(*args, sizes), want)


@needs_ext
def test_assemble_inputs_embeds_takes_int32_ids_strided_tables_and_unread_garbage():
    args, sizes = prompt_case(torch.float32, batch=4, width=6, dim=40)
    item_table, history, history_len, candidates, recency, cemb, template_ids, embed = args
    strided = torch.zeros(item_table.shape[0], 2 * item_table.shape[1])[:, ::2]
    strided.copy_(item_table)
    garbage = torch.where(history >= 0, history, 10**9)  # ids past history_len are never read
    got = torch.ops.speeder.assemble_inputs_embeds(strided, garbage, history_len.int(), candidates, recency, cemb,
                                                   template_ids.int(), embed, *sizes)
    assert_same(got, assemble_inputs_embeds_reference(*args, sizes))


@needs_ext
@pytest.mark.parametrize("change, message", [
    (lambda a: a[1].__setitem__((0, 0), 50), r"history\[0, 0\]=50 must be in 0..49"),
    (lambda a: a[2].fill_(6), r"history_len\[0\]=6 must be in 0..W=5"),
    (lambda a: a[3].__setitem__((0, 0), -1), r"candidate ids must be in 0..49"),
    (lambda a: a[6].__setitem__(0, 20), r"template ids must be in 0..19"),
    (lambda a: a.__setitem__(4, a[4][:4]), r"recency must have shape \[R, d=37\] with R >= W=5"),
    (lambda a: a.__setitem__(5, a[5].double()), r"candidate_embedding has dtype Double"),
    (lambda a: a.__setitem__(6, a[6][:-1]), r"template_ids must be an int32 / int64 tensor \[P \+ Mi \+ S \+ 1 = 7\]"),
    (lambda a: a.__setitem__(3, a[3][:2]), r"candidates must be an int64 tensor \[B=3, K\]"),
])
def test_assemble_inputs_embeds_rejects_bad_arguments(change, message):
    args, sizes = prompt_case(torch.float32)
    args = list(args)
    change(args)
    with pytest.raises(ValueError, match=message):
        torch.ops.speeder.assemble_inputs_embeds(*args, *sizes)


# -- score_topk / score_candidates -----------------------------------------------------------------------------------
def scoring_case(batch, num_items, dim, dtype=torch.float32, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, dim, generator=gen)
    table = torch.randn(num_items, dim, generator=gen).to(dtype)
    return query.to(device), table.to(device)


def exclusion(batch, width, num_items, seed=0):
    """Exclude ids with duplicates and negative padding (-1 and -7)."""
    gen = torch.Generator().manual_seed(seed)
    ex = torch.randint(0, num_items, (batch, width), generator=gen)
    ex[:, 1] = ex[:, 0]
    ex[0, -1], ex[-1, -2] = -1, -7
    return ex


def assert_topk(got, query, table, k, exclude=None):
    """Tie-robust: the values are the reference's, and each returned id's reference score is its returned score
    (blocked and full matrix products may differ in the last bit, which can swap near-equal items)."""
    ids, scores = got
    _, ref_scores = cpp_ops.score_topk_reference(query, table, k, exclude)
    assert ids.shape == scores.shape == (query.shape[0], k) and ids.dtype == torch.int64 and scores.dtype == torch.float32
    torch.testing.assert_close(scores, ref_scores, rtol=1e-5, atol=1e-5)
    full = query.float() @ table.float().T
    torch.testing.assert_close(scores, full.gather(1, ids), rtol=1e-5, atol=1e-5)
    assert (scores[:, :-1] >= scores[:, 1:]).all()
    for row in range(ids.shape[0]):
        assert len(set(ids[row].tolist())) == k
        if exclude is not None:
            assert not set(ids[row].tolist()) & set(exclude[row].tolist())


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch, num_items, dim, k", [
    (1, 1, 8, 1),
    (3, 17, 5, 17),           # k = N
    (70, 5003, 33, 7),        # several item blocks and query blocks, odd sizes
    (2, 4100, 16, 1000),      # k spanning most of a block (the CUDA limit is 1024)
])
@pytest.mark.parametrize("exclude", [False, True])
def test_score_topk_matches_the_reference(device, batch, num_items, dim, k, exclude):
    needs_kernel("score_topk", device)
    query, table = scoring_case(batch, num_items, dim, device=device)
    ex = exclusion(batch, 5, num_items).to(device) if exclude and num_items - 5 >= k else None
    got = torch.ops.speeder.score_topk(query, table, k, ex)
    assert_topk(got, query, table, k, ex)
    assert cpp_ops.implementation("score_topk", device) == "cpp"
    torch.testing.assert_close(cpp_ops.score_topk(query, table, k, ex), got, rtol=0, atol=0)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_score_topk_reduced_precision_tables(dtype):
    query, table = scoring_case(4, 3000, 24, dtype)
    assert_topk(torch.ops.speeder.score_topk(query, table, 9, exclusion(4, 3, 3000)), query, table, 9, exclusion(4, 3, 3000))


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
def test_score_topk_ties_return_the_lower_id_first(device):
    needs_kernel("score_topk", device)
    table = torch.ones(3000, 8, device=device)
    table[2500] = 2.0  # one clear winner, then 2999 equal scores
    ex = torch.tensor([[-1, -1], [0, 5]], device=device)
    ids, scores = torch.ops.speeder.score_topk(torch.ones(2, 8, device=device), table, 5, ex)
    assert ids.tolist() == [[2500, 0, 1, 2, 3], [2500, 1, 2, 3, 4]]
    assert scores[:, 0].tolist() == [16.0, 16.0] and (scores[:, 1:] == 8.0).all()
    assert torch.equal(cpp_ops.score_topk_reference(torch.ones(2, 8), table.cpu(), 5, ex.cpu())[0], ids.cpu())


@pytest.mark.parametrize("use_ext", [pytest.param(True, marks=needs_ext), False])
@pytest.mark.parametrize("k, exclude, message", [
    (5, None, r"score_topk: k=5 exceeds the catalog size 4"),
    (0, None, r"score_topk: k must be >= 1, got 0"),
    (3, [[0, 1, -1], [0, 0, 0]], r"score_topk: k=3 but row 0 has only 2 items left after excluding 2 of 4"),
    (1, [[4, -1, -1], [0, 0, 0]], r"exclude_ids.* must be < 4 \(negative = none\)"),
])
def test_score_topk_errors(use_ext, k, exclude, message):
    query, table = scoring_case(2, 4, 3)
    ex = None if exclude is None else torch.tensor(exclude)
    op = torch.ops.speeder.score_topk if use_ext else cpp_ops.score_topk_reference
    with pytest.raises(ValueError, match=message):
        op(query, table, k, ex)


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("batch, num_candidates, dim", [(1, 1, 1), (5, 20, 37), (3, 0, 8), (4, 7, 64)])
def test_score_candidates_matches_the_reference(device, dtype, batch, num_candidates, dim):
    if device == "cuda" and dtype == torch.float64:
        pytest.skip("the CUDA kernel takes float32 / float16 / bfloat16")
    needs_kernel("score_candidates", device)
    query, table = scoring_case(batch, 50, dim, dtype, device=device)
    candidates = torch.randint(0, 50, (batch, num_candidates), device=device)
    if num_candidates > 1:
        candidates[:, -1] = candidates[:, 0]
    got = torch.ops.speeder.score_candidates(query, table, candidates)
    assert got.dtype == torch.float32 and got.shape == (batch, num_candidates)
    torch.testing.assert_close(got, cpp_ops.score_candidates_reference(query, table, candidates), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cpp_ops.score_candidates(query, table, candidates), got, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"candidate ids must be in 0..49"):
        torch.ops.speeder.score_candidates(query, table, torch.full((batch, 1), 50, device=device))


# -- tracing --------------------------------------------------------------------------------------------------------
class Recommend(torch.nn.Module):
    """All three ops in one graph: prompt assembly, candidate scores and the catalog top-k."""

    def __init__(self, args, sizes, k=3):
        super().__init__()
        item_table, _, _, _, recency, cemb, template_ids, embed = args
        for name, value in dict(item_table=item_table, recency=recency, cemb=cemb, template_ids=template_ids,
                                embed=embed).items():
            self.register_buffer(name, value)
        self.sizes, self.k = sizes, k

    def forward(self, history, history_len, candidates):
        embeds, item_idx, token_mask = torch.ops.speeder.assemble_inputs_embeds(
            self.item_table, history, history_len, candidates, self.recency, self.cemb, self.template_ids, self.embed,
            *self.sizes)
        query = (embeds * token_mask[..., None]).sum(1) + item_idx.sum(1, keepdim=True)
        ids, top = torch.ops.speeder.score_topk(query, self.item_table, self.k, history)
        return torch.ops.speeder.score_candidates(query, self.item_table, candidates), ids, top


def traced_inputs(batch, width, num_candidates, seed):
    args, _ = prompt_case(torch.float32, batch=batch, width=width, num_candidates=num_candidates, seed=seed)
    return args[1:4]  # history (-1 padded: also the top-k's exclusion), history_len, candidates


def assert_outputs_equal(got, want, rtol=0.0, atol=0.0):
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=rtol, atol=atol)


@needs_ext
def test_meta_kernels_trace_under_torch_export_with_dynamic_shapes():
    args, sizes = prompt_case(torch.float32)
    module = Recommend(args, sizes)
    batch, width, cands = torch.export.Dim("batch", max=64), torch.export.Dim("width", max=50), torch.export.Dim("k", max=99)
    program = torch.export.export(module, traced_inputs(3, 5, 4, seed=1), dynamic_shapes=(
        {0: batch, 1: width}, {0: batch}, {0: batch, 1: cands}))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert {"speeder.assemble_inputs_embeds.default", "speeder.score_topk.default",
            "speeder.score_candidates.default"} <= targets
    for shape in [(2, 4, 3), (6, 7, 9)]:  # other shapes than the traced one
        inputs = traced_inputs(*shape, seed=2)
        assert_outputs_equal(program.module()(*inputs), module(*inputs))


@needs_ext
def test_ops_compile_with_torch_compile_fullgraph():
    args, sizes = prompt_case(torch.float32)
    module = Recommend(args, sizes)
    compiled = torch.compile(module, backend="aot_eager", fullgraph=True, dynamic=True)
    for shape in [(3, 5, 4), (2, 4, 3)]:
        inputs = traced_inputs(*shape, seed=3)
        assert_outputs_equal(compiled(*inputs), module(*inputs))


@needs_ext
@pytest.mark.slow
def test_ops_run_inside_an_aotinductor_package(tmp_path):
    args, sizes = prompt_case(torch.float32)
    module = Recommend(args, sizes)
    batch = torch.export.Dim("batch", max=64)
    program = torch.export.export(module, traced_inputs(3, 5, 4, seed=1),
                                  dynamic_shapes=({0: batch}, {0: batch}, {0: batch}))
    package = torch._inductor.aoti_compile_and_package(program, package_path=str(tmp_path / "ops.pt2"))
    inputs = traced_inputs(6, 5, 4, seed=4)
    # Inductor fuses the query's reduction in another order: last-bit differences
    assert_outputs_equal(torch._inductor.aoti_load_package(package)(*inputs), module(*inputs), rtol=1e-5, atol=1e-4)
