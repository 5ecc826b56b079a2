"""Data-parallel training on torchrun: one training over every rank, for Speeder and the text-item baseline.

torchrun (``--standalone``, or ``--nnodes N --rdzv-backend c10d --rdzv-endpoint HOST:PORT``) starts one process
per device and sets RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous address. :func:`init_world` turns that
environment into the process group: NCCL with rank ``r`` on ``cuda:LOCAL_RANK``, gloo on the CPU; beside it a
gloo group for the host-side collectives (barriers, gathered evaluation ranks, RNG states). A process started
without that environment is a single process and nothing here runs a collective.

The model is wrapped for ``train.parallel`` (``auto``: ddp when LoRA is on, fsdp otherwise):

- ``ddp``: ``DistributedDataParallel``: every rank holds the whole model, gradients are all-reduced. It is
  rebuilt at each phase start, since MPO phases change which parameters train.
- ``fsdp``: FSDP2, ``fully_shard`` on every decoder layer, then on the whole model; for a bf16 model with a
  ``MixedPrecisionPolicy`` that computes in bf16 and reduce-scatters gradients in fp32 (the parameters stay in
  the model's dtype, the one model files are written in). Checkpoints gather the full state on rank 0
  (``torch.distributed.checkpoint.state_dict``, full and CPU-offloaded), so they are the files a single process
  writes. Evaluation runs on a plain replica loaded with the gathered weights, so no collective runs inside it
  (ranks score different users, the text baseline generates for a varying number of steps): the whole model's
  parameters must fit on one device beside the shards.

Global batch: ``train.batch_size`` samples per optimizer step over all ranks. Each rank takes its contiguous
share of the step's batch (the epoch's order is the single-process one, a pure function of seed, stage, phase
and epoch) and cuts it into ``train.grad_accumulation`` micro-batches, syncing gradients on the last one only
(``no_sync`` / ``set_requires_gradient_sync``). A micro-batch's loss, a mean over its loss terms (samples for
Speeder, target tokens for the text baseline), is scaled by ``world_size * terms(micro) / terms(step)``, so the
gradient DDP and FSDP2 average over ranks is the single-process gradient of the step's mean loss, also for the
epoch's last, smaller batch. A rank whose share is empty runs a zero-weight micro-batch, so every rank joins
every collective. Sums run in another order than in one process (per-rank GEMMs over fewer rows, then the
all-reduce), so losses and weights equal the single-process run's to fp32 rounding, not bit for bit.

Evaluation: each rank scores a contiguous block of users in whole batches (the batches one process forms), the
per-user results are gathered and the metrics computed once, on every rank: the single-process metrics of the
same weights, bit for bit.

One writer: rank 0 builds the item table cache and writes checkpoints and logs; the other ranks wait at a
barrier, then read (``--resume`` and ``<out_dir>/items`` need a filesystem every rank sees).
"""
from __future__ import annotations

import contextlib
import copy
import inspect
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from speeder_rt.train.resume import load_named_optimizer_state, named_optimizer_state

# Host-side waits (the item table that rank 0 builds: MiniLM features, SASRec) may take long; a dead rank is
# noticed by torchrun's agent at once, whatever this says.
HOST_TIMEOUT = timedelta(hours=2)
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
# The buffers (item features, enabled modalities) are equal on every rank and never trained: no broadcast before each
# forward (torch >= 2.13 names this forward_sync_buffers and deprecates broadcast_buffers=False).
_NO_BUFFER_SYNC = ({"forward_sync_buffers": False}
                   if "forward_sync_buffers" in inspect.signature(nn.parallel.DistributedDataParallel).parameters
                   else {"broadcast_buffers": False})


