"""Jobs this scheduler replica found waiting for a worker, and when.

A job no worker can take now (none alive for its topic, or every one overloaded) is redelivered
after RETRY_NO_WORKERS_S and stays PENDING. Each redelivery used to take the whole path: the
job's lock, its record read, the policy decision, an audit event, the replayer's mark written
and a log line, every 2 s for every waiting job, so a backlog behind busy workers kept the
scheduler and Redis busy in proportion to its size. A redelivery of a job this replica saw
waiting less than `refresh` seconds ago, which still has no route, is now answered from memory
(`Engine.on_submit`). Every `refresh` seconds such a job takes the whole path once again: that
renews the replayer's mark (`route_wait_at`, compared with SCHEDULER_PENDING_AGE) and looks at
its state (a job cancelled meanwhile is let go then). Only a hint: a job not found here (another
replica saw it, or it was forgotten) takes the whole path.
"""

from __future__ import annotations

CAPACITY = 10_000  # past it the oldest are forgotten: they take the whole path on their next turn


class WaitingJobs:
    def __init__(self, refresh: float, capacity: int = CAPACITY) -> None:
        self.refresh = refresh
        self._capacity = capacity
        self._seen: dict[str, float] = {}  # job id -> when the whole path last found it waiting

    def __len__(self) -> int:
        return len(self._seen)

    def note(self, job_id: str, now: float) -> None:
        """The whole path found the job waiting for a worker at `now`."""
        self._seen.pop(job_id, None)  # kept in the order noted: the oldest first
        self._seen[job_id] = now
        while self._seen:  # drop the entries that no longer count (and the oldest past capacity)
            old, at = next(iter(self._seen.items()))
            if now - at < self.refresh and len(self._seen) <= self._capacity:
                break
            del self._seen[old]

    def recent(self, job_id: str, now: float) -> bool:
        """Whether the job was found waiting less than `refresh` seconds ago."""
        at = self._seen.get(job_id)
        return at is not None and now - at < self.refresh

    def forget(self, job_id: str) -> None:
        self._seen.pop(job_id, None)
