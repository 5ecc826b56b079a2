"""assemble_inputs_embeds (Triton, one launch) against prompt.py's layout + gather, bit for bit.

On CPU the kernel runs under TRITON_INTERPRET=1 (fp32 / fp16: the interpreter mishandles bf16); the GPU cases
(``@pytest.mark.gpu``) run the sm90 report's prompts (``sm90_report.PROMPT_SHAPES``) at d=896 in bf16 / fp16 /
fp32. The only arithmetic is one add per history / candidate element, so the comparison is exact
(``torch.equal``), not a tolerance.
"""

from __future__ import annotations

import importlib
import os
import zlib
from dataclasses import dataclass

import pytest
import torch

from speeder_rt.kernels.assemble_inputs_embeds import assemble_inputs_embeds, assemble_inputs_embeds_reference
from speeder_rt.tools.sm90_report import PROMPT_SHAPES

aie_module = importlib.import_module("speeder_rt.kernels.assemble_inputs_embeds")

needs_triton_backend = pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
    reason="Triton needs a CUDA device or TRITON_INTERPRET=1",
)
pytestmark = needs_triton_backend


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    """Outputs start as NaN / sentinel values, so any element the kernel fails to write fails the test."""
    monkeypatch.setattr(aie_module, "DEBUG_POISON_OUTPUTS", True)


@dataclass(frozen=True)
class Case:
    batch: int
    width: int
    num_candidates: int
    sizes: tuple[int, int, int]
    d: int
    dtype: torch.dtype
    len_dtype: torch.dtype = torch.int64
    num_items: int = 60
    vocab: int = 70

    @property
    def id(self) -> str:
        p, mi, s = self.sizes
        return (f"B{self.batch}-W{self.width}-K{self.num_candidates}-T{p}.{mi}.{s}-d{self.d}-"
                f"{str(self.dtype).removeprefix('torch.')}-len{str(self.len_dtype).removeprefix('torch.')}")