@dataclass(frozen=True)
class World:
    """This process's place in the job: rank ``rank`` of ``size`` (``local_rank`` on its node), computing on
    ``device``; ``host_group`` is the gloo group of a distributed run, None for a single process."""

    device: torch.device
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    host_group: Any = None

    @property
    def distributed(self) -> bool:
        return self.host_group is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def launched_by_torchrun() -> bool:
    return all(key in os.environ for key in TORCHRUN_ENV)


def init_world(device: str = "auto") -> World:
    """The process group of a torchrun job (a single-process World without torchrun's environment).
    ``device``: ``train.device``; under torchrun ``auto`` / ``cuda`` mean ``cuda:LOCAL_RANK``."""
    if not launched_by_torchrun():
        return World(pick_device(device))
    local_rank = int(os.environ["LOCAL_RANK"])
    own = rank_device(device, local_rank)
    if own.type == "cuda":
        torch.cuda.set_device(own)
        dist.init_process_group("nccl", device_id=own)
    else:
        dist.init_process_group("gloo")
    host = dist.new_group(backend="gloo", timeout=HOST_TIMEOUT)
    return World(own, dist.get_rank(), dist.get_world_size(), local_rank, host)


def rank_device(name: str, local_rank: int) -> torch.device:
    """The device of the rank with ``local_rank`` for ``train.device`` = ``name``."""
    device = pick_device(name)
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise ValueError(f"train.device: {name!r}; distributed training runs on cpu (gloo) or cuda (nccl)")
    if device.index not in (None, local_rank):
        raise ValueError(f"train.device: {name!r} names one GPU, but under torchrun rank {local_rank} of this node "
                         f"computes on cuda:{local_rank}; set train.device to auto or cuda")
    return torch.device("cuda", local_rank)


def close_world(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


# -- collectives ----------------------------------------------------------------------------------------------
def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier(group=world.host_group)


def all_gather_concat(world: World, values: np.ndarray) -> np.ndarray:
    """Every rank's 1-D ``values`` (any lengths) concatenated in rank order."""
    if not world.distributed:
        return values
    local = torch.from_numpy(np.ascontiguousarray(values))
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(world.size)]
    dist.all_gather(sizes, torch.tensor([len(local)]), group=world.host_group)
    padded = torch.zeros(int(max(sizes)), dtype=local.dtype)
    padded[: len(local)] = local
    parts = [torch.empty_like(padded) for _ in range(world.size)]
    dist.all_gather(parts, padded, group=world.host_group)
    return torch.cat([part[: int(n)] for part, n in zip(parts, sizes)]).numpy()


def all_reduce_sum(world: World, value: torch.Tensor) -> float:
    """The sum over ranks of a scalar tensor on this rank's device."""
    if world.distributed:
        value = value.clone()
        dist.all_reduce(value)
    return float(value)


def mean_of_counts(world: World, metrics: dict[str, float], n: int) -> dict[str, float]:
    """Metrics over all ranks' users from each rank's metrics over its ``n`` users, for metrics that are means of
    an integer per user (a hit, a validity flag, a token count): the counts are recovered exactly, summed and
    divided once, so the result is the single-process mean bit for bit."""
    if not world.distributed:
        return metrics
    keys = list(metrics)  # the same order on every rank
    counts = torch.tensor([n] + [round(metrics[k] * n) for k in keys], dtype=torch.int64)
    dist.all_reduce(counts, group=world.host_group)
    total = int(counts[0])
    return {k: int(c) / total for k, c in zip(keys, counts[1:])}


def gather_rank_rng(world: World) -> dict[str, torch.Tensor]:
    """The RNG states of ranks 1.., keyed ``rank<r>/cpu`` and (on CUDA) ``rank<r>/cuda``, on every rank; rank 0's
    are stored as a single process stores its own."""
    if not world.distributed:
        return {}
    own = {"cpu": torch.get_rng_state()}
    if world.device.type == "cuda":
        own["cuda"] = torch.cuda.get_rng_state(world.device)
    out = {}
    for key, state in own.items():
        parts = [torch.empty_like(state) for _ in range(world.size)]
        dist.all_gather(parts, state, group=world.host_group)
        out.update((f"rank{r}/{key}", part) for r, part in enumerate(parts) if r)
    return out


