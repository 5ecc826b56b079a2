"""The ablation's rows: each one a set of overrides of the study's run config, checked by the config schema.

``full`` is the run config as given. The other Speeder rows take one piece of it away:

- ``mrc_<modalities>``: the mixture of modality experts over fewer modalities (each single modality, and each
  modality set an MPO stage of the config trains, less the full set). The schedule keeps its stages restricted
  to the row's modalities: a stage left with none gives its epochs to the next one, consecutive stages with the
  same modalities merge (their epochs summed), so the row trains as many epochs as ``full``;
- ``spae_off`` (``model.relative_bias: false``), ``recency_off`` (``model.recency: false``), ``spae_recency_off``;
- ``mpo_off``: one MPO stage over every modality from the first step, its epochs the sum of the schedule's,
  the first stage's learning rate and every module set any stage trains.

With a pretrained backbone (``model.backbone.gguf_file`` or ``pretrained``) two rows more:

- ``backbone_tiny``: the tiny random-init backbone (``shape: tiny``, full fine-tune: each stage's ``lora`` becomes
  ``backbone``) trained on exactly the same samples, epochs, batches and learning rates;
- ``text_item``: the text-item baseline (LLaRA-style: titles in the prompt, the target's title generated) on the
  same backbone and LoRA, trained until its optimizer steps took as long as the ``full`` row's of the same seed
  (``train.max_step_seconds``, set when the row runs); evaluated on ``text_baseline.eval_limit`` seeded test
  users (``eval_subset``), where every Speeder row is evaluated too.

``sasrec``, ``popularity`` and ``random`` are the baselines (SASRec with the config's ``data.sasrec``). A row
whose run would be the same as an earlier row's (e.g. ``mpo_off`` of a one-stage schedule) is left out and
named in ``StudyRows.same_as``.
"""
from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from speeder_rt.model.mpo import MPOStage, default_schedule
from speeder_rt.train.config import RunConfig, run_config_from_dict
from speeder_rt.train.kinds import SPEEDER

Kind = Literal["speeder", "text_item", "sasrec", "popularity", "random"]
SPAE_ROWS = ("full", "spae_off", "recency_off", "spae_recency_off")  # the long-history study's Speeder rows
BASELINE_ROWS = ("sasrec", "popularity", "random")


@dataclass(frozen=True)
class Row:
    id: str  # the --rows name and the row's directory
    label: str  # the table's row name
    kind: Kind
    overrides: dict[str, Any] = field(default_factory=dict)  # merged into the run config's mapping
    removes: str | None = None  # what the row takes away from full Speeder, for the findings

    @property
    def trains_speeder(self) -> bool:
        """A Speeder model trained for the row (the others are baselines)."""
        return self.kind == SPEEDER.name


@dataclass
class StudyRows:
    rows: list[Row]
    same_as: dict[str, str]  # left-out row id -> the row it would repeat


