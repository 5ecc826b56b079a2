"""The exportable Speeder graphs (ids and the item-token table in, scores out, the model baked in) and their parity
check.

``ScoringGraph``: ``(history_ids int64 [B, n], history_mask bool [B, n], candidate_ids int64 [B, K],
item_tokens [N, d]) -> scores float32 [B, K]``. ``TopKGraph``: ``(history_ids, history_mask, item_tokens) ->
(item_ids int64 [B, k], scores float32 [B, k])`` over the whole catalog with the history's items excluded; ``k``
is fixed at export time (a constant of the graph, so ONNX / TensorRT see a static TopK). ``QueryGraph``:
``(history_ids, history_mask, item_tokens) -> query float32 [B, d]``, the PRED query vector ``q`` (item ``i``
scores ``q . item_tokens[i]``), what an ANN index searches with (exports with ``--index``). ``item_tokens`` is the
item-token table (``format.item_table_dtype``; a bf16 graph casts it), N dynamic: the catalog is the table passed
in, so items appended to it are scored without a new export.

``history_mask`` marks real items (True); they come first in each row and every row has at least one.
``history_len = history_mask.sum(1)``; masked entries are ignored whatever their id (-1 is customary).

Invalid input never yields a plausible score (the graphs are served raw by Triton's ONNX Runtime /
TensorRT backends, with no runtime in front to check requests). A row is invalid when its mask has a
hole or no True entry, an id under its mask is outside ``0..N-1`` (N: the rows of ``item_tokens``), or the history is wider than
``max_history``; its scores are NaN (top-k: NaN scores, item id -1). A candidate outside ``0..N-1``, or
any candidate beyond ``max_candidates`` per row, scores NaN. Invalid ids are replaced by safe ones
before any gather, so no engine reads out of bounds or wraps -1 around to the last item; on valid input
the graphs compute exactly what they did without these checks.

The recency and candidate embeddings, template token embeddings, SPAE slopes, head and the decoder (LoRA
merged into its weights) are module state, so an exporter bakes them in; a model trained
with ``recency: false`` has no recency table, and its graphs add none. The graphs run
the model's own ``prompt`` / ``pred_state`` on a slim module holding only what inference reads (no MoME,
no item features, only the template rows of the vocabulary embedding).

Parity: ``parity_cases`` draws valid random inputs over the export ranges; ``check_parity`` compares a
``Runner`` (an exported artifact, loaded) against the PyTorch ``SpeederModel``. A case passes when
``max |engine - reference| <= atol * max(1, max |reference|)``, i.e. ``atol`` is relative to the
scores' magnitude (and absolute for scores below 1), and every score of both sides is finite (a NaN or an
infinity fails the case whatever ``atol``: NaN equal to NaN is no agreement; top-k's -inf for excluded history
items, on both sides, excepted).
"""
from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from speeder_rt.export.format import ITEM_TOKENS, Ranges, Runner
from speeder_rt.model.speeder import SpeederModel

