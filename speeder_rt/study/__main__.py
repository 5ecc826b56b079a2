"""python -m speeder_rt.study --config CONFIG --out DIR [--seeds 0,1,2] [--rows ID,...] [--history-len N] [--jobs N]
[--report-only]"""
from __future__ import annotations

import argparse
import shlex
import sys

from speeder_rt.study.report import require_matplotlib, write_report
from speeder_rt.study.rows import BASELINE_ROWS, SPAE_ROWS
from speeder_rt.study.runner import plan, recorded_results, run_study
from speeder_rt.train.config import read_config_file
from speeder_rt.train.faults import TrainingStopped


def _ids(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _seeds(text: str) -> list[int]:
    try:
        return [int(part) for part in _ids(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"comma-separated integers expected, got {text!r}") from None


def rows_for(rows: list[str] | None, history_len: int | None) -> list[str] | None:
    """The rows to run: those given, else every row (the long-history study: SPAE on vs off and the baselines)."""
    return rows or (list(SPAE_ROWS + BASELINE_ROWS) if history_len else None)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m speeder_rt.study", description=(
        "The ablation study: full Speeder, MRC over fewer modalities, SPAE / recency / MPO off, SASRec, popularity "
        "and random, each trained and evaluated on the test split for every seed; resumable."))
    parser.add_argument("--config", required=True, help="the run configuration YAML every row overrides")
    parser.add_argument("--out", required=True, help="the study directory (results.json, study.md, study.png, runs)")
    parser.add_argument("--seeds", type=_seeds, default=[0, 1, 2], help="comma-separated run seeds (default 0,1,2)")
    parser.add_argument("--rows", type=_ids, help="comma-separated row ids (default: every row; with --history-len: "
                                                  f"{','.join(SPAE_ROWS + BASELINE_ROWS)})")
    parser.add_argument("--history-len", type=int, help="history window N, users with >= N interactions only")
    parser.add_argument("--jobs", type=int, default=1, help="runs trained at once, each in its own process (default "
                                                             "1; on a CPU, the cores over the config's train.num_threads)")
    parser.add_argument("--no-progress", action="store_true", help="no bar over the runs")
    parser.add_argument("--report-only", action="store_true", help="train nothing: write study.md and study.png "
                        "from the runs results.json already holds for these rows and seeds (a partial study's report)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rows = rows_for(args.rows, args.history_len)
    try:
        require_matplotlib()
        raw = read_config_file(args.config)
        study = plan(raw, args.config, args.out, args.seeds, rows, args.history_len)
        if args.report_only:
            results = recorded_results(study)
        else:
            study.apply_process_settings()  # threads and kernels: the same for every row
            results = run_study(study, progress=not args.no_progress, jobs=args.jobs)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingStopped as e:  # a row diverged, or a checkpoint could not be written: the rows done are kept
        print(f"error: {e}", file=sys.stderr)
        return e.status
    command = shlex.join(["python", "-m", "speeder_rt.study", *(argv if argv is not None else sys.argv[1:])])
    text, paths = write_report(study.out, study.rows, results, study.seeds, command, study.selection.same_as)
    print(text)
    print("wrote " + ", ".join(str(p) for p in ([] if args.report_only else [study.out / "results.json"]) + paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
