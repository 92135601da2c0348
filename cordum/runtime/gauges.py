"""Gauges of shared state (DLQ size, consumer backlog, the safety breaker) and of the Redis pool.

Shared state is read by every replica on its own timer, `REFRESH_S` apart: a handful of cheap reads
(ZCARD, a consumer-info request, a GET) per replica and interval, never per job, and no leader to
fail over. Every replica then reports the same value for the same thing: dashboards take the `max`
over `pod`. The pool is read at scrape time from the pool's own bookkeeping: no round trip at all.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Awaitable, Callable, Protocol, Sequence

import trio

from cordum.infra.metrics import Metrics
from cordum.infra.redis import Redis
from cordum.runtime.log import get_logger
from cordum.store import keys

if TYPE_CHECKING:  # the context engine uses no NATS: it does not load the client for this
    from cordum.infra.bus import Bus

log = get_logger("gauges")

REFRESH_S = 15.0  # a scrape interval: fresher values would not be seen
Step = Callable[[], Awaitable[None]]


async def refresh_forever(steps: Sequence[Step], *, every: float = REFRESH_S,
                          task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Run each step now and then every `every` seconds. A failing step keeps its last value
    (Redis or NATS is away: its own log says so) and does not stop the others."""
    task_status.started()
    while True:
        for step in steps:
            try:
                with trio.move_on_after(every):
                    await step()
            except Exception as exc:
                log.debug("gauges.refresh_failed", step=getattr(step, "__qualname__", repr(step)), error=repr(exc))
        await trio.sleep(every)


def watch_redis_pool(metrics: Metrics, redis: Redis) -> None:
    """`cordum_redis_pool_connections{state=in_use|idle|max}`, computed when scraped (not on a
    cluster: its pools are per node)."""
    if redis.pool_usage() is None:
        return
    gauge = metrics.gauge("cordum_redis_pool_connections", "Connections of this process's Redis pool",
                          ["state"])

    def reading(index: int) -> Callable[[], float]:
        def read() -> float:
            usage = redis.pool_usage()
            return float(usage[index]) if usage is not None else float("nan")
        return read

    for index, state in enumerate(("in_use", "idle", "max")):
        gauge.labels(state=state).set_function(reading(index))


class DlqSize:
    """`cordum_dlq_entries`: members of the DLQ index (all tenants; expired ones until the hourly
    cleanup drops them)."""

    def __init__(self, metrics: Metrics, redis: Redis) -> None:
        self.redis = redis
        self.gauge = metrics.gauge("cordum_dlq_entries", "Entries in the dead-letter queue (all tenants)")

    async def refresh(self) -> None:
        self.gauge.set(int(await self.redis.execute("ZCARD", keys.DLQ_INDEX) or 0))


class ConsumerBacklog:
    """`cordum_bus_consumer_pending` / `_ack_pending{queue,subject}`: the backlog of the shared
    JetStream durables this service's queue group consumes (well-known subjects only: bounded)."""

    def __init__(self, metrics: Metrics, bus: "Bus", consumed: Sequence[tuple[str, str]]) -> None:
        self.bus = bus
        self.consumed = list(consumed)  # (subject, queue)
        self.pending = metrics.gauge("cordum_bus_consumer_pending",
                                     "Messages the queue group's durable has not delivered yet", ["queue", "subject"])
        self.ack_pending = metrics.gauge("cordum_bus_consumer_ack_pending",
                                         "Messages delivered to the queue group and not acked yet", ["queue", "subject"])

    async def refresh(self) -> None:
        for subject, queue in self.consumed:
            backlog = await self.bus.consumer_backlog(subject, queue)
            if backlog is not None:
                self.pending.labels(queue=queue, subject=subject).set(backlog[0])
                self.ack_pending.labels(queue=queue, subject=subject).set(backlog[1])


class Breaker(Protocol):  # safety.client.CircuitBreaker, as far as it is used here
    open: bool

    async def is_open(self) -> bool: ...


def watch_breaker(metrics: Metrics, breaker: Breaker) -> Step:
    """`cordum_safety_breaker_open` (1 = open): the breaker's last look, kept fresh by the step
    returned (one look; a look that saw no failure is reused by the job path)."""
    metrics.gauge("cordum_safety_breaker_open", "1 while the shared safety-kernel circuit breaker is open"
                  ).set_function(lambda: 1.0 if breaker.open else 0.0)

    async def look() -> None:
        await breaker.is_open()

    return look