EXPORT_BACKENDS = ("sdpa", "reference")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class _Slim(nn.Module):
    """What ``SpeederModel.prompt`` / ``pred_state`` read at inference; the item tokens come with each call."""

    fused_item_path = False  # export graphs use standard ops only (EXPORT_BACKENDS)
    template: torch.Tensor  # buffer: 0..len(template)-1, the rows of the slim vocabulary embedding
    decoder: Any  # the decoder, LoRA merged

    def __init__(self, model: SpeederModel, dtype: torch.dtype, backend: str, ranges: Ranges | None = None) -> None:
        super().__init__()
        if backend not in EXPORT_BACKENDS:
            raise ValueError(f"attention backend for export must be one of {list(EXPORT_BACKENDS)}, got {backend!r}")
        decoder = copy.deepcopy(model.decoder)
        if hasattr(decoder, "merge_and_unload"):  # a peft model: fold LoRA into the base weights
            decoder = decoder.merge_and_unload()
        with torch.no_grad():  # keep only the template's rows of the vocabulary embedding
            rows = decoder.get_input_embeddings()(model.template).detach().clone()
        decoder.set_input_embeddings(nn.Embedding.from_pretrained(rows, freeze=True))
        self.register_buffer("template", torch.arange(len(rows), device=rows.device))
        self.cfg = model.cfg
        self.max_history = ranges.max_history if ranges else model.cfg.max_history
        self.max_candidates = ranges.max_candidates if ranges else None
        self.template_sizes = model.template_sizes
        self.hidden_size = model.hidden_size
        self.decoder = decoder
        self.recency = copy.deepcopy(model.recency)  # None when the model has no recency table
        self.candidate_embedding = nn.Parameter(model.candidate_embedding.detach().clone())
        self.slopes = nn.Parameter(model.slopes.detach().clone())
        self.head = copy.deepcopy(model.head)
        self.compute_dtype = dtype  # the item tokens' compute dtype (a table passed in another one is cast)
        self.to(dtype)
        self.requires_grad_(False)
        self.eval()
        SpeederModel.set_backend(self.as_model, backend)

    @property
    def as_model(self) -> SpeederModel:
        """This module where ``SpeederModel``'s inference methods take their ``self``: it holds every attribute
        ``set_backend``, ``prompt`` and ``pred_state`` read (a duck-typed stand-in, hence the cast)."""
        return cast(SpeederModel, self)

    def valid(self, history_ids: torch.Tensor, history_mask: torch.Tensor, candidate_ids: torch.Tensor,
              num_items: int | torch.SymInt) -> tuple[torch.Tensor, torch.Tensor]:
        """(valid rows bool [B], valid candidates bool [B, K]) by the rules of the module docstring; shape
        bounds are tensor comparisons (no guard on the symbolic sizes, so they survive export)."""
        slot = torch.arange(history_ids.shape[1], device=history_ids.device)
        length = history_mask.sum(1)
        in_catalog = (history_ids >= 0) & (history_ids < num_items)
        rows = ((history_mask == (slot[None, :] < length[:, None])).all(1) & (length >= 1)
                & (in_catalog | ~history_mask).all(1) & (slot < self.max_history).all())
        cands = (candidate_ids >= 0) & (candidate_ids < num_items)
        if self.max_candidates is not None:
            cands = cands & (torch.arange(candidate_ids.shape[1], device=cands.device) < self.max_candidates).all()
        return rows, cands

    def query(self, history_ids: torch.Tensor, history_mask: torch.Tensor, candidate_ids: torch.Tensor,
              item_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(PRED query [B, d], candidate item tokens [B, K, d], both float32, valid rows [B], valid candidates
        [B, K]). Invalid rows run as empty histories and invalid candidates as item 0 (in range, discarded).
        ``item_tokens`` is already in the compute dtype (``table``)."""
        rows, cands = self.valid(history_ids, history_mask, candidate_ids, item_tokens.shape[0])
        real = history_mask & rows[:, None]
        history = torch.where(real, history_ids, -1)
        safe_candidates = torch.where(cands, candidate_ids, 0)
        model = self.as_model
        embeds, lay, cand_tok = SpeederModel.prompt(model, history, real.sum(1), safe_candidates, item_tokens)
        return SpeederModel.pred_state(model, embeds, lay).float(), cand_tok.float(), rows, cands

    def table(self, item_tokens: torch.Tensor) -> torch.Tensor:
        """The item tokens in the compute dtype (a no-op unless the stored dtype differs: bf16 graphs)."""
        return item_tokens.to(self.compute_dtype)


class ScoringGraph(nn.Module):
    """Candidate scoring: ``forward(history_ids, history_mask, candidate_ids, item_tokens) -> scores [B, K]``."""

    def __init__(self, model: SpeederModel, dtype: torch.dtype = torch.float32, backend: str = "sdpa",
                 ranges: Ranges | None = None) -> None:
        super().__init__()
        self.core = _Slim(model, dtype, backend, ranges)

    def forward(self, history_ids: torch.Tensor, history_mask: torch.Tensor, candidate_ids: torch.Tensor,
                item_tokens: torch.Tensor) -> torch.Tensor:
        query, cand, rows, cands = self.core.query(history_ids, history_mask, candidate_ids, self.core.table(item_tokens))
        scores = torch.einsum("bd,bkd->bk", query, cand)
        return scores.masked_fill(~(rows[:, None] & cands), float("nan"))


class TopKGraph(nn.Module):
    """Full-catalog top-``k``: ``forward(history_ids, history_mask, item_tokens) -> (item_ids [B, k], scores [B, k])``."""

    def __init__(self, model: SpeederModel, k: int, dtype: torch.dtype = torch.float32, backend: str = "sdpa",
                 ranges: Ranges | None = None) -> None:
        super().__init__()
        if not 1 <= k <= model.num_items:
            raise ValueError(f"--topk must be in 0..{model.num_items} (the catalog size; 0 = no top-k graph), got {k}")
        self.k = k
        self.core = _Slim(model, dtype, backend, ranges)

    def forward(self, history_ids: torch.Tensor, history_mask: torch.Tensor,
                item_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        table = self.core.table(item_tokens)
        query, _, rows, _ = self.core.query(history_ids, history_mask, history_ids[:, :0], table)
        scores = query @ table.float().T
        # Masked entries point at the row's first item (real in a valid row; item 0 in an invalid one), so
        # every index is in range and every write is "seen": duplicate indices cannot race (a plain
        # scatter, no reduction: ONNX / TensorRT friendly).
        first = torch.where(rows, history_ids[:, 0], 0)[:, None]
        seen_ids = torch.where(history_mask & rows[:, None], history_ids, first)
        seen = torch.zeros_like(scores, dtype=torch.bool).scatter(1, seen_ids, True)
        top = scores.masked_fill(seen, float("-inf")).topk(self.k, dim=1)
        valid = rows[:, None]
        return top.indices.masked_fill(~valid, -1), top.values.masked_fill(~valid, float("nan"))


class QueryGraph(nn.Module):
    """The PRED query vector: ``forward(history_ids, history_mask, item_tokens) -> query float32 [B, d]``; item ``i``
    scores ``query . item_tokens[i]`` (TopKGraph's scores); an invalid row's query is NaN."""

    def __init__(self, model: SpeederModel, dtype: torch.dtype = torch.float32, backend: str = "sdpa",
                 ranges: Ranges | None = None) -> None:
        super().__init__()
        self.core = _Slim(model, dtype, backend, ranges)

    def forward(self, history_ids: torch.Tensor, history_mask: torch.Tensor, item_tokens: torch.Tensor) -> torch.Tensor:
        query, _, rows, _ = self.core.query(history_ids, history_mask, history_ids[:, :0], self.core.table(item_tokens))
        return query.masked_fill(~rows[:, None], float("nan"))


def example_inputs(item_tokens: torch.Tensor, topk: bool, device: str | torch.device = "cpu") -> tuple[torch.Tensor, ...]:
    """Tracing inputs of batch 2, width 2, 2 candidates (size 1 would be specialised), ragged lengths, over the
    table ``item_tokens``."""
    gen = torch.Generator().manual_seed(0)
    num_items = item_tokens.shape[0]
    ids = torch.randint(0, num_items, (2, 2), generator=gen)
    mask = torch.tensor([[True, True], [True, False]])
    args = (ids, mask) if topk else (ids, mask, torch.randint(0, num_items, (2, 2), generator=gen))
    return tuple(a.to(device) for a in (*args, item_tokens))


def dynamic_shapes(ranges: Ranges, topk: bool, min_items: int = 2) -> dict[str, dict[int, Any]]:
    """torch.export ``dynamic_shapes`` within ``ranges``. Every dimension stays symbolic, whatever the
    ranges: bounds below 3 are widened to 3 (the runtime enforces the real ones), because torch.export does
    not unify the shared batch / history symbols of different inputs when the example size is the bound.
    The table's rows are unbounded above (a catalog grows) and at least ``min_items`` (>= 2: 1 would be
    specialised; top-k's k: a table cannot shrink below it, versions only append)."""
    def dim(name: str, top: int) -> Any:
        return torch.export.Dim(name, min=1, max=max(3, top))

    batch, hist = dim("batch", ranges.max_batch), dim("history", ranges.max_history)
    shapes = {"history_ids": {0: batch, 1: hist}, "history_mask": {0: batch, 1: hist}}
    if not topk:
        shapes["candidate_ids"] = {0: batch, 1: dim("candidates", ranges.max_candidates)}
    shapes[ITEM_TOKENS] = {0: torch.export.Dim("num_items", min=max(2, min_items))}
    return shapes


def export_program(graph: nn.Module, args: tuple[torch.Tensor, ...], ranges: Ranges, topk: bool) -> torch.export.ExportedProgram:
    """``torch.export.export`` with the ranges' dynamic shapes.

    Deferred runtime asserts: the symbolic solver cannot prove some trivially true guards of HF's
    ``repeat_kv`` reshape (``min(16 L, 32 L) == 16 L``) and would reject the dynamic history dimension.
    """
    with torch.no_grad():
        shapes = dynamic_shapes(ranges, topk, graph.k if isinstance(graph, TopKGraph) else 2)
        return torch.export.export(graph, args, dynamic_shapes=shapes, strict=False,
                                   prefer_deferred_runtime_asserts_over_guards=True)


# -- parity ------------------------------------------------------------------------------------
@dataclass
class ParityCase:
    batch: int
    history: int
    candidates: int
    history_lengths: list[int]
    max_abs_error: float = 0.0
    max_rel_error: float = 0.0
    scale: float = 1.0
    top1_agreement: float = 1.0
    passed: bool = True
    non_finite: str = ""  # e.g. "reference nan": a side scored NaN or an infinity (fails whatever atol)


@dataclass
class ParityReport:
    atol: float
    rule: str = "max|engine - reference| <= atol * max(1, max|reference|), per case"
    scores: list[ParityCase] = field(default_factory=list)
    topk: list[ParityCase] = field(default_factory=list)
    query: list[ParityCase] = field(default_factory=list)  # exports with a query graph; ``candidates``: the width d
    topk_k: int = 0

    def _named_cases(self) -> tuple[tuple[str, list[ParityCase]], ...]:
        return ("scores", self.scores), ("topk", self.topk), ("query", self.query)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.scores + self.topk + self.query)

    def failure(self) -> str:
        """Why the parity check failed, in one sentence."""
        cases = self.scores + self.topk + self.query
        broken = next((c for c in cases if c.non_finite), None)
        if broken:
            side, _, value = broken.non_finite.partition(" ")
            cause = ("the model's weights or item features are not finite (a diverged training?)" if side == "reference"
                     else "the engine computes what the model does not")
            return f"parity failed: the {side} scored {value} on valid inputs; {cause}"
        return f"parity outside atol={self.atol:g} (max relative error {max(c.max_rel_error for c in cases):.3e})"

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"passed": self.passed, "atol": self.atol, "rule": self.rule}
        for name, cases in self._named_cases():
            if cases:
                out[name] = {"max_abs_error": max(c.max_abs_error for c in cases),
                             "max_rel_error": max(c.max_rel_error for c in cases),
                             "top1_agreement": float(np.mean([c.top1_agreement for c in cases])),
                             "passed": all(c.passed for c in cases),
                             **({"k": self.topk_k} if name == "topk" else {}),
                             "cases": [asdict(c) for c in cases]}
        return out

    def table(self) -> str:
        """Human-readable lines, one per case."""
        lines = [f"parity ({self.rule}; atol={self.atol:g}):"]
        for name, cases in self._named_cases():
            for c in cases:
                lines.append(f"  {name:6s} B={c.batch:<3d} n={c.history:<3d} K={c.candidates:<4d} max_abs={c.max_abs_error:.3e} "
                             f"max_rel={c.max_rel_error:.3e} top1={c.top1_agreement:.2f} {'ok' if c.passed else 'FAIL'}"
                             + (f" ({c.non_finite})" if c.non_finite else ""))
        return "\n".join(lines)


