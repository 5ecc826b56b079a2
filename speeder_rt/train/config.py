"""Run configuration: one YAML file describes data, features, model, MPO schedule and training.

Unknown keys are errors that name the section and the key, so a typo never silently falls back to a
default.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from speeder_rt.model.mpo import MPOStage
from speeder_rt.model.speeder import SpeederConfig


@dataclass
class DataConfig:
    source: str = "synthetic"  # synthetic | movielens | movielens:DIR | csv:FILE | amazon:REVIEWS[,META]
    synthetic: dict[str, Any] = field(default_factory=dict)  # SyntheticConfig overrides
    split: dict[str, Any] = field(default_factory=lambda: {"short_users": "drop"})  # SplitConfig overrides
    text_features: str = "auto"  # auto (synthetic: generated; else MiniLM) | minilm | none
    image_features: str | None = None  # a .safetensors/.npz/.npy file keyed by item
    collab_features: bool = True  # SASRec item embeddings trained on the training split
    sasrec: dict[str, Any] = field(default_factory=lambda: {"epochs": 20})  # SASRecConfig overrides


@dataclass
class TrainConfig:
    batch_size: int = 64
    eval_batch_size: int = 256
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    max_train_samples_per_epoch: int | None = None  # subsample the training split each epoch
    checkpoint_every: int = 0  # steps; 0 = at epoch ends only
    device: str = "auto"
    progress: bool = True


@dataclass
class TextBaselineSection:
    epochs: int = 1
    lr: float = 1e-3
    max_title_tokens: int = 32
    max_new_tokens: int = 40
    eval_limit: int | None = 200  # generation is slow: evaluate this many test users (None = all)


@dataclass
class RunConfig:
    out_dir: str = "runs/demo"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: SpeederConfig = field(default_factory=SpeederConfig)
    mpo: list[MPOStage] | None = None  # None = default_schedule over the model's modalities
    mpo_defaults: dict[str, Any] = field(default_factory=lambda: {"epochs": 1, "lr": 1e-3, "warmup_steps": 20})
    train: TrainConfig = field(default_factory=TrainConfig)
    text_baseline: TextBaselineSection = field(default_factory=TextBaselineSection)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _build(cls, values: dict[str, Any] | None, where: str):
    values = dict(values or {})
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"{where}: unknown key {unknown[0]!r}; known keys: {sorted(names)}")
    try:
        return cls(**values)
    except TypeError as e:
        raise ValueError(f"{where}: {e}") from None


def run_config_from_dict(raw: dict[str, Any], where: str = "config") -> RunConfig:
    raw = dict(raw or {})
    top = {f.name for f in dataclasses.fields(RunConfig)}
    unknown = sorted(set(raw) - top)
    if unknown:
        raise ValueError(f"{where}: unknown section {unknown[0]!r}; known: {sorted(top)}")
    model_raw = dict(raw.get("model") or {})
    from speeder_rt.model.backbone import BackboneConfig
    from speeder_rt.model.prompt import TemplateConfig

    model_raw["backbone"] = _build(BackboneConfig, model_raw.get("backbone"), f"{where}: model.backbone")
    model_raw["template"] = _build(TemplateConfig, model_raw.get("template"), f"{where}: model.template")
    stages = raw.get("mpo")
    return RunConfig(
        out_dir=str(raw.get("out_dir", RunConfig.out_dir)),
        seed=int(raw.get("seed", 0)),
        data=_build(DataConfig, raw.get("data"), f"{where}: data"),
        model=_build(SpeederConfig, model_raw, f"{where}: model"),
        mpo=None if stages is None else [_build(MPOStage, s, f"{where}: mpo[{i}]") for i, s in enumerate(stages)],
        mpo_defaults=dict(raw.get("mpo_defaults") or RunConfig().mpo_defaults),
        train=_build(TrainConfig, raw.get("train"), f"{where}: train"),
        text_baseline=_build(TextBaselineSection, raw.get("text_baseline"), f"{where}: text_baseline"),
    )


def load_run_config(path: str | Path) -> RunConfig:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: config file not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        raise ValueError(f"{path}:{line} invalid YAML ({getattr(e, 'problem', e)})") from None
    if raw is not None and not isinstance(raw, dict):
        raise ValueError(f"{path}: top level must be a mapping")
    return run_config_from_dict(raw or {}, str(path))
