"""Run Triton Inference Server (the ``tritonserver`` of the ``nvidia-pytriton`` wheel, launched by PyTriton) on a
Python-backend model repository, keep it healthy, and stop it cleanly (``run``; docs/serving.md).

tritonserver's HTTP, gRPC and metrics endpoints listen on private loopback ports (``backend``) behind the request
fronts that own the public ports (``front`` for HTTP and metrics: limits, readiness, 503s; ``grpc_front`` for
gRPC: readiness, UNAVAILABLE; both count the requests in flight in one ``front.Gate``); ``health`` watches the stub
processes and recovers a model whose instance died by replacing tritonserver behind the fronts; SIGINT / SIGTERM
drain the requests in flight (``_drain``) before the models are unloaded and tritonserver stops.

Three traps of the wheel's Python backend stub are handled here, before the server starts:

* the stub links the system's ``libpython3.X.so``; an interpreter built elsewhere (pyenv, conda) then dies
  with ``'_thread.RLock' object has no attribute '_recursion_count'``: ``LD_LIBRARY_PATH`` must start with
  this interpreter's own library directory;
* the stub runs the ``python3`` it finds on ``PATH`` (``PYTHONPATH`` does not choose it): this interpreter's
  directory goes first;
* with numpy 2 the stub answers with EMPTY responses and no error anywhere: numpy<2 is required (the serve
  venv has it; ``nvidia-pytriton`` pins it).
"""
from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import signal
import socket
import sys
import sysconfig
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from speeder_rt.export.format import EXPORT_JSON, PYTHON_REPOSITORY, read_export_json
from speeder_rt.serve.limits import MAX_BODY_CEILING, served_models

if TYPE_CHECKING:  # aiohttp and grpcio (the fronts, health) are imported where they run: only the serve venv has them
    from speeder_rt.serve.front import Gate
    from speeder_rt.serve.health import Health

UNLOAD_TIMEOUT_S = 10.0  # the least time the models get to unload after a drain


class ServeError(RuntimeError):
    """The server cannot start (environment, ports, export); the message says what to do."""


@dataclass
class Endpoints:
    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002

    def urls(self) -> dict[str, str]:
        return {"HTTP": f"http://{self.host}:{self.http_port}", "gRPC": f"{self.host}:{self.grpc_port}",
                "metrics": f"http://{self.host}:{self.metrics_port}/metrics"}


def stub_environment(env: dict[str, str]) -> dict[str, str]:
    """``env`` with this interpreter's libpython directory first on ``LD_LIBRARY_PATH`` and its ``bin`` first on
    ``PATH`` (see the module docstring)."""
    def prepend(value: str, current: str | None) -> str:
        return value + (os.pathsep + current if current else "")

    env = dict(env)
    env["LD_LIBRARY_PATH"] = prepend(sysconfig.get_config_var("LIBDIR"), env.get("LD_LIBRARY_PATH"))
    env["PATH"] = prepend(str(Path(sys.executable).parent), env.get("PATH"))
    return env


def check_environment() -> None:
    """ServeError unless PyTriton is importable and numpy is older than 2."""
    import numpy

    hint = "serving runs in its own venv: `make serve EXPORT=DIR`, or `.venv-serve/bin/python -m speeder_rt.serve`"
    try:
        import pytriton  # noqa: F401
    except ImportError:
        raise ServeError(f"nvidia-pytriton is not installed in {sys.prefix}; {hint}") from None
    if int(numpy.__version__.split(".")[0]) >= 2:
        raise ServeError(f"numpy {numpy.__version__}: Triton's Python backend stub returns empty responses with "
                         f"numpy 2 (nvidia-pytriton pins numpy<2); {hint}")


def check_ports(endpoints: Endpoints) -> None:
    """ServeError naming the flag of a port that is taken (or used twice) on the host."""
    ports = {"--http-port": endpoints.http_port, "--grpc-port": endpoints.grpc_port,
             "--metrics-port": endpoints.metrics_port}
    for flag, port in ports.items():
        if not 1 <= port <= 65535:
            raise ServeError(f"{flag} {port}: a port is 1..65535")
        if list(ports.values()).count(port) > 1:
            raise ServeError(f"{flag} {port}: the same port is given for two endpoints")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server does: TIME_WAIT is no conflict
            try:
                sock.bind((endpoints.host, port))
            except OSError as e:
                raise ServeError(f"{flag} {port}: cannot listen on {endpoints.host}:{port} ({e.strerror}); the port "
                                 "is in use or not allowed: stop what holds it or choose another port") from None


