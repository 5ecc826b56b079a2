"""The request front on the public HTTP and metrics ports: the HTTP and metrics endpoints of the current
tritonserver (``Health.backend``; it changes when a recovery replaces tritonserver) listen on private loopback
ports behind it (the gRPC one behind ``grpc_front``; both share one ``Gate``).

For every request the front

* reads at most ``max_body_bytes`` (413 past it) and checks infer bodies (``limits.check_infer_body``: 400 with a
  message for malformed JSON, shapes that do not match their data or the export's ranges, ids that are not
  int64, masks that are not true / false, an empty batch), so no request reaches tritonserver that could crash it;
* answers 503 with the cause for a model that ``Health`` has down (its requests already at tritonserver too:
  ``Gate.model_down``), and turns tritonserver's errors for a dead stub into that 503; it answers the readiness
  endpoints itself from ``Health`` (the server is ready when every model is), as tritonserver 2.51's block while
  any model loads (17 s during a reload, measured);
* while draining (SIGTERM / SIGINT) answers new requests 503 and counts the ones in flight (``Gate``);
* forwards everything else unchanged (KServe v2 JSON or binary tensors, health, metadata, statistics), each
  request to the tritonserver current when it came, counted there (``Backend.in_flight``) so that a replaced one
  answers what it has before it stops; and the metrics port's requests to the current tritonserver's metrics.
"""
from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Awaitable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import aiohttp
from aiohttp import web

from speeder_rt.serve.backend import InFlight
from speeder_rt.serve.health import Health, triton_error
from speeder_rt.serve.limits import Refused, ServedModel, check_infer_body

INFER = re.compile(r"/v2/models/([^/]+)(?:/versions/[^/]+)?/infer")
MODEL_READY = re.compile(r"/v2/models/([^/]+)(?:/versions/[^/]+)?/ready")
SERVER_READY = "/v2/health/ready"
SERVER_LIVE = "/v2/health/live"
HEADER_LENGTH = "Inference-Header-Content-Length"
# Not Content-Encoding: aiohttp inflates gzip / deflate request bodies as it reads them (``client_max_size`` counts
# the inflated bytes, so a compression bomb is refused too); the body goes on plain.
REQUEST_HEADERS = ("Content-Type", HEADER_LENGTH, "Accept-Encoding", "triton-access-token")
RESPONSE_HEADERS = ("Content-Type", HEADER_LENGTH, "Content-Encoding")
UPSTREAM_TIMEOUT_S = 120.0  # no request waits on tritonserver longer than this (504)
DRAINING = "the server is shutting down (draining): send the request to another replica"
WENT_DOWN = "the model went down while answering; retry in a few seconds"
# tritonserver's answers for a model whose stub died or that is being reloaded
DOWN_ERRORS = ("is not healthy", "has no available versions", "is not found", "version not ready")


T = TypeVar("T")


class ModelWentDown(Exception):
    """A forwarded request cut off because its model went down (``Gate.model_down``)."""


class Gate:
    """What the HTTP and gRPC fronts share: the drain (new requests refused from ``drain`` on, the ones in flight
    counted until ``drained``) and the requests forwarded to each model (cut off when it goes down)."""

    def __init__(self, models: list[str]) -> None:
        self.draining = False
        self.in_flight = {"HTTP": 0, "gRPC": 0}
        self._all = InFlight()
        self._forwarding: dict[str, set[asyncio.Future]] = {name: set() for name in models}

    @contextmanager
    def admitted(self, protocol: str) -> Iterator[None]:
        """Count one request of ``protocol`` in flight while the block runs."""
        self.in_flight[protocol] += 1
        try:
            with self._all.counted():
                yield
        finally:
            self.in_flight[protocol] -= 1

    async def forward(self, model: str, forwarding: Awaitable[T]) -> T:
        """``forwarding``'s result; ``ModelWentDown`` when ``model`` goes down before it comes."""
        future = asyncio.ensure_future(forwarding)
        self._forwarding[model].add(future)
        try:
            return await future
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():  # this handler was cancelled (the client went away)
                raise
            raise ModelWentDown(model) from None
        finally:
            self._forwarding[model].discard(future)

    def model_down(self, name: str) -> None:
        """``Health``'s call when ``name`` goes down: its requests at tritonserver are cut off now (a request that
        was executing in a killed stub never returns in tritonserver 2.51)."""
        for future in list(self._forwarding[name]):
            future.cancel()

    def drain(self) -> None:
        """Refuse new requests from now on; the ones in flight go on."""
        self.draining = True

    async def drained(self, timeout_s: float) -> bool:
        """Whether every request in flight was answered within ``timeout_s``."""
        return await self._all.idle(timeout_s)


def error(status: int, message: str) -> web.Response:
    """Triton's error body: ``{"error": message}``."""
    headers = {"Retry-After": "1"} if status == 503 else None
    return web.json_response({"error": message}, status=status, headers=headers)


