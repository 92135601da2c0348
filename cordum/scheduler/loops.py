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
from cordum.scheduler.engine import SENDER, Engine
from cordum.scheduler.output import skip_unchecked
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
    output_content: float = 30.0  # CORDUM_OUTPUT_CONTENT_TIMEOUT: a content check listed longer is overdue


class Reconciler:
    def __init__(self, engine: Engine, timeouts: Timeouts) -> None:
        self.engine = engine
        self.timeouts = timeouts

    async def tick(self, lease: Lease) -> None:
        now = now_us()
        for state, limit in ((S.DISPATCHED, self.timeouts.dispatch), (S.RUNNING, self.timeouts.running)):
            cutoff = now - int(limit * 1_000_000)
            overdue = await self.engine.store.ids_in_state(state, updated_before_us=cutoff)
            self.engine.metrics.stale_jobs.labels(state=state.value).set(len(overdue))
            for job_id in overdue:
                await self._guarded(job_id, f"timeout: {state.value} > {limit:g}s", expected=state, cutoff=cutoff)
        for job_id in await self.engine.store.due_deadlines(now):
            await self._guarded(job_id, "timeout: deadline expired")
        for job_id in await self.engine.store.dlq_pending(marked_before_us=now - 5_000_000):
            try:
                meta = await self.engine.store.get(job_id)
                if meta is None or not meta.get("dlq_pending"):
                    await self.engine.store.run_repeatable(self.engine.store.dlq_pending_commands(job_id, pending=False))
                else:
                    await self.engine.resend_pending_dlq(job_id, meta)
            except Exception as exc:
                log.warning("reconciler.dlq_resend_failed", job_id=job_id, error=repr(exc))
        try:  # output checks a scheduler left unfinished (or, told not to check, settle them skipped)
            if self.engine.output is not None:
                await self.engine.output.sweep()
            else:
                await skip_unchecked(self.engine, self.timeouts.output_content)
        except Exception as exc:
            log.warning("reconciler.output_sweep_failed", error=repr(exc))

    async def _guarded(self, job_id: str, reason: str, **kw: object) -> None:
        # One job's trouble must not stall the sweep (or make the leader step down and loop).
        try:
            await self._time_out(job_id, reason, **kw)  # type: ignore[arg-type]
        except Exception as exc:
            log.warning("reconciler.job_failed", job_id=job_id, error=repr(exc))

    async def _time_out(self, job_id: str, reason: str, *, expected: JobState | None = None, cutoff: int = 0) -> None:
        store = self.engine.store
        async with self.engine.lock_if_free(job_id) as lease:
            if lease is None:
                return  # someone is working on it right now; look again next tick
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
                dlq = await self.engine.end_job(
                    job_id, S.TIMEOUT, fence=lease.fence, code="timeout", reason=reason,
                    fields={"failure_reason": reason}, tenant=None, allowed_from=[state], event={"reason": reason},
                    after=store.inflight_commands(meta.get("worker_id", ""), job_id, done=True), send_dlq=False)
            except (InvalidTransition, StaleFence) as exc:
                log.info("reconciler.skip", job_id=job_id, error=str(exc))
                return
            self.engine.metrics.finished.labels(topic=topic, state=S.TIMEOUT.value).inc()
            self.engine.metrics.ran(topic, meta, state)
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
            if dlq is not None:
                await self.engine.send_dlq(job_id, *dlq, topic=topic)  # if it fails, the next pass sends it


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
        self.engine.metrics.orphan_replayed.labels(topic=meta.get("topic", "")).inc()
        log.info("replayer.resubmitted", job_id=job_id, state=state.value)

    async def _redispatch(self, job_id: str) -> None:
        async with self.engine.lock_if_free(job_id) as lease:
            if lease is not None and await self.engine.redispatch(job_id, lease):
                self.replayed += 1
                log.info("replayer.redispatched", job_id=job_id)


class SnapshotWriter:
    def __init__(self, engine: Engine, redis: Redis, writer_id: str) -> None:
        self.engine = engine
        self.redis = redis
        self.writer_id = writer_id

    async def tick(self, lease: Lease) -> None:
        snapshot = self.engine.registry.snapshot(self.engine.pools(), trio.current_time(),
                                                 writer_id=self.writer_id, wall_time=time.time())
        await write_snapshot(self.redis, snapshot)