def restore_rank_rng(world: World, rng: dict[str, torch.Tensor]) -> bool:
    """Set this rank's (rank > 0) RNG states from ``rng``; False when it holds none for this rank."""
    cpu = rng.get(f"rank{world.rank}/cpu")
    if cpu is None:
        return False
    torch.set_rng_state(cpu)
    cuda = rng.get(f"rank{world.rank}/cuda")
    if cuda is not None and world.device.type == "cuda":
        torch.cuda.set_rng_state(cuda, world.device)
    return True


# -- sharding -------------------------------------------------------------------------------------------------
def check_batch(world: World, batch_size: int, accumulation: int) -> None:
    """``train.batch_size`` (the global batch) must cut into world_size x grad_accumulation equal micro-batches."""
    parts = world.size * accumulation
    if batch_size % parts:
        raise ValueError(f"train.batch_size {batch_size} is the global batch; it must be a multiple of world size "
                         f"{world.size} x train.grad_accumulation {accumulation} = {parts} (per-rank batch = "
                         f"batch_size / world size, micro-batch = that / grad_accumulation)")


def micro_batches(world: World, batch: np.ndarray, accumulation: int) -> list[np.ndarray]:
    """This rank's micro-batches of a step's sample indices: its contiguous share, in ``accumulation`` parts."""
    return np.array_split(np.array_split(batch, world.size)[world.rank], accumulation)


def eval_rows(world: World, n: int, batch_size: int) -> slice:
    """This rank's contiguous block of ``n`` evaluation rows, in whole batches of ``batch_size`` as one process
    cuts them."""
    batches = -(-n // batch_size)
    first, last = batches * world.rank // world.size, batches * (world.rank + 1) // world.size
    return slice(min(first * batch_size, n), min(last * batch_size, n))


# -- the model on every rank ----------------------------------------------------------------------------------
class TrainingLoss(nn.Module):
    """``model.loss`` as a module's forward: DDP and FSDP2 act on their root module's forward."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *batch: torch.Tensor) -> torch.Tensor:
        return self.model.loss(*batch)


class LocalModel:
    """A single process: the model as it is, no collective."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def start_phase(self, params: list[nn.Parameter]) -> list[nn.Parameter]:
        """Called once the phase's trainable parameters are set; returns the parameters its optimizer trains."""
        return params

    def loss(self, *batch: Any) -> torch.Tensor:
        return self.model.loss(*batch)

    def gradient_sync(self, sync: bool) -> contextlib.AbstractContextManager:
        """Around a micro-batch's forward and backward: ``sync`` False accumulates gradients locally."""
        return contextlib.nullcontext()

    def full_state(self) -> dict[str, torch.Tensor] | None:
        """The full model state for a checkpoint on rank 0 (None: the model's own ``state_dict()``)."""
        return None

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """The optimizer state by parameter name (full, on rank 0)."""
        return named_optimizer_state(self.model, optimizer)

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict[str, Any], where: str | Path) -> None:
        load_named_optimizer_state(self.model, optimizer, state, where)

    def eval_model(self) -> nn.Module:
        """A module with the current weights that evaluates without collectives."""
        return self.model