class Front:
    def __init__(self, models: dict[str, ServedModel], health: Health, gate: Gate, max_body_bytes: int) -> None:
        self.models = models
        self.health = health
        self.gate = gate
        self.max_body_bytes = max_body_bytes
        self._runners: list[web.AppRunner] = []
        self._session: aiohttp.ClientSession | None = None

    async def start(self, host: str, port: int, metrics_port: int) -> None:
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256), auto_decompress=False,
                                              timeout=aiohttp.ClientTimeout(total=UPSTREAM_TIMEOUT_S))
        for handler, listen_port in ((self._handle, port), (self._metrics, metrics_port)):
            app = web.Application(client_max_size=self.max_body_bytes)
            app.router.add_route("*", "/{path:.*}", handler)
            self._runners.append(web.AppRunner(app, access_log=None, handle_signals=False))
            await self._runners[-1].setup()
            await web.TCPSite(self._runners[-1], host, listen_port, reuse_address=True, backlog=1024).start()

    async def close(self) -> None:
        for runner in self._runners:
            await runner.cleanup()
        if self._session is not None:
            await self._session.close()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        ready = MODEL_READY.fullmatch(path)
        if ready or path == SERVER_READY:  # answered here: tritonserver's blocks while any model loads
            if ready and ready[1] not in self.models:
                return error(404, f"unknown model {json.dumps(ready[1])}; served: {', '.join(self.models)}")
            reason = DRAINING if self.gate.draining else self.health.unavailable(ready[1] if ready else None)
            return error(503, reason) if reason else web.Response(status=200)
        if self.gate.draining and path != SERVER_LIVE:  # alive while draining: a liveness probe must not kill it
            return error(503, DRAINING)
        with self.gate.admitted("HTTP"):
            return await self._answer(request, INFER.fullmatch(path))

    async def _answer(self, request: web.Request, infer: re.Match | None) -> web.StreamResponse:
        if request.content_length is not None and request.content_length > self.max_body_bytes:
            return error(413, self._too_large(request.content_length))
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return error(413, self._too_large(None))
        if infer is None or request.method != "POST":
            return await self._forward(request, body)
        name = infer[1]
        if name not in self.models:
            return error(404, f"unknown model {json.dumps(name)}; served: {', '.join(self.models)}")
        header_length = request.headers.get(HEADER_LENGTH)
        try:
            if header_length is not None and not header_length.isdigit():
                raise Refused(400, f"{HEADER_LENGTH} must be a byte count, got {json.dumps(header_length)}")
            check_infer_body(self.models[name], body, None if header_length is None else int(header_length))
        except Refused as refused:
            return error(refused.status, refused.message)
        reason = self.health.unavailable(name)
        if reason:
            return error(503, reason)
        try:
            response = await self.gate.forward(name, self._forward(request, body))
        except ModelWentDown:
            return error(503, self.health.unavailable(name) or WENT_DOWN)
        if response.status >= 400 and isinstance(response, web.Response) and response.body is not None:
            message = triton_error(bytes(response.body))
            if any(text in message for text in DOWN_ERRORS):
                self.health.report(name, f"tritonserver answered: {message}")
                return error(503, self.health.unavailable(name) or message)
        return response

    def _too_large(self, size: int | None) -> str:
        got = f"request body of {size} bytes" if size is not None else "request body (inflated)"
        return (f"{got}: larger than {self.max_body_bytes} bytes (--max-request-bytes); split the batch into "
                "several requests")

    async def _metrics(self, request: web.Request) -> web.StreamResponse:
        """The metrics port: the current tritonserver's Prometheus endpoint (its counters start again at a
        replacement, which Prometheus reads as a counter reset)."""
        return await self._forward(request, await request.read(), metrics=True)

    async def _forward(self, request: web.Request, body: bytes, metrics: bool = False) -> web.Response:
        assert self._session is not None
        headers = {k: request.headers[k] for k in REQUEST_HEADERS if k in request.headers}
        headers.setdefault("Accept-Encoding", "identity")  # aiohttp would ask for gzip: compressed answers
        backend = self.health.backend
        url = (backend.metrics if metrics else backend.http) + request.path_qs
        try:
            with backend.in_flight.counted():
                async with self._session.request(request.method, url, data=body or None, headers=headers) as upstream:
                    data = await upstream.read()
                    return web.Response(status=upstream.status, body=data, headers={
                        k: upstream.headers[k] for k in RESPONSE_HEADERS if k in upstream.headers})
        except TimeoutError:
            return error(504, f"tritonserver did not answer within {UPSTREAM_TIMEOUT_S:.0f} s")
        except aiohttp.ClientError as e:
            return error(503, f"tritonserver is unreachable ({type(e).__name__}); retry in a few seconds")
