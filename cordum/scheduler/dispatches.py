"""What this scheduler replica dispatched lately, kept until the job's result comes back.

A worker's plain success for a job found here needs nothing read: the tenant (for the indexes),
the worker and the attempt it was sent for are known, so the success is written in one script,
guarded by the job's stored attempt and worker and by nobody holding its lock
(`JobStore.transition(unlocked=...)`), instead of taking the lock, reading the job, writing and
releasing (Engine.on_result). Only a hint: the script checks everything it relies on, and a job
not found here (sent by another replica, forgotten, or the result is anything else) takes the
locked path, which decides as before.
"""

from __future__ import annotations

from dataclasses import dataclass

CAPACITY = 2048  # the oldest are forgotten first: their results take the locked path


@dataclass(frozen=True, slots=True)
class Dispatched:
    tenant: str
    topic: str
    worker_id: str
    attempt: int
    trace_id: str
    at_us: int  # when it was recorded RUNNING (the dispatch published)


class RecentDispatches:
    def __init__(self, capacity: int = CAPACITY) -> None:
        self._capacity = capacity
        self._sent: dict[str, Dispatched] = {}

    def __len__(self) -> int:
        return len(self._sent)

    def remember(self, job_id: str, dispatched: Dispatched) -> None:
        self._sent.pop(job_id, None)  # a new attempt goes to the back of the line
        self._sent[job_id] = dispatched
        while len(self._sent) > self._capacity:
            del self._sent[next(iter(self._sent))]

    def peek(self, job_id: str) -> Dispatched | None:
        return self._sent.get(job_id)

    def forget(self, job_id: str) -> None:
        self._sent.pop(job_id, None)
