"""MPO: Modality-aware Progressive Optimization.

A schedule is a list of stages. Each stage enables a set of modalities (the rest are masked in the MoME
gate exactly like missing ones), trains for ``epochs`` with its own learning rate, and only updates its
``trainable`` module sets. A stage that enables a modality the previous stage did not first runs
``warmup_steps`` steps in which only the new modalities' experts and the gate train.

Module sets: ``experts`` (the experts of the stage's enabled modalities), ``expert:<m>``, ``gate``,
``head``, ``spae`` (recency table, candidate embedding, slopes), ``lora`` (adapter weights),
``backbone`` (every decoder weight: full fine-tune).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, TypedDict

from torch import nn

from speeder_rt.utils.schema import NonNegativeInt, PositiveFloat, check

MODULE_SETS = ("experts", "gate", "head", "spae", "lora", "backbone")
DEFAULT_ORDER = ("text", "collab", "image")


class MPODefaults(TypedDict):
    """The stage settings of the default schedule (``default_schedule``'s keywords; ``mpo_defaults`` in a run)."""

    epochs: NonNegativeInt
    lr: PositiveFloat
    warmup_steps: NonNegativeInt


@dataclass
class MPOStage:
    name: str  # shown in logs and checkpoints
    modalities: list[str]  # the modalities enabled from this stage on
    epochs: NonNegativeInt = 1
    lr: PositiveFloat = 1e-3
    trainable: list[str] = field(default_factory=lambda: ["experts", "gate", "head", "spae", "lora"])  # of MODULE_SETS
    warmup_steps: NonNegativeInt = 0  # steps training only a new modality's expert and the gate first

    def __post_init__(self) -> None:
        check(self)

    def to_dict(self) -> dict:
        return asdict(self)


def default_schedule(modalities: list[str], epochs: int = 1, lr: float = 1e-3, warmup_steps: int = 20,
                     full_finetune: bool = False) -> list[MPOStage]:
    """text -> +collab -> +image (the modality closest to text first), restricted to ``modalities``."""
    order = [m for m in DEFAULT_ORDER if m in modalities] + [m for m in modalities if m not in DEFAULT_ORDER]
    tuned = "backbone" if full_finetune else "lora"
    return [
        MPOStage(name=f"stage{i + 1}:{'+'.join(order[: i + 1])}", modalities=order[: i + 1], epochs=epochs, lr=lr,
                 trainable=["experts", "gate", "head", "spae", tuned], warmup_steps=0 if i == 0 else warmup_steps)
        for i in range(len(order))
    ]


def validate_schedule(stages: list[MPOStage], model_modalities: list[str]) -> None:
    if not stages:
        raise ValueError("mpo: the schedule has no stages")
    for i, s in enumerate(stages):
        for m in s.modalities:
            if m not in model_modalities:
                raise ValueError(f"mpo[{i}].modalities: unknown modality {m!r} (stage {s.name!r}); the model has "
                                 f"{model_modalities}")
        for t in s.trainable:
            if t not in MODULE_SETS and not (t.startswith("expert:") and t[len("expert:"):] in model_modalities):
                raise ValueError(f"mpo[{i}].trainable: unknown trainable set {t!r} (stage {s.name!r}); known: "
                                 f"{list(MODULE_SETS)} and expert:<modality>")


def new_modalities(stages: list[MPOStage], index: int) -> list[str]:
    previous = set(stages[index - 1].modalities) if index > 0 else set()
    return [m for m in stages[index].modalities if m not in previous]


def select_parameters(model: Any, sets: list[str], modalities: list[str]) -> dict[str, nn.Parameter]:
    """Parameters of a Speeder model belonging to the named module sets."""
    chosen: dict[str, nn.Parameter] = {}

    def add(prefix: str, module: nn.Module | nn.Parameter) -> None:
        if isinstance(module, nn.Parameter):
            chosen[prefix] = module
        else:
            for n, p in module.named_parameters():
                chosen[f"{prefix}.{n}"] = p

    for s in sets:
        if s == "experts":
            for m in modalities:
                add(f"mome.experts.{m}", model.mome.experts[m])
        elif s.startswith("expert:"):
            m = s[len("expert:"):]
            add(f"mome.experts.{m}", model.mome.experts[m])
        elif s == "gate":
            add("mome.gate", model.mome.gate)
        elif s == "head":
            add("head", model.head)
        elif s == "spae":
            if model.recency is not None:  # a model with recency off has no table
                add("recency", model.recency)
            add("candidate_embedding", model.candidate_embedding)
            add("slopes", model.slopes)
        elif s == "lora":
            for n, p in model.decoder.named_parameters():
                if "lora_" in n:
                    chosen[f"decoder.{n}"] = p
        elif s == "backbone":
            for n, p in model.decoder.named_parameters():
                if "lora_" not in n:
                    chosen[f"decoder.{n}"] = p
        else:
            raise ValueError(f"unknown trainable set {s!r}")
    return chosen


def set_trainable(model: Any, sets: list[str], modalities: list[str]) -> list[nn.Parameter]:
    """Freeze everything, then unfreeze the named sets; returns the trainable parameters."""
    params = select_parameters(model, sets, modalities)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    return list(params.values())
