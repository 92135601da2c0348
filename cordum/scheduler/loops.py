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
from cordum.runtime.log import get_logger
from cordum.scheduler.engine import JOB_LOCK_TTL, SENDER, Engine
from cordum.store import keys
from cordum.store.jobs import InvalidTransition, StaleFence, now_us
from cordum.store.jobstate import TERMINAL, JobState, status_for_state
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
            # DLQ event first: if it cannot be sent, the job stays as it is and the next tick retries.
            await self.engine._emit_dlq(job_id, status_for_state(S.TIMEOUT), "timeout", reason)
            try:
                await store.transition(job_id, S.TIMEOUT, fence=lease.fence, fields={"failure_reason": reason},
                                       allowed_from=[state], event={"reason": reason})
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
            with trio.CancelScope(shield=True), trio.move_on_after(2):
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
        request = await store.get_request(job_id)
        if request is None:
            log.warning("replayer.request_missing", job_id=job_id)
            return
        packet = new_packet(request, sender_id=SENDER, trace_id=meta.get("trace_id") or job_id)
        # A fresh msg id: the original submit's id is still inside JetStream's dedup window.
        await self.engine.bus.publish(subjects.SUBMIT, encode(packet), msg_id=f"replay:{job_id}:{now_us()}")
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
            with trio.CancelScope(shield=True), trio.move_on_after(2):
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
