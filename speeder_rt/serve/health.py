"""Which served models can answer, and their recovery by a fresh tritonserver (``backend``).

tritonserver 2.51 does not notice when a Python-backend stub (the process of one model instance) dies: after a
``kill -9`` (the OOM killer, a crash in an engine) it keeps answering the model and the server ready while every
request fails with ``Stub process '<instance>' is not healthy.``. ``Health`` watches the stubs itself: every
``POLL_S`` it counts each model's live stubs among the current tritonserver's child processes (``/proc``); a model
with fewer than its instance count, or one whose request got the stub error (``report``), is marked down at once
(the fronts then answer it, and the server's readiness, 503) and recovered: a new tritonserver is started beside
the current one (``backend.start_backend``; the other models keep serving from the current one), and once every
model is ready in it the fronts switch to it (``on_switch``) and the old one is retired (``_retire``).
Replacing rather than reloading the model frees what tritonserver 2.51 keeps of a dead instance (``backend``).
A recovery that fails (the new tritonserver does not get ready: an engine that cannot load) or that does not hold
for ``STABLE_S`` counts against ``max_recoveries``; past it ``failed`` names the model and the cause and
``speeder_rt.serve`` exits 1, so that an orchestrator restarts it.
"""
from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp

from speeder_rt.serve.limits import ServedModel

if TYPE_CHECKING:
    from speeder_rt.serve.backend import Backend

POLL_S = 0.2  # how often the stubs are counted (a dead one is seen within this)
RETIRE_TIMEOUT_S = 30.0  # the longest a replaced tritonserver gets to answer the requests it has
STABLE_S = 10.0  # a recovered model that goes down again sooner counts as a failed recovery
CONTROL_TIMEOUT_S = 120.0  # one call of the model-control API (unload at the drain)
ACCESS_HEADER = "triton-access-token"  # PyTriton restricts the model-control API to its generated token
STUB_COMMAND = "triton_python_b"  # /proc/PID/comm of triton_python_backend_stub (cut to 15 characters)


def child_processes(pid: int) -> list[int]:
    """The live (not zombie) children of ``pid`` (each thread lists the ones it started; a thread that exits while
    they are read is skipped, not taken for a process without children)."""
    children: list[int] = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return []
    for task in tasks:
        try:
            children += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return [c for c in children if _alive(c)]


