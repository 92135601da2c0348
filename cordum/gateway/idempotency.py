"""Idempotency keys of job submits: `idempotency:<tenant>:<key>` → the job id holding it.

The store reserves a key with SET NX (`JobStore.reserve_idempotency`). The gateway adds the other
half of the life cycle:
- `release`: a compare-and-delete (one-key Lua script), used when the job the key was reserved
  for was never created or could not be queued — so a retry of the same submit can succeed;
- `in_flight`: a key whose job has no meta yet is either being created right now (reserved less
  than `RESERVE_GRACE` seconds ago: the submit holding it is between reserve and create) or stale
  (its job never came to be, or its meta expired): a stale key is released and the submit
  proceeds as a new one.
"""

from __future__ import annotations


from cordum.infra.redis import Redis
from cordum.runtime.lifecycle import close_scope
from cordum.runtime.log import get_logger
from cordum.store import keys
from cordum.store.jobs import IDEMPOTENCY_TTL

log = get_logger("gateway.idempotency")

RESERVE_GRACE = 10.0  # seconds; far longer than reserve → create takes

# KEYS[1] the idempotency key  ARGV[1] the job id it must still hold
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class IdempotencyKeys:
    def __init__(self, redis: Redis) -> None:
        self._redis = redis
        self._release = redis.script(_RELEASE)

    async def release(self, tenant: str, key: str, job_id: str) -> bool:
        """Delete the key only if it still holds `job_id`; True if it was deleted."""
        return int(await self._release([keys.idempotency(tenant, key)], [job_id]) or 0) == 1

    async def release_quietly(self, tenant: str, key: str, job_id: str) -> None:
        """`release` on a failure path: shielded from cancellation, errors logged, never raised."""
        try:
            with close_scope(2):
                await self.release(tenant, key, job_id)
        except Exception as exc:
            log.error("idempotency.release_failed", tenant=tenant, job_id=job_id, error=repr(exc))

    async def in_flight(self, tenant: str, key: str) -> bool:
        """True if the key was reserved less than RESERVE_GRACE seconds ago."""
        pttl = await self._redis.execute("PTTL", keys.idempotency(tenant, key))
        if not isinstance(pttl, int) or pttl < 0:
            return False
        return IDEMPOTENCY_TTL - pttl / 1000.0 < RESERVE_GRACE
