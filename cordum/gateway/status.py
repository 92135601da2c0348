"""`GET /api/v1/status` and the `/health` check: bus and store reachability, workers, the
caller's pipeline by state, and (admins of the operator's tenant, TENANT_ID, only) the live replicas
of every registered service. What
status reads from Redis is cached for STATUS_CACHE_S per replica."""

from __future__ import annotations

import time
from collections import Counter
from typing import Any, Awaitable, Callable

import trio
from quart import Quart

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


async def redis_ok(gw: Gateway) -> bool:
    with trio.move_on_after(PROBE_TIMEOUT):
        try:
            return bool(await gw.redis.ping())
        except (RedisError, *RedisUnavailable):
            return False
    return False


async def health(gw: Gateway) -> dict[str, Any]:
    nats, redis = bus_connected(gw), await redis_ok(gw)
    body: dict[str, Any] = {"nats": "connected" if nats else "disconnected", "redis": "ok" if redis else "error"}
    if not (nats and redis):
        body["status"] = "unhealthy"
    return body


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
        lock = self._locks.setdefault(key, trio.Lock())
        async with lock:  # one computes, the others wait for its answer
            cached = self._values.get(key)
            if cached is not None and trio.current_time() < cached[0]:
                return cached[1]
            value = await compute()
            self._values[key] = (trio.current_time() + self.ttl, value)
            return value


async def status(gw: Gateway, who: Principal) -> dict[str, Any]:
    ok = await redis_ok(gw)
    body: dict[str, Any] = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "uptime_seconds": int(time.time() - gw.started_at),
        "instance_id": gw.instance_id,
        "nats": {"connected": bus_connected(gw)},
        "redis": {"ok": ok},
        "workers": {"count": 0},
        "pipeline": {},
        "active_ws_clients": gw.hub.client_count if gw.hub is not None else 0,
        "rate_limiter": gw.ratelimiter.describe() if gw.ratelimiter is not None else {"mode": "off"},
        # who the key is: the dashboard shows actions only to roles that may take them
        "caller": {"tenant": who.tenant, "role": who.role, "principal_id": who.principal_id},
    }
    if who.allows("admin") and who.tenant == gw.options.default_tenant:
        # which replicas run where, and who leads each loop: for the operator's admins, not tenants'
        body["replicas"] = {}
        body["leaders"] = {}
        body["stream_lag"] = []
    if gw.status_cache is None:
        gw.status_cache = StatusCache()
    cache: StatusCache = gw.status_cache
    if "stream_lag" in body:  # from NATS: answers while Redis is away too
        body["stream_lag"] = await cache.get("stream_lag", lambda: stream_lag(gw))
    if ok:

        async def pipeline() -> dict[str, int]:
            recent, _ = await gw.jobs.list(who.tenant, limit=PIPELINE_SAMPLE)
            return dict(Counter(str(m.get("state", "")) for m in recent))

        async def workers() -> int:
            return len(await list_workers(gw))

        body["workers"]["count"] = await cache.get("workers", workers)
        body["pipeline"] = await cache.get(f"pipeline:{who.tenant}", pipeline)
        if "replicas" in body:
            body["replicas"] = await cache.get("replicas", lambda: list_instances(gw.redis))
            body["leaders"] = await cache.get("leaders", lambda: leaders(gw))
    return body


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
        return await status(gw, caller())
