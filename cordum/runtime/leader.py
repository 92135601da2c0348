"""Leader election over a lease key: exactly one replica runs a loop at a time.

Every replica campaigns; the winner runs `work(lease)` inside the lease's scope, so the work is
cancelled as soon as leadership is in doubt (a failed renewal near the validity deadline), before
the key can have expired and gone to another replica. Candidates poll often enough that a crashed
leader is replaced within about one TTL; a leader that shuts down releases the key, so its
successor takes over at its next poll.
"""

from __future__ import annotations

from typing import Awaitable, Callable

import trio

from cordum.infra.redis import RedisError, RedisUnavailable
from cordum.runtime.lease import Lease, LeaseLost, Leases, LeaseUnavailable
from cordum.runtime.log import get_logger

log = get_logger("leader")

Work = Callable[[Lease], Awaitable[None]]


class LeaderElection:
    def __init__(self, leases: Leases, key: str, ttl: float, *, poll: float | None = None) -> None:
        self.leases = leases
        self.key = key
        self.ttl = ttl
        self.poll = poll if poll is not None else min(ttl / 6, 1.0)
        self.is_leader = False
        self.terms = 0  # how many times this replica became leader

    async def run(self, work: Work, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Campaign forever; run `work` whenever this replica leads."""
        task_status.started()
        while True:
            try:
                async with self.leases.hold(self.key, self.ttl) as lease:
                    self.is_leader = True
                    self.terms += 1
                    log.info("leader.elected", key=self.key, fence=lease.fence)
                    await work(lease)
                    log.info("leader.work_returned", key=self.key, fence=lease.fence)
            except LeaseUnavailable:
                pass
            except LeaseLost:
                log.warning("leader.stepped_down", key=self.key)
            except (RedisError, *RedisUnavailable) as exc:
                log.warning("leader.campaign_failed", key=self.key, error=repr(exc))
            except Exception as exc:  # a bug in one pass of the loop must not kill the replica
                log.error("leader.work_failed", key=self.key, error=repr(exc))
            finally:
                self.is_leader = False
            await trio.sleep(self.poll)


def every(interval: float, step: Callable[[Lease], Awaitable[None]], *, first_after: float = 0.0) -> Work:
    """Leader work that runs `step` every `interval` seconds while leading, the first time
    `first_after` seconds after becoming leader.

    Before each step it checks the lease's local validity itself: after a pause (SIGSTOP, a long
    GC, a frozen VM) this task can wake before the lease keeper does, and must not act on a
    leadership that has already passed to another replica."""

    async def loop(lease: Lease) -> None:
        await trio.sleep(first_after)
        while True:
            if lease.lost or trio.current_time() >= lease.valid_until:
                log.warning("leader.lease_expired_while_idle", key=lease.key, fence=lease.fence)
                return
            await step(lease)
            await trio.sleep(interval)

    return loop
