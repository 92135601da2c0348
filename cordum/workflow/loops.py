"""The workflow engine's leader-elected loops: the run reconciler and the delay-timer poller.

Neither is on the fast path (results drive runs); they are the safety nets that make a run finish
when something was lost: a result that never arrived, a replica that died between two writes, a
timer whose owner crashed.
"""

from __future__ import annotations


import trio

from cordum.runtime.lease import Lease
from cordum.runtime.log import get_logger
from cordum.store.jobs import now_us
from cordum.workflow import runstate as rs
from cordum.workflow.engine import WorkflowEngine

log = get_logger("workflow.loops")

ACTIVE = (rs.PENDING, rs.RUNNING, rs.WAITING)
ENDED_BADLY = (rs.CANCELLED, rs.TIMED_OUT, rs.FAILED, rs.DENIED)
#: how far back the reconciler looks for finished runs with step jobs still running
STRAY_WINDOW_S = 120.0
CONCURRENCY = 8
BATCH = 100


class RunReconciler:
    """Every scan: active runs not updated for a scan interval are reconciled (job outcomes the
    engine missed, step jobs never published, due retries/delays/timeouts), `limit` per status
    per pass, walking each status index with a cursor that wraps around: runs that stay quiet
    (waiting for a person, a long delay) do not keep the others from their turn. Each run that
    ended badly in the last STRAY_WINDOW_S gets cancels for step jobs still running."""

    def __init__(self, engine: WorkflowEngine, scan: float, limit: int = 200) -> None:
        self.engine = engine
        self.scan = scan
        self.limit = limit
        self.passes = 0
        self.cursors: dict[str, int | None] = {}  # status → updated µs of the last run looked at

    async def tick(self, lease: Lease) -> None:
        now = now_us()
        quiet_since = now - int(self.scan * 1_000_000)
        active: list[str] = []
        for status in ACTIVE:
            page = await self.engine.store.runs_in_status(status, self.limit, updated_before_us=quiet_since,
                                                          updated_after_us=self.cursors.get(status))
            self.cursors[status] = page[-1][1] if len(page) == self.limit else None
            active += [run_id for run_id, _ in page]
        ended: list[str] = []
        for status in ENDED_BADLY:
            ended += await self.engine.store.recent_runs_in_status(
                status, since_us=now - int(STRAY_WINDOW_S * 1_000_000), limit=self.limit)
        limiter = trio.CapacityLimiter(CONCURRENCY)

        async def one(coro_fn, run_id: str) -> None:
            async with limiter:
                if lease.lost:
                    return
                try:
                    await coro_fn(run_id)
                except Exception as exc:  # one bad run must not stop the pass
                    log.warning("workflow.reconcile_failed", run_id=run_id, error=repr(exc))

        async with trio.open_nursery() as nursery:
            for run_id in dict.fromkeys(active):
                nursery.start_soon(one, self.engine.reconcile, run_id)
            for run_id in dict.fromkeys(ended):
                nursery.start_soon(one, self.engine.cancel_strays, run_id)
        self.passes += 1


class DelayPoller:
    """Fires due timers (``cordum:wf:delay:timers``): retries, delay steps, workflow timeouts."""

    def __init__(self, engine: WorkflowEngine) -> None:
        self.engine = engine

    async def tick(self, lease: Lease) -> None:
        while not lease.lost and await self.engine.fire_timers(BATCH) == BATCH:
            pass  # a full batch: there may be more due
