"""Run configuration: one YAML file describes data, features, model, MPO schedule and training.

The whole file is one schema of typed dataclasses (``speeder_rt.utils.schema``), down to the sections
that the data, model and baseline code consume directly (``data.split`` is a ``SplitConfig``,
``data.synthetic`` a ``SyntheticConfig``, ``data.sasrec`` a ``SASRecConfig``, ``mpo[i]`` an ``MPOStage``,
``mpo_defaults`` an ``MPODefaults``). An unknown key at any depth, a wrong type or a value out of range is
one :class:`~speeder_rt.utils.schema.ConfigError` naming the key path, the value and what is allowed, raised
while the file is read: before any data is built or any file written. Keys not given keep the defaults
below. A new setting is one line in its section, e.g. ``grad_accumulation: PositiveInt = 1``.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import yaml

from speeder_rt.baselines.sasrec import SASRecConfig
from speeder_rt.data.sequences import SplitConfig
from speeder_rt.data.sources import parse_source
from speeder_rt.data.synthetic import SyntheticConfig
from speeder_rt.model.mpo import MPODefaults, MPOStage, validate_schedule
from speeder_rt.model.speeder import SpeederConfig
from speeder_rt.utils.schema import (
    ConfigError,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    check,
    from_dict,
    invalid,
)


@dataclass
class DataConfig:
    source: str = "synthetic"  # see speeder_rt.data.sources.SOURCES
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    split: SplitConfig = field(default_factory=lambda: SplitConfig(short_users="drop"))  # seed: the run's (file)
    text_features: Literal["auto", "minilm", "none"] = "auto"  # auto: synthetic: generated; else MiniLM
    image_features: str | None = None  # a .safetensors/.npz/.npy file keyed by item
    collab_features: bool = True  # SASRec item embeddings trained on the training split
    sasrec: SASRecConfig = field(default_factory=lambda: SASRecConfig(epochs=20))  # seed: the run's (file)
    prepared: str | None = None  # a split written by `python -m speeder_rt.data prepare` ("{seed}": the split's seed)

    def __post_init__(self) -> None:
        check(self)
        try:
            parse_source(self.source)
        except ValueError as e:
            raise invalid(self, "source", str(e)) from None

    def identity(self) -> dict[str, Any]:
        """What the data is (a cache or result key): the section less ``prepared``, which only says where a
        copy of the split is read from (its recipe is checked against the rest)."""
        out = dataclasses.asdict(self)
        out.pop("prepared")
        return out

    def feature_modalities(self) -> list[str]:
        """The modalities this section gives items features for (built by ``train.data.item_table``)."""
        synthetic = self.source == "synthetic"  # its table carries generated text and image features
        return [m for m, present in (("text", synthetic or self.text_features != "none"),
                                     ("collab", self.collab_features),
                                     ("image", synthetic or self.image_features is not None)) if present]


@dataclass
class TrainConfig:
    batch_size: PositiveInt = 64  # the global batch: over all ranks under torchrun, a multiple of the world size
    grad_accumulation: PositiveInt = 1  # micro-batches per step and rank (batch_size / world size / this each)
    parallel: Literal["auto", "ddp", "fsdp"] = "auto"  # under torchrun; auto: ddp with LoRA, fsdp (FSDP2) without
    eval_batch_size: PositiveInt = 256  # users per validation / test batch
    weight_decay: NonNegativeFloat = 0.0
    grad_clip: PositiveFloat = 1.0  # max gradient norm
    max_train_samples_per_epoch: PositiveInt | None = None  # subsample the training split each epoch
    checkpoint_every: NonNegativeInt = 0  # steps; 0 = at epoch ends only
    device: str = "auto"  # auto (cuda when available) or a torch device: cpu, cuda, cuda:1
    progress: bool = True  # progress bars (SASRec, features, training, generation)
    num_threads: PositiveInt | None = None  # torch intra-op threads of the process (None: torch's default)
    deterministic: bool = False  # Triton kernels: one fixed config per shape, fixed summation order (bitwise runs)
    autocast: Literal["none", "bf16"] = "none"  # training forward in bf16 (torch.autocast); weights, optimizer, eval fp32
    max_step_seconds: PositiveFloat | None = None  # end the run once its optimizer steps took this long (equal compute)

    def __post_init__(self) -> None:
        check(self)
        if self.device != "auto":
            try:
                torch.device(self.device)
            except RuntimeError:
                raise invalid(self, "device", f"{self.device!r} is not auto or a torch device (cpu, cuda, cuda:1)"
                              ) from None

    def apply_process_settings(self) -> None:
        """Apply the settings that belong to the process, not to one model: torch's intra-op thread count when
        ``num_threads`` is given (on a machine whose cores are shared with other jobs, OpenMP threads that
        spin-wait for descheduled siblings make every op slower than one thread would: measured 8x on the tiny
        backbone at load 13 on 2 cores), and the Triton kernels' fixed configs when ``deterministic``."""
        from speeder_rt.kernels import use_deterministic_kernels

        if self.num_threads is not None:
            torch.set_num_threads(self.num_threads)
        use_deterministic_kernels(self.deterministic)


