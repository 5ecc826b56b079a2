"""Training loop for Speeder (MPO stages) and the text-item baseline, with exact resume.

A run is a list of phases. Speeder: per MPO stage an optional warm-up phase (only the new modalities'
experts and the gate train, for ``warmup_steps`` steps) then the stage's main phase (its trainable sets,
``epochs`` epochs). The text-item baseline: one main phase over its trainable weights.

Every batch is a pure function of (seed, stage, phase, epoch): the epoch's sample order and its training
candidates (target + 19 never-seen items) are drawn from a generator seeded by those numbers. Checkpoints
are model directories (``speeder_rt.model.pretrained``), written atomically: ``<out_dir>/<kind>/best/`` holds
the model with the best validation metric, ``last/`` the latest one plus its resume state (optimizer,
scheduler, progress, RNG). Resuming from ``last/`` reproduces the uninterrupted run bit for bit when both
processes compute with one intra-op thread (``torch.set_num_threads(1)``); with more, CPU kernels (MKL's
threaded GEMMs) may sum in a different order from run to run, so even two uninterrupted runs agree only to
fp32 rounding (measured on 2 threads: up to 5.6e-6 in the weights after configs/demo.yaml's run reduced to
text+image and 1,024 samples per epoch), and so does a resumed one. Resuming a finished run loads its state and
trains nothing (``complete``).

Under torchrun the same loop runs on every rank (``speeder_rt.train.distributed``): ``train.batch_size`` is the
global batch, each rank trains on its share of every step's batch, validation shards the users and gathers
their results, and rank 0 alone writes checkpoints and logs. The files are the ones a single process writes.
Resuming with the same world size reproduces the uninterrupted distributed run bit for bit on the CPU (torchrun
runs each rank on one intra-op thread); with another world size it continues to fp32 rounding and says so.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from tqdm import tqdm

from speeder_rt.data import ItemTable, SequenceData
from speeder_rt.data.sequences import draw_candidates
from speeder_rt.model.pretrained import ITEMS, check_model_dir, load_weights, read_model_config
from speeder_rt.train.config import RunConfig, run_config_from_dict
from speeder_rt.train.distributed import (
    World,
    all_reduce_sum,
    check_batch,
    gather_rank_rng,
    micro_batches,
    parallel_mode,
    parallel_model,
    pick_device,
    restore_rank_rng,
)
from speeder_rt.train.faults import (
    CheckpointFailed,
    Diverged,
    Preempted,
    StopRequest,
    TrainingStopped,
    agree,
    finite,
    stop_signal_name,
    total_norm,
)
from speeder_rt.train.kinds import Phase, kind_named, kind_of
from speeder_rt.train.resume import RESUME_TENSORS, ResumeState, read_resume_state, save_checkpoint
from speeder_rt.utils.readers import differences, first_non_finite

PHASE_CODES = {"warmup": 0, "main": 1}
# run-config keys a resume may change: they change how the same steps are computed (device, threads, sharding,
# micro-batches: to fp32 rounding) or reported, not which steps run
RESUME_MAY_CHANGE = frozenset({"out_dir", "train.device", "train.num_threads", "train.parallel",
                               "train.grad_accumulation", "train.eval_batch_size", "train.checkpoint_every",
                               "train.progress", "train.deterministic"})


@dataclass
class Progress:
    phase: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    best_metric: float = float("-inf")
    step_seconds: float = 0.0  # wall seconds inside optimizer steps (forward, backward, update), over every resume
    run_seconds: float = 0.0  # wall seconds of run() (steps, validation, checkpoints), over every resume


def recorded_config(cfg: RunConfig) -> dict[str, Any]:
    """The run config as a model directory records it: every path absolute (resolved against the current
    directory), so eval rebuilds the same data from any working directory."""
    raw = cfg.to_dict()
    absolute = os.path.abspath
    raw["out_dir"] = absolute(raw["out_dir"])
    data = raw["data"]
    kind, sep, arg = data["source"].partition(":")
    if sep and arg:
        reviews, comma, meta = arg.partition(",") if kind == "amazon" else (arg, "", "")
        data["source"] = f"{kind}:{absolute(reviews)}" + (f",{absolute(meta)}" if comma and meta else "")
    for path in ("image_features", "prepared"):
        if data.get(path):
            data[path] = absolute(data[path])
    backbone = raw["model"]["backbone"]
    if backbone.get("pretrained"):
        backbone["pretrained"] = absolute(backbone["pretrained"])
    if backbone.get("gguf_file") not in (None, "smollm2"):
        backbone["gguf_file"] = absolute(backbone["gguf_file"])
    return raw


def check_table_fits(data: SequenceData, table: ItemTable, where: str | Path) -> None:
    """The dense item ids of ``data`` must mean the items of ``table`` (the one a model was trained with)."""
    if data.item_keys != table.item_keys:
        n = min(len(data.item_keys), len(table.item_keys))
        i = next((i for i in range(n) if data.item_keys[i] != table.item_keys[i]), n)
        first = (f"id {i} is {data.item_keys[i]!r} in the data, {table.item_keys[i]!r} in the table" if i < n
                 else f"{len(data.item_keys)} items in the data, {len(table.item_keys)} in the table")
        raise ValueError(f"{where}: the data no longer fits the model's item table ({first})")


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def _silent(*_: Any) -> None:
    pass


class Trainer:
    def __init__(self, kind: str, cfg: RunConfig, data: SequenceData, table: ItemTable, log=print,
                 world: World | None = None) -> None:
        """``world``: this process's rank in a torchrun job (``distributed.init_world``); None: a single process."""
        self.model_kind = kind_named(kind)
        self.world = world or World(pick_device(cfg.train.device))
        self.kind, self.cfg, self.data, self.table = kind, cfg, data, table
        self.log = log if self.world.is_main else _silent
        check_batch(self.world, cfg.train.batch_size, cfg.train.grad_accumulation)
        self.device = self.world.device
        torch.manual_seed(cfg.seed)
        self.model = self.model_kind.build(cfg, table, self.device)
        if self.world.rank:  # rank 0 goes on with the single-process stream, the others draw their own (dropout)
            torch.manual_seed(_seed(cfg.seed, self.world.rank))
        mode = parallel_mode(cfg.train.parallel, cfg.model.backbone.lora is not None)
        self.parallel = parallel_model(self.model, self.world, mode,
                                       find_unused=self.model_kind.find_unused_parameters(cfg))
        if self.world.distributed:
            per_rank = cfg.train.batch_size // self.world.size
            self.log(f"distributed: {self.world.size} ranks on {self.device.type}, train.parallel {mode}, global batch "
                     f"{cfg.train.batch_size} = {self.world.size} ranks x {cfg.train.grad_accumulation} micro-batches "
                     f"x {per_rank // cfg.train.grad_accumulation}")
        self.phases = self.model_kind.phases(cfg)
        self.out = Path(cfg.out_dir) / kind
        self.progress = Progress()
        self.last_metrics: dict[str, float] = {}
        self.step_losses: list[float] = []  # the training loss of every step this process ran, in order
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: torch.optim.lr_scheduler.LambdaLR | None = None
        self.stop_request = StopRequest()  # the train CLI installs its signal handlers around run()
        self.stop_signal = 0  # the stop signal every rank agreed on after the last step (0: none)
        self.last_saved: int | None = None  # the global step last/ holds (None: none written or resumed from)
        self._clock: float | None = None  # run(): the perf_counter up to which progress.run_seconds counts

    @property
    def complete(self) -> bool:
        """Every phase is done (a finished run, or one resumed from a finished run's last/)."""
        return self.progress.phase >= len(self.phases)

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
        params = self.parallel.start_phase(self.model_kind.phase_parameters(self.model, phase))
        self.optimizer = torch.optim.AdamW(params, lr=phase.lr, weight_decay=self.cfg.train.weight_decay)
        total = max(1, self._phase_steps(phase_index))
        ramp = max(1, total // 20)
        # linear warm-up over 5% of the phase, then linear decay to 10% of the peak
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min((s + 1) / ramp, max(0.1, 1.0 - 0.9 * (s - ramp) / max(1, total - ramp))))

    # -- checkpoints ---------------------------------------------------------------------------
    def save(self, name: str) -> Path:
        """Write ``<out_dir>/<kind>/<name>/`` atomically: ``best`` (the model) or ``last`` (the model and its
        resume state). Every rank calls it (an FSDP2 state is gathered); rank 0 writes, the others wait."""
        state = self.parallel.full_state()
        resume = None
        if name == "last":
            p = self.progress
            now = time.perf_counter()
            if self._clock is not None:  # run() is running: the seconds since the last mark
                p.run_seconds += now - self._clock
                self._clock = now
            progress = {**dataclasses.asdict(p), "best_metric": p.best_metric if math.isfinite(p.best_metric) else None}
            rng = {"cpu": torch.get_rng_state()}
            if torch.cuda.is_available():
                rng.update((f"cuda:{i}", s) for i, s in enumerate(torch.cuda.get_rng_state_all()))
            rng.update(gather_rank_rng(self.world))
            facts = {"last_valid": self.last_metrics, "intra_op_threads": torch.get_num_threads(),
                     "world_size": self.world.size, "step_losses": self.step_losses}
            resume = ResumeState(progress, self.parallel.optimizer_state(self.optimizer), self.scheduler.state_dict(),
                                 rng, facts)
        path = self.out / name
        error = self._write_checkpoint(path, state, resume) if self.world.is_main else None
        # every rank waits here for rank 0's outcome (the barrier after a write), so all of them raise together
        diverged, failed = agree(self.world, isinstance(error, Diverged), isinstance(error, CheckpointFailed))
        if diverged or failed:
            raise error or (Diverged if diverged else CheckpointFailed)(f"rank 0 could not write {path}")
        if name == "last":
            self.last_saved = self.progress.global_step
        return path

    def _write_checkpoint(self, path: Path, state: dict[str, torch.Tensor] | None,
                          resume: ResumeState | None) -> TrainingStopped | None:
        """Write one checkpoint (rank 0); the reason it was not written, or None. Non-finite weights (a step that
        overflowed them) are never written; a failed write leaves the previous checkpoint as it was."""
        bad = first_non_finite(self.model.state_dict() if state is None else state)
        if bad:
            return Diverged(f"training diverged: weight {bad[0]!r} is {bad[2]} after global step "
                            f"{self.progress.global_step}, so {path} was not written; {self._kept()}. "
                            f"{self._advice()}")
        try:
            save_checkpoint(path, self.model, state_dict=state, run_config=recorded_config(self.cfg), resume=resume)
        except (OSError, SafetensorError) as e:
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            return CheckpointFailed(f"could not write {path}: {reason}; the checkpoint there before (if any) is "
                                    f"intact ({self._kept()}); free space or fix the directory, then resume")
        return None

    def _kept(self) -> str:
        """Which checkpoint holds the last good state, for the messages of an early stop."""
        last = self.out / "last"
        if self.last_saved is not None:
            return f"{last} holds global step {self.last_saved}"
        return f"{last} is as it was" if last.exists() else "no last/ checkpoint was written yet"

    def _advice(self) -> str:
        phase = self.phases[min(self.progress.phase, len(self.phases) - 1)]
        return (f"Try a lower learning rate ({phase.lr_key}) or train.grad_clip, or check the data and item features "
                "for extreme values; then resume from last/ with --resume-changed-config, or start over")

    def resume(self, path: str | Path, allow_changed_config: bool = False) -> None:
        """Continue from a run's ``last/`` directory (a finished run's leaves ``complete`` True); call it before
        ``run`` (the weights load before FSDP2 shards them). A run config that differs from the checkpoint's in
        anything but ``RESUME_MAY_CHANGE`` is refused unless ``allow_changed_config`` (then each change is logged)."""
        path = check_model_dir(path)
        config = read_model_config(path, self.kind)
        state = read_resume_state(path)
        own = self.model.cfg.to_dict()
        diff = differences({**config["model_config"], "attn_backend": own.get("attn_backend")}, own)
        if diff:  # the attention backend computes the same function, so a run may switch it (e.g. CPU -> GPU)
            raise ValueError(f"{path}: trained with model.{diff[0][0]} = {diff[0][1]!r}; this run's config has "
                             f"{diff[0][2]!r}")
        self._check_run_config(path, config.get("run_config"), allow_changed_config)
        self._check_table(path / ITEMS)
        load_weights(self.model, path)
        progress = dict(state.progress)
        progress["best_metric"] = float("-inf") if progress.get("best_metric") is None else progress["best_metric"]
        self.progress = Progress(**progress)
        self.last_metrics = dict(state.facts.get("last_valid") or {})
        self.step_losses = [float(v) for v in state.facts.get("step_losses") or []]
        p = self.progress
        if p.phase > len(self.phases):
            raise ValueError(f"{path}: checkpointed in phase {p.phase}; this run's schedule has {len(self.phases)} phases")
        if self.complete:
            self.log(f"{path}: the run is complete ({len(self.phases)} phases, {p.global_step} steps); nothing to train")
            return
        self._start_phase(p.phase)
        self.parallel.load_optimizer_state(self.optimizer, state.optimizer, path / RESUME_TENSORS)
        self.scheduler.load_state_dict(state.scheduler)
        torch.set_rng_state(state.rng["cpu"])
        cuda = [state.rng[k] for k in sorted(state.rng) if k.startswith("cuda:")]
        if cuda and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(cuda)
        if self.world.rank and not restore_rank_rng(self.world, state.rng):  # a rank the checkpoint did not have
            torch.manual_seed(_seed(self.cfg.seed, self.world.rank, p.global_step))
        self.log(f"resumed from {path} at phase {p.phase}, epoch {p.epoch}, step {p.step_in_epoch} "
                 f"(global step {p.global_step})")
        world = (state.facts.get("world_size", 1), self.world.size)
        if world[0] != world[1]:
            self.log(f"note: checkpointed with world size {world[0]}, resuming with {world[1]}: the same global batches "
                     "in the same order, but the gradient sums run in another order, so the run continues to fp32 "
                     "rounding of the uninterrupted one, not bit for bit")
        threads = (state.facts.get("intra_op_threads"), torch.get_num_threads())
        if threads != (1, 1):
            self.log(f"note: checkpointed with {threads[0] or 'an unknown number of'} intra-op threads, resuming with "
                     f"{threads[1]}: the result matches the uninterrupted run to fp32 rounding; bit for bit only with "
                     "torch.set_num_threads(1) in both")

    def _check_run_config(self, path: Path, recorded: dict[str, Any] | None, allow: bool) -> None:
        if recorded is None:  # a model saved outside a training run (e.g. converted): nothing to compare with
            return
        changes = [(key, a, b) for key, a, b in differences(recorded, json.loads(json.dumps(recorded_config(self.cfg))))
                   if not key.startswith("model.") and key not in RESUME_MAY_CHANGE]  # model: compared above
        if not changes:
            return
        listed = "; ".join(f"{key}: {a!r} -> {b!r}" for key, a, b in changes)
        if not allow:
            raise ValueError(f"{path}: this run's config differs from the one the checkpoint was trained with "
                             f"({listed}), so resuming would not continue the same run; pass --resume-changed-config "
                             "to continue with the new settings anyway")
        self.log(f"note: resuming {path} with a changed config ({listed}): the run continues with the new settings")

    def _check_table(self, saved: Path) -> None:
        """The run's item table must be the one the checkpoint was trained with (same items and features)."""
        table = ItemTable.load(saved)
        if table.item_keys != self.table.item_keys or table.titles != self.table.titles:
            raise ValueError(f"{saved}: the checkpoint's items (keys or titles) differ from this run's item table")
        for m in table.modalities:
            if m not in self.table.features or not (torch.equal(table.features[m], self.table.features[m])
                                                    and torch.equal(table.available[m], self.table.available[m])):
                raise ValueError(f"{saved}: modality {m!r} differs from this run's item table (features rebuilt "
                                 "since the checkpoint); resume with the checkpoint's table (the train CLI does)")

    # -- loop ----------------------------------------------------------------------------------
    def _loss(self, samples, idx: np.ndarray) -> torch.Tensor:
        batch = samples.subset(idx)  # the batch's history windows are gathered here, never the whole split's
        to = lambda a: torch.from_numpy(a).to(self.device)  # noqa: E731
        label = self.model_kind.labels(batch)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.train.autocast == "bf16"):
            return self.parallel.loss(to(batch.history), to(batch.history_len), to(batch.candidates), to(label))

    def _loss_terms(self, samples, batch: np.ndarray) -> np.ndarray:
        """Per sample of ``batch``, the terms its loss averages over (the kind's ``loss_terms``)."""
        return self.model_kind.loss_terms(self.model, samples, batch)

    def _micro_batches(self, samples, batch: np.ndarray) -> list[tuple[np.ndarray, float | None]]:
        """This rank's micro-batches of a step's ``batch``, each with its share of the step's loss terms (None: the
        whole step in one process). An empty one becomes the step's first sample with share 0, so that every rank
        runs every forward, backward and collective."""
        accumulation = self.cfg.train.grad_accumulation
        if not self.world.distributed and accumulation == 1:
            return [(batch, None)]
        terms = self._loss_terms(samples, batch)
        total = terms.sum()
        return [(batch[rows], float(terms[rows].sum() / total)) if len(rows) else (batch[:1], 0.0)
                for rows in micro_batches(self.world, np.arange(len(batch)), accumulation)]

    def train_step(self, samples, batch: np.ndarray) -> float:
        """One optimizer step on the global batch ``batch`` (indices into ``samples``); returns its loss, the mean
        over the whole batch (all ranks)."""
        self.optimizer.zero_grad(set_to_none=True)
        parts = self._micro_batches(samples, batch)
        total = None
        for i, (rows, share) in enumerate(parts):
            with self.parallel.gradient_sync(i == len(parts) - 1):
                loss = self._loss(samples, rows)
                # DDP and FSDP2 average gradients over ranks: world_size x share makes that the step's mean
                (loss if share is None else loss * (share * self.world.size)).backward()
            part = loss.detach() if share is None else loss.detach() * share
            total = part if total is None else total + part
        norm = total_norm(torch.nn.utils.clip_grad_norm_([q for g in self.optimizer.param_groups for q in g["params"]],
                                                         self.cfg.train.grad_clip))
        loss = all_reduce_sum(self.world, total)
        # one collective per step: every rank stops at the same step, on divergence before the weights move
        diverged, self.stop_signal = agree(self.world, not finite(loss, norm), self.stop_request.signum or 0)
        if diverged:
            raise Diverged(self._divergence(loss, norm))
        self.optimizer.step()
        self.scheduler.step()
        return loss

    def _divergence(self, loss: float, norm: float) -> str:
        p = self.progress
        return (f"training diverged in {self._where(p.step_in_epoch + 1)}: loss {loss:.6g}, grad norm {norm:.6g}, "
                f"learning rate {self.optimizer.param_groups[0]['lr']:.6g}; the step was not applied and "
                f"{self._kept()}. {self._advice()}")

    def _where(self, step: int) -> str:
        """Stage, phase, epoch and ``step`` (1-based, of the epoch) of the current phase, and the global step."""
        p = self.progress
        phase = self.phases[p.phase]
        modalities = "+".join(phase.modalities) or "text"
        return (f"stage {phase.stage} ({modalities}, {phase.name}), epoch {p.epoch}, step {step} "
                f"(global step {p.global_step - p.step_in_epoch + step})")

    def validate(self) -> dict[str, float]:
        """Validation metrics over all users: each rank evaluates its block of users (whole batches), the results
        are gathered and the metrics computed once."""
        return self.model_kind.validate(self.parallel.eval_model(), self.data, self.cfg, self.world)

    def run(self, stop_after_steps: int | None = None) -> dict[str, float]:
        """Train to the end (or stop right after checkpointing at global step ``stop_after_steps``). With
        ``train.max_step_seconds`` the run ends after the step that spends that budget: validated, ``best/`` and
        ``last/`` written, and complete."""
        start = time.perf_counter()
        self._clock = start
        p = self.progress
        if self.complete:
            return self.last_metrics
        if self.optimizer is None:
            self._start_phase(p.phase)
        while p.phase < len(self.phases) and not self._budget_spent():
            phase = self.phases[p.phase]
            self.model.train()
            n_epochs = phase.epochs if phase.name == "main" else math.inf
            while p.epoch < n_epochs:
                samples, batches = self._epoch_batches(p.phase, p.epoch)
                bar = tqdm(total=len(batches), initial=p.step_in_epoch,
                           disable=not (self.cfg.train.progress and self.world.is_main),
                           desc=f"{self.kind} {phase.name} stage {phase.stage} epoch {p.epoch}", leave=False)
                tic, seen = time.perf_counter(), 0
                while p.step_in_epoch < len(batches) and not self._warmup_done(phase) and not self._budget_spent():
                    idx = batches[p.step_in_epoch]
                    step_start = time.perf_counter()
                    loss = self.train_step(samples, idx)
                    p.step_seconds += time.perf_counter() - step_start
                    p.step_in_epoch += 1
                    p.global_step += 1
                    seen += len(idx)  # the global batch: samples/s over all ranks
                    bar.update(1)
                    self.step_losses.append(loss)
                    bar.set_postfix(loss=f"{loss:.4f}", samples_per_s=f"{seen / (time.perf_counter() - tic):.0f}")
                    if self.cfg.train.checkpoint_every and p.global_step % self.cfg.train.checkpoint_every == 0:
                        self.save("last")
                        if stop_after_steps is not None and p.global_step >= stop_after_steps:
                            bar.close()
                            return {}
                    if self.stop_signal:
                        bar.close()
                        self._preempt()
                bar.close()
                if self._budget_spent():
                    break
                if phase.name == "warmup":
                    if self._warmup_done(phase):
                        break
                    p.epoch, p.step_in_epoch = p.epoch + 1, 0
                    continue
                p.epoch, p.step_in_epoch = p.epoch + 1, 0
                self._validate_and_keep(start)
            if self._budget_spent():
                break
            p.phase, p.epoch, p.step_in_epoch = p.phase + 1, 0, 0
            if p.phase < len(self.phases):
                self._start_phase(p.phase)
        if self._budget_spent() and not self.complete:
            self.log(f"{self.kind}: train.max_step_seconds {self.cfg.train.max_step_seconds:g} spent after "
                     f"{p.global_step} steps ({p.step_seconds:.1f}s of steps); the run ends here")
            if p.step_in_epoch:  # the budget ended an epoch early: validate what was trained
                self._validate_and_keep(start)
            p.phase, p.epoch, p.step_in_epoch = len(self.phases), 0, 0
        self.save("last")
        return self.last_metrics

    def _validate_and_keep(self, start: float) -> None:
        """Validate; write ``best/`` when the metric improved, and ``last/``."""
        p, phase, metric_name = self.progress, self.phases[self.progress.phase], self.model_kind.metric
        self.last_metrics = self.validate()
        self.log(f"{self.kind} stage {phase.stage} ({'+'.join(phase.modalities) or 'text'}) epoch {p.epoch}: "
                 f"valid {metric_name} {self.last_metrics[metric_name]:.4f}  ({time.perf_counter() - start:.1f}s)")
        if self.last_metrics[metric_name] > p.best_metric:
            p.best_metric = self.last_metrics[metric_name]
            self.save("best")
        self.save("last")

    def _budget_spent(self) -> bool:
        budget = self.cfg.train.max_step_seconds
        return budget is not None and self.progress.step_seconds >= budget

    def _preempt(self) -> None:
        """Write last/ at the step just taken (unless checkpoint_every just did) and raise ``Preempted``."""
        last = self.out / "last"
        if self.last_saved != self.progress.global_step:
            self.save("last")
        where = self._where(self.progress.step_in_epoch)
        raise Preempted(f"stopped by {stop_signal_name(self.stop_signal)} after {where}: {last} holds that step; "
                        f"resume by running the same command with --resume {last}", self.stop_signal)

    def _warmup_done(self, phase: Phase) -> bool:
        """A warm-up phase ends after ``phase.steps`` steps (checked before each step, so a resume from a
        checkpoint taken at its last step goes straight on to the next phase)."""
        return phase.name == "warmup" and self.progress.global_step - self._phase_start_step() >= phase.steps

    def _phase_start_step(self) -> int:
        """Global step at which the current phase began (steps of earlier phases are fixed by the schedule)."""
        return sum(self._phase_steps(i) for i in range(self.progress.phase))


def load_trained(path: str | Path, kind: str | None = None):
    """(model in eval mode on the CPU, RunConfig, data, item table, kind) of a model directory that a run wrote.

    Reads only the directory; the data split is rebuilt from the recorded recipe (the files it names, synthetic
    data from its seed), never features, SASRec or ``<out_dir>/items``.
    """
    config = read_model_config(path, kind)
    model_kind = kind_of(path)
    if config.get("run_config") is None:
        raise ValueError(f"{Path(path) / 'config.json'}: no run_config (a model saved outside a training run), so "
                         "there is no data recipe to rebuild the split from; evaluate it with "
                         "speeder_rt.eval.protocol.evaluate on your own SequenceData")
    from speeder_rt.train.data import load_sequences

    cfg = run_config_from_dict(config["run_config"], f"{Path(path) / 'config.json'}: run_config")
    model = model_kind.load(path)
    _, data = load_sequences(cfg)
    check_table_fits(data, model.item_table, path)
    return model, cfg, data, model.item_table, model_kind.name
