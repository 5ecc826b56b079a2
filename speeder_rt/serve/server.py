"""Run Triton Inference Server (the ``tritonserver`` of the ``nvidia-pytriton`` wheel, launched by PyTriton) on a
Python-backend model repository, and stop it cleanly.

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

import os
import shutil
import signal
import socket
import sys
import sysconfig
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from speeder_rt.export.format import EXPORT_JSON, PYTHON_REPOSITORY, read_export_json


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


def run(repository: Path, endpoints: Endpoints, stop: threading.Event, log: Callable[[str], None] = print) -> int:
    """Serve ``repository`` until ``stop`` is set (0) or the server dies (1)."""
    from pytriton.triton import Triton, TritonConfig

    os.environ.update(stub_environment(dict(os.environ)))  # PyTriton passes its environment to tritonserver
    config = TritonConfig(model_repository=repository, http_address=endpoints.host, http_port=endpoints.http_port,
                          grpc_address=endpoints.host, grpc_port=endpoints.grpc_port,
                          metrics_address=endpoints.host, metrics_port=endpoints.metrics_port,
                          allow_gpu_metrics=False, exit_timeout_secs=3, strict_readiness=True)
    triton = Triton(config=config)
    try:
        try:
            triton.run()  # starts tritonserver, waits until the server and every model are ready
        except Exception as e:  # noqa: BLE001 -- PyTriton's errors for a server that died or never got ready
            log(f"speeder_rt.serve: tritonserver did not start ({type(e).__name__}: {e}); its log is above")
            return 1
        if not triton.is_alive():
            log("speeder_rt.serve: tritonserver exited while loading the models (its log is above)")
            return 1
        models = sorted(p.name for p in repository.iterdir() if (p / "config.pbtxt").is_file())
        log("speeder_rt.serve: ready; models " + ", ".join(models) + "; "
            + ", ".join(f"{name} {url}" for name, url in endpoints.urls().items()))
        while not stop.wait(0.5):
            if not triton.is_alive():
                log("speeder_rt.serve: tritonserver exited unexpectedly (its log is above)")
                return 1
        log("speeder_rt.serve: stopping")
        return 0
    finally:
        triton.stop()


def serve_repository(repository: Path, endpoints: Endpoints, log: Callable[[str], None] = print) -> int:
    """Serve a Python-backend ``repository`` as it is until SIGINT / SIGTERM (0) or the server's death (1)."""
    check_environment()
    check_ports(endpoints)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    return run(repository, endpoints, stop, log)


def serve(export_dir: Path, endpoints: Endpoints, max_batch: int | None = None, queue_delay_us: int | None = None,
          instances: int | None = None, threads: int | None = None, log: Callable[[str], None] = print) -> int:
    """``python -m speeder_rt.serve``: the export's repository with these batching settings, written to a temporary
    directory and served (``serve_repository``). ServeError for a bad setup (nothing started)."""
    check_environment()
    with tempfile.TemporaryDirectory(prefix="speeder_rt_serve_") as tmp:
        repository = Path(tmp) / PYTHON_REPOSITORY
        meta = write_repository(export_dir.resolve(), repository, max_batch, queue_delay_us, instances, threads)
        log(f"speeder_rt.serve: {meta['engine']} export {export_dir} ({meta['num_items']} items, ranges "
            f"{meta['ranges']}, top-k {meta['topk']})")
        code = serve_repository(repository, endpoints, log)
    log("speeder_rt.serve: stopped")
    return code
