"""The request front on the public gRPC port: the current tritonserver's gRPC endpoint (``Health.backend``) listens
on a private loopback port behind it, as its HTTP one does behind ``front``.

A generic handler (grpcio's asyncio server) takes every method of Triton's ``inference.GRPCInferenceService`` and
forwards the raw request bytes to the same method of tritonserver, and tritonserver's raw answer (or its status and
message) back: nothing is decoded to be re-encoded, the metadata (headers) go along, the client's deadline too. A
call goes to the tritonserver current when it came, counted there (``Backend.in_flight``); a replaced tritonserver's
channel is closed once it has answered its calls (``Health.on_switch``). The front

* answers ``ServerReady`` / ``ModelReady`` itself from ``Health`` (ready when no model is down and no drain runs),
  as the HTTP front answers its readiness endpoints, and ``NOT_FOUND`` for a model that is not served;
* answers ``UNAVAILABLE`` with the message of the HTTP 503 for a ``ModelInfer`` of a model that ``Health`` has
  down, for the ones already at tritonserver when it goes down (``Gate.model_down``), and in place of
  tritonserver's errors for a dead stub;
* while draining answers every method but ``ServerLive`` ``UNAVAILABLE`` (the drain's message), and counts the
  calls in flight in the ``Gate`` it shares with the HTTP front, so the drain waits for them;
* reads messages up to ``max_message_bytes`` (``RESOURCE_EXHAUSTED`` past it, grpcio's message).

``ModelStreamInfer`` (a stream of requests on one call) is forwarded and counted as one call; the state of its
model is not checked per message (tritonserver answers those).
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import DecodeError
from grpc import aio
from tritonclient.grpc import service_pb2

from speeder_rt.serve.backend import Backend
from speeder_rt.serve.front import DOWN_ERRORS, DRAINING, UPSTREAM_TIMEOUT_S, WENT_DOWN, Gate, ModelWentDown
from speeder_rt.serve.health import Health

SERVICE = service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
METHOD_PREFIX = f"/{SERVICE.full_name}/"
# the metadata that belongs to the connection (HTTP/2 and gRPC's own), not to the call: not forwarded
CONNECTION_METADATA = ("user-agent", "content-type", "te", "host", "grpc-")
Upstream = Callable[..., Awaitable[bytes]]  # a raw (bytes in, bytes out) unary method of tritonserver


async def _call(upstream: Upstream, request: bytes, context: aio.ServicerContext) -> bytes:
    """``upstream(request)`` with the call's metadata and deadline (at most ``UPSTREAM_TIMEOUT_S``); ``AioRpcError``
    with tritonserver's status and message."""
    remaining = context.time_remaining()
    timeout = UPSTREAM_TIMEOUT_S if remaining is None else min(remaining, UPSTREAM_TIMEOUT_S)
    return await upstream(request, metadata=_forwarded(context.invocation_metadata()), timeout=timeout)


def _forwarded(metadata: tuple[tuple[str, str | bytes], ...] | None) -> tuple[tuple[str, str | bytes], ...]:
    return tuple((k, v) for k, v in metadata or () if not k.startswith(":") and not k.startswith(CONNECTION_METADATA))


