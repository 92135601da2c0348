"""gRPC over grpclib, with Trio on both ends.

Server: implement the service as a plain object whose methods are Trio `async def Method(request)
-> reply` (or plain `def Method(request) -> reply` for pure computations without I/O, which then
run where the call arrives, without a crossing to Trio), and serve it with the grpclib base class
generated from the .proto. `drain()` makes new calls fail with UNAVAILABLE, waits for in-flight
calls to finish, then closes the server (grpclib's own `close()` would cancel them, DESIGN.md §4.4).

Client: `await client.call("Check", request)`; the call's timeout is the caller's Trio deadline
(or `timeout=`), so deadlines pass through instead of being re-invented per call.

`native=` takes grpclib servables as they are (asyncio handlers, streaming allowed), e.g.
`grpclib.health.service.Health` for the standard `grpc.health.v1.Health`: they are not drained,
so a health check still answers while the service's own calls drain.

Both ends send what grpclib writes during one event-loop turn as one socket write (see
`_CoalescingTransport`).
"""

from __future__ import annotations

import asyncio
import inspect
from ssl import SSLContext
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Mapping, Sequence

import trio
from grpclib.client import Channel
from grpclib.config import Configuration
from grpclib.const import Cardinality, Handler, Status
from grpclib.exceptions import GRPCError, StreamTerminatedError
from grpclib.protocol import H2Protocol
from grpclib.server import Server, Stream

from cordum.infra.aio import aio, timeout_left, trio_from_aio
from cordum.runtime.lifecycle import close_scope
from cordum.runtime.log import get_logger

log = get_logger("grpc")


class RpcError(Exception):
    """A gRPC status; raise it from a service method, catch it around a client call."""

    def __init__(self, code: str, message: str = "") -> None:
        super().__init__(f"{code}: {message}" if message else code)
        self.code = code
        self.message = message


class _CoalescingTransport:
    """grpclib writes each batch of HTTP/2 frames the moment it has it: a unary reply is three
    socket writes (headers, message, trailers), a request two. Every write to a local peer costs
    a system call and usually a wake-up of the peer, so the writes of one event-loop turn are
    joined and sent once, at the end of the turn. Everything else is the real transport's."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._loop = asyncio.get_running_loop()
        self._pending: list[bytes] = []

    def write(self, data: bytes) -> None:
        if not data:
            return
        if not self._pending:
            self._loop.call_soon(self._flush)
        self._pending.append(data)

    def writelines(self, chunks: Any) -> None:
        self.write(b"".join(chunks))

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        if pending and not self._transport.is_closing():
            self._transport.write(b"".join(pending))

    def write_eof(self) -> None:
        self._flush()
        self._transport.write_eof()

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + sum(map(len, self._pending))

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


def _coalesce_writes(protocol: H2Protocol) -> H2Protocol:
    made = protocol.connection_made
    protocol.connection_made = lambda transport: made(_CoalescingTransport(transport))  # type: ignore[method-assign]
    return protocol


class _Server(Server):
    def _protocol_factory(self) -> H2Protocol:
        return _coalesce_writes(super()._protocol_factory())


class _Channel(Channel):
    def _protocol_factory(self) -> H2Protocol:
        return _coalesce_writes(super()._protocol_factory())


def _handlers_of(base: type, impl: object, server: "GrpcServer") -> dict[str, Handler]:
    """The grpclib mapping of `base` with each method routed to `impl`'s Trio method."""
    placeholders = {name: (lambda self, stream: None) for name in getattr(base, "__abstractmethods__", ())}
    concrete = type(f"_{base.__name__}Routes", (base,), placeholders)()
    handlers = {}
    for path, handler in concrete.__mapping__().items():
        if handler.cardinality is not Cardinality.UNARY_UNARY:
            raise ValueError(f"{path}: only unary calls are supported")
        method = getattr(impl, path.rsplit("/", 1)[1])
        handlers[path] = Handler(server._unary(path, method), handler.cardinality, handler.request_type, handler.reply_type)
    return handlers


class _Servable:
    def __init__(self, mapping: dict[str, Handler]) -> None:
        self._mapping = mapping

    def __mapping__(self) -> Mapping[str, Handler]:
        return self._mapping


DEFAULT_MAX_MESSAGE = 4 << 20  # as gRPC's own default receive limit; grpclib reads up to 4 GiB


async def _recv_bounded(stream: Stream, limit: int) -> Any:
    """The request message, refused (RESOURCE_EXHAUSTED) before its body is read if its length
    prefix says it is larger than `limit`: grpclib itself would buffer whatever a client
    announces. (Reads grpclib's stream internals, as `grpclib.stream.recv_message` does.)"""
    meta = await stream._stream.recv_data(5)
    if len(meta) < 5:
        raise GRPCError(Status.INVALID_ARGUMENT, "no request message")
    if meta[0]:
        raise GRPCError(Status.UNIMPLEMENTED, "compressed messages are not supported")
    size = int.from_bytes(meta[1:5], "big")
    if size > limit:
        raise GRPCError(Status.RESOURCE_EXHAUSTED, f"request message of {size} bytes; the limit is {limit}")
    data = await stream._stream.recv_data(size)
    if len(data) != size:
        raise GRPCError(Status.INVALID_ARGUMENT, "request message cut short")
    return stream._codec.decode(data, stream._recv_type)


