"""TTL leases in Redis with fencing tokens: the guide's TryAcquireLock/ReleaseLock, made safe
against paused holders.

- acquire: SET NX PX with a unique holder value, in one script that also INCRs the lock's fence
  counter and returns it: a grant always carries a token larger than every earlier grant's.
- renew: compare-and-PEXPIRE, every TTL/3 while held.
- release: compare-and-DEL, so a holder never deletes a lease that expired and went to another.
- A holder keeps a local, conservative validity deadline (send time of its last successful
  renewal + TTL - margin). When renewals fail or report the lease gone, the protected work is
  cancelled before that deadline passes, i.e. before anyone else can have been granted the lease.
  Writes the lease protects carry its fence (`JobStore` refuses an older one), so even a holder that was
  paused past expiry cannot overwrite its successor's work.
"""

from __future__ import annotations

import math
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import AsyncIterator, Awaitable, Callable

import trio

from cordum.infra.redis import NoScriptError, Redis, RedisError, RedisUnavailable
from cordum.runtime.identity import holder_token
from cordum.runtime.lifecycle import close_scope
from cordum.runtime.log import get_logger
from cordum.store import keys

log = get_logger("lease")

_ACQUIRE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local fence = redis.call('INCR', KEYS[2])
if tonumber(ARGV[3]) > 0 then redis.call('PEXPIRE', KEYS[2], ARGV[3]) end
redis.call('SET', KEYS[1], ARGV[1] .. '#' .. fence, 'PX', ARGV[2])
return fence
"""
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

class LeaseUnavailable(Exception):
    """Someone else holds the lease."""


class LeaseLost(Exception):
    """The lease expired or was taken while held; the protected work was cancelled."""


@dataclass
class Lease:
    key: str
    value: str
    fence: int
    ttl: float
    valid_until: float  # trio clock; conservative local bound on the server-side expiry
    lost: bool = False
    giving_back: bool = False  # its release is on its way: no longer renewed (Leases.release_later)
    released: bool = False  # a release's reply came back: nothing left to release
    renew_at: float = 0.0  # trio clock: when its keeper renews it next
    looking: bool = False  # the shared keeper is renewing it now
    unkept: bool = False  # the shared keeper stopped while it was held: its body was stopped
    _body: trio.CancelScope | None = field(default=None, repr=False)

    @property
    def margin(self) -> float:
        # Room for clock-rate differences and the time to cancel the protected work.
        return min(self.ttl / 10, 1.0)


class Leases:
    def __init__(self, redis: Redis, instance_id: str) -> None:
        self._redis = redis
        self._instance_id = instance_id
        self._acquire = redis.script(_ACQUIRE)
        self._renew = redis.script(_RENEW)
        self._release = redis.script(_RELEASE)
        self._init_keeper()

    def _init_keeper(self) -> None:
        # The shared keeper (keep_all): the leases it keeps, by id, and when it looks next.
        self._kept: dict[int, Lease] = {}
        self._keeper_on = False
        self._keeper_looks_at = math.inf
        self._keeper_kick = trio.Event()

    async def try_acquire(self, key: str, ttl: float) -> Lease | None:
        holder = holder_token(self._instance_id)
        sent = trio.current_time()
        fence = int(await self._acquire([key, keys.fence_counter(key)], [holder, _ms(ttl), keys.FENCE_TTL_MS]))
        return _granted(key, holder, fence, ttl, sent)

    def try_acquire_later(self, key: str, ttl: float) -> Callable[[], Awaitable[Lease | None]]:
        """`try_acquire`, queued with the next Redis batch: a read queued right after it runs
        after the grant, in the same round trip (one server). The reply raises NoScriptError
        when the server lacks the script; `try_acquire` then loads it."""
        holder = holder_token(self._instance_id)
        sent = trio.current_time()
        reply = self._acquire.call_later([key, keys.fence_counter(key)], [holder, _ms(ttl), keys.FENCE_TTL_MS])

        async def lease() -> Lease | None:
            return _granted(key, holder, int(await reply()), ttl, sent)

        return lease

    async def acquire_within(self, key: str, ttl: float, wait: float) -> Lease | None:
        """`try_acquire`, polled with backoff (5 ms doubling to 100 ms) for up to `wait` seconds:
        a lock held for a moment (a result arriving while its dispatch still holds the job) is
        waited out instead of refused. None when still held at the end."""
        deadline = trio.current_time() + wait
        delay = 0.005
        while True:
            lease = await self.try_acquire(key, ttl)
            if lease is not None or trio.current_time() + delay > deadline:
                return lease
            await trio.sleep(delay)
            delay = min(delay * 2, 0.1)

    async def renew(self, lease: Lease) -> bool:
        sent = trio.current_time()
        if int(await self._renew([lease.key], [lease.value, _ms(lease.ttl)])) != 1:
            return False
        lease.valid_until = sent + lease.ttl - lease.margin
        return True

    async def release(self, lease: Lease) -> bool:
        """Compare-and-DEL (safe to repeat: the value names the grant); True when it deleted the
        lease, or a release of it had already come back."""
        if lease.released:
            return True
        deleted = int(await self._release([lease.key], [lease.value])) == 1
        lease.released = True
        return deleted

    def release_later(self, lease: Lease) -> Callable[[], Awaitable[bool]]:
        """`release`, queued with the next Redis batch: behind a last write queued just before
        it, both go in one round trip. From then on the lease is no longer renewed, and the body
        goes on without it (nothing it does after may rely on the lease). Should the release not
        come back (cancelled, Redis away), `holding` releases again on its way out."""
        lease.giving_back = True
        reply = self._release.call_later([lease.key], [lease.value])

        async def released() -> bool:
            try:
                deleted = int(await reply()) == 1
            except NoScriptError:  # a restarted server: the plain call loads the script
                return await self.release(lease)
            lease.released = True
            return deleted

        return released

    @asynccontextmanager
    async def hold(self, key: str, ttl: float) -> AsyncIterator[Lease]:
        """Hold `key` for the body; renewed at TTL/3; the body is cancelled if the lease is lost
        (then `LeaseLost` is raised); released on every exit path."""
        lease = await self.try_acquire(key, ttl)
        if lease is None:
            raise LeaseUnavailable(key)
        async with self.holding(lease):
            yield lease

    @asynccontextmanager
    async def holding(self, lease: Lease) -> AsyncIterator[Lease]:
        """Keep an acquired lease for the body (see `hold`): by the shared keeper when it runs
        (`keep_all`), else by a task of its own."""
        try:
            if self._keeper_on:
                with trio.CancelScope() as body:
                    lease._body = body
                    self._keep_shared(lease)
                    try:
                        yield lease
                    finally:
                        self._kept.pop(id(lease), None)
                        lease.giving_back = True  # a renewal still in flight must not count as a loss
            else:
                try:
                    async with trio.open_nursery() as nursery:
                        with trio.CancelScope() as body:
                            lease._body = body
                            nursery.start_soon(self.keep, lease)
                            yield lease
                        nursery.cancel_scope.cancel()
                except BaseExceptionGroup as group:
                    # The keeper never raises, so a group holds the body's one exception: give
                    # the caller that exception itself, as if no nursery were involved.
                    if len(group.exceptions) == 1:
                        raise group.exceptions[0] from None
                    raise
        finally:
            if not lease.lost and not lease.released:  # (a release that never came back: again)
                with close_scope(2):
                    try:
                        await self.release(lease)
                    except (RedisError, *RedisUnavailable) as exc:
                        log.warning("lease.release_failed", key=lease.key, error=repr(exc))
        if lease.lost or lease.unkept:
            raise LeaseLost(lease.key)

    async def keep(self, lease: Lease) -> None:
        """Renew until cancelled; on loss, mark the lease and cancel its body."""
        lease.renew_at = trio.current_time() + lease.ttl / 3
        while True:
            await trio.sleep_until(min(lease.renew_at, lease.valid_until))
            if not await self._look(lease):
                return

    async def _look(self, lease: Lease) -> bool:
        """A kept lease's renewal (or its loss, once its validity ran out); whether to go on
        keeping it. Sets `renew_at` for the next look."""
        if lease.giving_back or lease.released:
            return False
        if trio.current_time() >= lease.valid_until:
            self._lose(lease, "validity ran out before a renewal succeeded")
            return False
        interval = lease.ttl / 3
        try:
            with trio.move_on_at(lease.valid_until):
                if not await self.renew(lease):
                    if not (lease.giving_back or lease.released):  # (not: released meanwhile, as it should be)
                        self._lose(lease, "lease held by another holder or expired")
                    return False
            lease.renew_at = trio.current_time() + interval
        except (RedisError, *RedisUnavailable) as exc:
            log.warning("lease.renew_failed", key=lease.key, error=repr(exc))
            lease.renew_at = trio.current_time() + min(interval / 4, 0.5)
        return True

    async def keep_all(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep every lease held through `holding` from this one task while it runs: a held lease
        costs an entry here instead of a task and a nursery of its own (the scheduler holds two
        per job, for milliseconds each). Renewals run concurrently, each bounded by its lease's
        validity. When this stops, the bodies of the leases it kept are cancelled (nobody would
        renew them) and raise LeaseLost; `holding` releases the leases."""
        self._keeper_on = True
        task_status.started()
        try:
            async with trio.open_nursery() as looks:
                while True:
                    now, looks_at = trio.current_time(), math.inf
                    for lease in list(self._kept.values()):
                        if lease.looking:
                            continue
                        due = min(lease.renew_at, lease.valid_until)
                        if due <= now:
                            lease.looking = True
                            looks.start_soon(self._look_shared, lease)
                        else:
                            looks_at = min(looks_at, due)
                    self._keeper_looks_at = looks_at
                    self._keeper_kick = trio.Event()
                    with trio.move_on_at(looks_at):
                        await self._keeper_kick.wait()
        finally:
            self._keeper_on = False
            for lease in list(self._kept.values()):  # nobody renews them now: their bodies stop
                lease.unkept = True  # (and `holding` releases them, as they were not lost)
                if lease._body is not None:
                    lease._body.cancel()

    def _keep_shared(self, lease: Lease) -> None:
        lease.renew_at = trio.current_time() + lease.ttl / 3
        self._kept[id(lease)] = lease
        if min(lease.renew_at, lease.valid_until) < self._keeper_looks_at:
            self._keeper_kick.set()  # it sleeps past this lease's first renewal

    async def _look_shared(self, lease: Lease) -> None:
        try:
            going = await self._look(lease)
        except Exception as exc:  # not Redis's (that is retried): this lease only, not the keeper
            self._lose(lease, f"renewal failed: {exc!r}")
            going = False
        finally:
            lease.looking = False
        if not going:
            self._kept.pop(id(lease), None)
        self._keeper_kick.set()

    def _lose(self, lease: Lease, why: str) -> None:
        lease.lost = True
        log.warning("lease.lost", key=lease.key, fence=lease.fence, reason=why)
        if lease._body is not None:
            lease._body.cancel()


def _granted(key: str, holder: str, fence: int, ttl: float, sent: float) -> Lease | None:
    """The lease an acquire's reply grants (fence 0: held by someone else). Valid, by our clock,
    until the request's send time + TTL - margin."""
    if fence == 0:
        return None
    lease = Lease(key, f"{holder}#{fence}", fence, ttl, 0.0)
    lease.valid_until = sent + ttl - lease.margin
    return lease


def _ms(seconds: float) -> int:
    return max(int(seconds * 1000), 1)