def _random_cases(count: int) -> list[Case]:
    gen = torch.Generator().manual_seed(1234)

    def pick(lo: int, hi: int) -> int:
        return int(torch.randint(lo, hi + 1, (1,), generator=gen))

    cases = [
        Case(1, 1, 0, (0, 0, 0), 16, torch.float32),  # the smallest prompt: one history item, then PRED
        Case(5, 12, 20, (4, 0, 3), 40, torch.float16),  # no middle template
        Case(3, 7, 0, (5, 2, 3), 24, torch.float32, torch.int32),  # top-k prompt (K = 0)
    ]
    for n in range(count):
        cases.append(Case(
            batch=pick(1, 5), width=pick(1, 12), num_candidates=pick(0, 20),
            sizes=(pick(0, 5), (0, pick(1, 3))[n % 2], pick(0, 4)),
            d=(8, 24, 40, 72, 130)[n % 5], dtype=(torch.float32, torch.float16)[(n // 2) % 2],
            len_dtype=(torch.int64, torch.int32)[(n // 3) % 2],
        ))
    return cases


CPU_CASES = _random_cases(12)
GPU_CASES = [  # the sm90 report's prompts (scoring, L = 40; top-k, L = 64) at qwen2-0.5b's hidden size and vocabulary
    Case(batch, width, num_candidates, sizes, 896, dtype, num_items=20000, vocab=151936)
    for batch, width, num_candidates, sizes in PROMPT_SHAPES for dtype in (torch.bfloat16, torch.float16, torch.float32)
]


def _make_inputs(case: Case, device) -> dict:
    """Fresh random inputs: history right-padded with -1 after 1..W real items, repeated items allowed."""
    gen = torch.Generator(device=device).manual_seed(zlib.crc32(case.id.encode()))
    b, w, k, d, dtype = case.batch, case.width, case.num_candidates, case.d, case.dtype

    def table(rows: int) -> torch.Tensor:
        return torch.randn(rows, d, generator=gen, device=device).to(dtype)

    history_len = torch.randint(1, w + 1, (b,), generator=gen, device=device)
    history = torch.randint(0, case.num_items, (b, w), generator=gen, device=device)
    history = history.masked_fill(torch.arange(w, device=device)[None, :] >= history_len[:, None], -1)
    return dict(
        item_table=table(case.num_items),
        history=history,
        history_len=history_len.to(case.len_dtype),
        candidates=torch.randint(0, case.num_items, (b, k), generator=gen, device=device),
        recency=table(w + 3),
        candidate_embedding=table(1)[0],
        template_ids=torch.randint(0, case.vocab, (sum(case.sizes) + 1,), generator=gen, device=device),
        embed_weight=table(case.vocab),
        template_sizes=case.sizes,
    )


def _assert_bit_exact(got, expected) -> None:
    embeds, item_idx, token_mask = got
    ref_embeds, ref_item_idx, ref_mask = expected
    assert embeds.dtype == ref_embeds.dtype and embeds.shape == ref_embeds.shape
    assert item_idx.dtype == torch.int32 and token_mask.dtype == torch.bool
    assert torch.equal(token_mask.view(torch.uint8), ref_mask.to(torch.uint8)), "token_mask (unwritten entries?)"
    assert torch.equal(item_idx, ref_item_idx), "item_idx"
    assert not embeds.isnan().any(), "unwritten (poisoned) inputs_embeds elements"
    assert torch.equal(embeds, ref_embeds), "inputs_embeds"
    assert (embeds[~ref_mask] == 0).all()


@pytest.mark.parametrize("case", CPU_CASES, ids=lambda c: c.id)
def test_matches_reference_bit_exact(case):
    args = _make_inputs(case, "cpu")
    _assert_bit_exact(assemble_inputs_embeds(**args), assemble_inputs_embeds_reference(**args))


def test_strided_inputs():
    """Row-strided tables (views into wider buffers) and transposed id tensors are read in place or copied."""
    case = Case(4, 9, 6, (3, 1, 2), 40, torch.float32)
    args = _make_inputs(case, "cpu")
    wide = lambda t: torch.cat([t, torch.full_like(t, float("nan"))], dim=1)[:, : t.shape[1]]  # noqa: E731
    strided = dict(args, item_table=wide(args["item_table"]), recency=wide(args["recency"]),
                   embed_weight=wide(args["embed_weight"]),
                   history=args["history"].t().contiguous().t(), candidates=args["candidates"].t().contiguous().t())
    assert strided["item_table"].stride(0) == 80 and not strided["history"].is_contiguous()
    _assert_bit_exact(assemble_inputs_embeds(**strided), assemble_inputs_embeds_reference(**args))


def test_matches_speeder_prompt():
    """The reference (and so the kernel) is what SpeederModel.prompt builds from a precomputed item-token table."""
    from speeder_rt.data import SyntheticConfig, generate_synthetic
    from speeder_rt.model import BackboneConfig, SpeederConfig, SpeederModel

    _, table = generate_synthetic(SyntheticConfig(n_items=120, n_users=20, seed=1))
    torch.manual_seed(0)
    model = SpeederModel(SpeederConfig(backbone=BackboneConfig(shape="tiny"), d_expert=32,
                                       modalities=["text", "image"]), table).eval()
    with torch.no_grad():
        model.candidate_embedding.normal_()
        tokens = model.item_token_table()
        case = Case(4, 11, 5, model.template_sizes, model.hidden_size, torch.float32, num_items=model.num_items)
        args = _make_inputs(case, "cpu")
        embeds, lay, _ = model.prompt(args["history"], args["history_len"], args["candidates"], item_tokens=tokens)
        got = assemble_inputs_embeds(
            tokens, args["history"], args["history_len"], args["candidates"], model.recency.weight,
            model.candidate_embedding, model.template, model.decoder.get_input_embeddings().weight,
            model.template_sizes,
        )
    _assert_bit_exact(got, (embeds, lay.item_idx, lay.token_mask))


def test_unchecked_padding_slots_are_not_read():
    """History slots at or beyond history_len are never read, whatever they hold."""
    case = Case(3, 8, 4, (2, 1, 1), 24, torch.float32)
    args = _make_inputs(case, "cpu")
    expected = assemble_inputs_embeds_reference(**args)
    beyond = torch.arange(8)[None, :] >= args["history_len"][:, None]
    junk = dict(args, history=args["history"].masked_fill(beyond, 10**12))
    _assert_bit_exact(assemble_inputs_embeds(**junk, validate=False), expected)


def _valid_args() -> dict:
    return _make_inputs(Case(2, 5, 3, (2, 1, 2), 16, torch.float32), "cpu")


# kind -> (function of the valid arguments returning overrides, regex the ValueError message must match)
MISUSE = {
    "history_len_too_long": (lambda a: dict(history_len=torch.tensor([6, 1])), r"history_len .* must be in 0..W=5"),
    "history_len_negative": (lambda a: dict(history_len=torch.tensor([-1, 1])), r"history_len .* must be in 0..W=5"),
    "history_id_range": (lambda a: dict(history=a["history"].clone().index_fill_(1, torch.tensor([0]), 60)),
                         r"history \(shape \[2, 5\]\).* must be in 0..59"),
    "history_pad_inside": (lambda a: dict(history=a["history"].clone().index_fill_(1, torch.tensor([0]), -1)),
                           r"history \(shape \[2, 5\]\).* must be in 0..59"),
    "candidate_range": (lambda a: dict(candidates=torch.full((2, 3), -1)), r"candidates \(shape \[2, 3\]\) must be in"),
    "template_range": (lambda a: dict(template_ids=torch.full((6,), 70)),
                       r"template_ids \(shape \[6\]\) must be in 0..69"),
    "template_length": (lambda a: dict(template_ids=torch.zeros(5, dtype=torch.long)),
                        r"template_ids must be .* shape \[P \+ Mi \+ S \+ 1\] = \[6\].*\[5\]"),
    "history_dtype": (lambda a: dict(history=a["history"].int()), r"history must be an int64 tensor \[B, W\]"),
    "history_len_shape": (lambda a: dict(history_len=torch.ones(3, dtype=torch.long)), r"history_len must be .*\[3\]"),
    "candidates_batch": (lambda a: dict(candidates=torch.zeros(3, 3, dtype=torch.long)),
                         r"candidates must be an int64 tensor \[B=2, K\].*\[3, 3\]"),
    "recency_rows": (lambda a: dict(recency=a["recency"][:4]), r"recency must have shape \[R, d=16\] with R >= W=5"),
    "recency_dtype": (lambda a: dict(recency=a["recency"].half()), r"recency has dtype torch.float16"),
    "candidate_embedding_shape": (lambda a: dict(candidate_embedding=torch.zeros(15)),
                                  r"candidate_embedding must have shape \[d\] = \[16\]"),
    "embed_width": (lambda a: dict(embed_weight=torch.zeros(70, 8)), r"embed_weight must have shape \[V, d=16\]"),
    "table_dtype": (lambda a: {k: (v.double() if k in ("item_table", "recency", "candidate_embedding",
                                                        "embed_weight") else v) for k, v in a.items()},
                    r"item_table has unsupported dtype torch.float64"),
    "device": (lambda a: dict(recency=a["recency"].to("meta")), r"recency \(shape \[8, 16\]\) is on meta"),
    "template_sizes": (lambda a: dict(template_sizes=(2, -1, 4)), r"template_sizes must be \(P, Mi, S\) >= 0"),
}


@pytest.mark.parametrize("kind", list(MISUSE))
def test_misuse_raises_value_error(kind, monkeypatch):
    class NoLaunch:
        def __getitem__(self, grid):
            raise AssertionError("validation must happen before any launch")

    monkeypatch.setattr(aie_module, "_assemble_kernel", NoLaunch())
    args = _valid_args()
    overrides, pattern = MISUSE[kind]
    with pytest.raises(ValueError, match=pattern):
        assemble_inputs_embeds(**{**args, **overrides(args)})


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: c.id)
def test_matches_reference_bit_exact_gpu(case):
    args = _make_inputs(case, "cuda")
    _assert_bit_exact(assemble_inputs_embeds(**args), assemble_inputs_embeds_reference(**args))
