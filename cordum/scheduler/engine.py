"""The scheduler's job handling: submit → safety → route → dispatch; results; cancels.

Every step that touches a job runs under its lock `cordum:scheduler:job:<id>` and writes with
the lock's fencing token, so a replica that lost the lock (paused, partitioned) can no longer
change the job. Redelivery is safe at every point: the job's state says what was already done
(DISPATCHED/RUNNING/terminal → nothing to do), and a result for a terminal job is ignored.
"""

from __future__ import annotations

import json
import random
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, AsyncIterator, Awaitable, Callable, Sequence

import trio
from google.protobuf import json_format

from cordum.agent.v1.buspacket_pb2 import BusPacket
from cordum.agent.v1.job_pb2 import JobRequest, JobResult, JobStatus
from cordum.agent.v1.safety_pb2 import PolicyCheckRequest
from cordum.infra.bus import Bus, Message
from cordum.infra.metrics import Both, Metrics
from cordum.infra.redis import NoScriptError, RedisError, RedisUnavailable
from cordum.protocol import pointers, subjects
from cordum.protocol.packets import encode, new_packet
from cordum.runtime.consumer import Retry
from cordum.runtime.lease import Lease, LeaseLost, Leases
from cordum.runtime.lifecycle import close_scope
from cordum.runtime.log import get_logger
from cordum.safety.client import SafetyClient, SafetyDecision, Verdict
from cordum.scheduler.dispatches import Dispatched, RecentDispatches
from cordum.scheduler.registry import WorkerRegistry
from cordum.scheduler.reuse import NewestSnapshot, newest_snapshot_later, stored_decision
from cordum.runtime.audit import AuditLog, new_event
from cordum.scheduler.routing import NO_POOLS, NoRoute, Pools, WorkerInfo, pick_worker, topic_label
from cordum.scheduler.waiting import WaitingJobs
from cordum.store import keys
from cordum.store.dlq import dlq_packet
from cordum.store.jobs import (
    ConditionFailed, InvalidTransition, JobNotFound, JobStore, LockHeld, StaleFence, now_us, result_from_json,
)
from cordum.store.jobstate import (
    MAX_SCHEDULING_RETRIES, RETRY_LOCK_BUSY_S, RETRY_NO_WORKERS_S, RETRY_SAFETY_THROTTLE_S, TERMINAL, JobState,
    backoff_delay, can_transition, retries_left, scheduling_retries_exhausted, state_for_result,
    status_for_state,
)
from cordum.store.output import CHECK_FIELD, DUE, SKIPPED
from cordum.store.validate import job_id_problems, tenant_problems, validate_job_request, validate_job_result

if TYPE_CHECKING:
    from cordum.scheduler.output import OutputReview

log = get_logger("scheduler")

SENDER = "cordum-scheduler"
JOB_LOCK_TTL = 30.0
LOCK_WAIT = 2.0  # how long a handler waits for a busy job lock before asking for redelivery
UNREAD = object()  # a job's meta not read along with its lock (see Engine._lock_and_read)
S = JobState


@dataclass
class EngineConfig:
    fail_open: bool = False  # POLICY_CHECK_FAIL_MODE=open: dispatch when the kernel is unreachable
    reuse_submit_decision: bool = True  # SCHEDULER_REUSE_SUBMIT_DECISION (cordum/scheduler/reuse.py)
    # How long a job found waiting for a worker is answered from memory (cordum/scheduler/waiting.py);
    # the service keeps it at most a third of SCHEDULER_PENDING_AGE.
    route_wait_refresh: float = 10.0


class _TopicBounded:
    """A metric whose `topic` label takes only the topics the pools file routes; any other topic
    (anyone may publish `job.<anything>`) counts as `other`, so series stay bounded."""

    def __init__(self, metric: Any, known: Callable[[], Pools]) -> None:
        self._metric = metric
        self._known = known

    def labels(self, *, topic: str, **rest: str) -> Any:
        return self._metric.labels(topic=topic_label(self._known(), topic), **rest)


class _Rejections:
    """Cordum's `cordum_validation_rejections_total` (no labels) with, for one release, the
    per-kind counter it had before."""

    def __init__(self, metrics: Metrics) -> None:
        self._total = metrics.counter("cordum_validation_rejections_total", "Bus packets refused by CAP validation")
        self._by_kind = metrics.counter("cordum_scheduler_validation_rejections_total",
                                        "Deprecated: cordum_validation_rejections_total by kind", ["kind"])

    def labels(self, *, kind: str) -> Both:
        return Both(self._total, self._by_kind.labels(kind=kind))


