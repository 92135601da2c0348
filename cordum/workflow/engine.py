"""The workflow engine's I/O core: drives runs through the pure state machine (``runstate``).

One operation per run at a time, under the run lock ``cordum:wf:run:lock:<runID>`` (a 30 s
``runtime.lease`` renewed at TTL/3). The lock is re-entrant for its holder within one operation
(``handle_result`` → ``advance`` takes it once), and its fencing token goes with every
``WorkflowStore.update_run``: a replica that lost the lock (paused past the TTL) gets
``RunFenceStale`` and its whole operation is dropped and logged — no effect of it is carried out.

Order inside an operation (spec cordum-services §2.6/§2.7): a transition yields a new run and
effects; the run is persisted with the fence FIRST, then the effects are carried out (timeline,
timers, ``sys.job.cancel``), and a step job is published on ``sys.job.submit`` only after the
``running`` step that names it was stored ("persist before publish"). A failed publish puts the
step back (``revert_dispatch``), persists again and arms a timer to try later.

Step types: worker and its aliases dispatch a job; approval a gate job on
``job.cordum.approval-gate`` (step ``waiting``); the engine's own types (condition, transform,
notify, switch, storage, delay, parallel, loop, subworkflow) are ``handlers.StepHandlers`` (I/O)
over ``steps.py`` (pure decisions); ``for_each`` works on any step but switch/parallel/loop.
Steps that wait without a job are moved on by later advances: a delay once due (its timer, any
replica's poller, or the reconciler), a loop after each iteration (``runstate.due_steps``), a
parallel step as its children roll up, a subworkflow step when its child run ended. A run that
ends and has a parent run wakes that parent once its own lock is released (``_WAKE``).
"""

from __future__ import annotations

import contextvars
import json
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any, AsyncIterator, Callable, Mapping, Sequence

import trio

from cordum.agent.v1.buspacket_pb2 import BusPacket
from cordum.agent.v1.job_pb2 import Budget, JobCancel, JobMetadata, JobPriority, JobRequest, JobStatus
from cordum.infra.bus import Bus
from cordum.infra.metrics import Metrics
from cordum.infra.redis import Redis
from cordum.protocol import subjects
from cordum.protocol.packets import encode, new_packet
from cordum.protocol.pointers import context_key, ptr
from cordum.runtime.consumer import Retry
from cordum.runtime.lease import Lease, LeaseLost, Leases
from cordum.runtime.log import get_logger
from cordum.store import keys
from cordum.store.jobs import InvalidTransition, JobStore
from cordum.store.jobstate import TERMINAL as TERMINAL_JOB, JobState
from cordum.store.workflows import RunFenceStale, RunNotFound, WorkflowStore
from cordum.workflow import expr
from cordum.workflow import runstate as rs
from cordum.workflow.definition import Step, Workflow, parse_workflow
from cordum.workflow.handlers import SENDER, StepHandlers
from cordum.workflow.runstate import Run, StepRun

log = get_logger("workflow.engine")

RUN_LOCK_TTL = 30.0
LOCK_WAIT = 2.0  # how long an operation waits for a busy run lock before asking for a retry
MAX_RESULT_BYTES = 256 * 1024
PUBLISH_RETRY_S = 1.0
#: a running step whose job record is still missing after this long is published again
RECONCILE_STALE_S = 30.0
#: upper bound of transitions in one advance (inline steps chain; for_each children dispatch)
MAX_TRANSITIONS = 10_000
#: step types the engine cannot run (none left; the gateway's dry-run plan warns about these)
UNSUPPORTED_TYPES: frozenset[str] = frozenset()
#: a finished job's state → the result status runstate.apply_result understands
_STATUS_OF_STATE = {JobState.SUCCEEDED: "SUCCEEDED", JobState.CANCELLED: "CANCELLED", JobState.TIMEOUT: "TIMEOUT",
                    JobState.DENIED: "DENIED"}