def write_repository(export_dir: Path, repo: Path, max_batch: int | None = None, queue_delay_us: int | None = None,
                     instances: int | None = None, threads: int | None = None) -> dict:
    """The export's ``model_repository_python/`` copied to ``repo`` with the absolute path of ``export_dir`` and these
    batching settings (None keeps the exported one); returns the export's ``export.json``.
    The configs are edited through Triton's own ``ModelConfig`` schema (tritonclient's protobuf)."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    meta_path, source = export_dir / EXPORT_JSON, export_dir / PYTHON_REPOSITORY
    if not meta_path.is_file():
        raise ServeError(f"--export {export_dir}: not an export directory (no {EXPORT_JSON}); write one with "
                         "python -m speeder_rt.export")
    if not source.is_dir():
        raise ServeError(f"--export {export_dir}: no {PYTHON_REPOSITORY}/ (exported by an older speeder_rt); "
                         "export it again")
    for flag, value, low in (("--max-batch", max_batch, 1), ("--queue-delay-us", queue_delay_us, 0),
                             ("--instances", instances, 1), ("--threads", threads, 1)):
        if value is not None and value < low:
            raise ServeError(f"{flag} must be >= {low}, got {value}")
    for model in sorted(p for p in source.iterdir() if (p / "config.pbtxt").is_file()):
        config = text_format.Parse((model / "config.pbtxt").read_text(encoding="utf-8"), model_config_pb2.ModelConfig())
        if max_batch is not None:
            config.max_batch_size = max_batch
        if queue_delay_us is not None:
            config.dynamic_batching.max_queue_delay_microseconds = queue_delay_us
        for group in config.instance_group if instances is not None else ():
            group.count = instances
        if threads is not None:
            config.parameters["threads"].string_value = str(threads)
        config.parameters["export_dir"].string_value = str(export_dir.resolve())
        shutil.copytree(model, repo / model.name)
        (repo / model.name / "config.pbtxt").write_text(text_format.MessageToString(config), encoding="utf-8")
    return read_export_json(export_dir)


@dataclass
class Resilience:
    """How the server recovers, drains and bounds requests (the flags of ``python -m speeder_rt.serve``)."""

    max_recoveries: int = 3  # failed recoveries of a model before the server exits 1
    drain_timeout_s: float = 10.0  # SIGTERM / SIGINT: the longest wait for the requests in flight
    max_request_bytes: int | None = None  # None: from the export's ranges (limits.ServedModel.default_max_body_bytes)

    def check(self) -> None:
        if self.max_recoveries < 0:
            raise ServeError(f"--max-recoveries must be >= 0, got {self.max_recoveries}")
        if self.drain_timeout_s < 0:
            raise ServeError(f"--drain-timeout-s must be >= 0, got {self.drain_timeout_s}")
        if self.max_request_bytes is not None and not 1024 <= self.max_request_bytes <= MAX_BODY_CEILING:
            raise ServeError(f"--max-request-bytes must be in 1024..{MAX_BODY_CEILING} (tritonserver 2.51's HTTP "
                             f"endpoint crashes on bodies of ~5 MB), got {self.max_request_bytes}")


async def _wait_first(*awaitables: Awaitable[object]) -> None:
    tasks = [asyncio.ensure_future(a) for a in awaitables]
    await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    for task in tasks:
        task.cancel()


async def run(repository: Path, endpoints: Endpoints, resilience: Resilience, log: Callable[[str], None]) -> int:
    """Serve ``repository`` until SIGINT / SIGTERM (drain, then 0), a model that cannot be recovered (1) or the
    death of tritonserver (1). tritonserver's endpoints listen on private loopback ports behind the fronts."""
    from speeder_rt.serve.backend import BackendError, start_backend
    from speeder_rt.serve.front import Front, Gate
    from speeder_rt.serve.grpc_front import GrpcFront
    from speeder_rt.serve.health import Health

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    models = served_models(repository)
    max_body = resilience.max_request_bytes or min(MAX_BODY_CEILING,
                                                   max(m.default_max_body_bytes() for m in models.values()))
    os.environ.update(stub_environment(dict(os.environ)))  # PyTriton passes its environment to tritonserver
    access_token = secrets.token_urlsafe(32)  # one for every tritonserver this process starts (model control)
    try:
        backend = await start_backend(repository, access_token)
    except BackendError as e:
        log(f"speeder_rt.serve: tritonserver did not start ({e}); its log is above")
        return 1
    health = Health(models, backend, lambda: start_backend(repository, access_token), resilience.max_recoveries,
                    access_token, log)
    front = grpc_front = None
    try:
        gate = Gate(list(models))
        health.on_down.append(gate.model_down)
        front = Front(models, health, gate, max_body)
        await front.start(endpoints.host, endpoints.http_port, endpoints.metrics_port)
        grpc_front = GrpcFront(list(models), health, gate, max_body)
        await grpc_front.start(endpoints.host, endpoints.grpc_port)
        log("speeder_rt.serve: ready; models " + ", ".join(models) + "; "
            + ", ".join(f"{name} {url}" for name, url in endpoints.urls().items())
            + f"; requests up to {max_body} bytes")
        watcher = asyncio.ensure_future(health.watch())
        await _wait_first(stop.wait(), health.failed_event.wait(), health.until_backend_dies())
        watcher.cancel()
        if health.failed is not None:
            log(f"speeder_rt.serve: error: {health.failed}; exiting")
            return 1
        if not health.backend.alive():
            log("speeder_rt.serve: tritonserver exited unexpectedly (its log is above)")
            return 1
        return await _drain(gate, health, resilience.drain_timeout_s, log)
    finally:
        if front is not None:
            await front.close()
        if grpc_front is not None:
            await grpc_front.close()
        await health.close()
        for running in {health.backend, backend, *health.retiring}:
            await running.stop()


