"""Which served models can answer, and their recovery through Triton's model-control API.

tritonserver 2.51 does not notice when a Python-backend stub (the process of one model instance) dies: after a
``kill -9`` (the OOM killer, a crash in an engine) it keeps answering the model and the server ready while every
request fails with ``Stub process '<instance>' is not healthy.``. ``Health`` watches the stubs itself: every
``POLL_S`` it lists tritonserver's child processes (``/proc``) and counts each model's live stubs; a model with
fewer than its instance count, or one whose request got the stub error (``report``), is marked down at once
(the front then answers it, and the server's readiness, 503) and reloaded through Triton's model-control API
(PyTriton runs tritonserver with ``--model-control-mode=explicit``): ``unload``, then ``load``, which starts new
stubs. A recovery that fails (the load is refused: an engine that cannot load) or that does not hold for
``STABLE_S`` counts against ``max_recoveries``; past it ``failed`` names the model and the cause and
``speeder_rt.serve`` exits 1, so that an orchestrator restarts it.
"""
from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp

from speeder_rt.serve.limits import ServedModel

POLL_S = 0.2  # how often the stubs are counted (a dead one is seen within this)
STABLE_S = 10.0  # a recovered model that goes down again sooner counts as a failed recovery
LOAD_TIMEOUT_S = 120.0  # one load through the model-control API (a stub imports torch: seconds on a busy CPU)
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


def tritonserver_pid(parent: int | None = None) -> int | None:
    """The tritonserver that ``parent`` (default: this process) launched through PyTriton."""
    return next((pid for pid in child_processes(parent or os.getpid()) if command_name(pid) == "tritonserver"), None)


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
    """The served models' state (up, or down with a cause) and their recovery; see the module docstring."""

    def __init__(self, models: dict[str, ServedModel], control_url: str, access_token: str, server_pid: int,
                 max_recoveries: int, log: Callable[[str], None]) -> None:
        self.models = models
        self.server_pid = server_pid
        self.max_recoveries = max_recoveries
        self.log = log
        self.down: dict[str, str] = {}  # model -> why it cannot answer now
        self.failed: str | None = None  # set when a model could not be recovered: serve exits 1
        self.failed_event = asyncio.Event()
        self.on_down: list[Callable[[str], None]] = []  # called with the model's name when it goes down
        self._stopping = False
        self._control_url = control_url
        self._headers = {ACCESS_HEADER: access_token}
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=LOAD_TIMEOUT_S))
        self._failures = dict.fromkeys(models, 0)
        self._recovered_at = dict.fromkeys(models, float("-inf"))
        self._tasks: set[asyncio.Task] = set()

    def unavailable(self, model: str | None = None) -> str | None:
        """Why ``model`` (None: any model) cannot answer now, or None when it can."""
        names = [model] if model is not None else sorted(self.down)
        reasons = [f"model {name} is {self.down[name]}" for name in names if name in self.down]
        return "; ".join(reasons) or None

    def report(self, model: str, cause: str) -> None:
        """Mark ``model`` down for ``cause`` and start its recovery (nothing when it is down already)."""
        if model in self.down or self.failed is not None or self._stopping:
            return
        if time.monotonic() - self._recovered_at[model] < STABLE_S:
            self._failures[model] += 1  # the last recovery did not hold
        else:
            self._failures[model] = 0
        self.down[model] = f"recovering: {cause}; retry in a few seconds"
        self.log(f"speeder_rt.serve: model {model} is down ({cause}); not ready until it is reloaded")
        for listener in self.on_down:
            listener(model)
        task = asyncio.create_task(self._recover(model, cause))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def watch(self) -> None:
        """Count each model's live stubs every POLL_S; report the models that lost one. The stubs seen before are
        checked one by one (two ``/proc`` reads); tritonserver's children are listed (a read per tritonserver thread)
        only when fewer are alive than the model's instances: at the start, after a death, during a recovery.
        ``/proc/<pid>/task/*/children`` may miss a child while tritonserver starts or ends threads, so a stub seen
        once counts until it is dead."""
        seen: dict[str, set[int]] = {name: set() for name in self.models}
        while self.failed is None and not self._stopping:
            listed: dict[str, list[int]] | None = None
            for name, model in self.models.items():
                alive = set() if name in self.down else {pid for pid in seen[name] if _alive(pid, self.server_pid)}
                if len(alive) < model.instances:
                    listed = stubs_by_model(self.server_pid) if listed is None else listed
                    alive |= set(listed.get(name, []))
                seen[name] = alive
                if name not in self.down and len(alive) < model.instances:
                    self.report(name, f"{model.instances - len(alive)} of its {model.instances} instance processes "
                                      "died")
            await asyncio.sleep(POLL_S)

    async def unload_all(self, timeout_s: float) -> bool:
        """Unload every model through the model-control API and wait, at most ``timeout_s``, until their stubs have
        exited: tritonserver then stops at once instead of timing out on live models."""
        self._stopping = True  # no recovery from here on
        deadline = time.monotonic() + timeout_s
        try:
            for name in self.models:
                await self._control("unload", name)
            while time.monotonic() < deadline:  # the repository index says UNAVAILABLE before the stubs are done
                if not stubs_by_model(self.server_pid):
                    return True
                await asyncio.sleep(POLL_S)
        except (TimeoutError, RuntimeError, aiohttp.ClientError):
            return False
        return False

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await self._session.close()

    async def _control(self, action: str, model: str) -> None:
        """POST Triton's repository API ``action`` (load / unload) for ``model``; RuntimeError with Triton's
        message when it is refused."""
        url = f"{self._control_url}/v2/repository/models/{model}/{action}"
        async with self._session.post(url, headers=self._headers) as response:
            if response.status != 200:
                raise RuntimeError(triton_error(await response.read()) or f"HTTP {response.status}")

    async def _serving(self, model: str) -> None:
        """Wait (bounded) until Triton calls ``model`` ready and all its stubs run."""
        deadline = time.monotonic() + LOAD_TIMEOUT_S
        while time.monotonic() < deadline:
            async with self._session.get(f"{self._control_url}/v2/models/{model}/ready") as response:
                ready = response.status == 200
            if ready and len(stubs_by_model(self.server_pid).get(model, [])) >= self.models[model].instances:
                return
            await asyncio.sleep(POLL_S)
        raise RuntimeError(f"not ready {LOAD_TIMEOUT_S:.0f} s after it was loaded")

    async def _recover(self, model: str, cause: str) -> None:
        start = time.monotonic()
        last = cause
        while self._failures[model] < self.max_recoveries:
            attempt = self._failures[model] + 1
            try:
                await self._control("unload", model)
                await self._control("load", model)
                await self._serving(model)
            except (TimeoutError, RuntimeError, aiohttp.ClientError) as e:
                last = str(e) or type(e).__name__
                self._failures[model] += 1
                self.log(f"speeder_rt.serve: recovery {attempt}/{self.max_recoveries} of model {model} failed: {last}")
                continue
            self._recovered_at[model] = time.monotonic()
            del self.down[model]
            self.log(f"speeder_rt.serve: model {model} recovered in {time.monotonic() - start:.1f} s "
                     f"(attempt {attempt}/{self.max_recoveries}); ready")
            return
        self.failed = (f"model {model} could not be recovered after {self.max_recoveries} attempts "
                       f"(--max-recoveries); it went down because {cause}; last error: {last}")
        self.failed_event.set()
