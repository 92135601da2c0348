"""The dead-letter queue: one JSON entry per job (`dlq:entry:<id>`, TTL 30 days), indexed (score =
created unix seconds) in `dlq:index` and in the entry's tenant's index, where each tenant keeps at
most `max_size` entries, its oldest evicted first. Entries carry the job's tenant, so every read
is filtered to the caller's tenant.
"""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from typing import Any

from cordum.agent.v1.buspacket_pb2 import BusPacket
from cordum.agent.v1.job_pb2 import JobResult
from cordum.infra.redis import Redis, score_pairs
from cordum.protocol.packets import new_packet
from cordum.store import keys
from cordum.store.jobstate import error_code_enum

ENTRY_TTL = 30 * 24 * 3600
MAX_SIZE = 10_000


def dlq_entry(
    *, job_id: str, tenant: str, topic: str, status: str, reason: str, reason_code: str,
    last_state: str = "", attempts: int = 0, created: float | None = None,
) -> dict[str, Any]:
    created = time.time() if created is None else created
    return {
        "job_id": job_id, "tenant": tenant, "topic": topic, "status": status, "reason": reason,
        "reason_code": reason_code, "last_state": last_state, "attempts": attempts,
        "created_at": datetime.fromtimestamp(created, timezone.utc).isoformat().replace("+00:00", "Z"),
        "created_unix": int(created),
    }


def dlq_packet(job_id: str, *, status: int, reason_code: str, reason: str, sender_id: str) -> BusPacket:
    """The `sys.job.dlq` event for a job that ended badly (spec §2.10): a JobResult carrying the
    reason code and message, traced by the job id."""
    result = JobResult(job_id=job_id, status=status, error_code=reason_code,
                       error_code_enum=error_code_enum(reason_code), error_message=reason)
    return new_packet(result, sender_id=sender_id, trace_id=job_id)


