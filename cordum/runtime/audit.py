"""Recording audit events: what a service records goes, by AUDIT_TRANSPORT, either

- `local`: into this process's bounded buffer (CORDUM_AUDIT_BUFFER_SIZE, 1000), from which one
  task appends it to the tenant's chain (`cordum.store.audit`), a batch per tenant per round trip;
- `nats`: onto `sys.audit.export` (JetStream, message id = event id), whose durable consumer in
  queue group `audit-exporters` (every gateway replica joins it) appends each event to the chain
  once and acks it after: any replica's events reach the chain exactly once, whichever exporter
  takes them, even across a crash (a redelivery finds its id in the chain and is acked).

Recording never blocks the request or job that records: a full buffer drops its oldest event,
counted (`dropped`) and logged. The buffer is also where events wait while Redis (local) or NATS
(nats) is unreachable.
"""

from __future__ import annotations

import json
import time
import uuid
from collections import deque
from typing import Any, Mapping

import trio

from cordum.agent.v1.alert_pb2 import SystemAlert
from cordum.agent.v1.buspacket_pb2 import BusPacket
from cordum.infra.bus import Bus, Message
from cordum.infra.metrics import Metrics
from cordum.protocol import subjects
from cordum.protocol.packets import encode, new_packet
from cordum.runtime.log import get_logger
from cordum.store.audit import AuditChain

log = get_logger("audit")

BUFFER_SIZE = 1000
RETRY_S = 1.0
LINGER_S = 0.05  # how long the writer waits, once an event came, for more to append with it
EVENT_CODE = "audit.event"


def new_event(tenant: str, kind: str, action: str, **fields: Any) -> dict[str, Any]:
    """An audit event: who did what to which object in which tenant, and how it ended."""
    return {"id": str(uuid.uuid4()), "ts": time.time(), "tenant": tenant, "kind": kind, "action": action,
            **{k: v for k, v in fields.items() if v not in (None, "")}}


def event_packet(event: Mapping[str, Any], sender: str) -> BusPacket:
    """Cordum's shape on `sys.audit.export`: the event as JSON in a SystemAlert."""
    alert = SystemAlert(level="info", message=json.dumps(event, separators=(",", ":"), default=str),
                        component=sender, code=EVENT_CODE, details={"tenant_id": str(event.get("tenant", ""))})
    return new_packet(alert, sender_id=sender, trace_id=str(event.get("id", "")))


def event_of(packet: BusPacket) -> dict[str, Any] | None:
    """The event an export packet carries; None for anything else (acked and dropped)."""
    if packet.WhichOneof("payload") != "alert" or packet.alert.code != EVENT_CODE:
        return None
    try:
        event = json.loads(packet.alert.message)
    except ValueError:
        return None
    if not isinstance(event, dict) or not event.get("id") or not event.get("tenant"):
        return None
    return event


