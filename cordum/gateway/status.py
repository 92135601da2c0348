"""`GET /api/v1/status` and the `/health` check: bus and store reachability, workers, the
caller's pipeline by state, and the live replicas of every registered service."""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import trio
from quart import Quart

from cordum.gateway.context import Gateway, caller, require
from cordum.infra.redis import RedisError, RedisUnavailable
from cordum.gateway.workers import list_workers
from cordum.runtime.instances import list_instances

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


async def status(gw: Gateway, tenant: str) -> dict[str, Any]:
    ok = await redis_ok(gw)
    body: dict[str, Any] = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "uptime_seconds": int(time.time() - gw.started_at),
        "instance_id": gw.instance_id,
        "nats": {"connected": bus_connected(gw)},
        "redis": {"ok": ok},
        "workers": {"count": 0},
        "pipeline": {},
        "replicas": {},
        "active_ws_clients": gw.hub.client_count if gw.hub is not None else 0,
        "rate_limiter": gw.ratelimiter.describe() if gw.ratelimiter is not None else {"mode": "off"},
    }
    if ok:
        body["workers"]["count"] = len(await list_workers(gw))
        recent, _ = await gw.jobs.list(tenant, limit=500)
        body["pipeline"] = dict(Counter(str(m.get("state", "")) for m in recent))
        body["replicas"] = await list_instances(gw.redis)
    return body


def register(app: Quart, gw: Gateway) -> None:
    @app.get("/api/v1/status")
    @require("viewer")
    async def status_route() -> Any:
        return await status(gw, caller().tenant)