class SchedulerMetrics:
    def __init__(self, metrics: Metrics, pools: Callable[[], Pools] | None = None) -> None:
        known = pools or (lambda: NO_POOLS)

        def by_topic(metric: Any) -> _TopicBounded:
            return _TopicBounded(metric, known)

        self.finished = by_topic(metrics.counter("cordum_scheduler_jobs_finished_total", "Jobs this replica brought to a final state", ["topic", "state"]))
        # Cordum's names (operators' boards and alerts read them); the names these had before
        # count too, for one release.
        self.received = by_topic(metrics.renamed_counter(
            "cordum_jobs_received_total", "cordum_scheduler_jobs_received_total", "Job requests the scheduler handled", ["topic"]))
        self.dispatched = by_topic(metrics.renamed_counter(
            "cordum_jobs_dispatched_total", "cordum_scheduler_jobs_dispatched_total", "Jobs dispatched to a worker", ["topic"]))
        self.completed = by_topic(metrics.renamed_counter(
            "cordum_jobs_completed_total", "cordum_scheduler_jobs_completed_total", "Worker results applied, by status",
            ["topic", "status"]))
        self.denied = by_topic(metrics.renamed_counter(
            "cordum_safety_denied_total", "cordum_scheduler_safety_denied_total", "Jobs the policy denied before dispatch",
            ["topic"]))
        self.unavailable = by_topic(metrics.renamed_counter(
            "cordum_safety_unavailable_total", "cordum_scheduler_safety_unavailable_total",
            "Jobs held back because the safety kernel could not be asked", ["topic"]))
        self.rejected = _Rejections(metrics)
        self.ignored = metrics.counter("cordum_scheduler_results_ignored_total", "Results for unknown or finished jobs", ["reason"])
        self.fail_open = by_topic(metrics.counter(
            "cordum_input_fail_open_total", "Jobs dispatched unchecked while the kernel was away (POLICY_CHECK_FAIL_MODE=open)",
            ["topic"]))
        self.dlq_emit_failures = by_topic(metrics.counter(
            "cordum_dlq_emit_failures_total", "DLQ events that could not be published (the reconciler sends them later)",
            ["topic"]))
        self.dispatch_rollback = by_topic(metrics.counter(
            "cordum_scheduler_dispatch_rollback_total", "Dispatches rolled back because the publish to the worker failed",
            ["topic"]))
        self.orphan_replayed = by_topic(metrics.counter(
            "cordum_scheduler_orphan_replayed_total", "Stuck PENDING/SCHEDULED/RETRYING jobs the pending replayer re-submitted",
            ["topic"]))
        self.lock_wait = metrics.histogram(
            "cordum_scheduler_job_lock_wait_seconds", "Time to get a job's lock (with its record, when read together)",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))
        self.decisions_reused = metrics.counter(
            "cordum_scheduler_safety_decisions_reused_total",
            "Jobs dispatched under their submit-time policy decision, the policy that made it being the newest loaded")
        self.one_step = metrics.counter(
            "cordum_scheduler_results_one_step_total",
            "Worker successes written in one step by the replica that dispatched the job, without its lock")
        self.lock_abandoned = metrics.counter(
            "cordum_scheduler_job_lock_abandoned_total", "Job locks lost mid-work (their renewal failed): the work is retried")
        self.stale_jobs = metrics.gauge(
            "cordum_scheduler_stale_jobs", "Jobs the reconciler's last pass found overdue, by state", ["state"])
        self.latency = by_topic(metrics.histogram("cordum_scheduler_dispatch_latency_seconds", "Submit handling to dispatch", ["topic"],
                                                  buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)))
        # From the job's stored timestamps (its hash's `updated_at`, in hand with the meta the
        # handlers read anyway): waits for a worker, a lock or a policy retry count in here.
        self.submit_to_dispatch = by_topic(metrics.histogram(
            "cordum_scheduler_submit_to_dispatch_seconds",
            "From a job becoming due (submitted, approved, retry time reached) to its dispatch", ["topic"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)))
        self.dispatch_to_terminal = by_topic(metrics.histogram(
            "cordum_scheduler_dispatch_to_terminal_seconds",
            "From a job's dispatch to its final state (a worker's result or a timeout)", ["topic"],
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)))

    def ran(self, topic: str, meta: dict, state: JobState) -> None:
        """A job left DISPATCHED/RUNNING for a final state: in those two states the hash's
        `updated_at` is the dispatch (DISPATCHED, then RUNNING right after the publish)."""
        since = int(meta.get("updated_at") or 0)
        if since and state in (S.DISPATCHED, S.RUNNING):
            self.dispatch_to_terminal.labels(topic=topic).observe(max(now_us() - since, 0) / 1_000_000)


