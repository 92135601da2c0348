"""`GET /api/v1/stream`: job events, progress, workflow events and heartbeats over a WebSocket.

While it has a client, each replica taps `sys.job.>`, `sys.workflow.event` and `sys.heartbeat` once,
by broadcast (core NATS), and fans every packet out to its connected clients as a protobuf-JSON
text frame. Without clients it taps nothing: every replica would otherwise read every job's
messages for nobody. A client's connection is accepted once the taps are listening. A client
sees only its tenant's job events (a JobRequest names its tenant; for results, progress and
cancels the job's tenant is read from its meta, through a small LRU cache) and workflow events
(an Alert names its tenant in `details.tenant_id`; one that names none goes to nobody), and every
heartbeat. Each client has a bounded queue (CORDUM_WS_CLIENT_BUFFER_SIZE, 256): a client that
falls behind is dropped (close 1013), never waited for. No replay: clients re-read the REST API
after a reconnect.

The stream only sends. A client message of any kind closes the connection (1008), and hypercorn
refuses messages over WS_MAX_CLIENT_MESSAGE, so a client cannot park memory here. A tenant has at
most CORDUM_WS_MAX_CONNECTIONS_PER_TENANT streams per replica (beyond: HTTP 429 before the
upgrade). The server pings every GATEWAY_WS_PING_INTERVAL; a client that vanished without closing
is found by TCP keepalive (infra.http: about a minute of silence) and its stream ends. The stream's
key is re-checked every GATEWAY_WS_AUTH_RECHECK_INTERVAL: a key removed from the keys file, expired,
or moved to another tenant or role ends its streams (1008), as does a bearer token that expires.
"""

from __future__ import annotations

from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import trio
from google.protobuf import json_format
from quart import Quart, websocket

from cordum.agent.v1.buspacket_pb2 import BusPacket
from cordum.gateway.auth import KEY_SUBPROTOCOL, offered_subprotocols
from cordum.gateway.context import Gateway, caller
from cordum.gateway.errors import error_response
from cordum.infra.metrics import Metrics
from cordum.infra.redis import RedisError, RedisUnavailable
from cordum.protocol import subjects
from cordum.protocol.packets import PacketError, decode, job_id_of
from cordum.runtime.log import get_logger
from cordum.store import keys

log = get_logger("gateway.stream")

TENANT_CACHE_SIZE = 10_000
CLOSE_GOING_AWAY = 1001
CLOSE_POLICY_VIOLATION = 1008
CLOSE_TRY_AGAIN = 1013
TAPS_RETRY_S = 1.0
WS_MAX_CLIENT_MESSAGE = 4096  # clients send nothing; a close frame is at most 125 bytes


@dataclass(eq=False)
class _Client:
    tenant: str
    send: trio.MemorySendChannel[str]
    dropped: bool = False


class StreamMetrics:
    """Cordum's WebSocket metrics (its release gate reads `cordum_gateway_ws_clients_active`)."""

    def __init__(self, metrics: Metrics, hub: "StreamHub") -> None:
        metrics.gauge("cordum_gateway_ws_clients_active", "Event-stream clients connected to this replica"
                      ).set_function(lambda: len(hub.clients))
        self.evictions = metrics.counter("cordum_gateway_ws_slow_client_evictions_total",
                                         "Stream clients dropped for falling behind (close 1013)")
        self.events_dropped = metrics.counter("cordum_gateway_ws_events_dropped_total",
                                              "Events not delivered because their client fell behind")
        self.revalidations = metrics.counter("cordum_gateway_ws_revalidation_total",
                                             "Periodic re-checks of an open stream's credentials")
        self.duration = metrics.histogram("cordum_gateway_ws_connection_duration_seconds", "How long streams stayed open",
                                          buckets=(1, 10, 60, 300, 900, 3600, 4 * 3600, 24 * 3600))


