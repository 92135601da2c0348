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

from cordum.infra.metrics import Metrics
from cordum.infra.redis import RedisError, RedisUnavailable
from cordum.runtime.lease import Lease, LeaseLost, Leases, LeaseUnavailable
from cordum.runtime.log import get_logger

log = get_logger("leader")

Work = Callable[[Lease], Awaitable[None]]


class LeaderMetrics:
    """Per replica and lease key (a handful of fixed keys: bounded). Summed over the replicas,
    `cordum_leader_is_leader` is 1 while a loop has its leader and 0 during a failover; a rise of
    `cordum_leader_elections_total` is a (re-)election, `cordum_leader_stepdowns_total` a leader
    that lost its lease instead of releasing it."""

    def __init__(self, metrics: Metrics) -> None:
        self.leading = metrics.gauge("cordum_leader_is_leader", "1 while this replica leads the loop of this lease",
                                     ["lease"])
        self.elected = metrics.counter("cordum_leader_elections_total", "Times this replica became leader", ["lease"])
        self.lost = metrics.counter("cordum_leader_stepdowns_total",
                                    "Times this replica stepped down because its lease could not be renewed", ["lease"])

    def campaigning(self, key: str) -> None:
        # Every series exists from the start: a sum over the replicas is then 0, not empty, when
        # nobody leads, and an alert on it can fire.
        self.leading.labels(lease=key).set(0)
        self.elected.labels(lease=key)
        self.lost.labels(lease=key)


class LeaderElection:
    def __init__(self, leases: Leases, key: str, ttl: float, *, poll: float | None = None,
                 metrics: LeaderMetrics | None = None) -> None:
        self.leases = leases
        self.key = key
        self.ttl = ttl
        self.poll = poll if poll is not None else min(ttl / 6, 1.0)
        self.is_leader = False
        self.terms = 0  # how many times this replica became leader
        self.metrics = metrics
        if metrics is not None:
            metrics.campaigning(key)

    async def run(self, work: Work, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Campaign forever; run `work` whenever this replica leads."""
        task_status.started()
        while True:
            try:
                async with self.leases.hold(self.key, self.ttl) as lease:
                    self._lead(True)
                    self.terms += 1
                    log.info("leader.elected", key=self.key, fence=lease.fence)
                    await work(lease)
                    log.info("leader.work_returned", key=self.key, fence=lease.fence)
            except LeaseUnavailable:
                pass
            except LeaseLost:
                log.warning("leader.stepped_down", key=self.key)
                if self.metrics is not None:
                    self.metrics.lost.labels(lease=self.key).inc()
            except (RedisError, *RedisUnavailable) as exc:
                log.warning("leader.campaign_failed", key=self.key, error=repr(exc))
            except Exception as exc:  # a bug in one pass of the loop must not kill the replica
                log.error("leader.work_failed", key=self.key, error=repr(exc))
            finally:
                self._lead(False)
            await trio.sleep(self.poll)

    def _lead(self, leading: bool) -> None:
        self.is_leader = leading
        if self.metrics is not None:
            self.metrics.leading.labels(lease=self.key).set(1 if leading else 0)
            if leading:
                self.metrics.elected.labels(lease=self.key).inc()


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