TEND_AGE_US = 10_000_000  # a live worker's job this old with its result stored: the message was lost
UNCLAIMED_AGE_US = 60_000_000  # ... this old, not started while the worker had room: the dispatch was lost


class WorkerReaper:
    """Moves on the jobs sent to workers that left (DESIGN.md §4.13: worker ids change across
    restarts, so nobody will ever read a departed worker's subject).

    A worker that said "stopped" is gone. Our SDK's workers keep a presence key in Redis: such a
    worker is gone when its key is missing (twice, a third of a TTL apart: a key lost with a Redis
    restart comes back with the next renewal); the worker stops its own handlers before the key can
    expire, so a job is never taken from a handler still running. A worker on the public CAP SDK is
    gone when it has been silent past the worker TTL, judged only by a replica that has listened
    for a TTL and still hears other heartbeats. A worker that said "draining" finishes what it
    started: only the jobs it has not claimed move.

    Each job still DISPATCHED or RUNNING on a gone worker goes back to RETRYING and is submitted
    again, unless its result is already stored (then that result finishes it); every move is one
    guarded, fenced write that happens only if the attempt, its claim and its stored result are as
    read. For live workers the reaper also finishes jobs whose result is stored but whose message
    never came, re-routes jobs whose dispatch was lost (not started for a minute while the worker
    had room), and drops ended jobs from the worker's list."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.rerouted = 0
        self._absent_since: dict[str, float] = {}

    async def tick(self, lease: Lease) -> None:
        now = trio.current_time()
        for worker_id, last_dispatch in await self.engine.store.workers_with_inflight():
            try:
                await self._look_at(worker_id, last_dispatch, now)
            except Exception as exc:  # one worker's trouble must not stop the others being looked at
                log.warning("reaper.worker_failed", worker_id=worker_id, error=repr(exc))

    async def _look_at(self, worker_id: str, last_dispatch: int, now: float) -> None:
        store = self.engine.store
        status = await self.status(worker_id, now)
        if status is WorkerStatus.ALIVE:
            await self._tend(worker_id)
            return
        if status is WorkerStatus.UNKNOWN:
            return
        job_ids = [job_id for job_id, _ in await store.inflight(worker_id)]
        for job_id in job_ids:
            try:
                await self._move_on(worker_id, job_id, draining=status is WorkerStatus.DRAINING)
            except Exception as exc:
                log.warning("reaper.job_failed", job_id=job_id, worker_id=worker_id, error=repr(exc))
        if not job_ids and status is WorkerStatus.GONE:
            await store.forget_worker(worker_id, last_dispatch)
            self._absent_since.pop(worker_id, None)

    async def status(self, worker_id: str, now: float) -> WorkerStatus:
        registry = self.engine.registry
        heard = registry.status(worker_id, now)
        if registry.said_stopped(worker_id):
            return WorkerStatus.GONE
        if heard is WorkerStatus.DRAINING:
            return heard
        if registry.keeps_presence(worker_id) or heard is WorkerStatus.UNKNOWN:
            if await self.engine.store.worker_present(worker_id):
                self._absent_since.pop(worker_id, None)
                return WorkerStatus.ALIVE
            first_missed = self._absent_since.setdefault(worker_id, now)
            if now - first_missed < registry.ttl / 3:
                return WorkerStatus.UNKNOWN
            if heard is WorkerStatus.UNKNOWN and not (registry.warmed_up(now) and registry.hearing(now)):
                return WorkerStatus.UNKNOWN
            return WorkerStatus.GONE
        if heard is WorkerStatus.GONE and not registry.hearing(now):
            return WorkerStatus.UNKNOWN  # this replica hears nobody: it cannot tell silence from deafness
        return heard

    async def _tend(self, worker_id: str) -> None:
        engine, store = self.engine, self.engine.store
        old = await store.inflight(worker_id, dispatched_before_us=now_us() - TEND_AGE_US)
        if not old:
            return
        metas = await store.get_many([job_id for job_id, _ in old])
        ended = []
        for (job_id, dispatched_at), meta in zip(old, metas):
            if meta is None or is_terminal(meta["state"]) or meta.get("worker_id") != worker_id:
                ended.append(job_id)
                continue
            attempt = str(meta.get("attempts", ""))
            if meta.get("run_result") and str(meta.get("run_result_attempt")) == attempt:
                async with engine.lock_if_free(job_id) as lease:
                    if lease is not None and await engine.complete_from_store(await store.get(job_id) or meta, lease):
                        log.info("reaper.completed_from_stored_result", job_id=job_id, worker_id=worker_id)
            elif (self.engine.registry.keeps_presence(worker_id) and dispatched_at < now_us() - UNCLAIMED_AGE_US
                  and meta.get("state") in (S.DISPATCHED.value, S.RUNNING.value)
                  and not str(meta.get("run_claim", "")).endswith(f":{attempt}")
                  and self.engine.registry.has_room(worker_id)):
                log.warning("reaper.dispatch_lost", job_id=job_id, worker_id=worker_id)
                await self._move_on(worker_id, job_id, draining=True)  # only if still unclaimed
        if ended:
            await store.run_repeatable([command for job_id in ended
                                        for command in store.inflight_commands(worker_id, job_id, done=True)])

    async def _move_on(self, worker_id: str, job_id: str, *, draining: bool) -> None:
        engine, store = self.engine, self.engine.store
        async with engine.lock_if_free(job_id) as lease:
            if lease is None:
                return  # being worked on (its result, say): look again next tick
            meta = await store.get(job_id)
            state = S(meta["state"]) if meta else None
            if state not in (S.DISPATCHED, S.RUNNING) or meta.get("worker_id") != worker_id:
                if meta is not None and is_terminal(meta["state"]):
                    await engine.resend_pending_dlq(job_id, meta)
                await store.run_repeatable(store.inflight_commands(worker_id, job_id, done=True))
                return
            attempt, claim = int(meta.get("attempts") or 0), meta.get("run_claim", "")
            if draining and claim == f"{worker_id}:{attempt}":
                return  # it runs there, and the worker finishes it before it stops
            if await engine.complete_from_store(meta, lease):
                log.info("reaper.completed_from_stored_result", job_id=job_id, worker_id=worker_id)
                return
            reason = f"worker {worker_id} left" if not draining or claim else f"dispatch to {worker_id} not taken"
            try:
                await store.transition(
                    job_id, S.RETRYING, fence=lease.fence, allowed_from=[state], tenant=meta.get("tenant", ""),
                    expect={"attempts": attempt, "run_claim": claim,
                            "run_result_attempt": meta.get("run_result_attempt", "")},
                    fields={"retry_at": now_us(), "failure_reason": reason},
                    event={"reason": "worker_left", "worker_id": worker_id},
                    after=store.inflight_commands(worker_id, job_id, done=True))
            except (InvalidTransition, ConditionFailed, StaleFence) as exc:
                log.info("reaper.skip", job_id=job_id, error=str(exc))
                return
            self.rerouted += 1
            log.warning("reaper.rerouted", job_id=job_id, worker_id=worker_id, attempt=attempt, state=state.value)
            await engine.resubmit(job_id, meta.get("trace_id") or job_id, f"reroute:{job_id}:{attempt}")


KNOWN_STATES = frozenset(s.value for s in JobState)


class IndexSweep:
    """Finds jobs whose index entries were lost (an index write on a cluster that failed after
    the job's own hash was written) by walking the job hashes themselves, a page per step: a live
    job the reconciler, replayer or reaper cannot see through the indexes is put back into them."""

    def __init__(self, engine: Engine, page: int = 1000) -> None:
        self.engine = engine
        self.page = page
        self.cursor = "0"
        self.repaired = 0

    async def tick(self, lease: Lease) -> None:
        store = self.engine.store
        self.cursor, metas = await store.scan_jobs(self.cursor, self.page)
        known = [meta for meta in metas if meta.get("state") in KNOWN_STATES]  # an unknown state is left alone
        for job_id in await store.repair_indexes(known):
            self.repaired += 1
            log.warning("index_sweep.repaired", job_id=job_id)