def _in_flight(gate: Gate) -> str:
    return " and ".join(f"{count} {protocol}" for protocol, count in gate.in_flight.items())


async def _drain(gate: Gate, health: Health, timeout_s: float, log: Callable[[str], None]) -> int:
    """Refuse new requests (HTTP and gRPC: every one reaches tritonserver through a front), wait (at most
    ``timeout_s``) for the ones in flight, then unload the models (their stubs finish) so that tritonserver stops at
    once; 0 either way (a drain that times out says how many requests it cut off)."""
    deadline = time.monotonic() + timeout_s
    log(f"speeder_rt.serve: draining: {_in_flight(gate)} requests in flight, new ones refused (503 / UNAVAILABLE); "
        f"waiting up to {timeout_s:g} s")
    gate.drain()
    if await gate.drained(timeout_s):
        log("speeder_rt.serve: drained; stopping")
    else:
        log(f"speeder_rt.serve: drain timeout ({timeout_s:g} s, --drain-timeout-s): {_in_flight(gate)} requests are "
            "cut off; stopping")
    if not await health.unload_all(max(UNLOAD_TIMEOUT_S, deadline - time.monotonic())):
        log(f"speeder_rt.serve: the models did not unload within {UNLOAD_TIMEOUT_S:g} s; stopping tritonserver")
    return 0


def serve_repository(repository: Path, endpoints: Endpoints, resilience: Resilience | None = None,
                     log: Callable[[str], None] = print) -> int:
    """Serve a Python-backend ``repository`` as it is until SIGINT / SIGTERM (drain, then 0) or a failure (1)."""
    resilience = resilience or Resilience()
    resilience.check()
    check_environment()
    check_ports(endpoints)
    return asyncio.run(run(repository, endpoints, resilience, log))


def serve(export_dir: Path, endpoints: Endpoints, max_batch: int | None = None, queue_delay_us: int | None = None,
          instances: int | None = None, threads: int | None = None, resilience: Resilience | None = None,
          log: Callable[[str], None] = print) -> int:
    """``python -m speeder_rt.serve``: the export's repository with these batching settings, written to a temporary
    directory and served (``serve_repository``). ServeError for a bad setup (nothing started)."""
    resilience = resilience or Resilience()
    resilience.check()
    check_environment()
    with tempfile.TemporaryDirectory(prefix="speeder_rt_serve_") as tmp:
        repository = Path(tmp) / PYTHON_REPOSITORY
        meta = write_repository(export_dir.resolve(), repository, max_batch, queue_delay_us, instances, threads)
        log(f"speeder_rt.serve: {meta['engine']} export {export_dir} ({meta['num_items']} items, ranges "
            f"{meta['ranges']}, top-k {meta['topk']})")
        code = serve_repository(repository, endpoints, resilience, log)
    log("speeder_rt.serve: stopped")
    return code
