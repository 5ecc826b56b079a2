"""pytest-benchmark: ``python -m speeder_rt.serve`` under load -- 64 concurrent gRPC clients, 5,000 batch-1 requests.

Each request is one user: a history of 1..10 items (uniform) and 20 candidates, so Triton's dynamic batcher has to
merge requests of different widths (ragged inputs, padded server-side). Measured: requests/s over the whole run,
p50 / p99 latency per request, the average server batch (requests / executions of the ``speeder`` model, from the
metrics endpoint), errors, and the CPU seconds the clients themselves took. The server runs with its defaults (the
export's max batch 64, 2 ms queue delay, one instance, one ONNX Runtime thread) on a tiny random-init Speeder
exported to ONNX, plus the ``speeder_rt.serve`` flags in ``SERVE_ARGS`` (e.g. ``SERVE_ARGS="--instances 2"``).
The clients run in this process (asyncio gRPC, one channel each), on the same machine as the server.

Goal on the 2-core CPU: >= 1,000 requests/s at an average server batch >= 16, with 0 errors; the test fails
when a goal is missed (the figures are printed either way).

Run in the serve venv: ``.venv-serve/bin/python -m pytest benchmarks/benchmark_serving.py --benchmark-only``.
"""
from __future__ import annotations

import asyncio
import os
import re
import resource
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
import torch

pytest.importorskip("pytriton", reason="serving runs in the serve venv (.venv-serve, built by make serve / make test)")
grpcclient = pytest.importorskip("tritonclient.grpc")
import tritonclient.grpc.aio as grpc_aio  # noqa: E402

from speeder_rt.data import SyntheticConfig, generate_synthetic  # noqa: E402
from speeder_rt.export.exporter import export_model  # noqa: E402
from speeder_rt.export.format import Ranges  # noqa: E402
from speeder_rt.model import BackboneConfig, SpeederConfig, SpeederModel  # noqa: E402

REQUESTS, CLIENTS, MAX_HISTORY, CANDIDATES, N_ITEMS = 5000, 64, 10, 20, 2048
GOAL_RPS, GOAL_BATCH = 1000, 16
START_TIMEOUT_S = 300
SERVE_ARGS = shlex.split(os.environ.get("SERVE_ARGS", ""))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The tiny model's ONNX export, served by the CLI on free loopback ports; stopped by PID afterwards."""
    _, table = generate_synthetic(SyntheticConfig(n_items=N_ITEMS, n_users=20, seed=3))
    torch.manual_seed(0)
    model = SpeederModel(SpeederConfig(backbone=BackboneConfig(shape="tiny"), d_expert=32, max_history=MAX_HISTORY,
                                       modalities=["text", "image"]), table).eval()
    work = tmp_path_factory.mktemp("serving_bench")
    export_model(model, "onnx", work / "onnx", ranges=Ranges(64, MAX_HISTORY, CANDIDATES), topk=10, log=lambda *_: None)
    socks = [socket.socket() for _ in range(3)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    http, grpc, metrics = (s.getsockname()[1] for s in socks)
    for s in socks:
        s.close()
    log = open(work / "server.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "speeder_rt.serve", "--export", str(work / "onnx"), "--http-port",
                             str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics), *SERVE_ARGS],
                            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "TMPDIR": str(work)})
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc}")
        while True:
            assert proc.poll() is None, (work / "server.log").read_text()[-4000:]
            try:
                if client.is_model_ready("speeder"):
                    break
            except Exception:  # noqa: BLE001 -- not listening yet
                pass
            assert time.monotonic() < deadline, f"not ready within {START_TIMEOUT_S} s"
            time.sleep(0.5)
        yield {"grpc": f"127.0.0.1:{grpc}", "metrics": f"http://127.0.0.1:{metrics}/metrics"}
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)
        log.close()


def counters(url: str) -> tuple[float, float]:
    """(successful requests, executions) of the ``speeder`` model."""
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    get = lambda name: sum(float(v) for v in re.findall(rf'^{name}{{model="speeder",version="1"}} (\S+)$', text, re.M))  # noqa: E731
    return get("nv_inference_request_success"), get("nv_inference_exec_count")


def request_inputs(rng: np.random.Generator) -> list:
    n = int(rng.integers(1, MAX_HISTORY + 1))
    arrays = (("history_ids", rng.integers(0, N_ITEMS, size=(1, n)), "INT64"), ("history_mask", np.ones((1, n), bool), "BOOL"),
              ("candidate_ids", rng.integers(0, N_ITEMS, size=(1, CANDIDATES)), "INT64"))
    tensors = []
    for name, array, dtype in arrays:
        tensor = grpcclient.InferInput(name, list(array.shape), dtype)
        tensor.set_data_from_numpy(array.astype(bool if dtype == "BOOL" else np.int64))
        tensors.append(tensor)
    return tensors


async def load(url: str, requests: list[list]) -> tuple[float, list[float], int]:
    """(wall seconds, per-request latencies, errors) of ``requests`` sent by CLIENTS concurrent clients."""
    pending, latencies, errors = list(reversed(range(len(requests)))), [], 0

    async def client_loop() -> None:
        nonlocal errors
        async with grpc_aio.InferenceServerClient(url) as client:
            while pending:
                i = pending.pop()
                start = time.perf_counter()
                try:
                    result = await client.infer("speeder", requests[i])
                    ok = result.as_numpy("scores").shape == (1, CANDIDATES)
                except Exception:  # noqa: BLE001 -- counted
                    ok = False
                latencies.append(time.perf_counter() - start)
                errors += not ok

    start = time.perf_counter()
    await asyncio.gather(*(client_loop() for _ in range(CLIENTS)))
    return time.perf_counter() - start, latencies, errors


def cpu_seconds() -> float:
    """User + system CPU seconds of this process (the clients)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def test_serving_throughput(benchmark, server) -> None:
    rng = np.random.default_rng(0)
    warmup = [request_inputs(rng) for _ in range(256)]
    asyncio.run(load(server["grpc"], warmup))
    requests = [request_inputs(rng) for _ in range(REQUESTS)]
    before, cpu_before = counters(server["metrics"]), cpu_seconds()
    wall, latencies, errors = benchmark.pedantic(lambda: asyncio.run(load(server["grpc"], requests)), rounds=1,
                                                 iterations=1)
    client_cpu_s, after = cpu_seconds() - cpu_before, counters(server["metrics"])
    batch = (after[0] - before[0]) / max(1.0, after[1] - before[1])
    figures = {"requests": REQUESTS, "clients": CLIENTS, "requests_per_s": round(REQUESTS / wall, 1),
               "p50_ms": round(float(np.percentile(latencies, 50)) * 1e3, 2),
               "p99_ms": round(float(np.percentile(latencies, 99)) * 1e3, 2),
               "average_server_batch": round(batch, 2), "errors": errors, "wall_s": round(wall, 2),
               "client_cpu_s": round(client_cpu_s, 2), "serve_args": " ".join(SERVE_ARGS) or "defaults"}
    benchmark.extra_info.update(figures)
    print("\nserving:", ", ".join(f"{k}={v}" for k, v in figures.items()))
    assert errors == 0
    assert figures["requests_per_s"] >= GOAL_RPS and batch >= GOAL_BATCH, (
        f"goal {GOAL_RPS} req/s at average batch >= {GOAL_BATCH} missed: {figures}")
