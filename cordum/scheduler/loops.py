"""The scheduler's background loops, each run by one replica at a time (leader-elected):

- reconciler (`cordum:reconciler:default`): DISPATCHED / RUNNING jobs past their timeout, and jobs
  past their deadline, become TIMEOUT — with a DLQ entry and an alert, never silently;
- pending replayer (`cordum:replayer:pending`): jobs stuck in PENDING or SCHEDULED (a lost submit, a
  replica that died mid-dispatch, no worker for a while) are submitted again;
- snapshot writer (`cordum:scheduler:snapshot:writer`): the live worker list for the gateways.

Index entries are hints: each job's own hash is re-read under its lock before anything changes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import trio

from cordum.agent.v1.alert_pb2 import ALERT_SEVERITY_WARNING, SystemAlert
from cordum.agent.v1.job_pb2 import ERROR_CODE_JOB_TIMEOUT, JobCancel
from cordum.infra.redis import Redis
from cordum.protocol import subjects
from cordum.protocol.packets import encode, new_packet
from cordum.runtime.lease import Lease
from cordum.runtime.lifecycle import close_scope
from cordum.runtime.log import get_logger
from cordum.scheduler.engine import JOB_LOCK_TTL, SENDER, Engine
from cordum.store import keys
from cordum.scheduler.registry import WorkerStatus
from cordum.store.jobs import ConditionFailed, InvalidTransition, StaleFence, now_us
from cordum.store.jobstate import TERMINAL, JobState, is_terminal
from cordum.store.workers import write_snapshot

log = get_logger("scheduler.loops")
S = JobState


@dataclass
class Timeouts:
    dispatch: float = 120.0
    running: float = 900.0
    pending_age: float = 30.0
    dispatch_confirm: float = 10.0  # a DISPATCHED job not RUNNING after this was never confirmed sent


class Reconciler:
    def __init__(self, engine: Engine, timeouts: Timeouts) -> None:
        self.engine = engine
        self.timeouts = timeouts

    async def tick(self, lease: Lease) -> None:
        now = now_us()
        for state, limit in ((S.DISPATCHED, self.timeouts.dispatch), (S.RUNNING, self.timeouts.running)):
            cutoff = now - int(limit * 1_000_000)
            for job_id in await self.engine.store.ids_in_state(state, updated_before_us=cutoff):
                await self._guarded(job_id, f"timeout: {state.value} > {limit:g}s", expected=state, cutoff=cutoff)
        for job_id in await self.engine.store.due_deadlines(now):
            await self._guarded(job_id, "timeout: deadline expired")

    async def _guarded(self, job_id: str, reason: str, **kw: object) -> None:
        # One job's trouble must not stall the sweep (or make the leader step down and loop).
        try:
            await self._time_out(job_id, reason, **kw)  # type: ignore[arg-type]
        except Exception as exc:
            log.warning("reconciler.job_failed", job_id=job_id, error=repr(exc))

    async def _time_out(self, job_id: str, reason: str, *, expected: JobState | None = None, cutoff: int = 0) -> None:
        store = self.engine.store
        lease = await self.engine.leases.try_acquire(keys.job_lock(job_id), JOB_LOCK_TTL)
        if lease is None:
            return  # someone is working on it right now; look again next tick
        try:
            meta = await store.get(job_id)
            state = S(meta["state"]) if meta else None
            if state is None or state in TERMINAL:
                await store.forget_stale(job_id, expected)  # index or deadline entry left behind
                return
            if expected is not None and (state != expected or int(meta.get("updated_at", 0)) > cutoff):
                if state != expected:
                    await store.drop_from_index(expected, job_id)
                return
            topic = meta.get("topic", "")
            # A result that is stored but whose message never came (or waits in the stream behind a
            # restart) finishes the job: the work was done, it did not time out.
            if state in (S.DISPATCHED, S.RUNNING) and await self.engine.complete_from_store(meta, lease):
                log.info("reconciler.completed_from_stored_result", job_id=job_id)
                return
            try:
                await self.engine._end(job_id, S.TIMEOUT, fence=lease.fence, code="timeout", reason=reason,
                                       fields={"failure_reason": reason}, tenant=None, allowed_from=[state],
                                       event={"reason": reason},
                                       after=store.inflight_commands(meta.get("worker_id", ""), job_id, done=True))
            except (InvalidTransition, StaleFence) as exc:
                log.info("reconciler.skip", job_id=job_id, error=str(exc))
                return
            self.engine.metrics.finished.labels(topic=topic, state=S.TIMEOUT.value).inc()
            log.warning("reconciler.timed_out", job_id=job_id, state=state.value, reason=reason)
            alert = SystemAlert(
                level="warning", message=f"job {job_id} timed out", component=SENDER, code="timeout",
                severity=ALERT_SEVERITY_WARNING, error_code_enum=ERROR_CODE_JOB_TIMEOUT, source_component=SENDER,
                details={"job_id": job_id, "reason": reason, "last_state": state.value, "topic": topic},
                trace_id=meta.get("trace_id", job_id),
            )
            self.engine.bus.publish_nowait(subjects.ALERT, encode(new_packet(alert, sender_id=SENDER, trace_id=job_id)))
            # Tell the worker (if it still runs it) to stop: its late result would be ignored anyway.
            cancel = JobCancel(job_id=job_id, reason=reason, requested_by=SENDER)
            self.engine.bus.publish_nowait(subjects.CANCEL, encode(new_packet(cancel, sender_id=SENDER, trace_id=job_id)))
        finally:
            with close_scope(2):
                await self.engine.leases.release(lease)


class PendingReplayer:
    """Re-drives jobs that stopped moving: PENDING / SCHEDULED / RETRYING ones are submitted again
    (unless the scheduler marked them as waiting for a worker), DISPATCHED ones left unconfirmed
    are re-sent to their worker."""

    def __init__(self, engine: Engine, timeouts: Timeouts) -> None:
        self.engine = engine
        self.timeouts = timeouts
        self.replayed = 0

    async def tick(self, lease: Lease) -> None:
        store = self.engine.store
        now = now_us()
        cutoff = now - int(self.timeouts.pending_age * 1_000_000)
        for state in (S.PENDING, S.SCHEDULED, S.RETRYING):
            for job_id in await store.ids_in_state(state, updated_before_us=cutoff):
                try:
                    await self._resubmit(job_id, state, cutoff)
                except Exception as exc:
                    log.warning("replayer.job_failed", job_id=job_id, error=repr(exc))
        confirm_cutoff = now - int(self.timeouts.dispatch_confirm * 1_000_000)
        for job_id in await store.ids_in_state(S.DISPATCHED, updated_before_us=confirm_cutoff):
            try:
                await self._redispatch(job_id)
            except Exception as exc:
                log.warning("replayer.job_failed", job_id=job_id, error=repr(exc))

    async def _resubmit(self, job_id: str, state: JobState, cutoff: int) -> None:
        store = self.engine.store
        meta = await store.get(job_id)
        if meta is None or meta["state"] != state.value:
            await store.forget_stale(job_id, state) if meta is None else await store.drop_from_index(state, job_id)
            return
        if max(int(meta.get("replayed_at", 0)), int(meta.get("route_wait_at", 0))) > cutoff:
            return  # replayed, or seen waiting for a worker, recently: its submit is still around
        if int(meta.get("retry_at", 0)) > cutoff:
            return  # a retry's own submit is out there (it waits for its time)
        # A fresh msg id: the original submit's id is still inside JetStream's dedup window.
        if not await self.engine.resubmit(job_id, meta.get("trace_id") or job_id, f"replay:{job_id}:{now_us()}"):
            return
        await store.set_fields(job_id, {"replayed_at": now_us()})
        self.replayed += 1
        log.info("replayer.resubmitted", job_id=job_id, state=state.value)

    async def _redispatch(self, job_id: str) -> None:
        lease = await self.engine.leases.try_acquire(keys.job_lock(job_id), JOB_LOCK_TTL)
        if lease is None:
            return
        try:
            if await self.engine.redispatch(job_id, lease):
                self.replayed += 1
                log.info("replayer.redispatched", job_id=job_id)
        finally:
            with close_scope(2):
                await self.engine.leases.release(lease)


class SnapshotWriter:
    def __init__(self, engine: Engine, redis: Redis, writer_id: str) -> None:
        self.engine = engine
        self.redis = redis
        self.writer_id = writer_id

    async def tick(self, lease: Lease) -> None:
        snapshot = self.engine.registry.snapshot(self.engine.pools(), trio.current_time(),
                                                 writer_id=self.writer_id, wall_time=time.time())
        await write_snapshot(self.redis, snapshot)


PRUNE_AGE_US = 60_000_000


class WorkerReaper:
    """Moves on the jobs sent to workers that left (DESIGN.md §4.13: worker ids change across
    restarts, so nobody will ever read a departed worker's subject).

    A worker that said "stopped", or that has been silent past the worker TTL, is gone: each job
    still DISPATCHED or RUNNING there goes back to RETRYING and is submitted again, unless its
    result is already stored (then that result finishes it). A worker that said "draining"
    finishes what it started: only the jobs it has not claimed move. Every move is one guarded,
    fenced write: it happens only if the attempt is still the one sent there and no worker claimed
    it meanwhile, so a job is never taken from a worker that just started it.

    A replica judges silence only after hearing heartbeats for a whole TTL itself (a leader that
    just started knows nobody yet)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.rerouted = 0

    async def tick(self, lease: Lease) -> None:
        store, registry = self.engine.store, self.engine.registry
        now = trio.current_time()
        for worker_id, last_dispatch in await store.workers_with_inflight():
            status = registry.status(worker_id, now)
            if status is WorkerStatus.ALIVE:
                await self._prune(worker_id)
                continue
            if status is WorkerStatus.UNKNOWN and not registry.warmed_up(now):
                continue
            job_ids = await store.inflight(worker_id)
            for job_id in job_ids:
                try:
                    await self._move_on(worker_id, job_id, draining=status is WorkerStatus.DRAINING)
                except Exception as exc:
                    log.warning("reaper.job_failed", job_id=job_id, worker_id=worker_id, error=repr(exc))
            if not job_ids and status is not WorkerStatus.DRAINING:
                await store.forget_worker(worker_id, last_dispatch)

    async def _prune(self, worker_id: str) -> None:
        """Drop what ended without a result from a live worker's list (cancelled through the API,
        say), looking only at entries older than a minute."""
        store = self.engine.store
        old = await store.inflight(worker_id, dispatched_before_us=now_us() - PRUNE_AGE_US)
        if not old:
            return
        metas = await store.get_many(old)
        ended = [job_id for job_id, meta in zip(old, metas)
                 if meta is None or is_terminal(meta["state"]) or meta.get("worker_id") != worker_id]
        if ended:
            await store.run_repeatable([command for job_id in ended
                                        for command in store.inflight_commands(worker_id, job_id, done=True)])

    async def _move_on(self, worker_id: str, job_id: str, *, draining: bool) -> None:
        engine, store = self.engine, self.engine.store
        lease = await engine.leases.try_acquire(keys.job_lock(job_id), JOB_LOCK_TTL)
        if lease is None:
            return  # being worked on (its result, say): look again next tick
        try:
            meta = await store.get(job_id)
            state = S(meta["state"]) if meta else None
            if state not in (S.DISPATCHED, S.RUNNING) or meta.get("worker_id") != worker_id:
                await store.run_repeatable(store.inflight_commands(worker_id, job_id, done=True))
                return
            attempt, claim = int(meta.get("attempts") or 0), meta.get("run_claim", "")
            if draining and claim == f"{worker_id}:{attempt}":
                return  # it runs there, and the worker finishes it before it stops
            if await engine.complete_from_store(meta, lease):
                log.info("reaper.completed_from_stored_result", job_id=job_id, worker_id=worker_id)
                return
            reason = f"worker {worker_id} left"
            try:
                await store.transition(
                    job_id, S.RETRYING, fence=lease.fence, allowed_from=[state], tenant=meta.get("tenant", ""),
                    expect={"attempts": attempt, "run_claim": claim},
                    fields={"retry_at": now_us(), "failure_reason": reason},
                    event={"reason": "worker_left", "worker_id": worker_id},
                    after=store.inflight_commands(worker_id, job_id, done=True))
            except (InvalidTransition, ConditionFailed, StaleFence) as exc:
                log.info("reaper.skip", job_id=job_id, error=str(exc))
                return
            self.rerouted += 1
            log.warning("reaper.rerouted", job_id=job_id, worker_id=worker_id, attempt=attempt, state=state.value)
            await engine.resubmit(job_id, meta.get("trace_id") or job_id, f"reroute:{job_id}:{attempt}")
        finally:
            with close_scope(2):
                await engine.leases.release(lease)


class IndexSweep:
    """Finds jobs whose index entries were lost (an index write on a cluster that failed after
    the job's own hash was written) by walking the job hashes themselves, a page per tick: a
    job the reconciler and replayer cannot see through the indexes is put back into them. A job
    that ended without its DLQ event going out gets it now."""

    def __init__(self, engine: Engine, page: int = 500) -> None:
        self.engine = engine
        self.page = page
        self.cursor = "0"
        self.repaired = 0

    async def tick(self, lease: Lease) -> None:
        store = self.engine.store
        self.cursor, metas = await store.scan_jobs(self.cursor, self.page)
        for meta in metas:
            try:
                if is_terminal(meta["state"]):
                    if meta.get("dlq_pending"):
                        await self.engine.resend_pending_dlq(meta["id"], meta)
                elif await store.repair_index(meta):
                    self.repaired += 1
                    log.warning("index_sweep.repaired", job_id=meta["id"], state=meta["state"])
            except Exception as exc:
                log.warning("index_sweep.job_failed", job_id=meta.get("id"), error=repr(exc))