def _alive(pid: int, parent: int | None = None) -> bool:
    """Whether ``pid`` runs (is no zombie) and, when ``parent`` is given, is its child (not a reused PID)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    state, ppid = stat[stat.rindex(")") + 2:].split()[:2]
    return state not in "ZX" and (parent is None or int(ppid) == parent)


def command_name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def stub_model(pid: int) -> str | None:
    """The model a Python-backend stub serves: its first argument is ``<repository>/<model>/<version>/model.py``."""
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    return Path(args[1].decode()).parent.parent.name if len(args) > 1 else None


def tritonserver_pids(parent: int | None = None) -> list[int]:
    """The tritonservers that ``parent`` (default: this process) launched through PyTriton (two while one replaces
    the other)."""
    return [pid for pid in child_processes(parent or os.getpid()) if command_name(pid) == "tritonserver"]


def stubs_by_model(server_pid: int) -> dict[str, list[int]]:
    """The live stub processes of tritonserver, by model."""
    stubs: dict[str, list[int]] = {}
    for pid in child_processes(server_pid):
        if command_name(pid) == STUB_COMMAND and (model := stub_model(pid)) is not None:
            stubs.setdefault(model, []).append(pid)
    return stubs


def triton_error(body: bytes) -> str:
    """The message of tritonserver's ``{"error": ...}`` body on one line, without the Python backend's traceback
    (after ``At:``), at most 400 characters (the body itself when it is not such JSON)."""
    text = body.decode(errors="replace")
    try:
        parsed = json.loads(text)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict) and "error" in parsed:
        text = str(parsed["error"])
    line = " ".join(text.split("\n\nAt:\n")[0].split())
    return line if len(line) <= 400 else line[:397] + "..."


class Health:
    """The served models' state (up, or down with a cause), the current tritonserver and its replacement; see the
    module docstring."""

    def __init__(self, models: dict[str, ServedModel], backend: Backend,
                 start_backend: Callable[[], Awaitable[Backend]], max_recoveries: int, access_token: str,
                 log: Callable[[str], None]) -> None:
        self.models = models
        self.backend = backend
        self.max_recoveries = max_recoveries
        self.log = log
        self.down: dict[str, str] = {}  # model -> why it cannot answer now
        self.failed: str | None = None  # set when a model could not be recovered: serve exits 1
        self.failed_event = asyncio.Event()
        self.on_down: list[Callable[[str], None]] = []  # called with the model's name when it goes down
        self.on_switch: list[Callable[[Backend, Backend], None]] = []  # called with (old, new) at a switch
        self.retiring: set[Backend] = set()  # replaced tritonservers still answering their requests
        self._start_backend = start_backend
        self._stopping = False
        self._headers = {ACCESS_HEADER: access_token}
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=CONTROL_TIMEOUT_S))
        self._failures = 0  # failed recoveries since the last one that held
        self._recovered_at = float("-inf")
        self._causes: dict[str, str] = {}  # model -> why it went down (kept through its recovery)
        self._recovery: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()

    def unavailable(self, model: str | None = None) -> str | None:
        """Why ``model`` (None: any model) cannot answer now, or None when it can."""
        names = [model] if model is not None else sorted(self.down)
        reasons = [f"model {name} is {self.down[name]}" for name in names if name in self.down]
        return "; ".join(reasons) or None

    def report(self, model: str, cause: str) -> None:
        """Mark ``model`` down for ``cause`` and start the recovery (nothing when it is down already)."""
        if model in self.down or self.failed is not None or self._stopping:
            return
        if self._recovery is None:  # a new recovery: does the last one still hold?
            self._failures = self._failures + 1 if time.monotonic() - self._recovered_at < STABLE_S else 0
        self.down[model] = f"recovering: {cause}; retry in a few seconds"
        self._causes[model] = cause
        self.log(f"speeder_rt.serve: model {model} is down ({cause}); not ready until a new tritonserver serves it")
        for listener in self.on_down:
            listener(model)
        if self._recovery is None:
            self._recovery = self._spawn(self._recover())

    async def watch(self) -> None:
        """Count each model's live stubs in the current tritonserver every POLL_S; report the models that lost one.
        The stubs seen before are checked one by one (two ``/proc`` reads); tritonserver's children are listed (a
        read per tritonserver thread) only when fewer are alive than the model's instances: at the start, after a
        death, after a switch. ``/proc/<pid>/task/*/children`` may miss a child while tritonserver starts or ends
        threads, so a stub seen once counts until it is dead."""
        backend = self.backend
        seen: dict[str, set[int]] = {name: set() for name in self.models}
        while self.failed is None and not self._stopping:
            if self.backend is not backend:
                backend, seen = self.backend, {name: set() for name in self.models}
            listed: dict[str, list[int]] | None = None
            for name, model in self.models.items():
                alive = set() if name in self.down else {pid for pid in seen[name] if _alive(pid, backend.pid)}
                if len(alive) < model.instances:
                    listed = backend.stubs() if listed is None else listed
                    alive |= set(listed.get(name, []))
                seen[name] = alive
                if name not in self.down and len(alive) < model.instances:
                    self.report(name, f"{model.instances - len(alive)} of its {model.instances} instance processes "
                                      "died")
            await asyncio.sleep(POLL_S)

    async def until_backend_dies(self) -> None:
        """Return when the current tritonserver exits (not one being retired)."""
        while self.backend.alive():
            await asyncio.sleep(0.5)

    async def unload_all(self, timeout_s: float) -> bool:
        """Unload every model of the current tritonserver through the model-control API and wait, at most
        ``timeout_s``, until their stubs have exited: tritonserver then stops at once instead of timing out on live
        models."""
        self._stopping = True  # no recovery from here on
        deadline = time.monotonic() + timeout_s
        try:
            for name in self.models:
                await self._control("unload", name)
            while time.monotonic() < deadline:  # the repository index says UNAVAILABLE before the stubs are done
                if not self.backend.stubs():
                    return True
                await asyncio.sleep(POLL_S)
        except (TimeoutError, RuntimeError, aiohttp.ClientError):
            return False
        return False

    async def close(self) -> None:
        """Cancel a recovery or retirement under way (a tritonserver being started is stopped) and wait for them."""
        self._stopping = True
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._session.close()

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> asyncio.Task:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _control(self, action: str, model: str) -> None:
        """POST Triton's repository API ``action`` (load / unload) for ``model``; RuntimeError with Triton's
        message when it is refused."""
        url = f"{self.backend.http}/v2/repository/models/{model}/{action}"
        async with self._session.post(url, headers=self._headers) as response:
            if response.status != 200:
                raise RuntimeError(triton_error(await response.read()) or f"HTTP {response.status}")

    def _check_serving(self, backend: Backend) -> None:
        """RuntimeError unless every model has all its stubs running in ``backend``."""
        stubs = backend.stubs()
        for name, model in self.models.items():
            if len(stubs.get(name, [])) < model.instances:
                raise RuntimeError(f"the new tritonserver runs {len(stubs.get(name, []))} of the {model.instances} "
                                   f"instance processes of model {name}")

    async def _recover(self) -> None:
        start = time.monotonic()
        last = next(iter(self._causes.values()))
        try:
            while self._failures < self.max_recoveries:
                attempt = self._failures + 1
                try:
                    backend = await self._start_backend()
                except RuntimeError as e:  # backend.BackendError: the new tritonserver did not get ready
                    last = str(e) or type(e).__name__
                else:
                    try:
                        self._check_serving(backend)
                    except RuntimeError as e:
                        last = str(e)
                        await backend.stop()
                    else:
                        self._switch(backend, start, attempt)
                        return
                self._failures += 1
                self.log(f"speeder_rt.serve: recovery {attempt}/{self.max_recoveries} of model "
                         f"{', '.join(sorted(self.down))} failed: {last}")
            name = min(self.down, key=list(self.models).index)
            self.failed = (f"model {name} could not be recovered after {self.max_recoveries} attempts "
                           f"(--max-recoveries); it went down because {self._causes[name]}; last error: {last}")
            self.failed_event.set()
        finally:
            self._recovery = None

    def _switch(self, backend: Backend, start: float, attempt: int) -> None:
        """Send every request to ``backend`` from now on and retire the tritonserver it replaces."""
        old, self.backend = self.backend, backend
        for listener in self.on_switch:
            listener(old, backend)
        recovered = sorted(self.down)
        self.down.clear()
        self._causes.clear()
        self._recovered_at = time.monotonic()
        self.log(f"speeder_rt.serve: model {', '.join(recovered)} recovered in {self._recovered_at - start:.1f} s "
                 f"(attempt {attempt}/{self.max_recoveries}, a new tritonserver, pid {backend.pid}); ready")
        self.retiring.add(old)
        self._spawn(self._retire(old))

    async def _retire(self, old: Backend) -> None:
        """Let the replaced tritonserver answer the requests it has (at most RETIRE_TIMEOUT_S), then stop it (one
        whose retirement is cancelled stays in ``retiring``: ``speeder_rt.serve`` stops it on its way out)."""
        start = time.monotonic()
        if not await old.in_flight.idle(RETIRE_TIMEOUT_S):
            self.log(f"speeder_rt.serve: the replaced tritonserver still had {old.in_flight.count} requests after "
                     f"{RETIRE_TIMEOUT_S:g} s; stopping it")
        await old.stop()
        self.retiring.discard(old)
        self.log(f"speeder_rt.serve: the replaced tritonserver (pid {old.pid}) stopped "
                 f"{time.monotonic() - start:.1f} s after the switch")