_PRIORITIES = {"interactive": JobPriority.JOB_PRIORITY_INTERACTIVE, "batch": JobPriority.JOB_PRIORITY_BATCH,
               "critical": JobPriority.JOB_PRIORITY_CRITICAL}

#: (engine, run id) → lease held by the current task's operation (re-entrancy of the run lock)
_HELD: contextvars.ContextVar[Mapping[tuple[int, str], Lease]] = contextvars.ContextVar("wf_run_locks", default={})
#: parent runs (id, workflow id) to advance once the current operation released its lock: their
#: subworkflow child ended in it
_WAKE: contextvars.ContextVar[list[tuple[str, str]] | None] = contextvars.ContextVar("wf_wake", default=None)
#: passes of one advance (a pass that started child runs is followed by one that looks at them)
MAX_PASSES = 1000


class RunBusy(Retry):
    """The run lock is held by another operation: try again shortly."""


class OperationDropped(Exception):
    """The operation's fenced write was refused (a newer holder wrote): nothing of it took effect."""


def revert_dispatch(before: Run, now: float) -> Run:
    """The run as it was before ``mark_dispatched`` (its job never reached the bus): the step is
    pending again with its earlier attempt count, so the next dispatch reuses the same attempt."""
    return replace(before, updated_at=now)


def _spawns(effects: Sequence[rs.Effect]) -> bool:
    return any(isinstance(e, rs.StartRun) for e in effects)


def timer_member(run: Run) -> str:
    return f"{run.workflow_id}:{run.id}"


def status_name(status: int) -> str:
    """CAP JobStatus number → the name runstate.apply_result understands (``SUCCEEDED`` …)."""
    try:
        return JobStatus.Name(status).removeprefix("JOB_STATUS_")
    except ValueError:
        return "FAILED"


class WorkflowMetrics:
    """The Go original's workflow series (spec metrics): runs started, completed by status, and
    how long finished runs took, labelled by workflow id."""

    def __init__(self, metrics: Metrics) -> None:
        self.started = metrics.counter("cordum_workflows_started_total", "Workflows started by name", ["workflow"])
        self.completed = metrics.counter("cordum_workflows_completed_total", "Workflows completed by name and status",
                                         ["workflow", "status"])
        self.duration = metrics.histogram("cordum_workflow_duration_seconds", "Workflow duration seconds by name",
                                          ["workflow"])

    def moved(self, run: Run, previous: str) -> None:
        if previous == run.status:
            return
        if previous == rs.PENDING:
            self.started.labels(workflow=run.workflow_id).inc()
        if run.terminal and previous not in rs.TERMINAL_RUN_STATUSES:
            self.completed.labels(workflow=run.workflow_id, status=run.status).inc()
            if run.started_at is not None and run.completed_at is not None:
                self.duration.labels(workflow=run.workflow_id).observe(max(0.0, run.completed_at - run.started_at))