@dataclass
class StreamHub:
    gw: Gateway
    buffer: int = 256
    clients: set[_Client] = field(default_factory=set)
    _tenants: OrderedDict[str, str] = field(default_factory=OrderedDict)
    closed: bool = False
    delivered: int = 0
    dropped_clients: int = 0
    _changed: trio.Event = field(default_factory=trio.Event)  # a client came or went
    _tapping: trio.Event = field(default_factory=trio.Event)  # set while the taps listen
    metrics: StreamMetrics | None = None

    def __post_init__(self) -> None:
        if self.gw is not None:
            self.metrics = StreamMetrics(self.gw.metrics, self)

    @property
    def client_count(self) -> int:
        return len(self.clients)

    def tenant_count(self, tenant: str) -> int:
        return sum(1 for client in self.clients if client.tenant == tenant)

    @property
    def tapping(self) -> bool:
        return self._tapping.is_set()

    async def wait_taps(self, timeout: float = 5.0) -> bool:
        """Whether the taps listen (waiting up to `timeout` for them to start)."""
        if self.closed:
            return False
        with trio.move_on_after(timeout):
            await self._tapping.wait()
        return self._tapping.is_set()

    def _leave(self, client: _Client) -> None:
        self.clients.discard(client)
        self._changed.set()

    @contextmanager
    def connect(self, tenant: str) -> Iterator[tuple[_Client, trio.MemoryReceiveChannel[str]]]:
        send, receive = trio.open_memory_channel[str](self.buffer)
        client = _Client(tenant, send)
        if self.closed:
            send.close()
        else:
            self.clients.add(client)
            self._changed.set()
        try:
            yield client, receive
        finally:
            self._leave(client)
            send.close()

    def close(self) -> None:
        """Shutdown: end every client's stream (their handlers close the sockets)."""
        self.closed = True
        for client in list(self.clients):
            client.send.close()
        self.clients.clear()
        self._changed.set()

    async def serve_taps(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Tap while there are clients, until cancelled."""
        task_status.started()
        while True:
            while not self.clients:
                self._changed = trio.Event()
                await self._changed.wait()
            try:
                await self._tap_while_wanted()
            except Exception as exc:  # the bus is reconnecting or closing: try again shortly
                log.warning("stream.taps_failed", error=repr(exc))
                await trio.sleep(TAPS_RETRY_S)

    async def _tap_while_wanted(self) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(self._tap, subjects.JOB_EVENTS_ALL)
            await nursery.start(self._tap, subjects.HEARTBEAT)
            await nursery.start(self._tap, subjects.WORKFLOW_EVENT)
            await self.gw.bus.sync()  # the server has the subscriptions: no event published from now is missed
            self._tapping.set()
            try:
                while self.clients:
                    self._changed = trio.Event()
                    await self._changed.wait()
            finally:
                self._tapping = trio.Event()
            nursery.cancel_scope.cancel()

    async def _tap(self, subject: str, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with self.gw.bus.subscribe(subject) as messages:
            task_status.started()
            async for msg in messages:
                if not self.clients:
                    continue
                try:
                    packet = decode(msg.data)
                except PacketError:
                    continue
                try:
                    await self.dispatch(packet)
                except (RedisError, *RedisUnavailable) as exc:
                    log.warning("stream.tenant_lookup_failed", error=repr(exc))

    async def tenant_of(self, packet: BusPacket) -> str | None:
        """The tenant an event belongs to; None = every client (heartbeats); "" = nobody."""
        kind = packet.WhichOneof("payload")
        if kind == "heartbeat":
            return None
        if kind == "alert":  # workflow events (notify steps) name their run's tenant
            return packet.alert.details.get("tenant_id", "")
        if kind == "job_request":
            req = packet.job_request
            tenant = req.tenant_id or req.env.get("tenant_id", "")
            if tenant and req.job_id:
                self._remember(req.job_id, tenant)
            return tenant
        job_id = job_id_of(packet)
        if not job_id:
            return ""
        tenant = self._tenants.get(job_id)
        if tenant is not None:
            self._tenants.move_to_end(job_id)
            return tenant
        tenant = await self.gw.redis.execute("HGET", keys.job_meta(job_id), "tenant") or ""
        if tenant:
            self._remember(job_id, tenant)
        return tenant

    def _remember(self, job_id: str, tenant: str) -> None:
        self._tenants[job_id] = tenant
        self._tenants.move_to_end(job_id)
        while len(self._tenants) > TENANT_CACHE_SIZE:
            self._tenants.popitem(last=False)

    async def dispatch(self, packet: BusPacket) -> None:
        tenant = await self.tenant_of(packet)
        if tenant == "":
            return
        text: str | None = None
        for client in list(self.clients):
            if tenant is not None and client.tenant != tenant:
                continue
            if text is None:
                text = json_format.MessageToJson(packet, indent=None)
            try:
                client.send.send_nowait(text)
                self.delivered += 1
            except trio.WouldBlock:
                client.dropped = True
                self.dropped_clients += 1
                if self.metrics is not None:
                    self.metrics.evictions.inc()
                    self.metrics.events_dropped.inc()
                self._leave(client)
                client.send.close()
                log.warning("stream.slow_client_dropped", tenant=client.tenant, buffer=self.buffer)
            except trio.ClosedResourceError:
                self._leave(client)


def _subprotocol() -> str | None:
    """The bare key subprotocol when the client offered it as such (the `cordum-api-key, <key>`
    form): a browser accepts only a subprotocol it offered, and the key is never echoed."""
    offered = offered_subprotocols(websocket.headers.get("Sec-WebSocket-Protocol"))
    return KEY_SUBPROTOCOL if KEY_SUBPROTOCOL in offered else None


def register(app: Quart, gw: Gateway) -> None:
    @app.websocket("/api/v1/stream")
    async def stream() -> Any:
        hub: StreamHub | None = gw.hub
        who = caller()
        if hub is None:
            await websocket.accept(subprotocol=_subprotocol())
            await websocket.close(CLOSE_GOING_AWAY, "stream not available")
            return
        limit = gw.options.ws_max_per_tenant
        if hub.tenant_count(who.tenant) >= limit:
            log.warning("stream.tenant_limit", tenant=who.tenant, limit=limit)
            return error_response(429, f"tenant has {limit} streams open on this gateway replica (the limit)",
                                  code="too_many_streams", headers={"Retry-After": "5"})
        closing: list[tuple[int, str]] = []  # why the stream ends, if not the hub's doing

        async def refuse_client_data(done: trio.CancelScope) -> None:
            await websocket.receive()
            closing.append((CLOSE_POLICY_VIOLATION, "this stream takes no messages"))
            done.cancel()

        async def recheck_key(done: trio.CancelScope) -> None:
            while True:
                await trio.sleep(gw.options.ws_recheck_interval)
                if hub.metrics is not None:
                    hub.metrics.revalidations.inc()
                if not gw.options.keys.still_valid(who):
                    log.info("stream.key_revoked", tenant=who.tenant, principal_id=who.principal_id)
                    closing.append((CLOSE_POLICY_VIOLATION, "credentials no longer valid"))
                    done.cancel()
                    return

        opened = trio.current_time()
        with hub.connect(who.tenant) as (client, receive):
            if not await hub.wait_taps():
                log.warning("stream.taps_not_ready", tenant=who.tenant)
            await websocket.accept(subprotocol=_subprotocol())  # connect returns once events reach it
            async with trio.open_nursery() as nursery:
                nursery.start_soon(refuse_client_data, nursery.cancel_scope)
                nursery.start_soon(recheck_key, nursery.cancel_scope)
                async with receive:
                    async for text in receive:
                        await websocket.send(text)
                nursery.cancel_scope.cancel()
        if hub.metrics is not None:
            hub.metrics.duration.observe(trio.current_time() - opened)
        if closing:
            await websocket.close(*closing[0])
        elif client.dropped:
            await websocket.close(CLOSE_TRY_AGAIN, "client too slow, reconnect")
        else:
            await websocket.close(CLOSE_GOING_AWAY, "server shutting down")
