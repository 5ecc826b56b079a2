"""Training-step time of a run config's model on its real data: fp32, bf16 autocast, and torch.compile.

Builds the config's data, item table and model exactly as ``python -m speeder_rt.train`` does, then times the
trainer's own ``train_step`` over the first ``--steps`` batches of the first MPO stage for each mode, every mode
from the same initial weights and batches; prints seconds per step and the losses (so a mode that changes the
numbers shows it). ``bf16+compile`` wraps the decoder in ``torch.compile(dynamic=True)``; its first step
includes the compilation. Run it on one core for the figures of a one-core budget:

    taskset -c 1 python benchmarks/benchmark_step_modes.py --config configs/movielens_smollm2_study.yaml \
        --modes fp32,bf16,bf16+compile --steps 8
"""
from __future__ import annotations

import argparse
import copy
import json
import time

import torch

from speeder_rt.train.config import read_config_file, run_config_from_dict
from speeder_rt.train.data import prepare
from speeder_rt.train.trainer import Trainer

MODES = ("fp32", "bf16", "bf16+compile")


def time_mode(raw: dict, mode: str, steps: int, data, table) -> dict:
    """Seconds and loss of each of the first ``steps`` steps of stage 1 under ``mode``."""
    raw = copy.deepcopy(raw)
    raw.setdefault("train", {})["autocast"] = "none" if mode == "fp32" else "bf16"
    cfg = run_config_from_dict(raw, "benchmark config")
    trainer = Trainer("speeder", cfg, data, table, log=lambda *_: None)
    trainer._start_phase(0)
    if mode.endswith("+compile"):
        trainer.model.decoder = torch.compile(trainer.model.decoder, dynamic=True)
    samples, batches = trainer._epoch_batches(0, 0)
    trainer.model.train()
    seconds, losses = [], []
    for batch in batches[:steps]:
        start = time.perf_counter()
        losses.append(float(trainer.train_step(samples, batch)))
        seconds.append(time.perf_counter() - start)
    return {"seconds": seconds, "losses": losses}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--modes", default="fp32,bf16", help=f"comma-separated, of {', '.join(MODES)}")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--json", help="write the figures to this file too")
    args = parser.parse_args()
    modes = args.modes.split(",")
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        parser.error(f"--modes: unknown mode {unknown[0]!r}; known: {', '.join(MODES)}")
    raw = read_config_file(args.config)
    cfg = run_config_from_dict(raw, args.config)
    cfg.train.apply_process_settings()
    data, table = prepare(cfg)
    figures = {}
    for mode in modes:
        figures[mode] = result = time_mode(raw, mode, args.steps, data, table)
        later = result["seconds"][1:] or result["seconds"]
        print(f"{mode}: first step {result['seconds'][0]:.2f} s, then {min(later):.2f} to {max(later):.2f} s per step; "
              f"losses {' '.join(f'{v:.4f}' for v in result['losses'])}", flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(figures, f, indent=1)


if __name__ == "__main__":
    main()