class DlqStore:
    """Entries are indexed twice: in `dlq:index` (every tenant's, Cordum's key, for its readers)
    and in their tenant's `dlq:index:tenant:<t>`, which listings read and whose size is capped at
    `max_size` (SCHEDULER_DLQ_MAX_SIZE): a tenant's failures evict only that tenant's oldest entries,
    and listing one entry reads one tenant's index, not everybody's."""

    def __init__(self, redis: Redis, *, entry_ttl: int = ENTRY_TTL, max_size: int = MAX_SIZE) -> None:
        self._redis = redis
        self.entry_ttl = entry_ttl
        self.max_size = max_size

    async def put(self, entry: dict[str, Any]) -> None:
        """Write (or overwrite) the entry for its job and index it; trims the tenant's oldest past max."""
        job_id, tenant = entry["job_id"], str(entry.get("tenant", ""))
        created = entry.get("created_unix", int(time.time()))
        index = keys.dlq_tenant_index(tenant)
        *_, size = await self._redis.pipeline([
            ("SET", keys.dlq_entry(job_id), json.dumps(entry, separators=(",", ":")), "EX", self.entry_ttl),
            ("ZADD", keys.DLQ_INDEX, created, job_id),
            ("ZADD", index, created, job_id),
            ("SADD", keys.DLQ_TENANTS, tenant),
            ("ZCARD", index),
        ])
        if isinstance(size, int) and size > self.max_size:
            oldest = await self._redis.execute("ZRANGE", index, 0, size - self.max_size - 1)
            await self._remove(oldest, tenant)

    async def get(self, job_id: str, *, tenant: str | None = None) -> dict[str, Any] | None:
        text = await self._redis.execute("GET", keys.dlq_entry(job_id))
        if text is None:
            return None
        entry = json.loads(text)
        if tenant is not None and entry.get("tenant") != tenant:
            return None
        return entry

    async def delete(self, job_id: str, *, tenant: str) -> bool:
        removed = await self._remove([job_id], tenant)
        return removed > 0

    async def _remove(self, job_ids: list[str], tenant: str) -> int:
        if not job_ids:
            return 0
        # One DEL per entry: the entries hash to different slots on a Redis Cluster, where
        # `DEL k1 k2 ...` would fail with CROSSSLOT. Still one round trip (a pipeline).
        results = await self._redis.pipeline([
            *[("DEL", keys.dlq_entry(j)) for j in job_ids],
            ("ZREM", keys.DLQ_INDEX, *job_ids),
            ("ZREM", keys.dlq_tenant_index(tenant), *job_ids),
        ])
        for result in results:
            if isinstance(result, Exception):
                raise result
        return sum(int(r) for r in results[:-2])

    async def page(self, tenant: str, *, limit: int = 100, cursor: int | None = None) -> tuple[list[dict[str, Any]], int | None]:
        """Newest first; `cursor` is a created-at bound in unix seconds (exclusive of later)."""
        index = keys.dlq_tenant_index(tenant)
        high = "+inf" if cursor is None else str(cursor)
        found: list[dict[str, Any]] = []
        stale: list[str] = []
        while len(found) < limit:
            flat = await self._redis.execute("ZREVRANGEBYSCORE", index, high, "-inf", "WITHSCORES", "LIMIT", 0, limit)
            if not flat:
                break
            pairs = score_pairs(flat)
            texts = await self._redis.pipeline([("GET", keys.dlq_entry(job_id)) for job_id, _ in pairs])
            for (job_id, _score), text in zip(pairs, texts):
                entry = json.loads(text) if text is not None else None
                if entry is None or entry.get("tenant") != tenant:
                    stale.append(job_id)  # expired (or rewritten for another tenant): prune lazily
                    continue
                found.append(entry)
                if len(found) == limit:
                    break
            high = "(" + str(int(float(pairs[-1][1])))
            if len(pairs) < limit:
                break
        if stale:
            await self._redis.pipeline([("ZREM", index, *stale), ("ZREM", keys.DLQ_INDEX, *stale)])
        next_cursor = int(found[-1]["created_unix"]) - 1 if len(found) == limit else None
        return found, next_cursor

    async def cleanup(self, batch: int = 500) -> int:
        """Drop index members whose entry expired, from `dlq:index` and every tenant's index, and
        index entries written before tenant indexes existed under their tenant; returns how many
        members were dropped."""
        removed, start = 0, 0
        while True:
            ids = await self._redis.execute("ZRANGE", keys.DLQ_INDEX, start, start + batch - 1, "WITHSCORES")
            if not ids:
                break
            pairs = score_pairs(ids)
            texts = await self._redis.pipeline([("GET", keys.dlq_entry(j)) for j, _ in pairs])
            gone = [j for (j, _), text in zip(pairs, texts) if text is None]
            adopt = []
            for (job_id, score), text in zip(pairs, texts):
                if text is not None:
                    tenant = str(json.loads(text).get("tenant", ""))
                    adopt += [("ZADD", keys.dlq_tenant_index(tenant), "NX", score, job_id), ("SADD", keys.DLQ_TENANTS, tenant)]
            await self._redis.pipeline([*adopt, *([("ZREM", keys.DLQ_INDEX, *gone)] if gone else [])])
            removed += len(gone)
            start += batch - len(gone)
        for tenant in await self._redis.execute("SMEMBERS", keys.DLQ_TENANTS) or []:
            removed += await self._cleanup_tenant(tenant, batch)
        return removed

    async def _cleanup_tenant(self, tenant: str, batch: int) -> int:
        index, removed, start = keys.dlq_tenant_index(tenant), 0, 0
        while True:
            ids = await self._redis.execute("ZRANGE", index, start, start + batch - 1)
            if not ids:
                if start == 0:
                    await self._redis.execute("SREM", keys.DLQ_TENANTS, tenant)
                return removed
            exists = await self._redis.pipeline([("EXISTS", keys.dlq_entry(j)) for j in ids])
            gone = [j for j, e in zip(ids, exists) if not e]
            if gone:
                await self._redis.execute("ZREM", index, *gone)
                removed += len(gone)
            start += batch - len(gone)