class Engine:
    def __init__(
        self, *, store: JobStore, bus: Bus, leases: Leases, safety: SafetyClient, registry: WorkerRegistry,
        pools: Callable[[], Pools], metrics: SchedulerMetrics, config: EngineConfig,
    ) -> None:
        self.store = store
        self.bus = bus
        self.leases = leases
        self.safety = safety
        self.registry = registry
        self.pools = pools
        self.metrics = metrics
        self.config = config
        self.audit: AuditLog | None = None  # policy decisions go to the tenant's audit chain
        self.output: OutputReview | None = None  # the output policy (scheduler.output), when enabled
        self.dispatches = RecentDispatches()  # for applying a plain success in one step (on_result)
        self.waiting = WaitingJobs(config.route_wait_refresh)  # jobs seen waiting for a worker (on_submit)

    # ---- locking ----------------------------------------------------------------------------

    async def _lock(self, job_id: str) -> Lease:
        """Wait briefly for the job lock (a result often arrives while its dispatch still holds it)."""
        lease = await self.leases.acquire_within(keys.job_lock(job_id), JOB_LOCK_TTL, LOCK_WAIT)
        if lease is None:
            raise Retry(RETRY_LOCK_BUSY_S, f"job {job_id} is locked")
        return lease

    @asynccontextmanager
    async def lock_if_free(self, job_id: str) -> AsyncIterator[Lease | None]:
        """The job's lock if nobody holds it (else None: a sweep looks again next time),
        released on the way out within the shutdown deadline."""
        lease = await self.leases.try_acquire(keys.job_lock(job_id), JOB_LOCK_TTL)
        try:
            yield lease
        finally:
            if lease is not None:
                with close_scope(2):
                    await self.leases.release(lease)

    async def _lock_and_read(self, job_id: str) -> tuple[Lease, Any]:
        """The job's lock and its meta as of the grant, in one round trip: on one server the
        read is queued right behind the acquire, in the same pipeline. On a cluster (the two keys
        live on different nodes), or when the lock is busy, the meta is UNREAD: read it after."""
        started = trio.current_time()
        try:
            return await self._lock_and_read_now(job_id)
        finally:
            self.metrics.lock_wait.observe(trio.current_time() - started)

    async def _lock_and_read_now(self, job_id: str) -> tuple[Lease, Any]:
        if self.store.on_cluster:
            return await self._lock(job_id), UNREAD
        granted = self.leases.try_acquire_later(keys.job_lock(job_id), JOB_LOCK_TTL)
        read = self.store.get_later(job_id)
        try:
            lease = await granted()
        except NoScriptError:  # a restarted server: the plain path loads the script
            lease = None
        if lease is None:
            return await self._lock(job_id), UNREAD
        try:
            return lease, await read()
        except (RedisError, *RedisUnavailable):
            return lease, UNREAD  # the work reads it again, under the lock it holds

    async def _locked(self, job_id: str, work: Callable[[Lease], Awaitable[None]], *,
                      lease: Lease | None = None) -> None:
        lease = lease or await self._lock(job_id)
        try:
            async with self.leases.holding(lease):
                await work(lease)
        except LeaseLost:
            self.metrics.lock_abandoned.inc()
            raise Retry(1.0, f"lost the lock of job {job_id}") from None

    def _release_along(self, lease: Lease) -> Callable[[], Callable[[], Awaitable[Any]]] | None:
        """The lock's release, to go in the round trip of its last write (`JobStore.transition`'s
        `along`): one round trip fewer per handled message. Not on a cluster (the lock and the
        job live on different nodes)."""
        if self.store.on_cluster:
            return None
        return lambda: self.leases.release_later(lease)

    # ---- bus handlers -------------------------------------------------------------------------

    async def on_submit(self, packet: BusPacket, msg: Message) -> None:
        if packet.WhichOneof("payload") != "job_request":
            return
        request = packet.job_request
        problems = validate_job_request(request) + tenant_problems(request)
        if problems:
            self.metrics.rejected.labels(kind="job_request").inc()
            log.warning("scheduler.invalid_request", job_id=request.job_id, problems=problems)
            # A job we know of must not wait forever: fail it, visibly. An id that is itself
            # malformed names no job we could have stored, and would make a bad lock key.
            if not job_id_problems(request.job_id):
                await self._locked(request.job_id, lambda lease: self._reject(request, problems, lease))
            return
        started = trio.current_time()
        if self.waiting.recent(request.job_id, started) and self._unroutable(request, started):
            raise Retry(RETRY_NO_WORKERS_S, "still no worker for it")  # seen waiting moments ago
        newest = self._newest_snapshot_later()
        lease, meta = await self._lock_and_read(request.job_id)
        await self._locked(request.job_id,
                           lambda lease: self._handle_request(packet, request, lease, started, meta, newest),
                           lease=lease)

    def _route(self, request: JobRequest, now: float) -> WorkerInfo:
        """The worker to run it (pure: the pools and the live workers this replica knows); NoRoute."""
        return pick_worker(self.pools(), self.registry.alive(now), topic=request.topic,
                           requires=request.meta.requires, labels=request.labels)

    def _unroutable(self, request: JobRequest, now: float) -> bool:
        try:
            self._route(request, now)
        except NoRoute:
            return True
        return False

    def _newest_snapshot_later(self) -> NewestSnapshot | None:
        """The newest policy snapshot any kernel loaded, queued for the next Redis round trip (the
        one that takes the job's lock); awaited only when a stored decision could be reused. None
        where nothing is reused (turned off; on a cluster the list lives on another node)."""
        if not self.config.reuse_submit_decision or self.store.on_cluster:
            return None
        return newest_snapshot_later(self.store.redis)

    async def _reject(self, request: JobRequest, problems: list[str], lease: Lease) -> None:
        meta = await self.store.get(request.job_id)
        if meta is None or S(meta["state"]) in TERMINAL:
            return
        await self._finish(request.job_id, meta.get("topic", ""), S.FAILED, lease.fence, "invalid_request",
                           "; ".join(problems))

    async def on_result(self, packet: BusPacket, msg: Message) -> None:
        if packet.WhichOneof("payload") != "job_result":
            return
        result = packet.job_result
        if packet.sender_id == SENDER and result.worker_id == SENDER:
            return  # ours (an approved gate's or a checked output's): written before it was sent
        problems = validate_job_result(result) + (job_id_problems(result.job_id) if result.job_id else [])
        if problems:
            # e.g. the gateway's synthetic CANCELLED result has no worker id: not for us
            self.metrics.rejected.labels(kind="job_result").inc()
            log.debug("scheduler.invalid_result", job_id=result.job_id, problems=problems)
            return
        attempt = subjects.attempt_of(msg.headers)
        sent = self.dispatches.peek(result.job_id)
        if sent is not None and _plain_success_of(result, sent, attempt):
            self.dispatches.forget(result.job_id)
            if await self._apply_plain_success(result, sent):
                return
        lease, meta = await self._lock_and_read(result.job_id)
        known = None if meta is UNREAD else meta
        await self._locked(result.job_id, lambda lease: self.apply_result(result, lease, attempt=attempt, meta=known,
                                                                          release_early=True), lease=lease)

    async def on_cancel(self, packet: BusPacket, msg: Message) -> None:
        if packet.WhichOneof("payload") != "job_cancel" or not packet.job_cancel.job_id:
            return
        try:
            await self.store.cancel(packet.job_cancel.job_id, packet.job_cancel.reason or "cancelled")
        except JobNotFound:
            log.info("scheduler.cancel_unknown_job", job_id=packet.job_cancel.job_id)

    # ---- submit -----------------------------------------------------------------------------

    async def _handle_request(self, packet: BusPacket, request: JobRequest, lease: Lease, started: float,
                              meta: Any = UNREAD, newest: NewestSnapshot | None = None) -> None:
        try:
            await self._process_request(packet, request, lease, started, meta, newest)
        except InvalidTransition as exc:
            # The job moved on meanwhile (cancelled through the API, say): nothing left to do.
            log.info("scheduler.request_superseded", job_id=request.job_id, error=str(exc))

    async def _process_request(self, packet: BusPacket, request: JobRequest, lease: Lease, started: float,
                               meta: Any = UNREAD, newest: NewestSnapshot | None = None) -> None:
        job_id, fence = request.job_id, lease.fence
        if meta is UNREAD:
            meta = await self.store.get(job_id)
        state = S(meta["state"]) if meta else None
        if state in TERMINAL:
            await self.resend_pending_dlq(job_id, meta)  # a redelivery: only its DLQ event may be owed
            return
        if state in (S.DISPATCHED, S.RUNNING):
            return  # a redelivery of work already done
        if state is S.APPROVAL_REQUIRED:
            return  # held until a human approves; the approval re-submits it
        if state is S.RETRYING and meta is not None:
            wait = (int(meta.get("retry_at") or 0) - now_us()) / 1_000_000
            if wait > 0.01:
                raise Retry(wait, f"job {job_id} retries in {wait:.1f}s")
        self.metrics.received.labels(topic=request.topic).inc()
        tenant = _tenant_of(request)
        if meta is None:  # published straight to the bus (workflow engine, other producers)
            await self.store.create(job_id, S.PENDING, request=request, fields=_fields_from_request(request, packet.trace_id))
            meta = {"attempts": 0, "tenant": tenant, "topic": request.topic, "updated_at": now_us()}
        due_us = _due_since(meta)
        if scheduling_retries_exhausted(int(meta.get("attempts", 0))):
            await self._finish(job_id, request.topic, S.FAILED, fence, "max_scheduling_retries",
                               f"gave up after {MAX_SCHEDULING_RETRIES} scheduling attempts")
            return

        decision, reused = await self._safety(request, meta, tenant, newest)
        if self.audit is not None:
            self.audit.record(new_event(tenant, "policy_decision", "dispatch", job_id=job_id, topic=request.topic,
                                        verdict=decision.verdict.value, reason=decision.reason,
                                        rule_id=decision.rule_id, snapshot=decision.snapshot,
                                        principal=request.principal_id))
        if decision.verdict is Verdict.UNAVAILABLE:
            self.metrics.unavailable.labels(topic=request.topic).inc()
            if not self.config.fail_open:
                raise Retry(RETRY_SAFETY_THROTTLE_S, decision.reason)
            self.metrics.fail_open.labels(topic=request.topic).inc()
            decided: dict = {"safety_bypassed": True}
            recorded: list = []
        elif reused:  # the stored fields stand as written; the job's trace shows it was reused
            decided = {}
            recorded = self.store.decision_commands(job_id, {**_decision_record(decision), "reused": True})
        else:
            # Written together with the state change that follows the decision: no extra round trip.
            decided = _decision_fields(decision)
            recorded = self.store.decision_commands(job_id, _decision_record(decision))
        if decision.verdict is Verdict.THROTTLE:
            raise Retry(RETRY_SAFETY_THROTTLE_S, "throttled by policy")
        if decision.verdict is Verdict.DENY:  # a workflow approval gate too: policy first
            self.metrics.denied.labels(topic=request.topic).inc()
            await self._finish(job_id, request.topic, S.DENIED, fence, "safety_denied", decision.reason or "denied by policy",
                               tenant=tenant, fields=decided, after=recorded)
            return
        gate = request.topic == subjects.APPROVAL_GATE_TOPIC
        if decision.verdict is Verdict.REQUIRE_APPROVAL or (gate and not _approved(request, meta)):
            await self.store.transition(job_id, S.APPROVAL_REQUIRED, fence=fence, tenant=tenant, after=recorded,
                                        fields={**decided, "approval_status": "pending", "safety_approval_required": True})
            return
        if gate:  # approved: a gate has no work to do, no worker ever sees it
            await self._complete_gate(packet, request, fence, tenant, decided, recorded)
            return
        max_retries = _max_retries(decision)
        if max_retries and not retries_left(int(meta.get("retries") or 0) - 1, max_retries):
            # Retried more often than the policy (changed since) allows.
            await self._finish(job_id, request.topic, S.FAILED, fence, "max_retries_exceeded",
                               f"the policy allows {max_retries} retries", tenant=tenant, fields=decided, after=recorded)
            return

        budget_ms = request.budget.deadline_ms
        if budget_ms > 0 and not meta.get("deadline_unix"):
            await self.store.set_deadline(job_id, now_us() + budget_ms * 1000, fence=fence)
        try:
            worker = self._route(request, trio.current_time())
        except NoRoute as exc:
            # Nothing can run it right now: it stays PENDING and this message comes back shortly
            # (answered from memory until the next refresh: `waiting`). The mark tells the
            # replayer the job is not lost, so it adds no second copy. Logged when the job starts
            # waiting; its refreshes only at debug level (a backlog would fill the log).
            say = log.debug if meta.get("route_wait_at") else log.info
            say("scheduler.no_route", job_id=job_id, code=exc.code, reason=str(exc))
            await self.store.set_fields(job_id, {**decided, "route_wait_at": now_us(), "route_wait_reason": exc.code},
                                        fence=fence)
            self.waiting.note(job_id, trio.current_time())
            raise Retry(RETRY_NO_WORKERS_S, str(exc)) from None
        self.waiting.forget(job_id)
        await self._dispatch(packet, request, worker.worker_id, lease, started, tenant=tenant, fields=decided,
                             after=recorded, due_us=due_us, snapshot=decision.snapshot)

    async def _dispatch(self, packet: BusPacket, request: JobRequest, worker_id: str, lease: Lease, started: float,
                        *, tenant: str, fields: dict, after: list, due_us: int = 0, snapshot: str = "") -> None:
        job_id, fence = request.job_id, lease.fence
        # DISPATCHED is written before the publish: a redelivered submit then finds the job
        # dispatched and does nothing, so a job is never sent twice by the scheduler. (The
        # spec's SCHEDULED step in between is skipped: it would cost a write and tell nothing.)
        after = [*after, *self.store.inflight_commands(worker_id, job_id, done=False)]
        if self.output is not None:  # is its output to be checked before anyone relies on it?
            fields = {**fields, **self.output.dispatch_fields(snapshot)}
        dispatched = await self.store.transition(job_id, S.DISPATCHED, fence=fence, tenant=tenant, after=after,
                                                 fields={**fields, "worker_id": worker_id})
        try:
            await self.send_to_worker(request, worker_id, packet.trace_id or job_id, dispatched.attempts)
        except TimeoutError as exc:
            # No ack: the stream may or may not have it. Leave the job DISPATCHED; the replayer
            # re-sends it under the same message id, which the stream drops if it has it already.
            log.warning("scheduler.dispatch_unconfirmed", job_id=job_id, worker_id=worker_id, error=repr(exc))
            return
        except Exception as exc:
            self.metrics.dispatch_rollback.labels(topic=request.topic).inc()
            await self.store.transition(job_id, S.SCHEDULED, fence=fence, tenant=tenant, event={"rollback": repr(exc)},
                                        after=self.store.inflight_commands(worker_id, job_id, done=True))
            log.warning("scheduler.dispatch_failed", job_id=job_id, worker_id=worker_id, error=repr(exc))
            raise Retry(backoff_delay(dispatched.attempts, rand=random.random()), "dispatch publish failed") from None
        confirmed = await self._confirm_dispatch(job_id, request.topic, worker_id, fence, tenant,
                                                 along=self._release_along(lease))
        # Remembered once the lock is given back (in the confirmation's round trip): a result that
        # came sooner took the locked path, which waited for the lock instead of finding it held.
        if confirmed and not self.store.on_cluster and fields.get(CHECK_FIELD) != DUE:
            self.dispatches.remember(job_id, Dispatched(tenant, request.topic, worker_id, dispatched.attempts,
                                                        packet.trace_id or job_id, now_us()))
        self.metrics.latency.labels(topic=request.topic).observe(trio.current_time() - started)
        log.debug("job.dispatched", job_id=job_id, trace_id=packet.trace_id or job_id, worker_id=worker_id,
                  attempt=dispatched.attempts)
        if due_us:
            self.metrics.submit_to_dispatch.labels(topic=request.topic).observe(max(now_us() - due_us, 0) / 1_000_000)

    async def send_to_worker(self, request: JobRequest, worker_id: str, trace_id: str, attempt: int) -> None:
        dispatch = new_packet(request, sender_id=SENDER, trace_id=trace_id)
        await self.bus.publish(subjects.worker_subject(worker_id), encode(dispatch),
                               msg_id=f"dispatch:{request.job_id}:{attempt}",
                               headers={subjects.ATTEMPT_HEADER: str(attempt)})

    async def _confirm_dispatch(self, job_id: str, topic: str, worker_id: str, fence: int, tenant: str, *,
                                along: Callable[[], Callable[[], Awaitable[Any]]] | None = None) -> bool:
        """RUNNING, now that the dispatch is published; False when the job had moved on already."""
        self.registry.dispatched(worker_id)
        try:
            await self.store.transition(job_id, S.RUNNING, fence=fence, allowed_from=[S.DISPATCHED], tenant=tenant,
                                        along=along)
            moved = True
        except InvalidTransition:
            moved = False  # the worker was faster: its result already moved the job on
        self.metrics.dispatched.labels(topic=topic).inc()
        return moved

    async def redispatch(self, job_id: str, lease: Lease) -> bool:
        """Re-send a job left DISPATCHED without confirmation (its publish timed out, or its
        scheduler died between recording and sending) to the same worker under the same message
        id: the stream keeps one copy. Returns whether it was sent."""
        meta = await self.store.get(job_id)
        request = await self.store.get_request(job_id)
        if meta is None or request is None or meta["state"] != S.DISPATCHED.value or not meta.get("worker_id"):
            return False
        await self.send_to_worker(request, meta["worker_id"], meta.get("trace_id") or job_id, int(meta.get("attempts") or 0))
        await self._confirm_dispatch(job_id, meta.get("topic", ""), meta["worker_id"], lease.fence, meta.get("tenant", ""))
        return True

    async def _complete_gate(self, packet: BusPacket, request: JobRequest, fence: int, tenant: str, decided: dict,
                             recorded: list) -> None:
        """An approved workflow approval gate (jobpath §3.3 e): its synthetic result goes out on
        `sys.job.result` first, then the job is SUCCEEDED. A failed publish is retried with the
        message; a crash in between re-publishes (same msg id: JetStream keeps one)."""
        job_id = request.job_id
        result = JobResult(job_id=job_id, status=JobStatus.JOB_STATUS_SUCCEEDED, worker_id=SENDER)
        out = new_packet(result, sender_id=SENDER, trace_id=packet.trace_id or job_id)
        await self.bus.publish(subjects.RESULT, encode(out), msg_id=subjects.msg_id_for(out, subjects.RESULT))
        await self.end_job(job_id, S.SUCCEEDED, fence=fence, code="", reason="", tenant=tenant, after=recorded,
                           fields={**decided, "worker_id": SENDER})
        self.metrics.finished.labels(topic=request.topic, state=S.SUCCEEDED.value).inc()

    async def _safety(self, request: JobRequest, meta: dict, tenant: str,
                      newest: NewestSnapshot | None = None) -> tuple[SafetyDecision, bool]:
        """The policy's decision for dispatching the job, and whether it is the stored one reused."""
        if _approved(request, meta):
            return SafetyDecision(Verdict.ALLOW, "approval granted"), False
        if newest is not None and meta.get("safety_snapshot"):
            stored = stored_decision(meta, await newest())
            if stored is not None:
                self.metrics.decisions_reused.inc()
                return stored, True
        check = PolicyCheckRequest(
            job_id=request.job_id, topic=request.topic, tenant=tenant, priority=request.priority,
            budget=request.budget, principal_id=request.principal_id, labels=dict(request.labels),
            memory_id=request.memory_id, meta=request.meta,
        )
        return await self.safety.check(check), False

    # ---- results ----------------------------------------------------------------------------

    async def _apply_plain_success(self, result: JobResult, sent: Dispatched) -> bool:
        """A success from the worker this replica sent the job to, for the attempt it sent
        (`_plain_success_of`): written in one script, made only if the job is still DISPATCHED or
        RUNNING with that attempt and worker, no output check is due and nobody holds its lock
        (one round trip where the locked path takes two, and three scripts fewer). False when any
        of that is not so: nothing was written, and the locked path decides."""
        job_id = result.job_id
        try:
            moved = await self.store.transition(
                job_id, S.SUCCEEDED, fields=_result_fields(result), tenant=sent.tenant,
                after=self._result_after(result, sent.worker_id),
                allowed_from=[S.DISPATCHED, S.RUNNING], unlocked=keys.job_lock(job_id),
                expect={"attempts": sent.attempt, "worker_id": sent.worker_id, CHECK_FIELD: ""},
            )
        except (LockHeld, InvalidTransition, ConditionFailed, JobNotFound, StaleFence):
            return False
        self.metrics.one_step.inc()
        self.metrics.completed.labels(topic=sent.topic, status=JobStatus.Name(result.status)).inc()
        self.metrics.finished.labels(topic=sent.topic, state=S.SUCCEEDED.value).inc()
        self.metrics.ran(sent.topic, {"updated_at": sent.at_us}, moved.previous)
        self.registry.completed(result.worker_id)
        log.debug("job.result_applied", job_id=job_id, trace_id=sent.trace_id, state=S.SUCCEEDED.value,
                  worker_id=result.worker_id)
        return True

    def _result_after(self, result: JobResult, dispatched_to: str) -> list[tuple]:
        """The index upkeep of a result: the worker's history gains the job, and the in-flight
        list of the worker it was dispatched to loses it."""
        return [*self.store.worker_history_commands(result.worker_id, result.job_id),
                *self.store.inflight_commands(dispatched_to, result.job_id, done=True)]

    async def apply_result(self, result: JobResult, lease: Lease, *, attempt: int | None = None,
                           meta: dict | None = None, release_early: bool = False) -> bool:
        """Apply a worker's result under the job's lock; True when it moved the job.

        `attempt` is the dispatch attempt the result belongs to: a result of an earlier attempt (a
        late or repeated one) never moves the current attempt. A worker that does not say (the
        public CAP SDK) is taken to answer the current attempt if it is the worker that attempt
        went to. `release_early`: a plain success gives the lock back in its write's round trip
        (nothing after it needs the lock)."""
        job_id, fence = result.job_id, lease.fence
        meta = meta or await self.store.get(job_id)
        if meta is None:
            self.metrics.ignored.labels(reason="unknown_job").inc()
            log.info("scheduler.result_for_unknown_job", job_id=job_id, worker_id=result.worker_id)
            return False
        state, current = S(meta["state"]), int(meta.get("attempts") or 0)
        if state in TERMINAL:
            self.metrics.ignored.labels(reason="already_terminal").inc()
            await self.resend_pending_dlq(job_id, meta)
            return False
        if attempt is not None and attempt != current:
            self.metrics.ignored.labels(reason="stale_attempt").inc()
            log.info("scheduler.stale_result", job_id=job_id, attempt=attempt, current=current)
            return False
        if attempt is None and meta.get("worker_id") and result.worker_id != meta["worker_id"]:
            self.metrics.ignored.labels(reason="other_worker").inc()
            log.info("scheduler.stale_result", job_id=job_id, worker_id=result.worker_id, current=meta["worker_id"])
            return False
        target = state_for_result(result.status)
        if not can_transition(state, target) or (state is S.RETRYING and target is S.RETRYING):
            self.metrics.ignored.labels(reason="invalid_transition").inc()
            log.info("scheduler.result_not_applicable", job_id=job_id, state=state.value, target=target.value)
            return False
        topic, tenant = meta.get("topic", ""), meta.get("tenant", "")
        code = result.error_code or _default_reason(target)
        reason = result.error_message or f"worker reported {JobStatus.Name(result.status)}"
        fields = _result_fields(result)
        if target is S.RETRYING:
            target, code, reason, fields = self._plan_retry(meta, current, code, reason, fields)
        after = self._result_after(result, meta.get("worker_id", ""))
        outcome, unchecked = None, False
        if meta.get(CHECK_FIELD) == DUE:
            if target is not S.SUCCEEDED:
                fields[CHECK_FIELD] = ""  # a failure's output is not checked
            elif self.output is not None:
                outcome = await self.output.before_success({**meta, "id": job_id}, result)
                target, fields, after = outcome.state, {**fields, **outcome.fields}, [*after, *outcome.after]
                if target is S.OUTPUT_QUARANTINED:
                    code, reason = outcome.code, outcome.reason
                    fields["failure_reason"] = reason
            else:  # marked by a replica that checks outputs; this one was told not to
                fields[CHECK_FIELD], unchecked = SKIPPED, True
        quarantined = outcome is not None and target is S.OUTPUT_QUARANTINED
        plain = release_early and target is S.SUCCEEDED and outcome is None and not unchecked
        try:
            dlq = await self.end_job(job_id, target, fence=fence, code=code, reason=reason, fields=fields, tenant=tenant,
                                     after=after, allowed_from=[state], send_dlq=not quarantined,
                                     along=self._release_along(lease) if plain else None)
        except InvalidTransition as exc:  # (a stale fence raises on: the message comes back)
            self.metrics.ignored.labels(reason="invalid_transition").inc()
            log.info("scheduler.result_not_applicable", job_id=job_id, error=str(exc))
            return False
        self.metrics.completed.labels(topic=topic, status=JobStatus.Name(result.status)).inc()
        log.debug("job.result_applied", job_id=job_id, trace_id=meta.get("trace_id") or job_id, state=target.value,
                  worker_id=result.worker_id)
        if outcome is not None:
            await self.output.after_write({**meta, **fields, "id": job_id}, outcome)
            if dlq is not None:  # a quarantine's DLQ event after its audit record (see send_dlq)
                await self.send_dlq(job_id, *dlq, topic=topic)
        elif unchecked:
            await self.publish_checked({**meta, **fields, "id": job_id}, result.result_ptr)
        self.registry.completed(result.worker_id)
        if target is S.RETRYING:
            await self.resubmit(job_id, meta.get("trace_id") or job_id, f"retry:{job_id}:{current}")
        elif target in TERMINAL:
            self.metrics.finished.labels(topic=topic, state=target.value).inc()
            self.metrics.ran(topic, meta, state)
        return True

    def _plan_retry(self, meta: dict, attempts: int, code: str, reason: str,
                    fields: dict) -> tuple[JobState, str, str, dict]:
        """A retryable failure: RETRYING with the time of the next attempt, or FAILED when the
        policy's `budgets.max_retries` or the scheduling limit is used up. Retries are counted
        apart from attempts: a job moved on from a worker that left was not a failure."""
        limit, retries = _stored_max_retries(meta), int(meta.get("retries") or 0)
        if limit and not retries_left(retries, limit):
            reason = f"{reason} (no retries left: the policy allows {limit})"
            return S.FAILED, "max_retries_exceeded", reason, {**fields, "failure_reason": reason}
        if scheduling_retries_exhausted(attempts):
            reason = f"{reason} (gave up after {attempts} attempts)"
            return S.FAILED, "max_scheduling_retries", reason, {**fields, "failure_reason": reason}
        delay = backoff_delay(retries, rand=random.random())
        return S.RETRYING, code, reason, {**fields, "retries": retries + 1, "retry_at": now_us() + int(delay * 1_000_000)}

    async def complete_from_store(self, meta: dict, lease: Lease) -> bool:
        """Finish a job whose result message never came but whose result is stored: the result our
        workers commit to the job's hash for the current attempt, or else an output at `res:<id>`
        (every worker writes it before sending a success). True when that moved the job."""
        job_id, current = meta["id"], int(meta.get("attempts") or 0)
        stored = meta.get("run_result")
        if stored and str(meta.get("run_result_attempt")) == str(current):
            try:
                result = result_from_json(stored)
            except Exception as exc:  # a hash edited by hand must not stop the sweep
                log.warning("scheduler.bad_stored_result", job_id=job_id, error=repr(exc))
            else:
                return await self.apply_result(result, lease, attempt=current, meta=meta)
        if await self.store.has_output(job_id):
            result = JobResult(job_id=job_id, status=JobStatus.JOB_STATUS_SUCCEEDED, worker_id=meta.get("worker_id") or SENDER,
                               result_ptr=pointers.ptr(keys.result(job_id)))
            return await self.apply_result(result, lease, attempt=current, meta=meta)
        return False

    async def resubmit(self, job_id: str, trace_id: str, msg_id: str) -> bool:
        """Put a job back on `sys.job.submit` (a retry, a re-route). If this publish fails the
        pending replayer re-drives the job later: it is RETRYING, and that state is in its sweep."""
        request = await self.store.get_request(job_id)
        if request is None:
            log.warning("scheduler.request_missing", job_id=job_id)
            return False
        try:
            await self.bus.publish(subjects.SUBMIT, encode(new_packet(request, sender_id=SENDER, trace_id=trace_id)),
                                   msg_id=msg_id)
        except Exception as exc:
            log.warning("scheduler.resubmit_failed", job_id=job_id, error=repr(exc))
            return False
        return True

    # ---- endings ----------------------------------------------------------------------------

    async def _finish(self, job_id: str, topic: str, state: JobState, fence: int, code: str, reason: str, *,
                      tenant: str | None = None, fields: dict | None = None, after: list | None = None) -> None:
        """A final state the scheduler decided (denied, failed)."""
        await self.end_job(job_id, state, fence=fence, code=code, reason=reason,
                        fields={**(fields or {}), "failure_reason": reason}, tenant=tenant, after=after or ())
        self.metrics.finished.labels(topic=topic, state=state.value).inc()

    async def end_job(self, job_id: str, state: JobState, *, fence: int, code: str, reason: str, fields: dict,
                      tenant: str | None, after: Sequence[tuple], allowed_from: Sequence[JobState] | None = None,
                      event: dict | None = None, send_dlq: bool = True, expect: dict | None = None,
                      along: Callable[[], Callable[[], Awaitable[Any]]] | None = None) -> tuple[int, str, str] | None:
        """Write a state a result or a decision led to; a failed ending then gets its DLQ entry.

        The DLQ event goes out only after the terminal write succeeded (a write that lost — to a
        cancel, a newer fence — must not leave a DLQ entry for a job that ended otherwise). The
        write marks the job `dlq_pending` (and lists it in `job:dlq:pending`); the mark is cleared
        once the event is out, and the reconciler sends the event of a job still marked.
        `send_dlq=False` leaves the sending to the caller: the event is returned."""
        dlq = (status_for_state(state), code, reason) if state in TERMINAL and state is not S.SUCCEEDED else None
        if dlq is not None:
            fields = {**fields, "dlq_pending": json.dumps({"status": dlq[0], "code": code, "reason": reason})}
            after = [*after, *self.store.dlq_pending_commands(job_id, pending=True)]
        await self.store.transition(job_id, state, fence=fence, fields=fields, tenant=tenant, after=after,
                                    allowed_from=allowed_from, event=event, expect=expect, along=along)
        if dlq is not None and send_dlq:
            await self.send_dlq(job_id, *dlq)
            return None
        return dlq

    async def publish_checked(self, meta: dict, result_ptr: str) -> None:
        """A result the output policy cleared (or was told not to check), on `sys.job.result`: the
        workflow engine waits for it instead of the worker's when the job was marked `due`. If it
        is lost, nothing is: the engine's reconciler reads the job's stored outcome. Only a
        workflow step's (labelled with its run): nobody else waits for it."""
        labels = meta.get("labels")
        if not isinstance(labels, dict) or not labels.get("run_id"):
            return
        job_id, attempt = meta["id"], int(meta.get("attempts") or 0)
        result = JobResult(job_id=job_id, status=JobStatus.JOB_STATUS_SUCCEEDED, worker_id=SENDER,
                           result_ptr=result_ptr, execution_ms=int(meta.get("execution_ms") or 0))
        packet = new_packet(result, sender_id=SENDER, trace_id=meta.get("trace_id") or job_id)
        try:
            await self.bus.publish(subjects.RESULT, encode(packet), msg_id=f"checked:{job_id}:{attempt}",
                                   headers={subjects.ATTEMPT_HEADER: str(attempt)} if attempt else None)
        except Exception as exc:
            log.warning("scheduler.checked_result_publish_failed", job_id=job_id, error=repr(exc))

    async def resend_pending_dlq(self, job_id: str, meta: dict) -> None:
        """Send the DLQ event of a finished job whose event did not go out."""
        pending = meta.get("dlq_pending")
        if not pending:
            return
        try:
            entry = json.loads(pending)
            status, code, reason = int(entry["status"]), str(entry["code"]), str(entry["reason"])
        except (ValueError, KeyError, TypeError):
            log.warning("scheduler.bad_dlq_mark", job_id=job_id)
            await self.store.set_fields(job_id, {"dlq_pending": ""})
            return
        await self.send_dlq(job_id, status, code, reason, topic=meta.get("topic", ""))

    async def send_dlq(self, job_id: str, status: int, code: str, reason: str, topic: str = "") -> None:
        packet = dlq_packet(job_id, status=status, reason_code=code, reason=reason, sender_id=SENDER)
        try:
            await self.bus.publish(subjects.DLQ, encode(packet), msg_id=f"dlq:{job_id}:{code}")
        except Exception:
            self.metrics.dlq_emit_failures.labels(topic=topic).inc()  # still marked: the reconciler sends it
            raise
        await self.store.set_fields(job_id, {"dlq_pending": ""})
        await self.store.run_repeatable(self.store.dlq_pending_commands(job_id, pending=False))