class WorkflowEngine(StepHandlers):
    def __init__(self, *, store: WorkflowStore, jobs: JobStore, bus: Bus, leases: Leases, redis: Redis,
                 clock: Callable[[], float] = time.time, lock_ttl: float = RUN_LOCK_TTL,
                 lock_wait: float = LOCK_WAIT, metrics: WorkflowMetrics | None = None) -> None:
        self.metrics = metrics
        self.store = store
        self.jobs = jobs
        self.bus = bus
        self.leases = leases
        self.redis = redis
        self.clock = clock
        self.lock_ttl = lock_ttl
        self.lock_wait = lock_wait

    # ---- the run lock -------------------------------------------------------------------------

    async def _acquire(self, run_id: str, wait: float) -> Lease:
        lease = await self.leases.acquire_within(keys.workflow_run_lock(run_id), self.lock_ttl, wait)
        if lease is None:
            raise RunBusy(0.5, f"run {run_id} is locked")
        return lease

    @asynccontextmanager
    async def run_locked(self, run_id: str, *, wait: float | None = None) -> AsyncIterator[tuple[Run | None, int]]:
        """Hold the run lock (re-entrant within one operation) and yield ``(run, fence)``; run is
        None when the run does not exist. RunBusy when it stayed locked for ``wait`` seconds
        (default ``lock_wait``), LeaseLost if the lock was lost meanwhile. Parents whose child run
        ended in the operation are advanced after the lock is released."""
        held = _HELD.get()
        lease = held.get((id(self), run_id))
        if lease is not None:
            yield await self.load_run(run_id), lease.fence
            return
        lease = await self._acquire(run_id, self.lock_wait if wait is None else wait)
        token = _HELD.set({**held, (id(self), run_id): lease})
        wake: list[tuple[str, str]] = []
        wake_token = _WAKE.set(wake)
        try:
            async with self.leases.holding(lease):
                yield await self.load_run(run_id), lease.fence
        finally:
            _WAKE.reset(wake_token)
            _HELD.reset(token)
        await self._wake(wake)

    async def _wake(self, parents: Sequence[tuple[str, str]]) -> None:
        """Advance parent runs whose child ended. One this task holds is skipped: the holder
        started or cancelled the child and looks at it itself. A busy one gets a timer now."""
        for run_id, workflow_id in dict.fromkeys(parents):
            if (id(self), run_id) in _HELD.get():
                continue
            try:
                await self.advance(run_id)
            except Exception as exc:
                log.info("workflow.parent_wake_deferred", run_id=run_id, error=repr(exc))
                await self.store.arm_timer(f"{workflow_id}:{run_id}", self.clock())

    async def load_run(self, run_id: str) -> Run | None:
        doc = await self.store.get_run(run_id)
        return None if doc is None else Run.from_dict(doc)

    async def load_workflow(self, workflow_id: str) -> Workflow | None:
        doc = await self.store.get_definition(workflow_id)
        if doc is None:
            return None
        return parse_workflow(doc, origin=f"workflow {workflow_id}")

    async def save(self, run: Run, fence: int) -> bool:
        """Persist ``run`` with ``fence``; False (logged) when a newer fence already wrote."""
        try:
            previous = await self.store.update_run(run.to_dict(), fence=fence)
        except RunFenceStale as exc:
            log.warning("workflow.stale_fence", run_id=run.id, fence=exc.fence, held=exc.held)
            return False
        except RunNotFound:
            log.warning("workflow.run_deleted", run_id=run.id)
            return False
        if self.metrics is not None:
            self.metrics.moved(run, previous)
        return True

    async def _commit(self, run: Run, fence: int, effects: Sequence[rs.Effect]) -> None:
        """Persist, then carry out the non-dispatch effects; OperationDropped on a stale fence."""
        if not await self.save(run, fence):
            raise OperationDropped(run.id)
        parent = run.metadata.get("parent_run_id") if run.terminal else None
        wake = _WAKE.get()
        if isinstance(parent, str) and parent and wake is not None:
            wake.append((parent, str(run.metadata.get("parent_workflow_id") or "")))
        for effect in effects:
            await self._carry_out(run, effect)

    async def _carry_out(self, run: Run, effect: rs.Effect) -> None:
        if isinstance(effect, rs.TimelineEvent):
            event: dict[str, Any] = {"type": effect.type, "at": self.clock()}
            for name in ("step_id", "job_id", "status", "message"):
                if getattr(effect, name):
                    event[name] = getattr(effect, name)
            if effect.data:
                event["data"] = dict(effect.data)
            await self.store.append_timeline(run.id, event)
        elif isinstance(effect, rs.ArmTimer):
            await self._arm(run, effect.due_at)
        elif isinstance(effect, rs.CancelJob):
            cancel = JobCancel(job_id=effect.job_id, reason=effect.reason, requested_by=SENDER)
            await self.bus.publish(subjects.CANCEL, encode(new_packet(cancel, sender_id=SENDER, trace_id=run.id)))
        elif isinstance(effect, rs.StartRun):
            await self._spawn(run, effect)
        elif isinstance(effect, rs.CancelRun):
            await self._cancel_child(run, effect)
        # DispatchStep is carried out by the dispatch path itself (persist before publish)

    async def _arm(self, run: Run, due: float) -> None:
        member = timer_member(run)
        current = await self.store.timer_due(member)
        if current is None or current <= self.clock() or due < current:
            await self.store.arm_timer(member, due)

    # ---- public operations ----------------------------------------------------------------------

    async def start_run(self, workflow_id: str, tenant: str, input: Mapping[str, Any] | None = None, *,
                        idempotency_key: str | None = None, dry_run: bool = False,
                        triggered_by: str = "") -> str:
        """Create a run of a tenant's workflow and advance it; returns the run id (the existing
        run's for a repeated idempotency key). LookupError when the workflow is unknown."""
        doc = await self.store.get_definition(workflow_id, tenant=tenant)
        if doc is None:
            raise LookupError(f"workflow {workflow_id} not found")
        parse_workflow(doc, origin=f"workflow {workflow_id}")  # refuse a definition that no longer parses
        now = self.clock()
        run = Run(id=str(uuid.uuid4()), workflow_id=workflow_id, org_id=tenant,
                  team_id=str(doc.get("team_id") or ""), input=dict(input or {}), created_at=now,
                  updated_at=now, dry_run=dry_run, triggered_by=triggered_by,
                  idempotency_key=idempotency_key or "")
        run_id, created = await self.store.create_run(run.to_dict(), tenant=tenant, idempotency_key=idempotency_key)
        if created:
            await self.store.append_timeline(run_id, {"type": "run_created", "at": now, "status": rs.PENDING})
            await self.advance(run_id)
        return run_id

    async def advance(self, run_id: str) -> None:
        """Start/time out the run and dispatch (or complete inline) every step that is ready."""
        try:
            async with self.run_locked(run_id) as (run, fence):
                if run is None:
                    log.info("workflow.run_missing", run_id=run_id)
                    return
                await self._advance(run, fence)
        except (OperationDropped, LeaseLost) as exc:
            log.warning("workflow.operation_dropped", run_id=run_id, op="advance", error=repr(exc))

    async def on_result(self, packet: BusPacket, msg: Any = None) -> None:
        """``sys.job.result`` consumer. A FAILED_RETRYABLE result is not the step's outcome: the
        scheduler retries that job itself (same job id, next attempt), and its final failure
        reaches us on ``sys.job.dlq`` (or through the reconciler)."""
        if packet.WhichOneof("payload") == "job_result" and \
                packet.job_result.status == JobStatus.JOB_STATUS_FAILED_RETRYABLE:
            return
        await self.handle_result(packet)

    async def on_dlq(self, packet: BusPacket, msg: Any = None) -> None:
        """``sys.job.dlq`` consumer: a step job the scheduler ended badly (denied by policy,
        retries used up, timed out) without a worker result for it."""
        await self.handle_result(packet)

    async def handle_result(self, packet: BusPacket) -> None:
        """One JobResult packet: apply it to its run (ignored when not a workflow job), persist,
        carry out its effects, then advance the run."""
        if packet.WhichOneof("payload") != "job_result":
            return
        result = packet.job_result
        status = status_name(result.status)
        error: Any = None
        if status != "SUCCEEDED":
            error = {"message": result.error_message or f"job {status.lower()}"}
            if result.error_code:
                error["code"] = result.error_code
        await self.apply_outcome(result.job_id, status, error, result_ptr=result.result_ptr)

    async def apply_outcome(self, jid: str, status: str, error: Any = None, *, result_ptr: str = "") -> None:
        """Apply a step job's outcome (``status`` a CAP JobStatus name) to its run."""
        parsed = rs.parse_job_id(jid)
        if parsed is None:
            return
        run_id = parsed[0]
        try:
            async with self.run_locked(run_id) as (run, fence):
                if run is None:
                    log.info("workflow.result_unknown_run", job_id=jid)
                    return
                if run.terminal or run.step(parsed[1]).job_id != jid:
                    return  # stale or repeated: no need to read the output
                workflow = await self.load_workflow(run.workflow_id)
                if workflow is None:
                    return
                output = await self._read_output(jid, result_ptr) if status == "SUCCEEDED" else None
                new, effects = rs.apply_result(workflow, run, jid, status, output, error,
                                               self.clock(), result_ptr=result_ptr)
                if new is run:
                    log.debug("workflow.result_ignored", job_id=jid, status=status)
                    return
                await self._commit(new, fence, effects)
                await self._advance(new, fence, workflow)
        except (OperationDropped, LeaseLost) as exc:
            log.warning("workflow.operation_dropped", run_id=run_id, op="result", job_id=jid, error=repr(exc))

    async def cancel_run(self, run_id: str, tenant: str, reason: str = "workflow run cancelled") -> bool:
        """Cancel a tenant's run (JobCancel for its running step jobs). False when missing or
        another tenant's; True also when it was already terminal."""
        try:
            async with self.run_locked(run_id) as (run, fence):
                if run is None or run.org_id != tenant:
                    return False
                new, effects = rs.cancel(run, reason, self.clock())
                if new is not run:
                    await self._commit(new, fence, effects)
                return True
        except (OperationDropped, LeaseLost) as exc:
            log.warning("workflow.operation_dropped", run_id=run_id, op="cancel", error=repr(exc))
            return False

    # ---- the safety nets: reconciler and timers ----------------------------------------------------

    async def reconcile(self, run_id: str, *, stale_after: float = RECONCILE_STALE_S) -> None:
        """Heal one active run (§2.10): a step whose job ended without its result reaching us gets
        that outcome from the job store; a step whose job record never got written (the engine
        died between persisting the step and publishing its job) is published again, same job id;
        then the run is advanced (due retries, delays, timeouts). Skips a busy run."""
        try:
            async with self.run_locked(run_id, wait=0.0) as (run, _fence):
                if run is None or run.terminal:
                    return
                outcomes, lost = await self._job_outcomes(run, stale_after)
                for jid, status, error, result_ptr in outcomes:
                    await self.apply_outcome(jid, status, error, result_ptr=result_ptr)
                if lost:
                    await self._republish(run_id, lost)
                await self.advance(run_id)
        except RunBusy:
            return  # someone is working on it right now
        except (OperationDropped, LeaseLost) as exc:
            log.warning("workflow.operation_dropped", run_id=run_id, op="reconcile", error=repr(exc))
        except Exception as exc:
            log.warning("workflow.reconcile_failed", run_id=run_id, error=repr(exc))

    async def _job_outcomes(self, run: Run, stale_after: float,
                            ) -> tuple[list[tuple[str, str, Any, str]], list[str]]:
        """(outcomes of ended step jobs, paths whose job record is missing past ``stale_after``)."""
        live = [(path, sr) for path, sr in run.steps.items() if sr.status in (rs.RUNNING, rs.WAITING) and sr.job_id]
        if not live:
            return [], []
        metas = await self.jobs.get_many([sr.job_id for _, sr in live])
        outcomes: list[tuple[str, str, Any, str]] = []
        lost: list[str] = []
        now = self.clock()
        for (path, sr), meta in zip(live, metas):
            if meta is None:
                if sr.started_at is not None and now - sr.started_at > stale_after:
                    lost.append(path)
                continue
            state = JobState(meta["state"])
            if state not in TERMINAL_JOB:
                continue
            status = _STATUS_OF_STATE.get(state, "FAILED")
            error = None
            if status != "SUCCEEDED":
                error = {"message": str(meta.get("failure_reason") or f"job {state.value.lower()}")}
            outcomes.append((sr.job_id, status, error, str(meta.get("result_ptr") or "")))
        return outcomes, lost

    async def _republish(self, run_id: str, paths: Sequence[str]) -> None:
        async with self.run_locked(run_id) as (run, _fence):
            if run is None or run.terminal:
                return
            workflow = await self.load_workflow(run.workflow_id)
            if workflow is None:
                return
            for path in paths:
                sr = run.step(path)
                if sr.status not in (rs.RUNNING, rs.WAITING) or not sr.job_id:
                    continue
                parsed = rs.parse_job_id(sr.job_id)
                if parsed is None or not rs.is_step_path(workflow, path):
                    continue
                step = rs.step_for_path(workflow, path)[0]
                log.warning("workflow.step_job_republished", run_id=run_id, step=path, job_id=sr.job_id)
                job = self.build_step_job(workflow, run, step, path, sr.job_id, parsed[2])
                if not await self._publish_step(run, job):
                    await self._arm(run, self.clock() + PUBLISH_RETRY_S)

    async def cancel_strays(self, run_id: str) -> int:
        """A finished run's step jobs that still run (a cancel that never went out): cancel them
        again. Returns how many were cancelled."""
        doc = await self.store.get_run(run_id)
        if doc is None:
            return 0
        run = Run.from_dict(doc)
        if not run.terminal:
            return 0
        sent = 0
        for sr in run.steps.values():  # child runs of subworkflow steps, the same way
            child = await self.load_run(sr.child_run_id) if sr.child_run_id else None
            if child is not None and not child.terminal:
                await self._cancel_child(run, rs.CancelRun(child.id, f"workflow run {run.status}"))
                sent += 1
        jids = [sr.job_id for sr in run.steps.values() if sr.job_id]
        if not jids:
            return sent
        metas = await self.jobs.get_many(jids)
        for jid, meta in zip(jids, metas):
            if meta is not None and JobState(meta["state"]) not in TERMINAL_JOB:
                await self._carry_out(run, rs.CancelJob(jid, f"workflow run {run.status}"))
                sent += 1
        return sent

    async def fire_timers(self, limit: int = 100) -> int:
        """Advance the runs whose timers are due (retries, delays, timeouts, publish retries).
        A timer is taken by one caller; if advancing fails it is armed again shortly, and the
        reconciler advances every active run anyway, so a crash between the two loses nothing."""
        members = await self.store.pop_due_timers(self.clock(), limit)
        limiter = trio.CapacityLimiter(8)

        async def fire(member: str) -> None:
            run_id = member.rsplit(":", 1)[-1]
            async with limiter:
                try:
                    await self.advance(run_id)
                except Exception as exc:
                    log.warning("workflow.timer_failed", run_id=run_id, error=repr(exc))
                    await self.store.arm_timer(member, self.clock() + PUBLISH_RETRY_S)

        async with trio.open_nursery() as nursery:
            for member in members:
                nursery.start_soon(fire, member)
        return len(members)

    # ---- advancing ---------------------------------------------------------------------------------

    async def _advance(self, run: Run, fence: int, workflow: Workflow | None = None) -> None:
        if run.terminal:
            return
        if workflow is None:
            workflow = await self.load_workflow(run.workflow_id)
        if workflow is None:
            log.warning("workflow.definition_missing", run_id=run.id, workflow_id=run.workflow_id)
            return
        for _ in range(MAX_PASSES):
            passed = await self._pass(run, fence, workflow)
            if passed is None:
                return  # a publish failed: its retry timer is armed
            run, spawned = passed
            if not spawned or run.terminal:
                break  # else: child runs started in that pass may have ended already
        wake = rs.next_wake(workflow, run)
        if wake is not None and wake > self.clock():
            await self._arm(run, wake)

    async def _pass(self, run: Run, fence: int, workflow: Workflow) -> tuple[Run, bool] | None:
        """One pass of advance: returns the stored run and whether child runs were started."""
        now = self.clock()
        saved = run
        spawned = False
        effects: list[rs.Effect] = []
        run, fx = rs.start(run, now, workflow)
        effects += fx
        run, fx = rs.time_out(workflow, run, now)
        effects += fx
        run, fx = await self._look_at_children(workflow, run, now)
        effects += fx
        transitions = 0
        while transitions < MAX_TRANSITIONS:
            due = rs.due_steps(workflow, run, now)
            for path in due:
                transitions += 1
                step = rs.step_for_path(workflow, path)[0]
                if step.type == "loop":  # an iteration ended: the next one, or done
                    run, fx = await self._inline(workflow, run, step, path, now)
                else:
                    run, fx = rs.finish_delay(workflow, run, path, now)
                effects += fx
            paths = rs.next_dispatches(workflow, run, now)
            if not paths:
                if due and not run.terminal:
                    continue  # what finished may make its parent due (a loop whose body waited)
                break
            progressed = False
            for path in paths:
                transitions += 1
                step, item = rs.step_for_path(workflow, path)
                if run.step(path).status != rs.PENDING or run.terminal:
                    continue
                if step.for_each and not item:
                    run, fx = self._expand(workflow, run, step, path, now)
                elif step.condition and step.type not in ("condition", "switch", "loop") \
                        and not self._gate_passes(workflow, run, step, path):
                    run, fx = rs.complete_step(workflow, run, path, rs.SKIPPED, None,
                                               {"message": "condition_false"}, now)
                elif step.dispatches or step.type == "approval":
                    before = run
                    attempt = run.step(path).attempts + 1
                    try:
                        job = self.build_step_job(workflow, run, step, path, rs.job_id(run.id, path, attempt), attempt)
                    except Exception as exc:  # e.g. a template that does not render: the step cannot start
                        run, fx = rs.complete_step(workflow, run, path, rs.FAILED, None,
                                                   {"message": f"step input: {exc}"}, now)
                        effects += fx
                        progressed = True
                        continue
                    status = rs.WAITING if step.type == "approval" else rs.RUNNING
                    run, fx = rs.mark_dispatched(workflow, run, path, now, status=status)
                    effects += [e for e in fx if not isinstance(e, rs.DispatchStep)]
                    spawned |= _spawns(effects)
                    await self._commit(run, fence, effects)
                    effects, saved = [], run
                    dispatch = next(e for e in fx if isinstance(e, rs.DispatchStep))
                    if dispatch.job_id != job[0].job_id:  # runstate and our prediction disagree
                        job = self.build_step_job(workflow, run, step, path, dispatch.job_id, dispatch.attempt)
                    if not await self._publish_step(run, job):
                        run = revert_dispatch(before, self.clock())
                        await self._commit(run, fence, [rs.TimelineEvent(
                            "step_dispatch_failed", step_id=path, job_id=dispatch.job_id,
                            message="publish to sys.job.submit failed; retrying")])
                        await self._arm(run, self.clock() + PUBLISH_RETRY_S)
                        return None
                    progressed = True
                    continue
                else:
                    run, fx = await self._inline(workflow, run, step, path, now)
                effects += fx
                progressed = True
                if run.terminal:
                    break
            if not progressed or run.terminal:
                break
        if run is not saved or effects:
            spawned |= _spawns(effects)
            await self._commit(run, fence, effects)
        return run, spawned

    # ---- step jobs -----------------------------------------------------------------------------------

    def build_step_job(self, workflow: Workflow, run: Run, step: Step, path: str,
                       jid: str, attempt: int) -> tuple[JobRequest, Any]:
        """The JobRequest of a step attempt and the context stored at ``ctx:<jobID>`` (§2.6, §2.3)."""
        sr: StepRun = run.step(path)
        scope = self._scope(workflow, run, path)
        tenant = run.org_id
        rendered = expr.render(dict(step.input), scope) if step.input else dict(run.input)
        labels = {"workflow_id": run.workflow_id, "run_id": run.id, "step_id": path, "_source": "workflow"}
        if step.worker_id:
            labels["worker_id"] = step.worker_id
        for key, value in step.route_labels.items():
            labels[str(key)] = str(value)
        memory_id = str(run.input.get("memory_id") or f"run:{run.id}")
        env = {"workflow_id": run.workflow_id, "run_id": run.id, "step_id": path, "tenant_id": tenant,
               "team_id": run.team_id, "memory_id": memory_id, "context_mode": "raw"}
        if run.dry_run:
            env["dry_run"] = "true"
        if step.type == "approval":
            topic, priority = subjects.APPROVAL_GATE_TOPIC, JobPriority.JOB_PRIORITY_INTERACTIVE
            labels["gate_type"] = "workflow_approval"
            idempotency = f"wf:{run.id}:{path}:{attempt}:approval"
            context: Any = {
                "kind": "workflow_approval_context", "version": 1,
                "workflow": {"workflow_id": run.workflow_id, "workflow_name": workflow.name, "run_id": run.id,
                             "step_id": path, "step_name": step.name, "requested_at": self.clock(),
                             "triggered_by": run.triggered_by, "tenant_id": tenant, "team_id": run.team_id},
                "decision": rendered,
            }
        else:
            topic = step.topic or f"job.workflow.{run.workflow_id}"
            priority = _PRIORITIES.get(str(run.input.get("priority") or "batch"), JobPriority.JOB_PRIORITY_BATCH)
            idempotency = f"wf:{run.id}:{path}:{attempt}"
            context = dict(rendered) if isinstance(rendered, Mapping) else {"input": rendered}
            if isinstance(sr.input, Mapping):
                context.update(sr.input)  # e.g. the error of an activated on_error handler
            if sr.item is not None or rs.step_for_path(workflow, path)[1]:
                context["item"] = sr.item
                env["foreach_item"] = json.dumps(sr.item, separators=(",", ":"), default=str)
        meta = JobMetadata(tenant_id=tenant, idempotency_key=idempotency, labels=labels)
        request = JobRequest(
            job_id=jid, topic=topic, priority=priority, context_ptr=ptr(context_key(jid)),
            adapter_id=step.worker_id, env=env, workflow_id=run.workflow_id, memory_id=memory_id,
            tenant_id=tenant, labels=labels, meta=meta,
            budget=Budget(deadline_ms=int(step.timeout_sec * 1000)),
        )
        return request, context

    async def _publish_step(self, run: Run, job: tuple[JobRequest, Any]) -> bool:
        """Create the job record (PENDING, with its context) and publish the request; False when
        either failed (the caller reverts the step)."""
        request, context = job
        jid = request.job_id
        fields = {"topic": request.topic, "tenant": run.org_id, "trace_id": run.id, "labels": dict(request.labels),
                  "idempotency_key": request.meta.idempotency_key, "memory_id": request.memory_id,
                  "submitted_by": SENDER}
        try:
            try:
                await self.jobs.create(jid, JobState.PENDING, request=request, fields=fields, context=context)
            except InvalidTransition:
                pass  # created by an earlier try of this same attempt
            packet = new_packet(request, sender_id=SENDER, trace_id=run.id)
            await self.bus.publish(subjects.SUBMIT, encode(packet), msg_id=f"jobreq:{jid}")
        except Exception as exc:
            log.error("workflow.publish_failed", run_id=run.id, job_id=jid, error=repr(exc))
            return False
        return True

    async def _read_output(self, job_id: str, result_ptr: str) -> Any:
        """The JSON output a worker stored at ``res:<jobID>`` (None if absent or over 256 KiB)."""
        if not result_ptr:
            return None
        size = int(await self.redis.execute("STRLEN", keys.result(job_id)) or 0)
        if size == 0 or size > MAX_RESULT_BYTES:
            return None
        return await self.jobs.get_result(job_id)