class GrpcFront:
    """The gRPC server on the public port, forwarding to the current tritonserver's gRPC endpoint (see the module
    docstring)."""

    def __init__(self, models: list[str], health: Health, gate: Gate, max_message_bytes: int) -> None:
        self.models = models
        self.health = health
        self.gate = gate
        self._channels: dict[Backend, aio.Channel] = {}
        self._unary: dict[tuple[Backend, str], Upstream] = {}  # (tritonserver, method path) -> its unary callable
        self._closing: set[asyncio.Task] = set()
        health.on_switch.append(self._switched)
        self._server = aio.server(options=[("grpc.max_receive_message_length", max_message_bytes),
                                           ("grpc.max_send_message_length", -1),
                                           ("grpc.so_reuseport", 0)])  # a port taken twice must fail, not share
        handlers = {method.name: self._handler(method) for method in SERVICE.methods}
        self._server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE.full_name, handlers),))

    async def start(self, host: str, port: int) -> None:
        self._server.add_insecure_port(f"{host}:{port}")
        await self._server.start()

    async def close(self) -> None:
        await self._server.stop(grace=None)
        for task in self._closing:
            task.cancel()
        for channel in self._channels.values():
            await channel.close()

    def _channel(self, backend: Backend) -> aio.Channel:
        if backend not in self._channels:
            self._channels[backend] = aio.insecure_channel(backend.grpc, options=[
                ("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)])
        return self._channels[backend]

    def _switched(self, old: Backend, new: Backend) -> None:
        """``Health``'s call at a switch: close the old tritonserver's channel once it has answered its calls."""
        async def close_when_idle() -> None:
            await old.in_flight.idle(float("inf"))
            self._unary = {key: call for key, call in self._unary.items() if key[0] is not old}
            channel = self._channels.pop(old, None)
            if channel is not None:
                await channel.close()

        task = asyncio.ensure_future(close_when_idle())
        self._closing.add(task)  # held: the loop keeps only weak references to tasks
        task.add_done_callback(self._closing.discard)

    def _unary_call(self, backend: Backend, path: str) -> Upstream:
        if (backend, path) not in self._unary:
            self._unary[backend, path] = self._channel(backend).unary_unary(path)
        return self._unary[backend, path]

    def _handler(self, method: MethodDescriptor) -> grpc.RpcMethodHandler:
        path = METHOD_PREFIX + method.name
        if method.client_streaming and method.server_streaming:
            async def stream(requests: AsyncIterator[bytes], context: aio.ServicerContext) -> AsyncIterator[bytes]:
                await self._admit(method.name, context)
                backend = self.health.backend
                with self.gate.admitted("gRPC"), backend.in_flight.counted():
                    call = self._channel(backend).stream_stream(path)(
                        requests, metadata=_forwarded(context.invocation_metadata()))
                    try:
                        async for response in call:
                            yield response
                    except aio.AioRpcError as e:
                        await context.abort(e.code(), e.details() or "")

            return grpc.stream_stream_rpc_method_handler(stream)
        answers = {"ServerReady": self._server_ready, "ModelReady": self._model_ready, "ModelInfer": self._infer}
        answer = answers.get(method.name)

        async def unary(request: bytes, context: aio.ServicerContext) -> bytes:
            await self._admit(method.name, context)
            backend = self.health.backend
            upstream = self._unary_call(backend, path)
            if answer is not None:
                return await answer(request, context, upstream, backend)
            with self.gate.admitted("gRPC"), backend.in_flight.counted():
                return await self._forward(upstream, request, context)

        return grpc.unary_unary_rpc_method_handler(unary)

    async def _admit(self, method: str, context: aio.ServicerContext) -> None:
        """``UNAVAILABLE`` while draining, but for liveness (a liveness probe must not kill a server that drains) and
        readiness (answered not ready)."""
        if self.gate.draining and method not in ("ServerLive", "ServerReady", "ModelReady"):
            await context.abort(grpc.StatusCode.UNAVAILABLE, DRAINING)

    async def _forward(self, upstream: Upstream, request: bytes, context: aio.ServicerContext) -> bytes:
        """tritonserver's answer to ``request``, or its status and message."""
        try:
            return await _call(upstream, request, context)
        except aio.AioRpcError as e:
            await context.abort(e.code(), e.details() or "")
        raise AssertionError("unreachable: context.abort raises")

    async def _server_ready(self, request: bytes, context: aio.ServicerContext, _upstream: Upstream,
                            _backend: Backend) -> bytes:
        ready = not self.gate.draining and self.health.unavailable() is None
        return service_pb2.ServerReadyResponse(ready=ready).SerializeToString()

    async def _model_ready(self, request: bytes, context: aio.ServicerContext, _upstream: Upstream,
                           _backend: Backend) -> bytes:
        name = await self._served_model(service_pb2.ModelReadyRequest.FromString(request).name, context)
        ready = not self.gate.draining and self.health.unavailable(name) is None
        return service_pb2.ModelReadyResponse(ready=ready).SerializeToString()

    async def _infer(self, request: bytes, context: aio.ServicerContext, upstream: Upstream, backend: Backend) -> bytes:
        """tritonserver's answer, ``UNAVAILABLE`` naming the recovery for a model that is down or goes down."""
        try:
            model_name = service_pb2.ModelInferRequest.FromString(request).model_name
        except DecodeError:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the request is not an inference.ModelInferRequest")
        name = await self._served_model(model_name, context)
        reason = self.health.unavailable(name)
        if reason:
            await context.abort(grpc.StatusCode.UNAVAILABLE, reason)
        with self.gate.admitted("gRPC"), backend.in_flight.counted():
            try:
                return await self.gate.forward(name, _call(upstream, request, context))
            except ModelWentDown:
                await context.abort(grpc.StatusCode.UNAVAILABLE, self.health.unavailable(name) or WENT_DOWN)
            except aio.AioRpcError as e:
                message = e.details() or ""
                if any(text in message for text in DOWN_ERRORS):
                    self.health.report(name, f"tritonserver answered: {message}")
                    await context.abort(grpc.StatusCode.UNAVAILABLE, self.health.unavailable(name) or message)
                await context.abort(e.code(), message)
        raise AssertionError("unreachable: context.abort raises")

    async def _served_model(self, name: str, context: aio.ServicerContext) -> str:
        if name not in self.models:
            await context.abort(grpc.StatusCode.NOT_FOUND, f'unknown model "{name}"; served: {", ".join(self.models)}')
        return name
