"""The model kinds, one object each: what the trainer, evaluation, export and the study need to know about a kind of
model, so that no code outside this module compares a kind's name.

``SPEEDER`` (``SpeederModel``: listwise scores over candidates, MPO phases) and ``TEXT_BASELINE``
(``TextItemBaseline``: generates a title, one phase) each supply the model class (loading a model directory), the
model built for a run, the run's training phases and what each phase trains, the labels of its loss, the terms a
loss averages over, its validation and evaluation, and the metric that picks ``best/``. ``KINDS`` maps the name a
model directory records (config.json's ``model_kind``) to its kind; ``kind_named`` / ``kind_of`` look one up.

The registry sits above ``model`` and ``baselines`` (it imports both; they import neither it nor each other).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from speeder_rt.baselines.text_item import IGNORE, TextBaselineConfig, TextItemBaseline
from speeder_rt.data import ItemTable, SequenceData
from speeder_rt.data.sequences import Samples
from speeder_rt.eval.metrics import ranking_metrics
from speeder_rt.eval.protocol import evaluate, sample_ranks
from speeder_rt.model.mpo import default_schedule, new_modalities, set_trainable, validate_schedule
from speeder_rt.model.pretrained import CONFIG, load_model_dir, read_model_config
from speeder_rt.model.speeder import SpeederModel, resolve_backend
from speeder_rt.train.config import RunConfig
from speeder_rt.train.distributed import World, all_gather_concat, eval_rows, mean_of_counts

TEXT_EVAL_BATCH = 16  # users per generation batch in the text baseline's validation


@dataclass
class Phase:
    stage: int
    name: str  # warmup | main
    modalities: list[str]
    trainable: list[str]
    lr: float
    epochs: int = 0
    steps: int = 0  # warm-up length; main phases run whole epochs
    lr_key: str = ""  # the config key that sets ``lr`` (named when training diverges)


class ModelKind:
    """What one kind of model supplies; the subclasses below are the kinds."""

    name: str
    model_class: type[nn.Module]
    metric: str  # the validation metric that picks best/
    export_refusal: str | None = None  # why the kind has no exported scoring graph (None: it has one)
    full_catalog_refusal: str | None = None  # why it cannot rank the whole catalog (None: it can)

    def build(self, cfg: RunConfig, table: ItemTable, device: torch.device) -> nn.Module:
        """The run's model, freshly initialised (under the caller's RNG), on ``device``."""
        raise NotImplementedError

    def phases(self, cfg: RunConfig) -> list[Phase]:
        """The run's training phases, in order."""
        raise NotImplementedError

    def phase_parameters(self, model: nn.Module, phase: Phase) -> list[nn.Parameter]:
        """Set up ``model`` for ``phase`` (enabled modalities, requires_grad) and return what its optimizer trains."""
        raise NotImplementedError

    def labels(self, samples: Samples) -> np.ndarray:
        """The loss's labels of ``samples`` (the last argument of ``model.loss``)."""
        raise NotImplementedError

    def loss_terms(self, model: nn.Module, samples: Samples, batch: np.ndarray) -> np.ndarray:
        """Per sample of ``batch``, the terms its loss averages over."""
        raise NotImplementedError

    def find_unused_parameters(self, cfg: RunConfig) -> bool:
        """Whether some trainable parameter may reach no loss (DistributedDataParallel must then look for them)."""
        return False

    def validate(self, model: nn.Module, data: SequenceData, cfg: RunConfig, world: World) -> dict[str, float]:
        """Validation metrics over all users: each rank evaluates its block of users (whole batches), the results
        are gathered and the metrics computed once."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module, data: SequenceData, split: str, full_catalog: bool) -> dict[str, float]:
        """The metrics of ``split`` (the eval CLI's)."""
        raise NotImplementedError

    def load(self, path: str | Path) -> nn.Module:
        """The model of a model directory of this kind, on the CPU in eval mode."""
        return load_model_dir(path, self.model_class)


class SpeederKind(ModelKind):
    name = SpeederModel.model_kind
    model_class = SpeederModel
    metric = "NDCG@10"

    def build(self, cfg: RunConfig, table: ItemTable, device: torch.device) -> nn.Module:
        model = SpeederModel(cfg.model, table)
        model.set_backend(resolve_backend(cfg.model.attn_backend, device))
        return model.to(device)

    def phases(self, cfg: RunConfig) -> list[Phase]:
        """Per MPO stage an optional warm-up and the main phase."""
        stages = cfg.mpo or default_schedule(cfg.model.modalities, **cfg.mpo_defaults,
                                             full_finetune=cfg.model.backbone.lora is None)
        validate_schedule(stages, cfg.model.modalities)
        phases = []
        for i, s in enumerate(stages):
            fresh = new_modalities(stages, i)
            lr_key = f"mpo[{i}].lr" if cfg.mpo else "mpo_defaults.lr"
            if i > 0 and fresh and s.warmup_steps > 0:
                phases.append(Phase(i, "warmup", s.modalities, [f"expert:{m}" for m in fresh] + ["gate"], s.lr,
                                    steps=s.warmup_steps, lr_key=lr_key))
            phases.append(Phase(i, "main", s.modalities, s.trainable, s.lr, epochs=s.epochs, lr_key=lr_key))
        return phases

    def phase_parameters(self, model: nn.Module, phase: Phase) -> list[nn.Parameter]:
        model.set_enabled_modalities(phase.modalities)
        return set_trainable(model, phase.trainable, phase.modalities)

    def labels(self, samples: Samples) -> np.ndarray:
        return samples.label

    def loss_terms(self, model: nn.Module, samples: Samples, batch: np.ndarray) -> np.ndarray:
        return np.ones(len(batch))  # a mean over samples

    def find_unused_parameters(self, cfg: RunConfig) -> bool:
        return not cfg.model.relative_bias  # without the relative bias the SPAE slopes (trainable set "spae") reach no loss

    def validate(self, model: nn.Module, data: SequenceData, cfg: RunConfig, world: World) -> dict[str, float]:
        size = cfg.train.eval_batch_size
        rows = eval_rows(world, len(data.valid), size)
        ranks = sample_ranks(model, data, "valid", batch_size=size, rows=rows)
        return ranking_metrics(all_gather_concat(world, ranks))

    def evaluate(self, model: nn.Module, data: SequenceData, split: str, full_catalog: bool) -> dict[str, float]:
        return evaluate(model, data, split, full_catalog=full_catalog)


class TextBaselineKind(ModelKind):
    name = TextItemBaseline.model_kind
    model_class = TextItemBaseline
    metric = "VHR@1"
    export_refusal = "the text-item baseline generates titles token by token and has no scoring graph"
    full_catalog_refusal = "the text-item baseline generates titles; it has no full-catalog ranking"

    def build(self, cfg: RunConfig, table: ItemTable, device: torch.device) -> nn.Module:
        tb = cfg.text_baseline
        model = TextItemBaseline(TextBaselineConfig(backbone=cfg.model.backbone, max_title_tokens=tb.max_title_tokens,
                                                    max_new_tokens=tb.max_new_tokens), table)
        return model.to(device)

    def phases(self, cfg: RunConfig) -> list[Phase]:
        """One main phase over the trainable weights."""
        tb = cfg.text_baseline
        return [Phase(0, "main", [], ["all"], tb.lr, epochs=tb.epochs, lr_key="text_baseline.lr")]

    def phase_parameters(self, model: nn.Module, phase: Phase) -> list[nn.Parameter]:
        return [p for p in model.parameters() if p.requires_grad]

    def labels(self, samples: Samples) -> np.ndarray:
        return samples.target

    def loss_terms(self, model: nn.Module, samples: Samples, batch: np.ndarray) -> np.ndarray:
        """The target's tokens (the loss is a mean over tokens)."""
        part = samples.subset(batch)  # the history windows of ``batch`` only
        prompts = model.build_prompts(part.history, part.history_len, part.candidates, part.target)
        return (prompts.labels != IGNORE).sum(1).numpy()

    def validate(self, model: nn.Module, data: SequenceData, cfg: RunConfig, world: World) -> dict[str, float]:
        valid = data.valid
        limit = cfg.text_baseline.eval_limit
        rows = eval_rows(world, len(valid) if limit is None else min(limit, len(valid)), TEXT_EVAL_BATCH)
        users = rows.stop - rows.start
        if not users:  # more ranks than batches: evaluate one user and count none, so the metric names are known
            rows = slice(0, 1)
        metrics = model.evaluate(dataclasses.replace(data, valid=valid.subset(rows)), "valid",
                                 batch_size=TEXT_EVAL_BATCH, progress=cfg.train.progress and world.is_main)
        return mean_of_counts(world, metrics, users)

    def evaluate(self, model: nn.Module, data: SequenceData, split: str, full_catalog: bool) -> dict[str, float]:
        return model.evaluate(data, split, limit=None)


SPEEDER, TEXT_BASELINE = SpeederKind(), TextBaselineKind()
KINDS: dict[str, ModelKind] = {kind.name: kind for kind in (SPEEDER, TEXT_BASELINE)}
MODEL_KINDS = tuple(KINDS)


def kind_named(name: str) -> ModelKind:
    """The kind called ``name``; a ValueError naming the choices for any other."""
    if name not in KINDS:
        raise ValueError(f"--model must be one of {list(MODEL_KINDS)}, got {name!r}")
    return KINDS[name]


def kind_of(path: str | Path) -> ModelKind:
    """The kind of the model directory ``path`` (its config.json checked)."""
    name = read_model_config(path)["model_kind"]
    if name not in KINDS:
        raise ValueError(f"{Path(path) / CONFIG}: model_kind {name!r} is not one of {list(MODEL_KINDS)}")
    return KINDS[name]


def load_model(path: str | Path) -> Any:
    """The model of any model directory, its class by the kind it records; on the CPU in eval mode."""
    return kind_of(path).load(path)
