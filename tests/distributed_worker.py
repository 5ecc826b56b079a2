"""torchrun worker of tests/test_distributed.py: runs the train CLI (``speeder_rt.train.__main__.main``) once per
``--``-separated argument list and records what each rank did.

    torchrun --standalone --nproc_per_node N tests/distributed_worker.py OUT [--kill RANK:STEP[:SIGNAL]] \
        -- ARGS [-- ARGS ...]

All runs share one process group (the job's only ``init_world``). Per run index i and rank r it writes
OUT/i.rank<r>.json (``losses`` of every step, the final validation
``metrics``, ``world_size``, ``writes``: the targets of every atomic file or directory write of that rank) and
OUT/i.rank<r>.safetensors (the rank's own tensors: whole ones under DDP, its shards under FSDP2). Before training,
OUT/collectives.rank<r>.json holds the results of the gathering helpers on known per-user values, and
OUT/pids/<pid> names the process (the test kills what is left by PID). ``--kill RANK:STEP[:SIGNAL]``: rank RANK
writes OUT/killed_at (the time) and sends itself SIGNAL (default SIGKILL; e.g. SIGTERM) right after global step
STEP. Every run runs, also after one that failed; OUT/i.status.rank<r> holds its exit status, and the worker exits
with the first non-zero one. Without torchrun it is one process (rank 0).
"""
import json
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from speeder_rt.train import __main__ as train_cli
from speeder_rt.train import distributed
from speeder_rt.train.trainer import Trainer
from speeder_rt.utils import io


def check_collectives(world: distributed.World, out: Path) -> None:
    """Shard 50 users' integer results (batches of 16) with the trainer's helpers and write what they gather."""
    values = np.random.default_rng(0).integers(0, 7, size=50)
    rows = distributed.eval_rows(world, len(values), 16)
    mine = values[rows]
    local = {"hits": float(np.mean(mine == 3)), "tokens": float(np.mean(mine))}
    result = {"rows": [rows.start, rows.stop],
              "gathered": distributed.all_gather_concat(world, mine).tolist(),
              "means": distributed.mean_of_counts(world, local, len(mine)),
              "expected": {"hits": float(np.mean(values == 3)), "tokens": float(np.mean(values))}}
    (out / f"collectives.rank{world.rank}.json").write_text(json.dumps(result))


def main(argv: list[str]) -> int:
    out, argv = Path(argv[0]), argv[1:]
    (out / "pids").mkdir(parents=True, exist_ok=True)
    (out / "pids" / str(os.getpid())).touch()
    kill_rank = kill_step = None
    kill_signal = signal.SIGKILL
    if argv[0] == "--kill":
        rank, step, *name = argv[1].split(":")
        kill_rank, kill_step = int(rank), int(step)
        kill_signal = signal.Signals[name[0]] if name else kill_signal
        argv = argv[2:]
    runs, current = [], None
    for arg in argv:
        if arg == "--":
            current = []
            runs.append(current)
        else:
            current.append(arg)
    # One process group for the whole job: a second init_process_group in one process may read the first one's
    # addresses from torchrun's store. The CLI's own init and close are that of the train CLI otherwise.
    world = distributed.init_world("cpu")
    check_collectives(world, out)
    train_cli.init_world, train_cli.close_world = (lambda device: world), (lambda _: None)

    losses: list[float] = []
    writes: list[str] = []
    current = {"run": 0}  # the index of the run in progress: recording_run names its files by it
    train_step, run, workspace = Trainer.train_step, Trainer.run, io._workspace

    def recording_step(self, samples, batch):
        loss = train_step(self, samples, batch)
        losses.append(loss)
        if self.world.rank == kill_rank and self.progress.global_step + 1 == kill_step:
            (out / "killed_at").write_text(repr(time.time()))
            os.kill(os.getpid(), kill_signal)
        return loss

    def recording_run(self, *args, **kwargs):
        metrics = run(self, *args, **kwargs)
        rank = self.world.rank
        local = {n: (t.to_local() if hasattr(t, "to_local") else t).detach().cpu().clone()
                 for n, t in self.model.state_dict().items()}
        save_file(local, str(out / f"{current['run']}.rank{rank}.safetensors"))
        (out / f"{current['run']}.rank{rank}.json").write_text(json.dumps(
            {"losses": losses, "metrics": metrics, "world_size": self.world.size, "writes": writes}))
        return metrics

    def recording_workspace(target):
        writes.append(str(target))
        return workspace(target)

    Trainer.train_step, Trainer.run, io._workspace = recording_step, recording_run, recording_workspace
    statuses = []
    try:
        for current["run"], args in enumerate(runs):
            losses.clear()
            writes.clear()
            statuses.append(train_cli.main(args))
            (out / f"{current['run']}.status.rank{world.rank}").write_text(str(statuses[-1]))
    finally:
        distributed.close_world(world)
    return next((s for s in statuses if s), 0)


if __name__ == "__main__":
    torch.set_num_threads(1)
    sys.exit(main(sys.argv[1:]))
