"""One tritonserver behind the request fronts (``Backend``): started by PyTriton on private loopback ports
(HTTP, gRPC, metrics), counted while requests use it, and retired (its requests finished, then stopped) when
``Health`` replaces it with a fresh one.

A dead model instance is recovered by replacing the whole tritonserver, not by reloading the model in it:
tritonserver 2.51 never finishes unloading an instance whose stub died with a request executing and keeps its
memory (0.6 to 2.7 MiB per death, measured; fixed upstream in server PR 8552, not in the wheel's 2.51). A new
tritonserver starts beside the old one, the fronts switch to it once every model is ready in it, and the old one
answers the requests it already has (the models that did not die keep serving from it meanwhile), then stops and
takes all of its memory with it.
"""
from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import re
import signal
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from speeder_rt.serve.health import POLL_S, stubs_by_model, triton_error, tritonserver_pids

EXIT_TIMEOUT_S = 5  # tritonserver's own wait for its models when it stops (--exit-timeout-secs)
SHARED_MEMORY = "/dev/shm"  # where the Python backend keeps its shared-memory regions
# tritonserver's log line for a model that did not load; its message escapes newlines (the traceback follows one)
FAILED_LOAD = re.compile(r"(failed to load '[^']+' version \d+: .*?)(?:\\n|\"?$)", re.MULTILINE)


class BackendError(RuntimeError):
    """A tritonserver that did not start with every model ready; the message is the cause (its log's own line
    where it has one)."""


class InFlight:
    """Requests in flight: a count, and a wait until it is zero."""

    def __init__(self) -> None:
        self.count = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @contextmanager
    def counted(self) -> Iterator[None]:
        """Count one request in flight while the block runs."""
        self.count += 1
        self._idle.clear()
        try:
            yield
        finally:
            self.count -= 1
            if self.count == 0:
                self._idle.set()

    async def idle(self, timeout_s: float) -> bool:
        """Whether every request in flight was answered within ``timeout_s``."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            return False
        return True


@dataclass(eq=False)
class Backend:
    """A running tritonserver: PyTriton's ``Triton`` object, its process and private ports, the thread that runs
    it, and the requests the fronts have at it now (``in_flight``)."""

    triton: Any  # pytriton.triton.Triton (only the serve venv has PyTriton)
    pid: int
    http_port: int
    grpc_port: int
    metrics_port: int
    lifecycle: _Lifecycle
    in_flight: InFlight = field(default_factory=InFlight)

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def grpc(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def metrics(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}"

    def alive(self) -> bool:
        return bool(self.triton.is_alive())

    def stubs(self) -> dict[str, list[int]]:
        return stubs_by_model(self.pid)

    async def stop(self) -> None:
        """Stop this tritonserver (SIGINT; it waits EXIT_TIMEOUT_S for its models, PyTriton kills it later)."""
        self.lifecycle.stop_requested.set()
        await asyncio.shield(self.lifecycle.stopped)


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _remove_shared_memory(triton: Any) -> None:
    """Unlink what a stopped tritonserver left in ``/dev/shm``: its Python backend's shared-memory regions (4 MiB
    each, named by the prefix PyTriton gave this server). tritonserver removes them when it exits cleanly, not when
    its exit timeout runs out on an instance whose stub died (measured: one region per such recovery), and memory in
    ``/dev/shm`` counts against no process's RSS. A stub still mapping one keeps it until it exits."""
    config = getattr(triton, "_python_backend_config", None)  # PyTriton's; the prefix differs per server
    prefix = config["shm-region-prefix-name"] if config is not None else None
    for region in Path(SHARED_MEMORY).glob(f"{prefix}*") if prefix else ():
        with contextlib.suppress(FileNotFoundError):
            region.unlink()


def _cause(triton: Any, error: BaseException) -> str:
    """tritonserver's own ``failed to load '<model>' version N: <why>`` lines (each cut before its traceback),
    else PyTriton's error."""
    server = getattr(triton, "_triton_server", None)  # PyTriton keeps tritonserver's output there
    found = FAILED_LOAD.findall(server.logs() if server is not None else "")
    if found:
        return "; ".join(dict.fromkeys(triton_error(line.encode()) for line in found))
    return f"{type(error).__name__}: {error}"