class GrpcServer:
    def __init__(self, services: Sequence[tuple[type, object]], *, native: Sequence[Any] = (),
                 ssl: SSLContext | None = None, max_message: int = DEFAULT_MAX_MESSAGE) -> None:
        self._services = services
        self._native = native
        self._ssl = ssl
        self.max_message = max_message
        self._server: Server | None = None
        self._draining = False
        self._inflight = 0
        self._idle = trio.Event()
        self._idle.set()
        self._closed = trio.Event()
        self.port: int | None = None

    def _unary(self, path: str, method: Any) -> Any:
        if inspect.iscoroutinefunction(method):
            call_trio = trio_from_aio(method)
        else:
            async def call_trio(request: Any) -> Any:
                reply = method(request)
                if inspect.isawaitable(reply):  # an async callable we did not recognise as one
                    getattr(reply, "close", lambda: None)()
                    raise TypeError(f"{path}: make the service method `async def`")
                return reply

        async def handle(stream: Stream) -> None:
            if self._draining:
                raise GRPCError(Status.UNAVAILABLE, "server is shutting down")
            self._inflight += 1
            if self._idle.is_set():
                self._idle = trio.Event()
            try:
                request = await _recv_bounded(stream, self.max_message)
                try:
                    reply = await call_trio(request)
                except RpcError as exc:
                    raise GRPCError(Status[exc.code], exc.message) from None
                except (GRPCError, asyncio.CancelledError):
                    raise
                except Exception as exc:
                    log.error("grpc.handler_failed", path=path, error=repr(exc))
                    raise GRPCError(Status.INTERNAL, "internal error") from None
                await stream.send_message(reply)
            finally:
                self._inflight -= 1
                if self._inflight == 0:
                    self._idle.set()

        return handle

    async def serve(self, host: str, port: int, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen until drained or cancelled; reports the bound port."""
        self.port = await aio(self._start)(host, port)
        log.info("grpc.listening", host=host, port=self.port)
        task_status.started(self.port)
        try:
            await self._closed.wait()
        finally:
            if not self._closed.is_set():
                with close_scope(2):
                    await aio(self._close)()

    async def _start(self, host: str, port: int) -> int:
        mapping: dict[str, Handler] = {}
        for base, impl in self._services:
            mapping.update(_handlers_of(base, impl, self))
        for servable in self._native:
            mapping.update(servable.__mapping__())
        self._server = _Server([_Servable(mapping)])
        await self._server.start(host, port, ssl=self._ssl)
        sockets = self._server._server.sockets  # type: ignore[union-attr]
        return sockets[0].getsockname()[1]

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        self._closed.set()

    async def drain(self) -> None:
        """New calls → UNAVAILABLE; wait for in-flight calls (bounded by the caller's deadline)."""
        self._draining = True
        await self._idle.wait()
        await aio(self._close)()


class GrpcClient:
    def __init__(self, channel: Channel, stub: Any) -> None:
        self._channel = channel
        self._stub = stub
        self._calls: dict[str, Any] = {}

    def with_stub(self, stub_class: type) -> "GrpcClient":
        """Another service's client on the same connection."""
        return GrpcClient(self._channel, stub_class(self._channel))

    async def call(self, method: str, request: Any, *, timeout: float | None = None) -> Any:
        bridged = self._calls.get(method)
        if bridged is None:
            bridged = self._calls[method] = aio(self._invoke)
        if timeout is None:
            timeout = timeout_left()
        return await bridged(method, request, timeout)

    async def _invoke(self, method: str, request: Any, timeout: float | None) -> Any:
        try:
            return await getattr(self._stub, method)(request, timeout=timeout)
        except GRPCError as exc:
            raise RpcError(exc.status.name, exc.message or "") from None
        except asyncio.TimeoutError:
            raise RpcError("DEADLINE_EXCEEDED", f"{method} timed out") from None
        except (StreamTerminatedError, ConnectionError, OSError) as exc:
            raise RpcError("UNAVAILABLE", str(exc) or type(exc).__name__) from None


@asynccontextmanager
async def open_grpc_client(stub_class: type, host: str, port: int, *, ssl: SSLContext | None = None,
                           server_name: str = "") -> AsyncIterator[GrpcClient]:
    """A client of `host:port`; with `ssl`, over TLS (the certificate checked for `server_name`,
    else for `host`)."""
    channel = await aio(_make_channel)(host, port, ssl, server_name)
    try:
        yield GrpcClient(channel, stub_class(channel))
    finally:
        with close_scope(1):
            await aio(_close_channel)(channel)


async def _make_channel(host: str, port: int, ssl: SSLContext | None = None, server_name: str = "") -> Channel:
    if ssl is None:
        return _Channel(host, port)
    return _Channel(host, port, ssl=ssl, config=Configuration(ssl_target_name_override=server_name or None))


async def _close_channel(channel: Channel) -> None:
    channel.close()
