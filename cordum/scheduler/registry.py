"""Live workers, as this replica heard of them (heartbeats are broadcast to every replica).

Pure: the clock is passed in. A worker is alive for `ttl` seconds after its last heartbeat, unless
its heartbeat says it is leaving (label `cordum.worker.state`: "draining" — no new jobs; "stopped" —
gone). Between heartbeats the registry counts the jobs this replica dispatched to a worker, so a
burst does not pile onto the one worker whose last heartbeat looked idle.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import Any

from cordum.agent.v1.heartbeat_pb2 import Heartbeat
from cordum.protocol.subjects import WORKER_DRAINING, WORKER_PRESENCE_LABEL, WORKER_STATE_LABEL, WORKER_STOPPED
from cordum.scheduler.routing import Pools, WorkerInfo

WORKER_TTL = 30.0


class WorkerStatus(enum.Enum):
    ALIVE = "alive"  # takes jobs
    DRAINING = "draining"  # finishes what it started, takes nothing new
    GONE = "gone"  # said it stopped, or silent past the TTL
    UNKNOWN = "unknown"  # never heard of (or forgotten): gone, once the registry has listened a TTL


@dataclass
class _Entry:
    info: WorkerInfo
    heartbeat: Heartbeat
    seen: float
    leaving: str = ""  # "", WORKER_DRAINING or WORKER_STOPPED
    keeps_presence: bool = False  # it keeps cordum:worker:<id>:alive (our SDK)
    dispatched_since: int = 0


class WorkerRegistry:
    def __init__(self, ttl: float = WORKER_TTL, *, started: float = 0.0) -> None:
        self.ttl = ttl
        self.started = started  # when this replica began to listen for heartbeats
        self.last_heard = float("-inf")  # the last heartbeat of any worker
        self._workers: dict[str, _Entry] = {}

    def hearing(self, now: float) -> bool:
        """Whether heartbeats reach this replica at all (a replica cut off from NATS hears none,
        and must not take every worker for gone)."""
        return now - self.last_heard <= self.ttl / 2

    def said_stopped(self, worker_id: str) -> bool:
        entry = self._workers.get(worker_id)
        return entry is not None and entry.leaving == WORKER_STOPPED

    def has_room(self, worker_id: str) -> bool:
        """Whether its last heartbeat showed a free slot."""
        entry = self._workers.get(worker_id)
        return entry is not None and entry.heartbeat.active_jobs < max(entry.heartbeat.max_parallel_jobs, 1)

    def keeps_presence(self, worker_id: str) -> bool:
        entry = self._workers.get(worker_id)
        return entry is not None and entry.keeps_presence

    def warmed_up(self, now: float) -> bool:
        """Whether this replica has listened long enough to have heard every live worker."""
        return now - self.started >= self.ttl

    def status(self, worker_id: str, now: float) -> WorkerStatus:
        entry = self._workers.get(worker_id)
        if entry is None:
            return WorkerStatus.UNKNOWN
        if entry.leaving == WORKER_STOPPED or now - entry.seen > self.ttl:
            return WorkerStatus.GONE
        return WorkerStatus.DRAINING if entry.leaving == WORKER_DRAINING else WorkerStatus.ALIVE

    def observe(self, heartbeat: Heartbeat, now: float) -> bool:
        """Record a heartbeat; True when the worker was not alive before (came online)."""
        previous = self._workers.get(heartbeat.worker_id)
        info = WorkerInfo(
            worker_id=heartbeat.worker_id, pool=heartbeat.pool, active_jobs=heartbeat.active_jobs,
            max_parallel_jobs=heartbeat.max_parallel_jobs, cpu_load=heartbeat.cpu_load,
            gpu_utilization=heartbeat.gpu_utilization, labels=dict(heartbeat.labels),
        )
        leaving = heartbeat.labels.get(WORKER_STATE_LABEL, "")
        self._workers[heartbeat.worker_id] = _Entry(
            info, heartbeat, now, leaving if leaving in (WORKER_DRAINING, WORKER_STOPPED) else "",
            keeps_presence=heartbeat.labels.get(WORKER_PRESENCE_LABEL) == "redis")
        self.last_heard = max(self.last_heard, now)
        return previous is None or now - previous.seen > self.ttl

    def dispatched(self, worker_id: str) -> None:
        entry = self._workers.get(worker_id)
        if entry is not None:
            entry.dispatched_since += 1

    def completed(self, worker_id: str) -> None:
        """A result from this worker reached this replica: one job fewer than estimated."""
        entry = self._workers.get(worker_id)
        if entry is not None and entry.dispatched_since > 0:
            entry.dispatched_since -= 1

    def alive(self, now: float) -> list[WorkerInfo]:
        live = []
        for worker_id, entry in list(self._workers.items()):
            if now - entry.seen > 10 * self.ttl:
                del self._workers[worker_id]  # long gone: the reaper has had its chance
                continue
            if entry.leaving or now - entry.seen > self.ttl:
                continue
            live.append(replace(entry.info, active_jobs=entry.info.active_jobs + entry.dispatched_since))
        return live

    def is_alive(self, worker_id: str, now: float) -> bool:
        return self.status(worker_id, now) is WorkerStatus.ALIVE

    def snapshot(self, pools: Pools, now: float, *, writer_id: str, wall_time: float) -> dict[str, Any]:
        """The `sys:workers:snapshot` document (spec §3.7)."""
        workers = []
        pool_stats: dict[str, dict[str, int]] = {}
        for worker_id in sorted(self._workers):
            entry = self._workers[worker_id]
            if entry.leaving == WORKER_STOPPED or now - entry.seen > self.ttl:
                continue
            hb = entry.heartbeat
            workers.append({
                "worker_id": hb.worker_id, "pool": hb.pool, "active_jobs": hb.active_jobs,
                "max_parallel_jobs": hb.max_parallel_jobs, "capabilities": list(hb.capabilities),
                "cpu_load": round(hb.cpu_load, 2), "gpu_utilization": round(hb.gpu_utilization, 2),
                "memory_load": round(hb.memory_load, 2), "region": hb.region, "type": hb.type,
                "labels": dict(hb.labels),
                "last_heartbeat_at": _iso(wall_time - (now - entry.seen)),
            })
            stats = pool_stats.setdefault(hb.pool, {"workers": 0, "active_jobs": 0, "capacity": 0})
            stats["workers"] += 1
            stats["active_jobs"] += hb.active_jobs
            stats["capacity"] += hb.max_parallel_jobs
        topics = {}
        for topic, names in pools.topics.items():
            stats = pool_stats.get(names[0], {"workers": 0, "active_jobs": 0, "capacity": 0})
            topics[topic] = {"pool": names[0], "workers": stats["workers"], "capacity": stats["capacity"],
                             "available": max(stats["capacity"] - stats["active_jobs"], 0)}
        return {"captured_at": _iso(wall_time), "writer_id": writer_id, "pools": pool_stats,
                "topics": topics, "workers": workers}


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat().replace("+00:00", "Z")
