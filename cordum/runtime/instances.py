"""The instance registry: each replica of a service announces itself in Redis.

`cordum:instance:<service>:<instance_id>` = JSON `{id, service, started_at, pid}`, TTL 15 s,
renewed every 5 s by `serve_registration` (a child task), deleted when the task ends. A replica
that dies silently disappears within one TTL. `list_instances(redis)` → `{service: [entries]}`.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import trio

from cordum.infra.redis import Redis, RedisError, RedisUnavailable
from cordum.runtime.lifecycle import close_scope
from cordum.runtime.log import get_logger
from cordum.store import keys

log = get_logger("instances")

PREFIX = keys.INSTANCE_PREFIX
TTL = 15.0
RENEW_EVERY = 5.0


instance_key = keys.instance


async def serve_registration(
    redis: Redis, service: str, instance_id: str, *, ttl: float = TTL, every: float = RENEW_EVERY,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Register now, renew until cancelled, DEL on the way out (shielded)."""
    key = instance_key(service, instance_id)
    record = json.dumps({"id": instance_id, "service": service, "pid": os.getpid(),
                         "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    ttl_ms = max(int(ttl * 1000), 1)
    try:
        try:
            await redis.execute("SET", key, record, "PX", ttl_ms)
        except (RedisError, *RedisUnavailable) as exc:
            log.warning("instance.register_failed", key=key, error=repr(exc))
        task_status.started()
        while True:
            await trio.sleep(every)
            try:
                await redis.execute("SET", key, record, "PX", ttl_ms)
            except (RedisError, *RedisUnavailable) as exc:
                log.warning("instance.renew_failed", key=key, error=repr(exc))
    finally:
        with close_scope(2):
            try:
                await redis.execute("DEL", key)
            except (RedisError, *RedisUnavailable) as exc:
                log.debug("instance.unregister_failed", key=key, error=repr(exc))


async def list_instances(redis: Redis, *, limit: int = 1000) -> dict[str, list[dict[str, Any]]]:
    """Live replicas grouped by service, each list sorted by id."""
    # SCAN to the end; on a Redis Cluster `scan_keys` scans every primary (one SCAN on a cluster
    # client would see one node's keys only).
    found = await redis.scan_keys(PREFIX + "*", count=200, limit=limit)
    if not found:
        return {}
    texts = await redis.pipeline([("GET", key) for key in found[:limit]])
    services: dict[str, list[dict[str, Any]]] = {}
    for key, text in zip(found, texts):
        if not isinstance(text, str):
            continue  # expired between SCAN and GET
        try:
            entry = json.loads(text)
        except ValueError:
            continue
        service = entry.get("service") or key[len(PREFIX):].rsplit(":", 1)[0]
        services.setdefault(service, []).append(entry)
    for entries in services.values():
        entries.sort(key=lambda e: str(e.get("id", "")))
    return services
