"""The worker snapshot: the scheduler's view of live workers, written by one replica at a time
to `sys:workers:snapshot`, so every gateway replica serves the same list."""

from __future__ import annotations

import json
from typing import Any

from cordum.infra.redis import Redis
from cordum.store import keys

SNAPSHOT_TTL = 24 * 3600


async def write_snapshot(redis: Redis, snapshot: dict[str, Any], *, ttl: int = SNAPSHOT_TTL) -> None:
    await redis.execute("SET", keys.WORKERS_SNAPSHOT, json.dumps(snapshot, separators=(",", ":")), "EX", ttl)


async def read_snapshot(redis: Redis) -> dict[str, Any] | None:
    text = await redis.execute("GET", keys.WORKERS_SNAPSHOT)
    if not text:
        return None
    try:
        snapshot = json.loads(text)
    except ValueError:
        return None
    return snapshot if isinstance(snapshot, dict) else None
