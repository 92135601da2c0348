"""`GET /api/v1/status` and the `/health` check: bus and store reachability, the build, the
Redis pool's counters, workers, the caller's pipeline by state, and (admins of the operator's
tenant, TENANT_ID, only) the live replicas of every registered service. What status reads from
Redis is cached for STATUS_CACHE_S per replica; `X-Cache: HIT` says all of it came from the cache.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from typing import Any, Awaitable, Callable

import trio
from quart import Quart

import cordum
from cordum.gateway.auth import Principal
from cordum.gateway.context import Gateway, caller, require
from cordum.infra.redis import RedisError, RedisUnavailable
from cordum.gateway.workers import list_workers
from cordum.protocol import subjects
from cordum.runtime.instances import list_instances
from cordum.runtime.log import get_logger
from cordum.store import keys

log = get_logger("gateway.status")

PROBE_TIMEOUT = 1.0


def bus_connected(gw: Gateway) -> bool:
    return gw.bus.connected


async def redis_probe(gw: Gateway) -> str | None:
    """None when Redis answers a PING within PROBE_TIMEOUT, else what went wrong, in words that
    name no host or credential: /health serves it without a key."""
    with trio.move_on_after(PROBE_TIMEOUT):
        try:
            return None if await gw.redis.ping() else "ping failed"
        except (RedisError, *RedisUnavailable) as exc:
            log.debug("status.redis_unavailable", error=repr(exc))
            return f"ping failed: {type(exc).__name__}"
    return f"no reply to ping within {PROBE_TIMEOUT:g}s"


async def health(gw: Gateway) -> dict[str, Any]:
    """`{"status": "healthy", "nats": "connected", "redis": "ok"}`, or "unhealthy" (a 503), the
    NATS connection's state and `"redis": "error"` with an `error`."""
    error = await redis_probe(gw)
    healthy = bus_connected(gw) and error is None
    body: dict[str, Any] = {"status": "healthy" if healthy else "unhealthy", "nats": gw.bus.state,
                            "redis": "ok" if error is None else "error"}
    if error is not None:
        body["error"] = f"redis: {error}"
    return body


def build_info() -> dict[str, str]:
    # An image build stamps commit and date in its environment; a source checkout has neither.
    return {"version": cordum.__version__, "commit": os.environ.get("CORDUM_BUILD_COMMIT", ""),
            "date": os.environ.get("CORDUM_BUILD_DATE", "")}


def task_count() -> int:
    """The Trio tasks alive in this process, system tasks included: what Cordum reports as
    `goroutine_count`. The asyncio side's tasks (redis-py's, nats-py's) are not counted. One walk
    of the task tree from the root: about a millisecond per 3000 tasks."""
    count, pending = 0, [trio.lowlevel.current_root_task()]
    while pending:
        task = pending.pop()
        if task is None:
            continue
        count += 1
        for nursery in task.child_nurseries:
            pending.extend(nursery.child_tasks)
    return count


STATUS_CACHE_S = 5.0  # what a status call reads from Redis is reused this long
PIPELINE_SAMPLE = 500  # the tenant's most recent jobs, counted by state


class StatusCache:
    """The Redis-read parts of `/api/v1/status`, computed at most once per STATUS_CACHE_S per key
    (per tenant for its pipeline, once for workers and replicas) however many callers ask: a
    viewer polling status costs Redis nothing between refreshes."""

    def __init__(self, ttl: float = STATUS_CACHE_S) -> None:
        self.ttl = ttl
        self._values: dict[str, tuple[float, Any]] = {}
        self._locks: dict[str, trio.Lock] = {}

    async def get(self, key: str, compute: Callable[[], Awaitable[Any]]) -> Any:
        return (await self.lookup(key, compute))[0]

    async def lookup(self, key: str, compute: Callable[[], Awaitable[Any]]) -> tuple[Any, bool]:
        """The value, and whether it came from the cache."""
        lock = self._locks.setdefault(key, trio.Lock())
        async with lock:  # one computes, the others wait for its answer
            cached = self._values.get(key)
            if cached is not None and trio.current_time() < cached[0]:
                return cached[1], True
            value = await compute()
            self._values[key] = (trio.current_time() + self.ttl, value)
            return value, False


