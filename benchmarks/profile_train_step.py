"""Where one training step's time goes: ``torch.profiler`` over the training suite's step (benchmark_training.py).

The same model, batch and optimizer as ``benchmark_training.py`` (``common.train_model``, ``common.requests``);
``--warmup`` steps (Triton's autotuning and compilation happen there), then ``--steps`` profiled steps. Prints the
wall time per step, the kernel launches per step, and the operators with the most self time on the device (CUDA)
and on the host, so a step bound by launches or host work shows as such. The first H200 check (2026-12-04,
benchmarks/RESULTS.md) measured a Speeder LoRA step of 168 ms for 640 tokens of a 0.5B model: this script is how
to find out why.

    python benchmarks/profile_train_step.py [--shape qwen2-0.5b] [--method speeder|text_baseline] [--finetune lora|full]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common

from speeder_rt.model.backbone import SHAPES


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen2-0.5b" if common.CUDA else "tiny")
    parser.add_argument("--method", choices=("speeder", "text_baseline"), default="speeder")
    parser.add_argument("--finetune", choices=("lora", "full"), default="lora")
    parser.add_argument("--history", type=int, default=10)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rows", type=int, default=25, help="operators listed per table")
    args = parser.parse_args()

    settings = common.Settings(shape=args.shape, title_tokens=32, max_new_tokens=16, train_batch=args.batch)
    hist, hist_len, cand, label = common.requests(args.batch, args.history)
    model = common.train_model(args.method, settings, args.finetune == "lora")
    loss_args = (hist, hist_len, cand, label if args.method == "speeder" else cand.gather(1, label[:, None])[:, 0])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        model.loss(*loss_args).backward()
        optimizer.step()
        common.sync()

    for _ in range(args.warmup):
        step()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    wall_ms = (time.perf_counter() - start) / args.steps * 1e3
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if common.CUDA else [])
    with profile(activities=activities) as prof:
        for _ in range(args.steps):
            step()
    events = prof.key_averages()
    launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx"))
    print(f"{args.method} {args.finetune}, shape {args.shape}, batch {args.batch}, history {args.history}, "
          f"{common.DEVICE}: {wall_ms:.2f} ms per step (unprofiled, {args.steps} steps after {args.warmup} warm-up); "
          f"{launches / args.steps:.0f} kernel launches per step")
    if common.CUDA:
        print(events.table(sort_by="self_cuda_time_total", row_limit=args.rows))
    print(events.table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
