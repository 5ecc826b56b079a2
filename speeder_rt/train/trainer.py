"""Training loop for Speeder (MPO stages) and the text-item baseline, with exact resume.

A run is a list of phases. Speeder: per MPO stage an optional warm-up phase (only the new modalities'
experts and the gate train, for ``warmup_steps`` steps) then the stage's main phase (its trainable sets,
``epochs`` epochs). The text-item baseline: one main phase over its trainable weights.

Every batch is a pure function of (seed, stage, phase, epoch): the epoch's sample order and its training
candidates (target + 19 never-seen items) are drawn from a generator seeded by those numbers. A
checkpoint stores model, optimizer, scheduler, progress and the torch RNG state, so resuming from it
reproduces the uninterrupted run bit for bit. Checkpoints are written atomically; ``best.pt`` holds the
weights with the best validation metric, ``last.pt`` everything needed to resume.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from speeder_rt.data import ItemTable, SequenceData
from speeder_rt.data.sequences import draw_candidates
from speeder_rt.eval.protocol import evaluate
from speeder_rt.model.mpo import default_schedule, new_modalities, set_trainable, validate_schedule
from speeder_rt.model.speeder import SpeederModel, resolve_backend
from speeder_rt.train.config import RunConfig, run_config_from_dict
from speeder_rt.utils.io import atomic_path

MODEL_KINDS = ("speeder", "text_baseline")
PHASE_CODES = {"warmup": 0, "main": 1}


@dataclass
class Phase:
    stage: int
    name: str  # warmup | main
    modalities: list[str]
    trainable: list[str]
    lr: float
    epochs: int = 0
    steps: int = 0  # warm-up length; main phases run whole epochs


@dataclass
class Progress:
    phase: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    best_metric: float = float("-inf")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_model(kind: str, cfg: RunConfig, table: ItemTable, device: torch.device) -> torch.nn.Module:
    if kind == "speeder":
        model = SpeederModel(cfg.model, table)
        model.set_backend(resolve_backend(cfg.model.attn_backend, device))
    elif kind == "text_baseline":
        from speeder_rt.baselines.text_item import TextBaselineConfig, TextItemBaseline

        tb = cfg.text_baseline
        model = TextItemBaseline(TextBaselineConfig(backbone=cfg.model.backbone, max_title_tokens=tb.max_title_tokens,
                                                    max_new_tokens=tb.max_new_tokens), table)
    else:
        raise ValueError(f"--model must be one of {list(MODEL_KINDS)}, got {kind!r}")
    return model.to(device)


def load_checkpoint(path: str | Path, kind: str | None = None) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # torch raises several types for truncated or foreign files
        raise ValueError(f"{path}: not a readable checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict) or "kind" not in ckpt or "config" not in ckpt:
        raise ValueError(f"{path}: not a speeder_rt checkpoint (fields 'kind'/'config' missing)")
    if kind is not None and ckpt["kind"] != kind:
        raise ValueError(f"{path}: checkpoint is of model type {ckpt['kind']!r}, expected {kind!r}")
    return ckpt


def load_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], path: str | Path) -> None:
    """``model.load_state_dict`` with a clear error for a checkpoint of another shape."""
    own = model.state_dict()
    head = state.get("head.weight")
    if head is not None and "head.weight" in own and head.shape != own["head.weight"].shape:
        raise ValueError(f"{path}: checkpoint was trained with hidden size {head.shape[0]}, "
                         f"this backbone has {own['head.weight'].shape[0]}")
    for name, tensor in state.items():
        if name in own and own[name].shape != tensor.shape:
            raise ValueError(f"{path}: tensor {name!r} has shape {list(tensor.shape)}, the model expects "
                             f"{list(own[name].shape)}")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: checkpoint does not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]})")


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


class Trainer:
    def __init__(self, kind: str, cfg: RunConfig, data: SequenceData, table: ItemTable, log=print) -> None:
        if kind not in MODEL_KINDS:
            raise ValueError(f"--model must be one of {list(MODEL_KINDS)}, got {kind!r}")
        self.kind, self.cfg, self.data, self.table, self.log = kind, cfg, data, table, log
        self.device = pick_device(cfg.train.device)
        torch.manual_seed(cfg.seed)
        self.model = build_model(kind, cfg, table, self.device)
        self.phases = self._phases()
        self.out = Path(cfg.out_dir) / kind
        self.progress = Progress()
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: torch.optim.lr_scheduler.LambdaLR | None = None

    # -- schedule ------------------------------------------------------------------------------
    def _phases(self) -> list[Phase]:
        if self.kind == "text_baseline":
            tb = self.cfg.text_baseline
            return [Phase(0, "main", [], ["all"], tb.lr, epochs=tb.epochs)]
        stages = self.cfg.mpo or default_schedule(self.cfg.model.modalities, **self.cfg.mpo_defaults,
                                                  full_finetune=self.cfg.model.backbone.lora is None)
        validate_schedule(stages, self.cfg.model.modalities)
        phases = []
        for i, s in enumerate(stages):
            fresh = new_modalities(stages, i)
            if i > 0 and fresh and s.warmup_steps > 0:
                phases.append(Phase(i, "warmup", s.modalities, [f"expert:{m}" for m in fresh] + ["gate"], s.lr, steps=s.warmup_steps))
            phases.append(Phase(i, "main", s.modalities, s.trainable, s.lr, epochs=s.epochs))
        return phases

    def _trainable(self, phase: Phase) -> list[torch.nn.Parameter]:
        if self.kind == "text_baseline":
            return [p for p in self.model.parameters() if p.requires_grad]
        self.model.set_enabled_modalities(phase.modalities)
        return set_trainable(self.model, phase.trainable, phase.modalities)

    def _epoch_batches(self, phase_index: int, epoch: int) -> tuple[Any, list[np.ndarray]]:
        phase = self.phases[phase_index]
        key = (self.cfg.seed, phase.stage, PHASE_CODES[phase.name], epoch)
        samples = self.data.train.subset(slice(None))
        rng = np.random.default_rng(_seed(*key))
        cap = self.cfg.train.max_train_samples_per_epoch
        if cap is not None and cap < len(samples):
            samples = samples.subset(np.sort(rng.choice(len(samples), cap, replace=False)))
        draw_candidates(self.data, samples, "train", _seed(*key, 1))
        order = rng.permutation(len(samples))
        bs = self.cfg.train.batch_size
        return samples, [order[a : a + bs] for a in range(0, len(order), bs)]

    def _phase_steps(self, phase_index: int) -> int:
        phase = self.phases[phase_index]
        if phase.name == "warmup":
            return phase.steps
        return phase.epochs * math.ceil(self._train_size() / self.cfg.train.batch_size)

    def _train_size(self) -> int:
        cap = self.cfg.train.max_train_samples_per_epoch
        return len(self.data.train) if cap is None else min(cap, len(self.data.train))

    def _start_phase(self, phase_index: int) -> None:
        phase = self.phases[phase_index]
        params = self._trainable(phase)
        self.optimizer = torch.optim.AdamW(params, lr=phase.lr, weight_decay=self.cfg.train.weight_decay)
        total = max(1, self._phase_steps(phase_index))
        ramp = max(1, total // 20)
        # linear warm-up over 5% of the phase, then linear decay to 10% of the peak
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min((s + 1) / ramp, max(0.1, 1.0 - 0.9 * (s - ramp) / max(1, total - ramp))))

    # -- checkpoints ---------------------------------------------------------------------------
    def _state(self, full: bool) -> dict[str, Any]:
        state = {"kind": self.kind, "config": self.cfg.to_dict(), "model": self.model.state_dict(),
                 "progress": dataclasses.asdict(self.progress), "table_dir": str(Path(self.cfg.out_dir) / "items")}
        if full:
            state.update(optimizer=self.optimizer.state_dict(), scheduler=self.scheduler.state_dict(),
                         rng=torch.get_rng_state(),
                         cuda_rng=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
        return state

    def save(self, name: str, full: bool = True) -> Path:
        path = self.out / name
        with atomic_path(path) as tmp:
            torch.save(self._state(full), tmp)
        return path

    def resume(self, path: str | Path) -> None:
        ckpt = load_checkpoint(path, self.kind)
        if "optimizer" not in ckpt:
            raise ValueError(f"{path}: holds weights only (a best.pt); resume needs a last.pt")
        load_weights(self.model, ckpt["model"], path)
        self.progress = Progress(**ckpt["progress"])
        self._start_phase(self.progress.phase)
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        torch.set_rng_state(ckpt["rng"])
        if ckpt.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(ckpt["cuda_rng"])
        self.log(f"resumed from {path} at phase {self.progress.phase}, epoch {self.progress.epoch}, "
                 f"step {self.progress.step_in_epoch} (global step {self.progress.global_step})")

    # -- loop ----------------------------------------------------------------------------------
    def _loss(self, samples, idx: np.ndarray) -> torch.Tensor:
        to = lambda a: torch.from_numpy(a[idx]).to(self.device)  # noqa: E731
        label = samples.label if self.kind == "speeder" else samples.target
        return self.model.loss(to(samples.history), to(samples.history_len), to(samples.candidates), to(label))

    def validate(self) -> dict[str, float]:
        if self.kind == "speeder":
            return evaluate(self.model, self.data, "valid", batch_size=self.cfg.train.eval_batch_size)
        return self.model.evaluate(self.data, "valid", limit=self.cfg.text_baseline.eval_limit)

    def run(self, stop_after_steps: int | None = None) -> dict[str, float]:
        """Train to the end (or stop right after checkpointing at global step ``stop_after_steps``)."""
        start = time.perf_counter()
        metric_name = "NDCG@10" if self.kind == "speeder" else "VHR@1"
        p = self.progress
        if self.optimizer is None:
            self._start_phase(p.phase)
        last_metrics: dict[str, float] = {}
        while p.phase < len(self.phases):
            phase = self.phases[p.phase]
            self.model.train()
            n_epochs = phase.epochs if phase.name == "main" else math.inf
            while p.epoch < n_epochs:
                samples, batches = self._epoch_batches(p.phase, p.epoch)
                bar = tqdm(total=len(batches), initial=p.step_in_epoch, disable=not self.cfg.train.progress,
                           desc=f"{self.kind} {phase.name} stage {phase.stage} epoch {p.epoch}", leave=False)
                tic, seen = time.perf_counter(), 0
                while p.step_in_epoch < len(batches) and not self._warmup_done(phase):
                    idx = batches[p.step_in_epoch]
                    loss = self._loss(samples, idx)
                    self.optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_([q for g in self.optimizer.param_groups for q in g["params"]],
                                                   self.cfg.train.grad_clip)
                    self.optimizer.step()
                    self.scheduler.step()
                    p.step_in_epoch += 1
                    p.global_step += 1
                    seen += len(idx)
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss.item():.4f}", samples_per_s=f"{seen / (time.perf_counter() - tic):.0f}")
                    if self.cfg.train.checkpoint_every and p.global_step % self.cfg.train.checkpoint_every == 0:
                        self.save("last.pt")
                        if stop_after_steps is not None and p.global_step >= stop_after_steps:
                            bar.close()
                            return {}
                bar.close()
                if phase.name == "warmup":
                    if self._warmup_done(phase):
                        break
                    p.epoch, p.step_in_epoch = p.epoch + 1, 0
                    continue
                p.epoch, p.step_in_epoch = p.epoch + 1, 0
                last_metrics = self.validate()
                self.log(f"{self.kind} stage {phase.stage} ({'+'.join(phase.modalities) or 'text'}) epoch {p.epoch}: "
                         f"valid {metric_name} {last_metrics[metric_name]:.4f}  ({time.perf_counter() - start:.1f}s)")
                if last_metrics[metric_name] > p.best_metric:
                    p.best_metric = last_metrics[metric_name]
                    self.save("best.pt", full=False)
                self.save("last.pt")
            p.phase, p.epoch, p.step_in_epoch = p.phase + 1, 0, 0
            if p.phase < len(self.phases):
                self._start_phase(p.phase)
        self.save("last.pt")
        return last_metrics

    def _warmup_done(self, phase: Phase) -> bool:
        """A warm-up phase ends after ``phase.steps`` steps (checked before each step, so a resume from a
        checkpoint taken at its last step goes straight on to the next phase)."""
        return phase.name == "warmup" and self.progress.global_step - self._phase_start_step() >= phase.steps

    def _phase_start_step(self) -> int:
        """Global step at which the current phase began (steps of earlier phases are fixed by the schedule)."""
        return sum(self._phase_steps(i) for i in range(self.progress.phase))


def load_trained(path: str | Path, kind: str | None = None, device: str | torch.device = "cpu"):
    """(model with the checkpoint's weights, RunConfig, data, table, kind) from a best.pt or last.pt."""
    return model_from_checkpoint(load_checkpoint(path, kind), path, device)


def model_from_checkpoint(ckpt: dict[str, Any], path: str | Path, device: str | torch.device = "cpu"):
    """Rebuild an already loaded checkpoint's model (eval mode), with its config, data and item table."""
    from speeder_rt.train.data import prepare

    cfg = run_config_from_dict(ckpt["config"], f"{path}: config")
    data, table = prepare(cfg, log=lambda *_: None)
    model = build_model(ckpt["kind"], cfg, table, torch.device(device))
    load_weights(model, ckpt["model"], path)
    model.eval()
    return model, cfg, data, table, ckpt["kind"]
