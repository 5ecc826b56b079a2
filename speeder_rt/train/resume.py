"""A trainer's resume state: what a run's ``last/`` model directory holds beyond the model, so that ``--resume``
continues the run exactly.

    DIR/resume.json          progress, scheduler state, optimizer param groups and non-tensor optimizer state, facts
                             (last validation metrics, intra-op threads, world size)
    DIR/resume.safetensors   optimizer state tensors ``optimizer/<param>/<key>``, RNG ``rng/<device>``

The optimizer state is stored by parameter name, the layout
``torch.distributed.checkpoint.state_dict.get_optimizer_state_dict`` returns (``{"state": {name: {...}},
"param_groups": [{..., "params": [names]}]}``), so a distributed run saves its gathered full state from rank 0
with ``save_checkpoint(path, model, state_dict=<full model state>, resume=ResumeState(optimizer=<full optimizer
state>, ...))`` and a single-process ``--resume`` reads it like its own.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from speeder_rt.model.pretrained import FORMAT_VERSION, save_model_dir
from speeder_rt.utils.io import read_json_fields, write_json
from speeder_rt.utils.readers import check_finite, read_safetensors

RESUME_JSON, RESUME_TENSORS = "resume.json", "resume.safetensors"


@dataclass
class ResumeState:
    """What a trainer needs beyond the weights to continue a run exactly."""

    progress: dict[str, Any]  # JSON values
    optimizer: dict[str, Any]  # {"state": {param name: {key: tensor | number}}, "param_groups": [{..., "params": [names]}]}
    scheduler: dict[str, Any]  # a JSON-serialisable lr_scheduler.state_dict()
    rng: dict[str, torch.Tensor]  # "cpu" -> torch.get_rng_state(), "cuda:<i>" -> that device's state
    facts: dict[str, Any] = field(default_factory=dict)  # JSON values (e.g. last validation metrics)




def write_resume(directory: Path, resume: ResumeState) -> None:
    """``resume.json`` + ``resume.safetensors`` into ``directory`` (a model directory being written)."""
    tensors = {f"rng/{device}": state.detach().cpu() for device, state in resume.rng.items()}
    scalars: dict[str, dict[str, Any]] = {}
    for name, values in resume.optimizer["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer/{name}/{key}"] = value.detach().to("cpu").contiguous()
            else:
                scalars.setdefault(name, {})[key] = value
    save_file(tensors, str(directory / RESUME_TENSORS), metadata={"format": "pt"})
    write_json(directory / RESUME_JSON, {
        "format_version": FORMAT_VERSION,
        "progress": resume.progress,
        "scheduler": resume.scheduler,
        "optimizer": {"param_groups": resume.optimizer["param_groups"], "scalars": scalars},
        "facts": resume.facts,
    })


def has_resume_state(path: str | Path) -> bool:
    return (Path(path) / RESUME_JSON).is_file()


def read_resume_state(path: str | Path) -> ResumeState:
    """The resume state of a trainer's last/ directory (a ValueError naming the file for anything missing)."""
    path = Path(path)
    if not has_resume_state(path):
        raise ValueError(f"{path}: holds weights only (no {RESUME_JSON}; a best/ directory); --resume needs a "
                         "run's last/ directory")
    file = path / RESUME_JSON
    info = read_json_fields(file, ("progress", "scheduler", "optimizer", "facts"), FORMAT_VERSION)
    optimizer = info["optimizer"] if isinstance(info["optimizer"], dict) else {}
    groups, scalars = optimizer.get("param_groups"), optimizer.get("scalars", {})
    if not isinstance(groups, list) or not all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups):
        raise ValueError(f"{file}: optimizer.param_groups must be a list of groups, each with a 'params' list")
    tensors = read_safetensors(path / RESUME_TENSORS, mmap=False)
    check_finite(path / RESUME_TENSORS, tensors)
    state: dict[str, dict[str, Any]] = {name: dict(values) for name, values in scalars.items()}
    rng = {}
    for key, tensor in tensors.items():
        kind, _, rest = key.partition("/")
        if kind == "rng" and rest:
            rng[rest] = tensor
        elif kind == "optimizer" and "/" in rest:
            name, _, slot = rest.rpartition("/")
            state.setdefault(name, {})[slot] = tensor
        else:
            raise ValueError(f"{path / RESUME_TENSORS}: unexpected tensor {key!r} (expected optimizer/<param>/<key> "
                             "or rng/<device>)")
    if "cpu" not in rng:
        raise ValueError(f"{path / RESUME_TENSORS}: tensor 'rng/cpu' missing")
    known = {n for g in groups for n in g["params"]}
    stray = sorted(set(state) - known)
    if stray:
        raise ValueError(f"{path / RESUME_TENSORS}: optimizer state for {stray[0]!r}, a parameter no param group holds")
    return ResumeState(info["progress"], {"state": state, "param_groups": groups}, info["scheduler"], rng, info["facts"])


def named_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``optimizer.state_dict()`` keyed by ``model``'s parameter names instead of positions (the layout of
    ``torch.distributed.checkpoint.state_dict.get_optimizer_state_dict``, without its side effects)."""
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    saved = optimizer.state_dict()
    return {"state": {order[i]: values for i, values in saved["state"].items()},
            "param_groups": [{**g, "params": [order[i] for i in g["params"]]} for g in saved["param_groups"]]}


def load_named_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, named: dict[str, Any],
                               where: str | Path) -> None:
    """Load a state of ``named_optimizer_state``'s layout into ``optimizer``, whose groups must hold the same
    parameters in the same order (a ValueError naming the first difference)."""
    names = {id(p): n for n, p in model.named_parameters()}
    groups = named["param_groups"]
    if len(groups) != len(optimizer.param_groups):
        raise ValueError(f"{where}: the optimizer state has {len(groups)} parameter groups, this phase's optimizer "
                         f"{len(optimizer.param_groups)}")
    index: dict[str, int] = {}
    indexed = []
    for g, (saved, live) in enumerate(zip(groups, optimizer.param_groups)):
        want = [names[id(p)] for p in live["params"]]
        if list(saved["params"]) != want:
            diff = next((i for i, (a, b) in enumerate(zip(saved["params"], want)) if a != b), min(len(want), len(saved["params"])))
            have = saved["params"][diff] if diff < len(saved["params"]) else "<end>"
            expect = want[diff] if diff < len(want) else "<end>"
            raise ValueError(f"{where}: optimizer group {g} holds {len(saved['params'])} parameters, this phase trains "
                             f"{len(want)}; first difference at position {diff}: {have!r} vs {expect!r}")
        base = len(index)
        index.update({n: base + i for i, n in enumerate(want)})
        indexed.append({**saved, "params": [index[n] for n in want]})
    optimizer.load_state_dict({"state": {index[n]: values for n, values in named["state"].items()}, "param_groups": indexed})


def save_checkpoint(path: str | Path, model: nn.Module, *, state_dict: dict[str, torch.Tensor] | None = None,
                    run_config: dict[str, Any] | None = None, resume: ResumeState | None = None) -> Path:
    """``save_model_dir``; ``resume`` makes the directory a trainer's last/ (its files written in the same atomic
    commit)."""
    extra = None if resume is None else partial(write_resume, resume=resume)
    return save_model_dir(path, model, state_dict=state_dict, run_config=run_config, extra_files=extra)
