"""Shared builders of the Speeder-vs-text-baseline suites (training, inference, runtime).

Models are random-init on a ``SHAPES`` preset and built once per configuration on the CPU. Training gets a fresh
device copy per test (``train_model``); inference shares one resident eval copy across tests (``eval_model``), and
only one model is on the device at a time, so a benchmark's peak memory is its own. ``run`` appends a benchmark's
median to ``RESULTS``, which ``conftest.py`` turns into the report.
"""
from __future__ import annotations

import copy
import functools
import gc
import resource
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from speeder_rt.baselines.text_item import TextBaselineConfig, TextItemBaseline
from speeder_rt.data.item_table import ItemTable
from speeder_rt.model.backbone import BackboneConfig, LoraSettings
from speeder_rt.model.speeder import SpeederConfig, SpeederModel

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPE = "bfloat16" if CUDA else "float32"
NUM_CANDIDATES = 20
NUM_ITEMS = 2048
MODALITY_WIDTHS = {"text": 384, "collab": 64, "image": 48}
WORD_POOL = 200  # distinct title words; each appears with and without a leading space (<= 400 tokens)
INFERENCE_BATCHES = (1, 16, 128) if CUDA else (1, 16)
RUNTIME_BATCHES = (1, 16, 128, 256) if CUDA else (1, 16)
ROUNDS, WARMUP = 5, 2
SLOW_ROUNDS, SLOW_WARMUP = 3, 1  # text-baseline generation: the slowest case

RESULTS: list[dict[str, Any]] = []


@dataclass(frozen=True)
class Settings:
    """The command-line options (see ``conftest.py``)."""

    shape: str
    title_tokens: int
    max_new_tokens: int
    train_batch: int


_resident: dict[tuple[str, Settings], torch.nn.Module] = {}  # at most one eval model on the device


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


@functools.lru_cache(maxsize=2)
def item_table(title_tokens: int, num_items: int = NUM_ITEMS, seed: int = 0) -> ItemTable:
    """Random features (text 384 / collab 64 / image 48, ~15% images missing) and titles of ``title_tokens``
    distinct letter-only words, i.e. exactly ``title_tokens`` WordTokenizer tokens each."""
    if not 1 <= title_tokens <= WORD_POOL:
        raise ValueError(f"--bench-title-tokens must be in 1..{WORD_POOL}, got {title_tokens}")
    rng = np.random.default_rng(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = ["".join(letters[(i // 26**p) % 26] for p in range(3)) + "x" for i in range(WORD_POOL)]
    titles = [" ".join(words[w] for w in rng.choice(WORD_POOL, title_tokens, replace=False)) for _ in range(num_items)]
    table = ItemTable([f"item{i}" for i in range(num_items)], titles=titles)
    for name, width in MODALITY_WIDTHS.items():
        available = rng.random(num_items) >= 0.15 if name == "image" else None
        table.set_modality(name, rng.standard_normal((num_items, width)).astype(np.float32), available=available)
    return table


def _backbone(settings: Settings, lora: bool) -> BackboneConfig:
    return BackboneConfig(shape=settings.shape, dtype=DTYPE, lora=LoraSettings() if lora else None)


@functools.cache
def _cpu_model(kind: str, settings: Settings, lora: bool) -> torch.nn.Module:
    table = item_table(settings.title_tokens)
    if kind == "speeder":
        return SpeederModel(SpeederConfig(backbone=_backbone(settings, lora)), table)
    if kind != "text_baseline":
        raise ValueError(f"unknown model kind {kind!r}")
    cfg = TextBaselineConfig(backbone=_backbone(settings, lora), max_title_tokens=settings.title_tokens,
                             max_new_tokens=settings.max_new_tokens)
    return TextItemBaseline(cfg, table)


def release() -> None:
    """Free device memory of models nobody holds any more."""
    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()


def _set_backend(model: torch.nn.Module, backend: str | None) -> None:
    """Set a Speeder model's attention backend (default: speeder_rt's fast path, triton on CUDA / sdpa on CPU)."""
    if isinstance(model, SpeederModel):
        model.set_backend(backend or ("triton" if CUDA else "sdpa"))


def train_model(kind: str, settings: Settings, lora: bool) -> torch.nn.Module:
    """A fresh device copy of ``kind`` ("speeder" or "text_baseline") in train mode; evicts the resident model."""
    _resident.clear()
    release()
    model = copy.deepcopy(_cpu_model(kind, settings, lora)).to(DEVICE).train()
    _set_backend(model, None)
    return model


def eval_model(kind: str, settings: Settings, backend: str | None = None) -> torch.nn.Module:
    """The resident eval-mode device copy of ``kind`` (no LoRA), shared by inference tests; Speeder's attention
    backend is set on every call (default: the fast path)."""
    if (kind, settings) not in _resident:
        _resident.clear()
        release()
        _resident[kind, settings] = copy.deepcopy(_cpu_model(kind, settings, False)).to(DEVICE).eval()
    model = _resident[kind, settings]
    _set_backend(model, backend)
    return model


def requests(batch: int, history: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """(history [B, W] full rows, history_len [B], candidates [B, K], label [B]) on the device."""
    gen = torch.Generator().manual_seed(seed * 1000 + batch)
    hist = torch.randint(0, NUM_ITEMS, (batch, history), generator=gen)
    cand = torch.randint(0, NUM_ITEMS, (batch, NUM_CANDIDATES), generator=gen)
    label = torch.randint(0, NUM_CANDIDATES, (batch,), generator=gen)
    return tuple(t.to(DEVICE) for t in (hist, torch.full((batch,), history), cand, label))


def speeder_prompt_tokens(model: SpeederModel, history: int) -> int:
    return sum(model.template_sizes) + 1 + history + NUM_CANDIDATES


@contextmanager
def peak_memory(extra_info: dict[str, Any]) -> Iterator[None]:
    """Record the peak memory of the block: CUDA max_memory_allocated after a reset, or on CPU the
    process's peak RSS (a high-water mark of the whole session, not of the block alone)."""
    if CUDA:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    yield
    if CUDA:
        extra_info.update(peak_memory_mib=torch.cuda.max_memory_allocated() / 2**20, memory="cuda max_memory_allocated")
    else:
        extra_info.update(peak_memory_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                          memory="process peak RSS (session high-water mark)")


def run(benchmark, fn: Callable[[], Any], suite: str, method: str, variant: str, batch: int, history: int,
        slow: bool = False, after: Callable[[], dict[str, Any]] | None = None, **extra: Any) -> None:
    """Time ``fn`` (which synchronizes) with pedantic rounds; record peak memory, ``extra``, what ``after()``
    returns once the rounds are done, and the median."""
    rounds, warmup = (SLOW_ROUNDS, SLOW_WARMUP) if slow else (ROUNDS, WARMUP)
    benchmark.group = f"{suite}-{variant}-h{history}-b{batch}"
    info = benchmark.extra_info
    info.update(suite=suite, method=method, variant=variant, batch=batch, history=history, **extra)
    with peak_memory(info):
        benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=warmup)
    if after is not None:
        info.update(after())
    if benchmark.stats is not None:  # None under --benchmark-disable
        RESULTS.append(dict(info, median_s=benchmark.stats.stats.median))
