"""Serve a bus subject with a packet handler, without ever dying on a bad message.

- Undecodable bytes are counted (`cordum_bus_malformed_packets_total`), logged and terminated:
  redelivering the same bytes cannot help.
- A handler raising `Retry(delay)` gets the message redelivered after `delay`.
- Redis or bus trouble (a transient error) gets the message redelivered with backoff, however long
  it lasts (bounded by JetStream's max-deliver).
- Any other handler error (a bug, a message it cannot handle) is logged, counted, and the message
  redelivered with backoff until it has been tried `max_deliveries` times; then it is terminated,
  and `on_poison` (e.g. a DLQ write) runs first, so the message is recorded rather than dropped.
- Handlers run concurrently up to `concurrency`; a message is acked only after its handler
  returned, so a replica that dies mid-handler leaves it to be redelivered to another.
- `skip(body)`, if given, names the messages the handler would drop unread: they are acked (and
  counted as handled) where they arrive, without a task or a Trio wake-up (`bus.Skip`).
"""

from __future__ import annotations

from typing import Awaitable, Callable

import trio

from cordum.agent.v1.buspacket_pb2 import BusPacket
from cordum.infra.bus import Bus, Message, Skip
from cordum.infra.metrics import Metrics
from cordum.infra.redis import RedisError, RedisUnavailable
from cordum.protocol.packets import PacketError, decode
from cordum.runtime.log import get_logger

log = get_logger("consumer")

Handler = Callable[[BusPacket, Message], Awaitable[None]]
PoisonHook = Callable[[BusPacket, Message, BaseException], Awaitable[None]]


# Failures of the infrastructure rather than of the message.
TRANSIENT = (RedisError, *RedisUnavailable, TimeoutError, ConnectionError, trio.TooSlowError)


def _backoff(deliveries: int) -> float:
    return min(0.5 * 2 ** max(deliveries - 1, 0), 30.0)


class Retry(Exception):
    """Raised by a handler: try this message again after `delay` seconds."""

    def __init__(self, delay: float, reason: str = "") -> None:
        super().__init__(reason or f"retry in {delay}s")
        self.delay = delay


class ConsumerMetrics:
    def __init__(self, metrics: Metrics) -> None:
        self.malformed = metrics.counter(
            "cordum_bus_malformed_packets_total", "Bus messages that were not valid CAP packets", ["subject"]
        )
        self.handler_errors = metrics.counter(
            "cordum_bus_handler_errors_total", "Bus handler failures (message redelivered)", ["subject"]
        )
        self.handled = metrics.counter("cordum_bus_messages_handled_total", "Bus messages handled", ["subject"])


class PacketConsumer:
    """Consume `subject` (queue group if `queue`, else broadcast) with a packet handler.

    `stop()` ends the intake (fetched but unhandled messages go back to the stream at once) and
    waits for the handlers already running: the drain step of a graceful shutdown.
    """

    def __init__(
        self, bus: Bus, subject: str, handler: Handler, counters: ConsumerMetrics, *,
        queue: str | None = None, concurrency: int = 64, max_deliveries: int = 20, on_poison: PoisonHook | None = None,
        skip: Skip | None = None,
    ) -> None:
        self.bus, self.subject, self.handler, self.counters = bus, subject, handler, counters
        self.queue, self.max_deliveries, self.on_poison = queue, max_deliveries, on_poison
        self.skip = None if skip is None else _counted(skip, counters.handled.labels(subject=subject))
        self._limiter = trio.CapacityLimiter(concurrency)
        self._intake = trio.CancelScope()
        self._done = trio.Event()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        if self.queue:
            source = self.bus.consume(self.subject, self.queue, skip=self.skip)
        else:
            source = self.bus.subscribe(self.subject, skip=self.skip)
        try:
            async with trio.open_nursery() as handlers:
                with self._intake:
                    async with source as messages:
                        task_status.started()
                        async for msg in messages:
                            try:
                                await self._limiter.acquire_on_behalf_of(msg)
                            except BaseException:
                                msg.give_back()  # intake stopped before a handler took it
                                raise
                            handlers.start_soon(
                                _handle, msg, self.subject, self.handler, self.counters, self._limiter,
                                self.max_deliveries, self.on_poison,
                            )
        finally:
            self._done.set()

    async def stop(self) -> None:
        self._intake.cancel()
        await self._done.wait()


def _counted(skip: Skip, handled) -> Skip:
    def counted(data: bytes) -> bool:
        if skip(data):
            handled.inc()
            return True
        return False
    return counted


async def serve_packets(
    bus: Bus,
    subject: str,
    handler: Handler,
    counters: ConsumerMetrics,
    *,
    queue: str | None = None,
    concurrency: int = 64,
    max_deliveries: int = 20,
    on_poison: PoisonHook | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Consume `subject` until cancelled (see PacketConsumer)."""
    consumer = PacketConsumer(bus, subject, handler, counters, queue=queue, concurrency=concurrency,
                              max_deliveries=max_deliveries, on_poison=on_poison)
    await consumer.run(task_status=task_status)


async def _handle(
    msg: Message,
    subject: str,
    handler: Handler,
    counters: ConsumerMetrics,
    limiter: trio.CapacityLimiter,
    max_deliveries: int,
    on_poison: PoisonHook | None,
) -> None:
    try:
        try:
            packet = decode(msg.data)
        except PacketError as exc:
            counters.malformed.labels(subject=subject).inc()
            log.warning("bus.malformed_packet", subject=msg.subject, size=len(msg.data), error=str(exc))
            await msg.term()
            return
        try:
            await handler(packet, msg)
        except Retry as retry:
            await msg.nak(retry.delay)
            return
        except TRANSIENT as exc:
            # Redis or the bus is briefly unreachable: not the message's fault, so it is retried
            # (backing off) without counting toward poison; JetStream's own max-deliver bounds it.
            counters.handler_errors.labels(subject=subject).inc()
            log.warning("bus.handler_transient_error", subject=msg.subject, deliveries=msg.num_delivered, error=repr(exc))
            await msg.nak(_backoff(msg.num_delivered))
            return
        except Exception as exc:
            counters.handler_errors.labels(subject=subject).inc()
            log.error("bus.handler_failed", subject=msg.subject, deliveries=msg.num_delivered, error=repr(exc))
            if msg.num_delivered >= max_deliveries:
                if on_poison is not None:
                    try:
                        await on_poison(packet, msg, exc)
                    except Exception as hook_exc:
                        log.error("bus.poison_hook_failed", subject=msg.subject, error=repr(hook_exc))
                        await msg.nak(5.0)
                        return
                await msg.term()
            else:
                await msg.nak(_backoff(msg.num_delivered))
            return
        counters.handled.labels(subject=subject).inc()
        await msg.ack()
    except BaseException:  # every Exception is handled above: this is a (possibly grouped) cancel
        msg.give_back()  # a hard stop cut the handler short: redeliver now, not after the ack wait
        raise
    finally:
        limiter.release_on_behalf_of(msg)
