"""``OptimizedSpeeder``: the serving fast path of a ``SpeederModel`` (candidate scoring).

    fast = OptimizedSpeeder(model)                      # takes the model over: eval mode, fast backend
    scores = fast.scores(history, history_len, candidates)   # float32 [B, K] == model(...) up to rounding
    scores = fast.recommend([[3, 17, 5], [8]], [[1, 2, 3], [4, 5, 6]])   # numpy, the Recommender's requests

``recommend`` takes the requests of ``Recommender.recommend`` (lists, or arrays padded with negative ids) and
checks them by the request contract (``speeder_rt.runtime.validation``: ``RequestError`` with every runtime's
messages; max_history is the model's, max_candidates the constructor's). ``scores`` is the model's tensor form:
its shapes and ranges are ``SpeederModel.check_inputs``', integer dtypes and the candidate count the contract's.
Both raise ``ModelOutputError`` rather than return a NaN or infinite score (non-finite weights or features).

What it does differently from calling the model:

* item tokens come from the precomputed item-token table (MoME runs once, at construction);
* attention runs on speeder_rt's Triton kernel on CUDA (SDPA with the bias materialised on CPU);
* shapes are static: the batch is padded up to the next of ``buckets``, the history width up to the next of
  ``history_buckets`` (the model's ``max_history`` is always the last), K as given; padded rows are valid dummy
  requests whose scores are dropped, padded history columns lie beyond ``history_len`` and are ignored by the
  model. A batch larger than the biggest bucket is served in chunks;
* on CUDA (``use_cuda_graphs``) one CUDA graph per (batch bucket, history bucket, K) is captured on first use,
  after a warm-up on a side stream, and replayed with the inputs copied into its static buffers; the graphs share
  one memory pool (they never run concurrently, and each result is copied out before the next replay);
* ``compile=True`` wraps the scoring function in ``torch.compile(dynamic=False)`` (before any capture).

Weights stay in the model's dtype. Not thread-safe: one caller at a time (the static buffers are shared).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from speeder_rt.data.sequences import PAD
from speeder_rt.export.format import Ranges
from speeder_rt.model.speeder import SpeederModel
from speeder_rt.runtime.recommender import pad_histories
from speeder_rt.runtime.validation import Ids, RequestContract, check_finite_scores, check_integer_dtype

DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
DEFAULT_HISTORY_BUCKETS = (10, 20, 50)

Inputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    inputs: Inputs  # static history [b, w], history_len [b], candidates [b, K]
    scores: torch.Tensor  # static output [b, K]


def _next_bucket(buckets: Sequence[int], size: int) -> int:
    return next(b for b in buckets if b >= size)


class OptimizedSpeeder:
    """Scores candidates like ``SpeederModel.forward``, through the fast path described in the module docstring."""

    def __init__(self, model: SpeederModel, buckets: Sequence[int] = DEFAULT_BUCKETS,
                 history_buckets: Sequence[int] = DEFAULT_HISTORY_BUCKETS, use_cuda_graphs: bool = True,
                 compile: bool = False, max_candidates: int = Ranges.max_candidates) -> None:
        if not buckets or min(buckets) < 1 or not history_buckets or min(history_buckets) < 1:
            raise ValueError(f"buckets and history_buckets must be non-empty and >= 1, got {list(buckets)}, "
                             f"{list(history_buckets)}")
        self.model = model.eval()
        self.device = model.available.device
        self.backend = "triton" if self.device.type == "cuda" else "sdpa"
        model.set_backend(self.backend)
        self.table = model.item_token_table()
        self.buckets = sorted(set(buckets))
        max_history = model.cfg.max_history
        self.history_buckets = sorted({min(w, max_history) for w in history_buckets} | {max_history})
        # K is part of every shape (and CUDA graph) key: the bound keeps their number bounded
        self.contract = RequestContract(model.num_items, max_history, max_candidates, max_topk=0)
        self.use_cuda_graphs = use_cuda_graphs and self.device.type == "cuda"
        self._fn: Callable[..., torch.Tensor] = self._score
        if compile:  # one compilation per static shape: allow every bucket pair with a few values of K
            limit = 4 * len(self.buckets) * len(self.history_buckets)
            self._fn = torch._dynamo.config.patch(recompile_limit=limit)(torch.compile(self._score, dynamic=False))
        self._graphs: dict[tuple[int, int, int], _Graph] = {}
        self._pool = torch.cuda.graph_pool_handle() if self.use_cuda_graphs else None

    def _score(self, history: torch.Tensor, history_len: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """``SpeederModel.forward`` with the table, without its id checks (they synchronise with the host)."""
        embeds, lay, cand_tok = self.model.prompt(history, history_len, candidates, self.table)
        query = self.model.pred_state(embeds, lay)
        return torch.einsum("bd,bkd->bk", query.float(), cand_tok.float())

    def recommend(self, history_ids: Ids, candidate_ids: Ids) -> np.ndarray:
        """Scores float32 [B, K] (numpy) of ``Recommender.recommend``'s requests, checked by the contract."""
        histories, candidates = self.contract.recommend(history_ids, candidate_ids)
        history, mask = pad_histories(histories)
        inputs = (torch.from_numpy(history), torch.from_numpy(mask.sum(1)), torch.from_numpy(candidates))
        scores = self._serve(*inputs).cpu().numpy()
        check_finite_scores(scores)
        return scores

    def scores(self, history: torch.Tensor, history_len: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """float32 [B, K] on the model's device: history [B, W] (PAD after the ``history_len`` [B] real items),
        candidates [B, K] item ids."""
        self._check(history, history_len, candidates)
        scores = self._serve(history, history_len, candidates)
        if not bool(torch.isfinite(scores).all()):
            check_finite_scores(scores.cpu().numpy(), "history")
        return scores

    @torch.no_grad()
    def _serve(self, history: torch.Tensor, history_len: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        history, history_len, candidates = (t.to(self.device, torch.int64) for t in (history, history_len, candidates))
        step = self.buckets[-1]
        parts = [self._run(history[a:a + step], history_len[a:a + step], candidates[a:a + step])
                 for a in range(0, history.shape[0], step)]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _check(self, history: torch.Tensor, history_len: torch.Tensor, candidates: torch.Tensor) -> None:
        for name, tensor in (("history", history), ("candidates", candidates), ("history_len", history_len)):
            check_integer_dtype(tensor.dtype, name, "item ids" if name != "history_len" else "lengths")
        batch, width = history.shape if history.ndim == 2 else (-1, -1)
        if batch < 1 or history_len.shape != (batch,) or candidates.ndim != 2 or candidates.shape[0] != batch:
            raise ValueError(f"history [B, W], history_len [B], candidates [B, K] with B >= 1 expected; got "
                             f"{list(history.shape)}, {list(history_len.shape)}, {list(candidates.shape)}")
        if width > self.history_buckets[-1]:
            raise ValueError(f"history width {width} exceeds max_history={self.history_buckets[-1]}")
        self.contract.check_count(candidates.shape[1], "candidates")
        self.model.check_inputs(history, history_len, candidates)

    def _pad(self, history: torch.Tensor, history_len: torch.Tensor, candidates: torch.Tensor,
             rows: int, width: int) -> Inputs:
        """The request padded to ``rows`` x ``width``; extra rows are one-item histories of item 0."""
        batch, w = history.shape
        padded_history = torch.full((rows, width), PAD, dtype=torch.int64, device=self.device)
        padded_history[:, 0] = 0
        padded_history[:batch, :w] = history
        padded_len = torch.ones(rows, dtype=torch.int64, device=self.device)
        padded_len[:batch] = history_len
        padded_candidates = torch.zeros(rows, candidates.shape[1], dtype=torch.int64, device=self.device)
        padded_candidates[:batch] = candidates
        return padded_history, padded_len, padded_candidates

    def _run(self, history: torch.Tensor, history_len: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        batch, width = history.shape
        rows, width = _next_bucket(self.buckets, batch), _next_bucket(self.history_buckets, width)
        inputs = self._pad(history, history_len, candidates, rows, width)
        if not self.use_cuda_graphs:
            return self._fn(*inputs)[:batch]
        key = (rows, width, candidates.shape[1])
        graph = self._graphs.get(key) or self._capture(key, inputs)
        for static, value in zip(graph.inputs, inputs):
            static.copy_(value)
        graph.graph.replay()
        return graph.scores[:batch].clone()

    def _capture(self, key: tuple[int, int, int], example: Inputs) -> _Graph:
        """Warm up on a side stream (Triton autotuning, lazy inits), then capture one graph for ``key``."""
        static: Inputs = (example[0].clone(), example[1].clone(), example[2].clone())
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(3):
                self._fn(*static)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            scores = self._fn(*static)
        self._graphs[key] = _Graph(graph, static, scores)
        return self._graphs[key]


__all__ = ["DEFAULT_BUCKETS", "DEFAULT_HISTORY_BUCKETS", "OptimizedSpeeder"]
