"""python -m speeder_rt.export --checkpoint MODEL_DIR --engine onnx|trt|aoti --out DIR [options]

Exit status: 0 written; 1 parity outside --atol (nothing written unless --allow-mismatch); 2 bad input
(missing or corrupt model directory, a pickled checkpoint, a text-baseline model, ranges, existing --out,
TensorRT missing).
"""
from __future__ import annotations

import argparse
import sys

from speeder_rt.export.exporter import ExportError, ParityError, export_checkpoint
from speeder_rt.export.format import ENGINES
from speeder_rt.export.graph import DTYPES, EXPORT_BACKENDS
from speeder_rt.export.index import INDEX_CHOICES


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m speeder_rt.export",
                                     description="Export a Speeder checkpoint's scoring graphs, parity-checked against PyTorch.")
    parser.add_argument("--checkpoint", required=True, help="a Speeder model directory (e.g. runs/demo/speeder/best)")
    parser.add_argument("--engine", required=True, choices=ENGINES)
    parser.add_argument("--out", required=True, help="output directory (written atomically)")
    parser.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--max-history", type=int, default=None, help="default: the model's max_history")
    parser.add_argument("--max-candidates", type=int, default=100)
    parser.add_argument("--topk", type=int, default=10, help="k of the full-catalog top-k graph (0: no top-k graph)")
    parser.add_argument("--atol", type=float, default=None,
                        help="parity tolerance relative to max(1, |score|): default 1e-4 for fp32, 5e-2 for fp16/bf16")
    parser.add_argument("--attn-backend", default="sdpa", choices=EXPORT_BACKENDS)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda[:N] (aoti compiles for it; trt needs cuda)")
    parser.add_argument("--force", action="store_true", help="replace an existing --out")
    parser.add_argument("--allow-mismatch", action="store_true", help="keep the export when parity fails")
    parser.add_argument("--index", default="auto", choices=INDEX_CHOICES,
                        help="ANN index of full-catalog top-k: exact = none (the top-k graph scans the table), faiss = "
                             "FAISS IVF, auto = exact below 50,000 items else faiss; flat / ivf / hnsw: one FAISS "
                             "structure (needs faiss-cpu: pip install 'speeder_rt[catalog]')")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = export_checkpoint(args.checkpoint, args.engine, args.out, dtype=args.dtype, max_batch=args.max_batch,
                                   max_history=args.max_history, max_candidates=args.max_candidates, topk=args.topk,
                                   atol=args.atol, attn_backend=args.attn_backend, device=args.device, force=args.force,
                                   allow_mismatch=args.allow_mismatch, index=args.index)
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ParityError as e:
        print(f"error: {e}\nnothing written (pass --allow-mismatch to keep the export)", file=sys.stderr)
        return 1
    if not result.report.passed:
        print(f"warning: parity outside atol={result.report.atol:g}; kept because of --allow-mismatch", file=sys.stderr)
    print(f"wrote {result.out} ({args.engine}, {args.dtype}; parity {'passed' if result.report.passed else 'FAILED'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