async def start_backend(repository: Path, access_token: str) -> Backend:
    """A tritonserver serving ``repository`` on free loopback ports, returned once every model is ready;
    BackendError with the cause as soon as it exits, or when it never gets ready (nothing left running).

    A thread of its own (``_Lifecycle``) starts it with ``Triton.run`` and stops it with ``Triton.stop``, and the
    process is watched here meanwhile: PyTriton notices a tritonserver that exited while loading only at its 120 s
    start timeout, holding the lock ``Triton.stop`` needs while it waits."""
    from pytriton.triton import Triton, TritonConfig, TritonSecurityConfig

    ports = [free_loopback_port() for _ in range(3)]
    config = TritonConfig(model_repository=repository, http_address="127.0.0.1", http_port=ports[0],
                          grpc_address="127.0.0.1", grpc_port=ports[1], metrics_address="127.0.0.1",
                          metrics_port=ports[2], allow_gpu_metrics=False, exit_timeout_secs=EXIT_TIMEOUT_S,
                          strict_readiness=True)
    triton = Triton(config=config, security_config=TritonSecurityConfig(access_token=access_token))
    before = set(tritonserver_pids())
    lifecycle = _Lifecycle(triton)
    pid: int | None = None
    try:
        while not lifecycle.started.done():
            await asyncio.wait([lifecycle.started], timeout=POLL_S)
            started = [p for p in tritonserver_pids() if p not in before]
            pid = pid if pid is not None else next(iter(started), None)
            if pid is not None and pid not in started and not lifecycle.started.done():
                lifecycle.abandon()
                raise BackendError(_cause(triton, RuntimeError("tritonserver exited while loading the models")))
    except asyncio.CancelledError:  # serve stops meanwhile: leave nothing running
        if pid is not None and not lifecycle.started.done():
            os.kill(pid, signal.SIGINT)  # Triton.stop would wait for the lock run() holds
            lifecycle.abandon()
        lifecycle.stop_requested.set()
        raise
    outcome = lifecycle.started.result()
    if outcome is not None or pid is None or not triton.is_alive():
        lifecycle.stop_requested.set()
        await lifecycle.stopped
        raise BackendError(_cause(triton, outcome or RuntimeError("tritonserver exited while loading the models")))
    return Backend(triton, pid, http_port=ports[0], grpc_port=ports[1], metrics_port=ports[2], lifecycle=lifecycle)


class _Lifecycle:
    """The thread that runs one tritonserver: ``Triton.run`` (``started`` then holds None or its error), a wait
    for ``stop_requested``, ``Triton.stop`` (``stopped``). One thread for both ends, alive as long as the server:
    PyTriton starts tritonserver with ``PR_SET_PDEATHSIG`` (SIGTERM), which fires when the THREAD that started it
    ends. A daemon thread: one left in PyTriton's wait does not hold up the exit of this process."""

    def __init__(self, triton: Any) -> None:
        self._loop = asyncio.get_running_loop()
        self.started: asyncio.Future[BaseException | None] = self._loop.create_future()
        self.stopped: asyncio.Future[None] = self._loop.create_future()
        self.stop_requested = threading.Event()
        self._triton = triton
        threading.Thread(target=self._run, name="tritonserver", daemon=True).start()

    def abandon(self) -> None:
        """Give up on a tritonserver whose process has exited (or was told to) while ``Triton.run`` still waits:
        the thread stops it when PyTriton's wait ends, and this process's exit does not wait for that (PyTriton's
        ``atexit`` call of ``Triton.stop`` would; its workspace is a temporary directory removed at exit anyway)."""
        atexit.unregister(self._triton.stop)
        self.stop_requested.set()

    def _run(self) -> None:
        outcome: BaseException | None = None
        try:
            self._triton.run()
        except BaseException as e:  # noqa: BLE001 -- handed to the event loop
            outcome = e
        self._notify(self.started, outcome)
        self.stop_requested.wait()
        try:
            self._triton.stop()
        finally:
            _remove_shared_memory(self._triton)
            self._notify(self.stopped, None)

    def _notify(self, future: asyncio.Future, value: object) -> None:
        def resolve() -> None:
            if not future.done():
                future.set_result(value)

        with contextlib.suppress(RuntimeError):  # the event loop is closed: nobody waits any more
            self._loop.call_soon_threadsafe(resolve)
