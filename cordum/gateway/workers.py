"""Workers, as the scheduler's snapshot (`sys:workers:snapshot`) lists them: every replica reads
the same document, so every replica answers the same."""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any

from quart import Quart

from cordum.gateway.context import Gateway, require
from cordum.gateway.errors import not_found
from cordum.scheduler.registry import WORKER_TTL
from cordum.store.workers import read_snapshot


async def list_workers(gw: Gateway) -> list[dict[str, Any]]:
    snapshot = await read_snapshot(gw.redis)
    workers = (snapshot or {}).get("workers") or []
    if isinstance(workers, dict):  # tolerate a map keyed by worker id
        workers = [{"worker_id": k, **(v if isinstance(v, dict) else {})} for k, v in workers.items()]
    now = time.time()
    items = [_with_age(w, now) for w in workers if isinstance(w, dict)]
    return sorted(items, key=lambda w: str(w.get("worker_id", "")))


def _with_age(worker: dict[str, Any], now: float) -> dict[str, Any]:
    """Adds heartbeat age and `online` (heard from within the scheduler's worker TTL)."""
    try:
        seen = datetime.fromisoformat(str(worker["last_heartbeat_at"]).replace("Z", "+00:00")).timestamp()
    except (KeyError, ValueError):
        return {**worker, "online": False}
    age = max(now - seen, 0.0)
    return {**worker, "heartbeat_age_seconds": round(age, 1), "online": age <= WORKER_TTL}


def register(app: Quart, gw: Gateway) -> None:
    @app.get("/api/v1/workers")
    @require("viewer")
    async def workers() -> Any:
        return {"items": await list_workers(gw)}

    @app.get("/api/v1/workers/<worker_id>")
    @require("viewer")
    async def worker(worker_id: str) -> Any:
        for item in await list_workers(gw):
            if item.get("worker_id") == worker_id:
                return item
        raise not_found("worker not found")