def merged(raw: Mapping[str, Any], *overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``raw`` with ``overrides`` applied in order: mappings merge key by key, anything else is replaced."""
    out = copy.deepcopy(dict(raw))
    for override in overrides:
        for key, value in override.items():
            if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
                out[key] = merged(out[key], value)
            else:
                out[key] = copy.deepcopy(value)
    return out


def schedule(cfg: RunConfig) -> list[MPOStage]:
    """The run's MPO stages (``mpo``, or the default schedule of ``mpo_defaults``), as the trainer builds them."""
    return cfg.mpo or default_schedule(cfg.model.modalities, **cfg.mpo_defaults,
                                       full_finetune=cfg.model.backbone.lora is None)


def restricted_schedule(stages: list[MPOStage], modalities: list[str]) -> list[MPOStage]:
    """``stages`` over ``modalities`` only, with the same total epochs (see the module docstring)."""
    out: list[MPOStage] = []
    carried = 0  # epochs of stages left with no modality
    for stage in stages:
        kept = [m for m in stage.modalities if m in modalities]
        if not kept:
            carried += stage.epochs
            continue
        if out and out[-1].modalities == kept:
            out[-1].epochs += stage.epochs + carried
        else:
            trainable = [t for t in stage.trainable if not t.startswith("expert:") or t[len("expert:"):] in kept]
            out.append(dataclasses.replace(stage, name="+".join(kept), modalities=kept, trainable=trainable,
                                           epochs=stage.epochs + carried))
        carried = 0
    if not out:
        raise ValueError(f"no MPO stage trains any of {modalities}")
    out[-1].epochs += carried
    return out


def single_stage(stages: list[MPOStage], modalities: list[str]) -> MPOStage:
    """MPO off: every modality from the first step for the schedule's total epochs."""
    trainable = list(dict.fromkeys(t for s in stages for t in s.trainable))
    return MPOStage(name="all modalities", modalities=list(modalities), epochs=sum(s.epochs for s in stages),
                    lr=stages[0].lr, trainable=trainable, warmup_steps=0)


def _mpo(stages: list[MPOStage]) -> list[dict[str, Any]]:
    return [s.to_dict() for s in stages]


def _trained_modalities(cfg: RunConfig, stages: list[MPOStage]) -> list[str]:
    """The modalities some stage enables, in the model's order."""
    return [m for m in cfg.model.modalities if any(m in s.modalities for s in stages)]


def _modality_sets(order: list[str], stages: list[MPOStage]) -> list[list[str]]:
    """Each single modality of ``order``, then each stage's modality set, less the full set."""
    sets = [[m] for m in order] + [[m for m in order if m in s.modalities] for s in stages]
    unique = list(dict.fromkeys(tuple(s) for s in sets if s and len(s) < len(order)))
    return [list(s) for s in unique]


def _listed(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


FULL = Row("full", "Speeder (full)", "speeder")  # its config gives every row of a seed the data and item table


def all_rows(base: RunConfig) -> list[Row]:
    """Every row the study defines for the run config ``base`` (before duplicates are left out)."""
    stages = schedule(base)
    modalities = _trained_modalities(base, stages)
    rows = [FULL]
    for kept in _modality_sets(modalities, stages):
        removed = [m for m in modalities if m not in kept]
        only = " only" if len(kept) == 1 else ""
        rows.append(Row(f"mrc_{'+'.join(kept)}", f"MRC: {'+'.join(kept)}{only}", "speeder",
                        {"model": {"modalities": kept}, "mpo": _mpo(restricted_schedule(stages, kept))},
                        f"the {_listed(removed)} modalit{'y' if len(removed) == 1 else 'ies'}"))
    rows += [
        Row("spae_off", "SPAE off (no relative bias)", "speeder", {"model": {"relative_bias": False}},
            "the SPAE relative bias"),
        Row("recency_off", "recency table off", "speeder", {"model": {"recency": False}}, "the recency table"),
        Row("spae_recency_off", "SPAE and recency off", "speeder", {"model": {"relative_bias": False, "recency": False}},
            "the relative bias and the recency table together"),
        Row("mpo_off", "MPO off (all modalities at once)", "speeder", {"mpo": _mpo([single_stage(stages, modalities)])},
            "progressive modality training (MPO)"),
    ]
    backbone = base.model.backbone
    if backbone.gguf_file is not None or backbone.pretrained is not None:
        tiny = {"shape": "tiny", "gguf_file": None, "pretrained": None, "lora": None, "dtype": "float32"}
        tiny_stages = [dataclasses.replace(s, trainable=["backbone" if t == "lora" else t for t in s.trainable])
                       for s in stages]
        rows += [
            Row("backbone_tiny", "tiny random-init backbone", "speeder", {"model": {"backbone": tiny},
                                                                           "mpo": _mpo(tiny_stages)},
                "the pretrained backbone (replaced by the tiny random-init one)"),
            Row("text_item", "text-item LLM (equal step time)", "text_item", removes="the item token"),
        ]
    rows += [
        Row("sasrec", "SASRec", "sasrec"),
        Row("popularity", "popularity", "popularity"),
        Row("random", "random", "random"),
    ]
    return rows


def history_overrides(base: RunConfig, history_len: int) -> dict[str, Any]:
    """The long-history variant: window ``history_len``, only users with at least that many interactions."""
    return {"data": {"split": {"history_len": history_len, "min_interactions": max(3, history_len)}},
            "model": {"max_history": max(base.model.max_history, history_len)}}


def run_key(cfg: RunConfig, kind: Kind) -> dict[str, Any]:
    """What a run's result depends on: the whole config for Speeder and the text-item baseline (less its directory
    and progress bars),
    the data recipe and seed for a baseline (the item table's cache key)."""
    if kind not in (SPEEDER.name, "text_item"):
        return {"data": cfg.data.identity(), "seed": cfg.seed}
    raw = cfg.to_dict()
    raw["data"] = cfg.data.identity()
    raw.pop("out_dir")
    raw["train"].pop("progress")
    # stage names are labels, and the first stage has no warm-up (no modality is new to it)
    raw["mpo"] = [{**s, "name": None, "warmup_steps": s["warmup_steps"] if i else 0}
                  for i, s in enumerate(_mpo(schedule(cfg)))]
    return raw


def row_config(raw: Mapping[str, Any], row: Row, seed: int, out_dir: str | Path, where: str = "study config",
               extra: Mapping[str, Any] | None = None) -> RunConfig:
    """The run config of ``row`` for ``seed``: ``raw`` (a parsed run-config file) with ``extra``, the seed, the
    directory and the row's overrides; the split's and SASRec's seeds follow the run's unless the file sets them."""
    return run_config_from_dict(merged(raw, extra or {}, {"seed": seed, "out_dir": str(out_dir)}, row.overrides),
                                f"{where} (study row {row.id}, seed {seed})")


def study_rows(raw: Mapping[str, Any], base: RunConfig, selected: list[str] | None = None,
               where: str = "study config", extra: Mapping[str, Any] | None = None) -> StudyRows:
    """The rows to run (``selected`` ids in the study's order, default all), each config checked; rows that
    would repeat an earlier row's run are left out."""
    rows = all_rows(base)
    known = [r.id for r in rows]
    unknown = [r for r in selected or [] if r not in known]
    if unknown:
        raise ValueError(f"--rows: unknown row {unknown[0]!r}; this config's rows are {', '.join(known)}")
    keep, same_as, seen = [], {}, {}
    for row in rows:
        key = repr(run_key(row_config(raw, row, base.seed, base.out_dir, where, extra), row.kind)) + row.kind
        if key in seen:
            same_as[row.id] = seen[key]
        else:
            seen[key] = row.id
            if selected is None or row.id in selected:
                keep.append(row)
    return StudyRows(keep, {r: s for r, s in same_as.items() if selected is None or r in selected})