def _plain_success_of(result: JobResult, sent: Dispatched, attempt: int | None) -> bool:
    """A success from the worker the job was sent to, for the attempt sent (a worker that names
    no attempt is taken at its word by the script's check of the stored attempt)."""
    return (result.status == JobStatus.JOB_STATUS_SUCCEEDED and result.worker_id == sent.worker_id
            and (attempt is None or attempt == sent.attempt))


def _result_fields(result: JobResult) -> dict:
    """What a worker's result writes to the job's hash (with the state it leads to)."""
    fields: dict = {"worker_id": result.worker_id, "execution_ms": result.execution_ms}
    if result.result_ptr:
        fields["result_ptr"] = result.result_ptr
    if result.error_message:
        fields["failure_reason"] = result.error_message
    return fields


def _approved(request: JobRequest, meta: dict) -> bool:
    """A human approved this job (the approve route set both the label and the stored status)."""
    return request.labels.get("approval_granted") == "true" and meta.get("approval_status") == "approved"


def _due_since(meta: dict) -> int:
    """µs since the epoch at which the job became due: its last state change (submission,
    approval, a retry planned) or, for a retry, the time it was planned for, if later."""
    return max(int(meta.get("updated_at") or 0), int(meta.get("retry_at") or 0))


def _tenant_of(request: JobRequest) -> str:
    return request.tenant_id or request.env.get("tenant_id") or request.meta.tenant_id or "default"