async def status(gw: Gateway, who: Principal) -> tuple[dict[str, Any], bool]:
    """The body, and whether every part read from Redis came from the cache (`X-Cache: HIT`; a
    call that read nothing cacheable, Redis being away, is a MISS). Bus, ping, pool and task
    figures are always live."""
    error = await redis_probe(gw)
    ok = error is None
    redis: dict[str, Any] = {"ok": ok, "status": "ok" if ok else "error"}
    if error is not None:
        redis["error"] = error
    body: dict[str, Any] = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "uptime_seconds": int(time.time() - gw.started_at),
        "goroutine_count": task_count(),
        "instance_id": gw.instance_id,
        "build": build_info(),
        "nats": {"connected": bus_connected(gw), "status": gw.bus.state},
        "redis": redis,
        "redis_pool_stats": gw.redis.pool_stats(),
        "workers": {"count": 0},
        "pipeline": {},
        "active_ws_clients": gw.hub.client_count if gw.hub is not None else 0,
        "rate_limiter": gw.ratelimiter.describe() if gw.ratelimiter is not None else {"mode": "off"},
        # who the key is: the dashboard shows actions only to roles that may take them
        "caller": {"tenant": who.tenant, "role": who.role, "principal_id": who.principal_id},
    }
    if who.allows("admin") and who.tenant == gw.options.default_tenant:
        # which replicas run where, and who leads each loop: for the operator's admins, not tenants'
        url = gw.bus.server_url
        if url is not None:
            body["nats"]["url"] = url
        body["replicas"] = {}
        body["leaders"] = {}
        body["stream_lag"] = []
    if gw.status_cache is None:
        gw.status_cache = StatusCache()
    cache: StatusCache = gw.status_cache
    hits: list[bool] = []

    async def cached(key: str, compute: Callable[[], Awaitable[Any]]) -> Any:
        value, hit = await cache.lookup(key, compute)
        hits.append(hit)
        return value

    if "stream_lag" in body:  # from NATS: answers while Redis is away too
        body["stream_lag"] = await cached("stream_lag", lambda: stream_lag(gw))
    if ok:

        async def pipeline() -> dict[str, int]:
            recent, _ = await gw.jobs.list(who.tenant, limit=PIPELINE_SAMPLE)
            return dict(Counter(str(m.get("state", "")) for m in recent))

        async def workers() -> int:
            return len(await list_workers(gw))

        body["workers"]["count"] = await cached("workers", workers)
        body["pipeline"] = await cached(f"pipeline:{who.tenant}", pipeline)
        if "replicas" in body:
            body["replicas"] = await cached("replicas", lambda: list_instances(gw.redis))
            body["leaders"] = await cached("leaders", lambda: leaders(gw))
    return body, bool(hits) and all(hits)


# The leader-elected loops, by the name status shows them under.
LEADER_KEYS = {
    "reconciler": keys.RECONCILER_LEADER,
    "pending_replayer": keys.REPLAYER_LEADER,
    "snapshot_writer": keys.SNAPSHOT_WRITER_LEADER,
    "worker_reaper": keys.WORKER_REAPER_LEADER,
    "workflow_reconciler": keys.WORKFLOW_RECONCILER_LEADER,
    "workflow_delay_poller": keys.WORKFLOW_DELAY_POLLER_LEADER,
    "dlq_cleanup": keys.DLQ_CLEANUP_LEADER,
}


async def leaders(gw: Gateway) -> dict[str, str | None]:
    """Which replica holds each loop's lease right now (None: nobody; a failover is under way or
    no replica runs that loop). A lease's value is `<instance>/<fence>`."""
    values = await gw.redis.pipeline([("GET", key) for key in LEADER_KEYS.values()])
    return {name: value.rsplit("/", 1)[0] if isinstance(value, str) and value else None
            for name, value in zip(LEADER_KEYS, values)}


async def stream_lag(gw: Gateway) -> list[dict[str, Any]]:
    """The backlog of every shared durable (its queue group's, on JetStream): messages not yet
    delivered, and delivered but not acked. One request to NATS each; a durable that cannot be
    read is left out."""
    found: dict[tuple[str, str], tuple[int, int]] = {}

    async def probe(queue: str, subject: str) -> None:
        try:
            backlog = await gw.bus.consumer_backlog(subject, queue)
        except Exception as exc:  # NATS away, durable not created yet: status still answers
            log.debug("status.backlog_unavailable", subject=subject, queue=queue, error=repr(exc))
            return
        if backlog is not None:
            found[(queue, subject)] = backlog

    with trio.move_on_after(PROBE_TIMEOUT):  # all at once: one timeout, not one per durable
        async with trio.open_nursery() as nursery:
            for queue, subject in subjects.WELL_KNOWN_DURABLES:
                nursery.start_soon(probe, queue, subject)
    return [{"queue": queue, "subject": subject, "pending": found[(queue, subject)][0],
             "ack_pending": found[(queue, subject)][1]}
            for queue, subject in subjects.WELL_KNOWN_DURABLES if (queue, subject) in found]


def register(app: Quart, gw: Gateway) -> None:
    @app.get("/api/v1/status")
    @require("viewer")
    async def status_route() -> Any:
        body, hit = await status(gw, caller())
        return body, 200, {"X-Cache": "HIT" if hit else "MISS"}
