"""The scheduler's job handling: submit → safety → route → dispatch; results; cancels.

Every step that touches a job runs under its lock `cordum:scheduler:job:<id>` and writes with
the lock's fencing token, so a replica that lost the lock (paused, partitioned) can no longer
change the job. Redelivery is safe at every point: the job's state says what was already done
(DISPATCHED/RUNNING/terminal → nothing to do), and a result for a terminal job is ignored.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Awaitable, Callable

import trio
from google.protobuf import json_format

from cordum.agent.v1.buspacket_pb2 import BusPacket
from cordum.agent.v1.job_pb2 import JobRequest, JobResult, JobStatus
from cordum.agent.v1.safety_pb2 import PolicyCheckRequest
from cordum.infra.bus import Bus, Message
from cordum.infra.metrics import Metrics
from cordum.protocol import subjects
from cordum.protocol.packets import encode, new_packet
from cordum.runtime.consumer import Retry
from cordum.runtime.lease import Lease, LeaseLost, Leases
from cordum.runtime.log import get_logger
from cordum.safety.client import SafetyClient, SafetyDecision, Verdict
from cordum.scheduler.registry import WorkerRegistry
from cordum.scheduler.routing import NoRoute, Pools, pick_worker
from cordum.store import keys
from cordum.store.dlq import dlq_packet
from cordum.store.jobs import InvalidTransition, JobNotFound, JobStore, now_us
from cordum.store.jobstate import (
    MAX_SCHEDULING_RETRIES, RETRY_LOCK_BUSY_S, RETRY_NO_WORKERS_S, RETRY_SAFETY_THROTTLE_S, TERMINAL, JobState,
    backoff_delay, can_transition, result_goes_to_dlq, scheduling_retries_exhausted, state_for_result,
    status_for_state,
)
from cordum.store.validate import tenant_problems, validate_job_request, validate_job_result

log = get_logger("scheduler")

SENDER = "cordum-scheduler"
JOB_LOCK_TTL = 30.0
LOCK_WAIT = 2.0  # how long a handler waits for a busy job lock before asking for redelivery
S = JobState


@dataclass
class EngineConfig:
    fail_open: bool = False  # POLICY_CHECK_FAIL_MODE=open: dispatch when the kernel is unreachable


class SchedulerMetrics:
    def __init__(self, metrics: Metrics) -> None:
        self.finished = metrics.counter("cordum_scheduler_jobs_finished_total", "Jobs this replica brought to a final state", ["topic", "state"])
        self.received = metrics.counter("cordum_scheduler_jobs_received_total", "Job requests handled", ["topic"])
        self.dispatched = metrics.counter("cordum_scheduler_jobs_dispatched_total", "Jobs dispatched", ["topic"])
        self.completed = metrics.counter("cordum_scheduler_jobs_completed_total", "Worker results applied", ["topic", "status"])
        self.denied = metrics.counter("cordum_scheduler_safety_denied_total", "Jobs denied by policy", ["topic"])
        self.unavailable = metrics.counter("cordum_scheduler_safety_unavailable_total", "Safety checks that failed", ["topic"])
        self.rejected = metrics.counter("cordum_scheduler_validation_rejections_total", "Invalid packets dropped", ["kind"])
        self.ignored = metrics.counter("cordum_scheduler_results_ignored_total", "Results for unknown or finished jobs", ["reason"])
        self.latency = metrics.histogram("cordum_scheduler_dispatch_latency_seconds", "Submit handling to dispatch", ["topic"],
                                         buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))


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

    # ---- locking ----------------------------------------------------------------------------

    async def _lock(self, job_id: str) -> Lease:
        """Wait briefly for the job lock (a result often arrives while its dispatch still holds it)."""
        deadline = trio.current_time() + LOCK_WAIT
        delay = 0.005
        while True:
            lease = await self.leases.try_acquire(keys.job_lock(job_id), JOB_LOCK_TTL)
            if lease is not None:
                return lease
            if trio.current_time() + delay > deadline:
                raise Retry(RETRY_LOCK_BUSY_S, f"job {job_id} is locked")
            await trio.sleep(delay)
            delay = min(delay * 2, 0.1)

    async def _locked(self, job_id: str, work: Callable[[Lease], Awaitable[None]]) -> None:
        lease = await self._lock(job_id)
        try:
            async with self.leases.holding(lease):
                await work(lease)
        except LeaseLost:
            raise Retry(1.0, f"lost the lock of job {job_id}") from None

    # ---- bus handlers -------------------------------------------------------------------------

    async def on_submit(self, packet: BusPacket, msg: Message) -> None:
        if packet.WhichOneof("payload") != "job_request":
            return
        request = packet.job_request
        problems = validate_job_request(request) + tenant_problems(request)
        if problems:
            self.metrics.rejected.labels(kind="job_request").inc()
            log.warning("scheduler.invalid_request", job_id=request.job_id, problems=problems)
            if request.job_id:  # a job we know of must not wait forever: fail it, visibly
                await self._locked(request.job_id, lambda lease: self._reject(request, problems, lease))
            return
        started = trio.current_time()
        await self._locked(request.job_id, lambda lease: self._handle_request(packet, request, lease, started))

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
        problems = validate_job_result(result)
        if problems:
            # e.g. the gateway's synthetic CANCELLED result has no worker id: not for us
            self.metrics.rejected.labels(kind="job_result").inc()
            log.debug("scheduler.invalid_result", job_id=result.job_id, problems=problems)
            return
        await self._locked(result.job_id, lambda lease: self._handle_result(result, lease))

    async def on_cancel(self, packet: BusPacket, msg: Message) -> None:
        if packet.WhichOneof("payload") != "job_cancel" or not packet.job_cancel.job_id:
            return
        try:
            await self.store.cancel(packet.job_cancel.job_id, packet.job_cancel.reason or "cancelled")
        except JobNotFound:
            log.info("scheduler.cancel_unknown_job", job_id=packet.job_cancel.job_id)

    # ---- submit -----------------------------------------------------------------------------

    async def _handle_request(self, packet: BusPacket, request: JobRequest, lease: Lease, started: float) -> None:
        try:
            await self._process_request(packet, request, lease, started)
        except InvalidTransition as exc:
            # The job moved on meanwhile (cancelled through the API, say): nothing left to do.
            log.info("scheduler.request_superseded", job_id=request.job_id, error=str(exc))

    async def _process_request(self, packet: BusPacket, request: JobRequest, lease: Lease, started: float) -> None:
        job_id, fence = request.job_id, lease.fence
        meta = await self.store.get(job_id)
        state = S(meta["state"]) if meta else None
        if state in (S.DISPATCHED, S.RUNNING) or state in TERMINAL:
            return  # a redelivery of work already done
        if state is S.APPROVAL_REQUIRED:
            return  # held until a human approves; the approval re-submits it
        self.metrics.received.labels(topic=request.topic).inc()
        tenant = _tenant_of(request)
        if meta is None:  # published straight to the bus (workflow engine, other producers)
            await self.store.create(job_id, S.PENDING, request=request, fields=_fields_from_request(request, packet.trace_id))
            meta = {"attempts": 0, "tenant": tenant, "topic": request.topic}
        if scheduling_retries_exhausted(int(meta.get("attempts", 0))):
            await self._finish(job_id, request.topic, S.FAILED, fence, "max_scheduling_retries",
                               f"gave up after {MAX_SCHEDULING_RETRIES} scheduling attempts")
            return

        decision = await self._safety(request, meta, tenant)
        if decision.verdict is Verdict.UNAVAILABLE:
            self.metrics.unavailable.labels(topic=request.topic).inc()
            if not self.config.fail_open:
                raise Retry(RETRY_SAFETY_THROTTLE_S, decision.reason)
            decided: dict = {"safety_bypassed": True}
            recorded: list = []
        else:
            # Written together with the state change that follows the decision: no extra round trip.
            decided = _decision_fields(decision)
            recorded = self.store.decision_commands(job_id, _decision_record(decision))
        if decision.verdict is Verdict.THROTTLE:
            raise Retry(RETRY_SAFETY_THROTTLE_S, "throttled by policy")
        if decision.verdict is Verdict.REQUIRE_APPROVAL:
            await self.store.transition(job_id, S.APPROVAL_REQUIRED, fence=fence, tenant=tenant, after=recorded,
                                        fields={**decided, "approval_status": "pending", "safety_approval_required": True})
            return
        if decision.verdict is Verdict.DENY:
            self.metrics.denied.labels(topic=request.topic).inc()
            await self._finish(job_id, request.topic, S.DENIED, fence, "safety_denied", decision.reason or "denied by policy",
                               tenant=tenant, fields=decided, after=recorded)
            return

        budget_ms = request.budget.deadline_ms
        if budget_ms > 0 and not meta.get("deadline_unix"):
            await self.store.set_deadline(job_id, now_us() + budget_ms * 1000, fence=fence)
        try:
            worker = pick_worker(self.pools(), self.registry.alive(trio.current_time()), topic=request.topic,
                                 requires=request.meta.requires, labels=request.labels)
        except NoRoute as exc:
            # Nothing can run it right now: it stays PENDING and this message comes back shortly.
            # The mark tells the replayer the job is not lost, so it adds no second copy.
            log.info("scheduler.no_route", job_id=job_id, code=exc.code, reason=str(exc))
            await self.store.set_fields(job_id, {**decided, "route_wait_at": now_us(), "route_wait_reason": exc.code},
                                        fence=fence)
            raise Retry(RETRY_NO_WORKERS_S, str(exc)) from None
        await self._dispatch(packet, request, worker.worker_id, fence, started, tenant=tenant, fields=decided,
                             after=recorded)

    async def _dispatch(self, packet: BusPacket, request: JobRequest, worker_id: str, fence: int, started: float,
                        *, tenant: str, fields: dict, after: list) -> None:
        job_id = request.job_id
        # DISPATCHED is written before the publish: a redelivered submit then finds the job
        # dispatched and does nothing, so a job is never sent twice by the scheduler. (The
        # spec's SCHEDULED step in between is skipped: it would cost a write and tell nothing.)
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
            await self.store.transition(job_id, S.SCHEDULED, fence=fence, tenant=tenant, event={"rollback": repr(exc)})
            log.warning("scheduler.dispatch_failed", job_id=job_id, worker_id=worker_id, error=repr(exc))
            raise Retry(backoff_delay(dispatched.attempts, rand=random.random()), "dispatch publish failed") from None
        await self._confirm_dispatch(job_id, request.topic, worker_id, fence, tenant)
        self.metrics.latency.labels(topic=request.topic).observe(trio.current_time() - started)

    async def send_to_worker(self, request: JobRequest, worker_id: str, trace_id: str, attempt: int) -> None:
        dispatch = new_packet(request, sender_id=SENDER, trace_id=trace_id)
        await self.bus.publish(subjects.worker_subject(worker_id), encode(dispatch),
                               msg_id=f"dispatch:{request.job_id}:{attempt}")

    async def _confirm_dispatch(self, job_id: str, topic: str, worker_id: str, fence: int, tenant: str) -> None:
        self.registry.dispatched(worker_id)
        try:
            await self.store.transition(job_id, S.RUNNING, fence=fence, allowed_from=[S.DISPATCHED], tenant=tenant)
        except InvalidTransition:
            pass  # the worker was faster: its result already moved the job on
        self.metrics.dispatched.labels(topic=topic).inc()

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

    async def _safety(self, request: JobRequest, meta: dict, tenant: str) -> SafetyDecision:
        labels = request.labels
        if labels.get("approval_granted") == "true" and meta.get("approval_status") == "approved":
            return SafetyDecision(Verdict.ALLOW, "approval granted")
        check = PolicyCheckRequest(
            job_id=request.job_id, topic=request.topic, tenant=tenant, priority=request.priority,
            budget=request.budget, principal_id=request.principal_id, labels=dict(request.labels),
            memory_id=request.memory_id, meta=request.meta,
        )
        return await self.safety.check(check)

    # ---- results ----------------------------------------------------------------------------

    async def _handle_result(self, result: JobResult, lease: Lease) -> None:
        job_id, fence = result.job_id, lease.fence
        meta = await self.store.get(job_id)
        if meta is None:
            self.metrics.ignored.labels(reason="unknown_job").inc()
            log.info("scheduler.result_for_unknown_job", job_id=job_id, worker_id=result.worker_id)
            return
        if S(meta["state"]) in TERMINAL:
            self.metrics.ignored.labels(reason="already_terminal").inc()
            return
        target = state_for_result(result.status)
        fields = {"worker_id": result.worker_id, "execution_ms": result.execution_ms}
        if result.result_ptr:
            fields["result_ptr"] = result.result_ptr
        if result.error_message:
            fields["failure_reason"] = result.error_message
        topic = meta.get("topic", "")
        if not can_transition(meta["state"], target):
            self.metrics.ignored.labels(reason="invalid_transition").inc()
            log.info("scheduler.result_not_applicable", job_id=job_id, state=meta["state"], target=target.value)
            return
        if result_goes_to_dlq(result.status):
            # The DLQ event goes out before the final state is written: if it fails, the result
            # is redelivered and both are tried again; never a failed job without its entry.
            await self._emit_dlq(job_id, status_for_state(target), result.error_code or _default_reason(target),
                                 result.error_message or f"worker reported {JobStatus.Name(result.status)}")
        try:
            await self.store.transition(job_id, target, fence=fence, fields=fields, tenant=meta.get("tenant", ""),
                                        after=self.store.worker_history_commands(result.worker_id, job_id))
        except InvalidTransition as exc:
            self.metrics.ignored.labels(reason="invalid_transition").inc()
            log.info("scheduler.result_not_applicable", job_id=job_id, error=str(exc))
            return
        self.metrics.completed.labels(topic=topic, status=JobStatus.Name(result.status)).inc()
        self.registry.completed(result.worker_id)
        if target in TERMINAL:
            self.metrics.finished.labels(topic=topic, state=target.value).inc()

    # ---- endings ----------------------------------------------------------------------------

    async def _finish(self, job_id: str, topic: str, state: JobState, fence: int, code: str, reason: str, *,
                      tenant: str | None = None, fields: dict | None = None, after: list | None = None) -> None:
        """A final state the scheduler decided (denied, failed): DLQ event first, then the state."""
        await self._emit_dlq(job_id, status_for_state(state), code, reason)
        await self.store.transition(job_id, state, fence=fence, fields={**(fields or {}), "failure_reason": reason},
                                    tenant=tenant, after=after or ())
        self.metrics.finished.labels(topic=topic, state=state.value).inc()

    async def _emit_dlq(self, job_id: str, status: int, code: str, reason: str) -> None:
        packet = dlq_packet(job_id, status=status, reason_code=code, reason=reason, sender_id=SENDER)
        await self.bus.publish(subjects.DLQ, encode(packet), msg_id=f"dlq:{job_id}:{code}")


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


def _default_reason(state: JobState) -> str:
    return {S.FAILED: "worker_failed", S.TIMEOUT: "timeout", S.CANCELLED: "cancelled", S.DENIED: "denied"}.get(state, state.value.lower())