class DDPModel(LocalModel):
    """``DistributedDataParallel`` over the model's training loss, rebuilt for each phase's trainable set."""

    def __init__(self, model: nn.Module, world: World, find_unused: bool) -> None:
        """``find_unused``: a trainable parameter may not reach the loss (DDP then searches the autograd graph for
        such parameters on every forward and leaves their gradients None, as one process does)."""
        super().__init__(model)
        self.world, self.find_unused = world, find_unused
        self.ddp: nn.parallel.DistributedDataParallel | None = None

    def start_phase(self, params: list[nn.Parameter]) -> list[nn.Parameter]:
        self.ddp = None  # the previous phase's reducer and hooks go first
        self.ddp = nn.parallel.DistributedDataParallel(
            TrainingLoss(self.model), device_ids=[self.world.device.index] if self.world.device.type == "cuda" else None,
            find_unused_parameters=self.find_unused, **_NO_BUFFER_SYNC)
        return params

    def loss(self, *batch: Any) -> torch.Tensor:
        return self.ddp(*batch)

    def gradient_sync(self, sync: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext() if sync else self.ddp.no_sync()


class FSDPModel(LocalModel):
    """FSDP2 over the model's training loss: each decoder layer its own unit, the rest the root's."""

    def __init__(self, model: nn.Module, world: World) -> None:
        super().__init__(model)
        self.world = world
        self.root: nn.Module | None = None
        self.replica: nn.Module | None = None

    def start_phase(self, params: list[nn.Parameter]) -> list[nn.Parameter]:
        if self.root is None:  # shard once: fully_shard keeps names and requires_grad, and follows later changes
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

            names = {id(p): n for n, p in self.model.named_parameters()}
            trained = [names[id(p)] for p in params]
            self.replica = copy.deepcopy(self.model)
            dtype = next(self.model.parameters()).dtype
            policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
                      if dtype == torch.bfloat16 else MixedPrecisionPolicy())
            mesh = init_device_mesh(self.world.device.type, (self.world.size,))
            for layer in decoder_layers(self.model):
                fully_shard(layer, mesh=mesh, mp_policy=policy)
            self.root = fully_shard(TrainingLoss(self.model), mesh=mesh, mp_policy=policy)
            sharded = dict(self.model.named_parameters())
            params = [sharded[n] for n in trained]
        return params

    def loss(self, *batch: Any) -> torch.Tensor:
        return self.root(*batch)

    @contextlib.contextmanager
    def gradient_sync(self, sync: bool) -> Iterator[None]:
        self.root.set_requires_gradient_sync(sync)
        yield

    def _options(self, on_rank0: bool):
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        return StateDictOptions(full_state_dict=True, cpu_offload=on_rank0)

    def full_state(self) -> dict[str, torch.Tensor]:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(self.model, options=self._options(on_rank0=True))

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(self.model, optimizer, options=self._options(on_rank0=True))

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict[str, Any], where: str | Path) -> None:
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        set_optimizer_state_dict(self.model, optimizer, state, options=self._options(on_rank0=False))

    def eval_model(self) -> nn.Module:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        self.replica.load_state_dict(get_model_state_dict(self.model, options=self._options(on_rank0=False)))
        return self.replica


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The backbone's decoder layers: the one ``*.layers`` ModuleList with ``num_hidden_layers`` entries."""
    count = model.lm_config.num_hidden_layers
    found = [m for name, m in model.named_modules()
             if name.rpartition(".")[2] == "layers" and isinstance(m, nn.ModuleList) and len(m) == count]
    if len(found) != 1:
        raise ValueError(f"train.parallel fsdp: expected one list of the {count} decoder layers ('*.layers') in "
                         f"{type(model).__name__}, found {len(found)}")
    return list(found[0])


def parallel_mode(parallel: str, lora: bool) -> str:
    """``train.parallel`` resolved: ``auto`` is ddp with LoRA (few trained weights), fsdp for a full fine-tune."""
    return ("ddp" if lora else "fsdp") if parallel == "auto" else parallel


def parallel_model(model: nn.Module, world: World, mode: str, find_unused: bool = False) -> LocalModel:
    """The model as ``world`` trains it: as it is in one process, else wrapped for ``mode`` (ddp | fsdp);
    ``find_unused``: see DDPModel."""
    if not world.distributed:
        return LocalModel(model)
    return DDPModel(model, world, find_unused) if mode == "ddp" else FSDPModel(model, world)
