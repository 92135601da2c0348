"""Calling the context engine from Trio, over every replica.

    async with open_context_client(parse_engine_addrs("ctx-1:50070,ctx-2:50070")) as engine:
        window = await engine.build_window(pb.BuildWindowRequest(memory_id=..., mode=pb.CONTEXT_MODE_CHAT, ...))
        await engine.update_memory(pb.UpdateMemoryRequest(...))

`CONTEXT_ENGINE_ADDR` is one `host:port` or a comma-separated list, one per replica. Calls go round
robin; a replica that failed a call in a way that moves it on (below) is tried last for
REPLICA_BACKOFF_S and the call moves on to the next one. Memory ids are passed as given: a caller
acting for a tenant scopes them first (`cordum.store.keys.memory_scope`).

Which failures move a call to another replica (`fails_over`):
- BuildWindow (a read, safe to repeat): UNAVAILABLE and DEADLINE_EXCEEDED.
- UpdateMemory (an append, recorded twice if repeated): only when the replica provably did not
  take the request: the connection could not be made (refused, unreachable, the name does not
  resolve), or the replica turned the call away unread while draining ("server is shutting
  down"). A connection cut mid-call is UNAVAILABLE too, but the replica may have written the turn
  before it died, so that error is raised, as is a timeout. "memory store unavailable" (Redis did
  not take the write) is final for both: every replica shares that Redis.
Other errors (INVALID_ARGUMENT, PERMISSION_DENIED) are raised as `RpcError` at once.
"""

from __future__ import annotations

import math
import re
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any, AsyncIterator, Sequence

import trio

from cordum.context.window import STORE_UNAVAILABLE
from cordum.infra.aio import timeout_left
from cordum.infra.grpc import GrpcClient, RpcError, open_grpc_client
from cordum.infra.tls import GrpcTls
from cordum.runtime.log import get_logger
from cordum.safety.client import parse_kernel_addrs
from cordum.v1 import context_grpc
from cordum.v1 import context_pb2 as pb

log = get_logger("context.client")

DEFAULT_TIMEOUT = 5.0  # above the engine's Redis deadline (2 s), so a degraded window still arrives
REPLICA_BACKOFF_S = 5.0
_READ_FAILOVER = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED"})
# cordum.infra.grpc's refusal of a call while draining, sent before the request is read.
DRAINING = "server is shutting down"
# cordum.infra.grpc reports a failed connect as UNAVAILABLE with the OSError's text: asyncio's
# "Connect call failed" (refused, unreachable, timed out), a refused connect, or a getaddrinfo
# error (negative errno). Nothing was sent on such a call.
_NOT_CONNECTED = re.compile(r"Connect call failed|Connection refused|^\[Errno -\d+\]")


def parse_engine_addrs(raw: str) -> list[tuple[str, int]]:
    """`CONTEXT_ENGINE_ADDR`: `host:port`, or several separated by commas (`:port` = this machine)."""
    return parse_kernel_addrs(raw)


def fails_over(exc: RpcError, *, write: bool) -> bool:
    """Whether a failed call moves on to the next replica (the rules in the module docstring)."""
    if exc.message.startswith(STORE_UNAVAILABLE):
        return False
    if not write:
        return exc.code in _READ_FAILOVER
    return exc.code == "UNAVAILABLE" and (exc.message == DRAINING or bool(_NOT_CONNECTED.search(exc.message)))


class ContextClient:
    def __init__(self, replicas: Sequence[GrpcClient], *, timeout: float = DEFAULT_TIMEOUT) -> None:
        if not replicas:
            raise ValueError("at least one context engine address is needed")
        self._replicas = list(replicas)
        self._next = 0
        self._backoff_until = [-math.inf] * len(self._replicas)
        self.timeout = timeout

    def _order(self) -> list[int]:
        """Round robin from the next replica; those in backoff go last (still tried, in order)."""
        count = len(self._replicas)
        start, self._next = self._next, (self._next + 1) % count
        now = trio.current_time()
        turn = [(start + offset) % count for offset in range(count)]
        return sorted(turn, key=lambda index: self._backoff_until[index] > now)

    async def _call(self, method: str, request: Any, *, write: bool) -> Any:
        left = timeout_left()
        timeout = self.timeout if left is None else min(self.timeout, left)
        order = self._order()
        for position, index in enumerate(order):
            try:
                return await self._replicas[index].call(method, request, timeout=timeout)
            except RpcError as exc:
                if not fails_over(exc, write=write):
                    raise
                self._backoff_until[index] = trio.current_time() + REPLICA_BACKOFF_S
                log.warning("context.replica_failed", method=method, replica=index, code=exc.code,
                            remaining=len(order) - position - 1)
                if position == len(order) - 1:
                    raise
        raise AssertionError("unreachable")

    async def build_window(self, request: pb.BuildWindowRequest) -> pb.BuildWindowResponse:
        return await self._call("BuildWindow", request, write=False)

    async def update_memory(self, request: pb.UpdateMemoryRequest) -> None:
        await self._call("UpdateMemory", request, write=True)


@asynccontextmanager
async def open_context_client(addrs: Sequence[tuple[str, int]], *, timeout: float = DEFAULT_TIMEOUT,
                              tls: GrpcTls | None = None) -> AsyncIterator[ContextClient]:
    """Channels to every replica (each connects on its first call; over TLS per `tls`,
    CONTEXT_ENGINE_TLS_*), closed on exit."""
    context = tls.client_context() if tls is not None else None
    server_name = tls.server_name if tls is not None else ""
    async with AsyncExitStack() as stack:
        replicas = [await stack.enter_async_context(open_grpc_client(context_grpc.ContextEngineStub, host, port,
                                                                     ssl=context, server_name=server_name))
                    for host, port in addrs]
        yield ContextClient(replicas, timeout=timeout)