def _fields_from_request(request: JobRequest, trace_id: str) -> dict:
    return {
        "topic": request.topic, "tenant": _tenant_of(request), "trace_id": trace_id or request.job_id,
        "principal": request.principal_id, "labels": dict(request.labels), "capability": request.meta.capability,
        "risk_tags": list(request.meta.risk_tags), "requires": list(request.meta.requires),
        "idempotency_key": request.meta.idempotency_key, "memory_id": request.memory_id,
    }


def _decision_fields(decision: SafetyDecision) -> dict:
    fields = {
        "safety_decision": decision.verdict.value, "safety_reason": decision.reason,
        "safety_checked_at": now_us(),
    }
    if decision.response is not None:
        fields.update(safety_rule_id=decision.response.rule_id, safety_snapshot=decision.response.policy_snapshot)
        if decision.response.HasField("constraints"):
            fields["safety_constraints"] = json_format.MessageToJson(decision.response.constraints, indent=None)
    return fields


def _decision_record(decision: SafetyDecision) -> dict:
    """One entry of `job:decisions:<id>`."""
    return {"decision": decision.verdict.value, "reason": decision.reason, "rule_id": decision.rule_id,
            "policy_snapshot": decision.snapshot, "checked_at": now_us(), "by": SENDER}


def _max_retries(decision: SafetyDecision) -> int:
    """The policy's `budgets.max_retries` in a decision (0 = no limit set)."""
    response = decision.response
    if response is None or not response.HasField("constraints"):
        return 0
    return max(int(response.constraints.budgets.max_retries), 0)


def _stored_max_retries(meta: dict) -> int:
    """The same limit, from the constraints stored with the job's last decision."""
    constraints = meta.get("safety_constraints")
    if isinstance(constraints, str):
        try:
            constraints = json.loads(constraints)
        except ValueError:
            return 0
    budgets = constraints.get("budgets") if isinstance(constraints, dict) else None
    if not isinstance(budgets, dict):
        return 0
    value = budgets.get("max_retries", budgets.get("maxRetries", 0))
    try:
        return max(int(value), 0)
    except (TypeError, ValueError):
        return 0


def _default_reason(state: JobState) -> str:
    return {S.FAILED: "worker_failed", S.TIMEOUT: "timeout", S.CANCELLED: "cancelled", S.DENIED: "denied"}.get(state, state.value.lower())

