"""Data-parallel training throughput: samples/s of the Trainer's step at several world sizes on torchrun.

Each world size is one ``torchrun --standalone`` job of this file in worker mode. Its ranks build the same
synthetic run (Speeder on text + image features, the phase's trainable sets: LoRA by default, so
``train.parallel`` auto is DDP; ``--full``: a full fine-tune, FSDP2) and run ``Trainer.train_step`` on the
epoch's global batches: ``--warmup`` steps, then ``--steps`` timed ones. The global batch is ``--per-rank-batch``
x world size (weak scaling: each rank's work stays the same). samples/s = timed steps x global batch / seconds on
rank 0; every step ends with the all-reduce of its loss, so the time covers the slowest rank. Scaling efficiency
= samples/s(N) / (N x samples/s(1)).

    python benchmarks/benchmark_distributed.py [--world-sizes 1,2] [--shape tiny] [--full] [--json FILE]

CPU (default: tiny shape, fp32, world sizes 1 and 2): information only. Every rank runs one intra-op thread
(OMP_NUM_THREADS=1 unless set, as torchrun does for more than one rank) and the ranks share the machine's cores (on
this project's 2-core machine, also with other jobs), so the
figure says nothing about a GPU node. GPU goal: efficiency >= 0.9 at N = 8 for LoRA on the Qwen2-0.5B shape (bf16,
Triton attention): ``--shape qwen2-0.5b --world-sizes 1,8``; not measured yet (no multi-GPU machine so far).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULT = "benchmark_distributed.rank0.json"


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-sizes", default="1,2", help="comma-separated (default 1,2)")
    parser.add_argument("--shape", default="tiny", help="backbone shape preset (default tiny)")
    parser.add_argument("--full", action="store_true", help="full fine-tune (FSDP2) instead of LoRA (DDP)")
    parser.add_argument("--per-rank-batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20, help="timed steps (default 20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    parser.add_argument("--json", help="write the results here as JSON")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # the torchrun job's output directory
    return parser.parse_args(argv)


def worker(args: argparse.Namespace) -> None:
    import torch

    from speeder_rt.data import build_sequences, generate_synthetic
    from speeder_rt.train.config import run_config_from_dict
    from speeder_rt.train.distributed import close_world, init_world
    from speeder_rt.train.trainer import Trainer

    world = init_world("auto")
    try:
        cuda = world.device.type == "cuda"
        tuned = "backbone" if args.full else "lora"
        cfg = run_config_from_dict({
            "out_dir": args.worker, "data": {"collab_features": False},
            "model": {"backbone": {"shape": args.shape, "dtype": "bfloat16" if cuda else "float32",
                                   "lora": None if args.full else {"rank": 8}},
                      "modalities": ["text", "image"]},
            "mpo": [{"name": "bench", "modalities": ["text", "image"], "epochs": 1, "lr": 1e-4,
                     "trainable": ["experts", "gate", "head", "spae", tuned]}],
            "train": {"batch_size": args.per_rank_batch * world.size, "progress": False},
        })
        inter, table = generate_synthetic(cfg.data.synthetic)
        trainer = Trainer("speeder", cfg, build_sequences(inter, cfg.data.split), table, log=lambda *_: None,
                          world=world)
        trainer._start_phase(0)
        steps, epoch, timed = args.warmup + args.steps, 0, None
        while steps:
            samples, batches = trainer._epoch_batches(0, epoch)
            for batch in batches[:-1][:steps]:  # whole global batches only
                trainer.train_step(samples, batch)
                steps -= 1
                if steps == args.steps:
                    timed = time.perf_counter()
            epoch += 1
        seconds = time.perf_counter() - timed
        if world.is_main:
            result = {"world_size": world.size, "device": str(world.device), "mode": type(trainer.parallel).__name__,
                      "global_batch": cfg.train.batch_size, "steps": args.steps, "seconds": seconds,
                      "samples_per_s": args.steps * cfg.train.batch_size / seconds,
                      "threads_per_rank": torch.get_num_threads()}
            (Path(args.worker) / RESULT).write_text(json.dumps(result))
    finally:
        close_world(world)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse(argv)
    sizes = [int(n) for n in args.world_sizes.split(",")]
    forwarded = sys.argv[1:] if argv is None else argv
    results = []
    with tempfile.TemporaryDirectory() as work:
        for n in sizes:
            out = Path(work) / f"world{n}"
            out.mkdir()
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
                       __file__, *forwarded, "--worker", str(out)]
            # torchrun sets one intra-op thread per rank only for more than one rank: the same for every size
            env = {"OMP_NUM_THREADS": "1", **os.environ}
            subprocess.run(command, check=True, timeout=3600, env=env)
            results.append(json.loads((out / RESULT).read_text()))
    base = results[0]["samples_per_s"] / results[0]["world_size"]  # per rank, at the first (smallest) world size
    print(f"{'world':>5} {'device':>8} {'mode':>10} {'global batch':>12} {'samples/s':>10} {'efficiency':>10}")
    for r in results:
        r["efficiency"] = r["samples_per_s"] / (r["world_size"] * base)
        print(f"{r['world_size']:>5} {r['device']:>8} {r['mode']:>10} {r['global_batch']:>12} "
              f"{r['samples_per_s']:>10.1f} {r['efficiency']:>10.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    arguments = parse(sys.argv[1:])
    if arguments.worker:
        worker(arguments)
    else:
        main()