def parity_shapes(ranges: Ranges) -> list[tuple[int, int, int]]:
    """(batch, history width, candidates): the corners of the ranges and a ragged middle case."""
    b, n, k = ranges.max_batch, ranges.max_history, ranges.max_candidates
    shapes = [(1, 1, 1), (b, n, k), (min(b, 5), max(1, n // 2), max(1, k // 3)), (min(b, 3), n, 1), (1, n, k)]
    return list(dict.fromkeys(shapes))


def parity_cases(num_items: int, ranges: Ranges, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Random valid (history_ids with -1 padding, history_mask, candidate_ids) for ``parity_shapes``."""
    rng = np.random.default_rng(seed)
    cases = []
    for b, n, k in parity_shapes(ranges):
        lengths = rng.integers(1, n + 1, size=b)
        lengths[0] = n
        mask = np.arange(n)[None, :] < lengths[:, None]
        ids = np.where(mask, rng.integers(0, num_items, size=(b, n)), -1)
        cases.append((ids.astype(np.int64), mask, rng.integers(0, num_items, size=(b, k)).astype(np.int64)))
    return cases


def non_finite(got: np.ndarray, want: np.ndarray, excluded: bool = False) -> str:
    """"" when every score of both sides is finite, else the first side holding a NaN or an infinity and that value
    ("reference nan", "engine inf"). ``excluded``: top-k values, where -inf on both sides at the same place is an
    excluded history item (a k beyond the items left)."""
    finite_got, finite_want = np.isfinite(got), np.isfinite(want)
    if excluded:
        both = (got == -np.inf) & (want == -np.inf)
        finite_got, finite_want = finite_got | both, finite_want | both
    for side, values, finite in (("reference", want, finite_want), ("engine", got, finite_got)):
        if not finite.all():
            return f"{side} {float(values[~finite].flat[0])}"
    return ""


def _compare(case: ParityCase, got: np.ndarray, want: np.ndarray, atol: float, excluded: bool = False) -> None:
    case.non_finite = non_finite(got, want, excluded)
    finite = np.isfinite(want)
    if case.non_finite or not np.array_equal(finite, np.isfinite(got)):
        case.max_abs_error = case.max_rel_error = math.inf
    elif finite.any():
        err = np.abs(got[finite].astype(np.float64) - want[finite])
        case.scale = float(max(1.0, np.abs(want[finite]).max()))
        case.max_abs_error = float(err.max())
        case.max_rel_error = case.max_abs_error / case.scale
    case.passed = case.max_rel_error <= atol


@torch.no_grad()
def check_parity(runner: Runner, model: SpeederModel, ranges: Ranges, atol: float, seed: int = 0,
                 query: bool = False) -> ParityReport:
    """Compare ``runner`` with the PyTorch model (its own dtype and attention backend) on ``parity_cases``;
    ``query``: its query graph too (the query vectors, element by element)."""
    model.eval()
    device = model.available.device
    table = model.item_token_table()
    report = ParityReport(atol=atol, topk_k=runner.topk_k)
    for ids, mask, cands in parity_cases(model.num_items, ranges, seed):
        history = torch.from_numpy(ids).to(device)
        history_len = torch.from_numpy(mask.sum(1)).to(device)
        shape = dict(batch=ids.shape[0], history=ids.shape[1], history_lengths=mask.sum(1).tolist())
        want = model(history, history_len, torch.from_numpy(cands).to(device), item_tokens=table).double().cpu().numpy()
        got = runner.scores(ids, mask, cands)
        case = ParityCase(candidates=cands.shape[1], **shape)
        _compare(case, got, want, atol)
        case.top1_agreement = float((got.argmax(1) == want.argmax(1)).mean())
        report.scores.append(case)
        if not (runner.topk_k or query):
            continue
        want_query = _reference_query(model, table, history, history_len)  # what top-k and the query graph share
        if runner.topk_k:
            report.topk.append(_check_topk(runner, model, table, want_query, ids, mask, atol, shape))
        if query:
            case = ParityCase(candidates=want_query.shape[1], **shape)
            _compare(case, runner.query(ids, mask), want_query.double().cpu().numpy(), atol)
            report.query.append(case)
    return report


def _reference_query(model: SpeederModel, table: torch.Tensor, history: torch.Tensor,
                     history_len: torch.Tensor) -> torch.Tensor:
    """The PyTorch model's PRED query vectors float32 [B, d]."""
    embeds, lay, _ = model.prompt(history, history_len, history[:, :0], table)
    return model.pred_state(embeds, lay).float()


def _check_topk(runner: Runner, model: SpeederModel, table: torch.Tensor, want_query: torch.Tensor,
                ids: np.ndarray, mask: np.ndarray, atol: float, shape: dict[str, Any]) -> ParityCase:
    """Top-k values against the reference's (``want_query``: the reference's query vectors, ``_reference_query``),
    and the reference's scores of the returned ids against the returned scores (tie-robust: equal-score items may
    come back in either order)."""
    full = (want_query @ table.float().T).double().cpu().numpy()
    rows = np.arange(len(ids))[:, None]
    full[np.broadcast_to(rows, ids.shape)[mask], ids[mask]] = -np.inf
    k = runner.topk_k
    want_ids = np.argsort(-full, axis=1, kind="stable")[:, :k]
    got_ids, got = runner.topk(ids, mask)
    case = ParityCase(candidates=k, **shape)
    _compare(case, got, full[rows, want_ids], atol, excluded=True)
    consistent = ParityCase(candidates=k, **shape)
    in_range = (got_ids >= 0).all() and (got_ids < model.num_items).all()
    if in_range:
        _compare(consistent, got, full[rows, got_ids], atol, excluded=True)
    else:
        consistent.max_abs_error = consistent.max_rel_error = math.inf
        consistent.passed = False
    case.max_abs_error = max(case.max_abs_error, consistent.max_abs_error)
    case.max_rel_error = max(case.max_rel_error, consistent.max_rel_error)
    case.passed = case.passed and consistent.passed
    case.non_finite = case.non_finite or consistent.non_finite
    case.top1_agreement = float((got_ids[:, 0] == want_ids[:, 0]).mean())
    return case