class AuditLog:
    def __init__(self, chain: AuditChain, bus: Bus | None, *, transport: str = "local", sender: str = "",
                 buffer_size: int = BUFFER_SIZE, linger: float = LINGER_S) -> None:
        self.chain = chain
        self.linger = linger
        self.bus = bus
        self.transport = transport
        self.sender = sender
        self._buffer: deque[dict[str, Any]] = deque()
        self.buffer_size = buffer_size
        self._wakeup = trio.Event()
        self.recorded = self.written = self.dropped = 0
        self.last_error = ""
        self.last_written_at = 0.0
        self._tenant_locks: dict[str, trio.Lock] = {}
        self._exported: Any = None  # counters, once `instrument` is called
        self._drops: Any = None

    def instrument(self, metrics: Metrics) -> None:
        """Cordum's audit metrics: events written (to the chain, or onto the bus), events dropped
        from a full buffer, and the buffer's depth."""
        self._exported = metrics.counter("cordum_audit_export_total", "Audit events written to the chain or exported")
        self._drops = metrics.counter("cordum_audit_batch_drops_total", "Audit events dropped from a full buffer")
        metrics.gauge("cordum_audit_export_events", "Audit events buffered, not yet written").set_function(
            lambda: len(self._buffer))

    def _drop(self, lost: dict[str, Any]) -> None:
        self.dropped += 1
        if self._drops is not None:
            self._drops.inc()
        log.error("audit.event_dropped", event_id=lost.get("id"), tenant=lost.get("tenant"), buffer=self.buffer_size)

    def record(self, event: dict[str, Any]) -> None:
        if len(self._buffer) >= self.buffer_size:
            self._drop(self._buffer.popleft())
        if self.sender:
            event.setdefault("replica", self.sender)
        self._buffer.append(event)
        self.recorded += 1
        self._wakeup.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        try:
            while True:
                if not self._buffer:
                    self._wakeup = trio.Event()
                    await self._wakeup.wait()
                    if self.transport == "local":
                        # Let more events join the batch: every replica's writer races for its
                        # tenant chain's head, and one append an event each lost most races.
                        await trio.sleep(self.linger)
                await self.flush()
                if self._buffer and self.last_error:
                    await trio.sleep(RETRY_S)
        finally:
            if self._buffer:  # stopping: what was recorded still goes out, within 2 s
                with trio.CancelScope(shield=True, deadline=trio.current_time() + 2):
                    await self.flush()
                if self._buffer:
                    log.error("audit.events_lost_at_stop", count=len(self._buffer), error=self.last_error)

    async def flush(self) -> None:
        """Send what is buffered; what could not be sent goes back to the front, in order (events
        recorded meanwhile stay behind it; past the buffer's size the oldest are dropped)."""
        batch = list(self._buffer)
        self._buffer.clear()
        sent = 0
        try:
            if self.transport == "nats" and self.bus is not None:
                for event in batch:
                    await self.bus.publish(subjects.AUDIT_EXPORT, encode(event_packet(event, self.sender)),
                                           msg_id=f"audit:{event['id']}")
                    sent += 1
            else:
                await self._append(batch)
                sent = len(batch)
            self.last_error = ""
            self.last_written_at = time.time()
        except Exception as exc:  # Redis or NATS away: keep the events, try again shortly
            if not self.last_error:
                log.warning("audit.write_failed", transport=self.transport, buffered=len(batch) - sent, error=repr(exc))
            self.last_error = repr(exc)
        finally:
            self.written += sent
            if self._exported is not None and sent:
                self._exported.inc(sent)
            unsent = batch[sent:]
            if unsent:
                self._buffer.extendleft(reversed(unsent))
                while len(self._buffer) > self.buffer_size:
                    self._drop(self._buffer.popleft())

    async def _append(self, events: list[dict[str, Any]]) -> None:
        by_tenant: dict[str, list[tuple[str, float, dict[str, Any]]]] = {}
        for event in events:
            by_tenant.setdefault(str(event["tenant"]), []).append((str(event["id"]), float(event["ts"]), event))
        for tenant, items in by_tenant.items():
            # a failed batch is appended again whole: its events already in the chain are skipped
            await self.chain.append(tenant, items)

    async def export(self, packet: BusPacket, msg: Message) -> None:
        """The `audit-exporters` consumer's handler: append one exported event to its chain."""
        event = event_of(packet)
        if event is None:
            log.warning("audit.export_ignored", subject=msg.subject)
            return
        tenant = str(event["tenant"])
        # one append at a time per tenant here: concurrent ones would only race for the chain's head
        async with self._tenant_locks.setdefault(tenant, trio.Lock()):
            await self.chain.append(tenant, [(str(event["id"]), float(event.get("ts") or 0), event)])
        self.written += 1
        if self._exported is not None:
            self._exported.inc()
        self.last_written_at = time.time()

    def health(self) -> dict[str, Any]:
        return {"status": "degraded" if self.last_error or self.dropped else "ok", "transport": self.transport,
                "buffered": len(self._buffer), "buffer_size": self.buffer_size, "recorded": self.recorded,
                "written": self.written, "dropped": self.dropped, "last_error": self.last_error,
                "last_written_at": self.last_written_at or None}