@dataclass
class TextBaselineSection:
    epochs: NonNegativeInt = 1
    lr: PositiveFloat = 1e-3
    max_title_tokens: PositiveInt = 32
    max_new_tokens: PositiveInt = 40
    eval_limit: PositiveInt | None = 200  # generation is slow: evaluate this many test users (None = all)

    def __post_init__(self) -> None:
        check(self)


@dataclass
class RunConfig:
    out_dir: str = "runs/demo"
    seed: NonNegativeInt = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: SpeederConfig = field(default_factory=SpeederConfig)
    mpo: list[MPOStage] | None = None  # None = default_schedule over the model's modalities
    mpo_defaults: MPODefaults = field(default_factory=lambda: MPODefaults(epochs=1, lr=1e-3, warmup_steps=20))
    train: TrainConfig = field(default_factory=TrainConfig)
    text_baseline: TextBaselineSection = field(default_factory=TextBaselineSection)

    def __post_init__(self) -> None:
        check(self)
        if self.mpo is not None:
            try:
                validate_schedule(self.mpo, self.model.modalities)
            except ValueError as e:
                raise ConfigError(str(e)) from None
        provided = self.data.feature_modalities()
        missing = [m for m in self.model.modalities if m not in provided]
        if missing:
            raise invalid(self, "model.modalities", f"{missing} have no features (data gives {provided}): configure "
                          "data.text_features / data.image_features / data.collab_features, or drop them")
        if self.data.split.history_len > self.model.max_history:
            raise invalid(self, "data.split.history_len", f"{self.data.split.history_len} exceeds model.max_history "
                                                          f"({self.model.max_history})")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def run_config_from_dict(raw: Mapping[str, Any] | None, where: str = "config") -> RunConfig:
    """The run config of a parsed YAML/JSON mapping (a file, or a checkpoint's ``to_dict()``)."""
    if raw is not None and not isinstance(raw, Mapping):
        raise ConfigError(f"the top level must be a mapping of sections, got {type(raw).__name__}", where=where)
    raw = raw or {}
    cfg = from_dict(RunConfig, raw, where)
    data = raw.get("data") or {}
    for section in ("split", "sasrec"):  # their seeds follow the run's unless given
        if "seed" not in (data.get(section) or {}):
            setattr(cfg.data, section, dataclasses.replace(getattr(cfg.data, section), seed=cfg.seed))
    return cfg


def read_config_file(path: str | Path) -> Any:
    """A run-config file as parsed ({} for an empty one); checked by ``run_config_from_dict``, not here."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: config file not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        raise ValueError(f"{path}:{line} invalid YAML ({getattr(e, 'problem', e)})") from None
    return {} if raw is None else raw


def load_run_config(path: str | Path) -> RunConfig:
    return run_config_from_dict(read_config_file(path), str(path))
