"""python -m speeder_rt.serve --export DIR [--host 127.0.0.1] [--http-port 8000] [--grpc-port 8001]
[--metrics-port 8002] [--max-batch N] [--queue-delay-us US] [--instances N] [--threads N]
[--max-recoveries 3] [--drain-timeout-s 10] [--max-request-bytes N]

Settings left out keep the export's (model_repository_python/*/config.pbtxt: its max batch, a 2 ms queue delay,
one instance, one engine thread per instance).

A model whose instance process dies is recovered by a new tritonserver that replaces the old one behind the fronts
(the model not ready meanwhile, its requests 503 / UNAVAILABLE); SIGINT / SIGTERM drains the requests in flight
before stopping; HTTP, gRPC and metrics requests reach tritonserver through fronts in this process, which also check
and bound the HTTP ones (docs/serving.md).

Exit status: 0 stopped by SIGINT / SIGTERM; 1 the server died or a model could not be recovered (the message
names it and the cause); 2 bad setup (export, ports, environment, flags).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from speeder_rt.serve.server import Endpoints, Resilience, ServeError, serve


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m speeder_rt.serve", description=(
        "Serve an export (onnx, aoti, trt) on Triton Inference Server: models speeder (history_ids, history_mask, "
        "candidate_ids -> scores) and speeder_topk (history_ids, history_mask -> item_ids, scores)."))
    parser.add_argument("--export", required=True, type=Path, help="directory written by python -m speeder_rt.export")
    parser.add_argument("--host", default="127.0.0.1", help="address every endpoint binds to (default 127.0.0.1)")
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--metrics-port", type=int, default=8002)
    parser.add_argument("--max-batch", type=int, default=None,
                        help="most rows Triton merges into one batch (default: the export's max batch)")
    parser.add_argument("--queue-delay-us", type=int, default=None,
                        help="how long a request may wait for others to join its batch (default: the export's, 2000)")
    parser.add_argument("--instances", type=int, default=None,
                        help="model instances (processes) per model (default: the export's, 1)")
    parser.add_argument("--threads", type=int, default=None,
                        help="the engine's CPU threads per instance (default: the export's, 1)")
    parser.add_argument("--max-recoveries", type=int, default=3,
                        help="failed recoveries of a model (a dead or crashing instance; each starts a new "
                             "tritonserver) before the server exits 1 (default 3)")
    parser.add_argument("--drain-timeout-s", type=float, default=10.0,
                        help="on SIGINT / SIGTERM, the longest wait for the requests in flight (default 10)")
    parser.add_argument("--max-request-bytes", type=int, default=None,
                        help="largest HTTP request body (default: a JSON request of the export's max batch at its "
                             "widest, at most 2 MiB)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    endpoints = Endpoints(args.host, args.http_port, args.grpc_port, args.metrics_port)
    log = lambda line: print(line, flush=True)  # noqa: E731
    try:
        resilience = Resilience(args.max_recoveries, args.drain_timeout_s, args.max_request_bytes)
        return serve(args.export, endpoints, args.max_batch, args.queue_delay_us, args.instances, args.threads,
                     resilience, log=log)
    except ServeError as e:
        print(f"speeder_rt.serve: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
