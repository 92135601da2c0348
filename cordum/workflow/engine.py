"""The workflow engine's I/O core: drives runs through the pure state machine (``runstate``).

One operation per run at a time, under the run lock ``cordum:wf:run:lock:<runID>`` (a 30 s
``runtime.lease`` renewed at TTL/3). The lock is re-entrant for its holder within one operation
(``handle_result`` → ``advance`` takes it once), and its fencing token goes with every
``WorkflowStore.update_run``: a replica that lost the lock (paused past the TTL) gets
``RunFenceStale`` and its whole operation is dropped and logged — no effect of it is carried out.

Order inside an operation (spec cordum-services §2.6/§2.7): a transition yields a new run and
effects; the run is persisted with the fence FIRST, then the effects are carried out (timeline,
timers, ``sys.job.cancel``), and a step job is published on ``sys.job.submit`` only after the
``running`` step that names it was stored ("persist before publish"). A pass of advance marks every
job it makes ready, persists once (with the result that led to them) and then publishes them
concurrently (right after checking the run lock is still ours). A publish that keeps failing leaves
its step running under its job id: the scheduler's pending replayer re-sends a job whose record was
written, the reconciler re-publishes one whose record never was; the step stays cancellable.

Operations of one replica on one run queue for the run in order (``_local_turn``) before taking the
Redis lock, and step outcomes that queued meanwhile are applied together: a fan-in's ten results
cost one or two operations, not ten rounds of lock polling.

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
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Mapping, Sequence

import trio

from cordum.agent.v1.buspacket_pb2 import BusPacket
from cordum.agent.v1.job_pb2 import Budget, JobCancel, JobMetadata, JobPriority, JobRequest, JobStatus
from cordum.infra.bus import Bus
from cordum.infra.metrics import BoundedLabel, Metrics
from cordum.infra.redis import Redis
from cordum.protocol import subjects
from cordum.protocol.packets import PacketError, decode, encode, new_packet
from cordum.protocol.pointers import context_key, ptr
from cordum.runtime.consumer import Retry
from cordum.runtime.lease import Lease, LeaseLost, Leases
from cordum.runtime.log import get_logger
from cordum.context.window import memory_id_problems
from cordum.store import keys
from cordum.store import output as output_check
from cordum.store.keys import memory_scope
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
#: pauses before publishing a pass's step jobs again, within the operation
PUBLISH_RETRIES = (0.2, 1.0)
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
#: GET a key unless its value is larger than ARGV[1] bytes (then false)
_GET_IF_SMALL = """
if redis.call('STRLEN', KEYS[1]) > tonumber(ARGV[1]) then return false end
return redis.call('GET', KEYS[1])
"""
#: run ids whose turn on this replica the current task holds (re-entrancy of ``_local_turn``)
_TURNS: contextvars.ContextVar[frozenset[str]] = contextvars.ContextVar("wf_run_turns", default=frozenset())
#: parsed definitions kept per replica, by their stored text
DEFINITION_CACHE = 256
#: passes of one advance (a pass that started child runs is followed by one that looks at them)
MAX_PASSES = 1000


@dataclass
class _Turn:
    """A run's queue on this replica (see ``WorkflowEngine._local_turn``)."""

    lock: trio.Lock = field(default_factory=trio.Lock)
    users: int = 0


@dataclass
class _Outcome:
    """A step job's outcome waiting for its run's turn; applied by whichever operation gets the
    turn first (one persist for all that queued meanwhile)."""

    job_id: str
    status: str
    error: Any
    result_ptr: str
    output_sha256: str = ""  # of the output the output policy checked (store.output.HASH_FIELD)
    done: bool = False


class OutputChanged(Exception):
    """A step job's output is no longer the one the output policy checked."""


class RunBusy(Retry):
    """The run lock is held by another operation: try again shortly."""


class OperationDropped(Exception):
    """The operation's fenced write was refused (a newer holder wrote): nothing of it took effect."""


def _spawns(effects: Sequence[rs.Effect]) -> bool:
    return any(isinstance(e, rs.StartRun) for e in effects)


def timer_member(run: Run) -> str:
    return f"{run.workflow_id}:{run.id}"


def _superseded(result: Any, attempt: int | None, current: str | None, worker: str | None) -> bool:
    """The scheduler's rule (``scheduler.engine.apply_result``): a result of an earlier dispatch
    attempt of the job (its worker was presumed gone and the job moved on), or, from a worker that
    does not say its attempt, from another worker than the current one, is not the step's
    outcome: the current attempt's result is."""
    if attempt is not None and current and attempt != int(current):
        log.info("workflow.stale_attempt_result", job_id=result.job_id, attempt=attempt, current=current)
        return True
    if attempt is None and worker and result.worker_id and result.worker_id != worker:
        log.info("workflow.other_worker_result", job_id=result.job_id, worker_id=result.worker_id, current=worker)
        return True
    return False


def _no_step_outcome(packet: BusPacket) -> bool:
    """True for a ``sys.job.result`` packet that decides no workflow step: another payload, a job
    that is not a step's (its id does not parse as one), or a FAILED_RETRYABLE attempt (the
    scheduler retries the job itself, and its final failure comes on ``sys.job.dlq``)."""
    if packet.WhichOneof("payload") != "job_result":
        return True
    result = packet.job_result
    return result.status == JobStatus.JOB_STATUS_FAILED_RETRYABLE or rs.parse_job_id(result.job_id) is None


def skips_result(data: bytes) -> bool:
    """The result consumer's `skip` (``bus.Skip``): most results on the bus are of plain jobs,
    acked where they arrive instead of waking the engine. Undecodable bytes are not skipped: the
    consumer counts and terminates them."""
    try:
        return _no_step_outcome(decode(data))
    except PacketError:
        return False


def status_name(status: int) -> str:
    """CAP JobStatus number → the name runstate.apply_result understands (``SUCCEEDED`` …)."""
    try:
        return JobStatus.Name(status).removeprefix("JOB_STATUS_")
    except ValueError:
        return "FAILED"


class WorkflowMetrics:
    """The Go original's workflow series (spec metrics): runs started, completed by status, and
    how long finished runs took, labelled by workflow id."""

    MAX_NAMED = 200  # workflows with series of their own per process; the rest count as "other"

    def __init__(self, metrics: Metrics) -> None:
        # Bounded: any tenant may define workflows, and each name would be series kept forever.
        self._label = BoundedLabel(self.MAX_NAMED)
        self.started = metrics.counter("cordum_workflows_started_total", "Workflows started by name", ["workflow"])
        self.completed = metrics.counter("cordum_workflows_completed_total", "Workflows completed by name and status",
                                         ["workflow", "status"])
        self.duration = metrics.histogram("cordum_workflow_duration_seconds", "Workflow duration seconds by name",
                                          ["workflow"])

    def moved(self, run: Run, previous: str) -> None:
        if previous == run.status:
            return
        name = self._label(run.workflow_id)
        if previous == rs.PENDING:
            self.started.labels(workflow=name).inc()
        if run.terminal and previous not in rs.TERMINAL_RUN_STATUSES:
            self.completed.labels(workflow=name, status=run.status).inc()
            if run.started_at is not None and run.completed_at is not None:
                self.duration.labels(workflow=name).observe(max(0.0, run.completed_at - run.started_at))


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
        self._turns: dict[str, _Turn] = {}
        self._inbox: dict[str, list[_Outcome]] = {}
        self._parsed: dict[str, Workflow] = {}
        self._followed: dict[str, str] = {}  # run id → the definition text it follows
        self._small_get: Any = None

    # ---- the run lock -------------------------------------------------------------------------

    async def _acquire(self, run_id: str, wait: float) -> Lease:
        lease = await self.leases.acquire_within(keys.workflow_run_lock(run_id), self.lock_ttl, wait)
        if lease is None:
            raise RunBusy(0.5, f"run {run_id} is locked")
        return lease

    @asynccontextmanager
    async def _local_turn(self, run_id: str, wait: float) -> AsyncIterator[None]:
        """This replica's turn on a run: operations of one replica on one run queue here, in
        order, instead of polling the Redis lock against each other (a fan-in's results arrive
        together). RunBusy when the turn did not come within ``wait`` seconds."""
        if run_id in _TURNS.get():
            yield
            return
        turn = self._turns.get(run_id)
        if turn is None:
            turn = self._turns[run_id] = _Turn()
        turn.users += 1
        try:
            if wait <= 0:
                try:
                    turn.lock.acquire_nowait()
                except trio.WouldBlock:
                    raise RunBusy(0.5, f"run {run_id} is busy on this replica") from None
            else:
                with trio.move_on_after(wait):
                    await turn.lock.acquire()
                if not turn.lock.locked() or turn.lock.statistics().owner is not trio.lowlevel.current_task():
                    raise RunBusy(0.5, f"run {run_id} is busy on this replica")
            token = _TURNS.set(_TURNS.get() | {run_id})
            try:
                yield
            finally:
                _TURNS.reset(token)
                turn.lock.release()
        finally:
            turn.users -= 1
            if turn.users == 0:
                del self._turns[run_id]

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
        wait = self.lock_wait if wait is None else wait
        wake: list[tuple[str, str]] = []
        async with self._local_turn(run_id, wait):
            lease = await self._acquire(run_id, wait)
            token = _HELD.set({**held, (id(self), run_id): lease})
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
        doc, definition = await self.store.get_run_with_definition(run_id, definition=run_id not in self._followed)
        if doc is None:
            return None
        if definition is not None:
            if len(self._followed) >= DEFINITION_CACHE * 16:
                self._followed.clear()
            self._followed[run_id] = definition
        return Run.from_dict(doc, copy_values=False)  # just decoded: nobody else holds it

    async def load_workflow(self, run: Run) -> Workflow | None:
        """The workflow ``run`` follows: the definition kept with it when it was created (read
        with the run), else — a run stored without one — the tenant's current definition. Parsed
        once per text (Workflow is frozen)."""
        text = self._followed.get(run.id)
        if text is None:
            doc = await self.store.get_definition(run.workflow_id, tenant=run.org_id)
            if doc is None:
                return None
            text = json.dumps(doc, sort_keys=True)
        return self._parse(text, json.loads(text), f"workflow {run.workflow_id}")

    def parsed(self, doc: Mapping[str, Any], origin: str) -> Workflow:
        """A stored definition parsed, once per text (its canonical JSON costs a twentieth of a
        parse); DefinitionError as `parse_workflow`."""
        return self._parse(json.dumps(doc, sort_keys=True), doc, origin)

    def _parse(self, text: str, doc: Mapping[str, Any], origin: str) -> Workflow:
        workflow = self._parsed.get(text)
        if workflow is None:
            workflow = parse_workflow(doc, origin=origin)
            if len(self._parsed) >= DEFINITION_CACHE:
                self._parsed.clear()
            self._parsed[text] = workflow
        return workflow

    async def save(self, run: Run, fence: int, *, timeline: Sequence[Mapping[str, Any]] = (),
                   before: Run | None = None) -> bool:
        """Persist ``run`` with ``fence`` (and its timeline events, in the same round trip);
        False (logged) when a newer fence already wrote. ``before``: the run as stored, whose
        step jobs are indexed already."""
        indexed = {sr.job_id for sr in before.steps.values() if sr.job_id} if before is not None else ()
        try:
            previous = await self.store.update_run(run.to_dict(copy_values=False), fence=fence, timeline=timeline,
                                                   indexed_jobs=indexed)
        except RunFenceStale as exc:
            log.warning("workflow.stale_fence", run_id=run.id, fence=exc.fence, held=exc.held)
            return False
        except RunNotFound:
            log.warning("workflow.run_deleted", run_id=run.id)
            return False
        if self.metrics is not None:
            self.metrics.moved(run, previous)
        return True

    async def _commit(self, run: Run, fence: int, effects: Sequence[rs.Effect], *,
                      before: Run | None = None) -> None:
        """Persist (with the timeline events), then carry out the other effects except
        dispatches; OperationDropped on a stale fence."""
        events = [self._event(e) for e in effects if isinstance(e, rs.TimelineEvent)]
        if not await self.save(run, fence, timeline=events, before=before):
            raise OperationDropped(run.id)
        parent = run.metadata.get("parent_run_id") if run.terminal else None
        wake = _WAKE.get()
        if isinstance(parent, str) and parent and wake is not None:
            wake.append((parent, str(run.metadata.get("parent_workflow_id") or "")))
        for effect in effects:
            if not isinstance(effect, rs.TimelineEvent):
                await self._carry_out(run, effect)

    def _event(self, effect: rs.TimelineEvent) -> dict[str, Any]:
        event: dict[str, Any] = {"type": effect.type, "at": self.clock()}
        for name in ("step_id", "job_id", "status", "message"):
            if getattr(effect, name):
                event[name] = getattr(effect, name)
        if effect.data:
            event["data"] = dict(effect.data)
        return event

    async def _carry_out(self, run: Run, effect: rs.Effect) -> None:
        """Every effect but timeline events (written with the run) and dispatches (the pass's)."""
        if isinstance(effect, rs.ArmTimer):
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
        await self.store.arm_timer_earlier(timer_member(run), due)

    # ---- public operations ----------------------------------------------------------------------

    async def start_run(self, workflow_id: str, tenant: str, input: Mapping[str, Any] | None = None, *,
                        idempotency_key: str | None = None, dry_run: bool = False,
                        triggered_by: str = "", started_by: Mapping[str, str] | None = None) -> str:
        """Create a run of a tenant's workflow and advance it; returns the run id (the existing
        run's for a repeated idempotency key). LookupError when the workflow is unknown.
        ``started_by`` (``{"principal", "key"}``: the caller's principal id and key fingerprint)
        goes onto the run's approval gates, so its starter cannot approve them."""
        doc = await self.store.get_definition(workflow_id, tenant=tenant)
        if doc is None:
            raise LookupError(f"workflow {workflow_id} not found")
        self.parsed(doc, f"workflow {workflow_id}")  # refuse a definition that no longer parses
        now = self.clock()
        run = Run(id=str(uuid.uuid4()), workflow_id=workflow_id, org_id=tenant,
                  team_id=str(doc.get("team_id") or ""), input=dict(input or {}), created_at=now,
                  updated_at=now, dry_run=dry_run, triggered_by=triggered_by,
                  idempotency_key=idempotency_key or "",
                  metadata={"started_by": dict(started_by)} if started_by else {})
        run_id, created = await self.store.create_run(run.to_dict(), tenant=tenant, idempotency_key=idempotency_key,
                                                      definition=doc)
        if created:
            await self.store.append_timeline(run_id, {"type": "run_created", "at": now, "status": rs.PENDING})
            try:
                await self.advance(run_id)
            except RunBusy:  # the run exists: say so (a retried start would make another); a timer starts it
                await self._arm(run, now)
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
        if _no_step_outcome(packet):
            return
        result = packet.job_result
        current, worker, check, stored_ptr, checked_hash = await self.redis.execute(
            "HMGET", keys.job_meta(result.job_id), "attempts", "worker_id", output_check.CHECK_FIELD, "result_ptr",
            output_check.HASH_FIELD)
        if _superseded(result, subjects.attempt_of(getattr(msg, "headers", None)), current, worker):
            return
        if result.status == JobStatus.JOB_STATUS_SUCCEEDED and check:
            if check in output_check.UNCHECKED or check == output_check.QUARANTINED:
                # The output policy has yet to clear it: the scheduler sends the checked result
                # (or, quarantined, a DLQ event) when it has, and our reconciler reads the store.
                return
            result.result_ptr = stored_ptr or result.result_ptr  # a redacted output's copy
        await self.handle_result(packet, output_sha256=checked_hash or "")

    async def on_dlq(self, packet: BusPacket, msg: Any = None) -> None:
        """``sys.job.dlq`` consumer: a step job the scheduler ended badly (denied by policy,
        retries used up, timed out) without a worker result for it."""
        await self.handle_result(packet)

    async def handle_result(self, packet: BusPacket, *, output_sha256: str = "") -> None:
        """One JobResult packet: apply it to its run (ignored when not a workflow job), persist,
        carry out its effects, then advance the run."""
        if packet.WhichOneof("payload") != "job_result":
            return
        result = packet.job_result
        status = status_name(result.status)
        if result.error_code.startswith("output_quarantined"):
            status = "FAILED"  # the job ran; what it produced may not be used: the step failed
        error: Any = None
        if status != "SUCCEEDED":
            error = {"message": result.error_message or f"job {status.lower()}"}
            if result.error_code:
                error["code"] = result.error_code
        await self.apply_outcome(result.job_id, status, error, result_ptr=result.result_ptr, output_sha256=output_sha256)

    async def apply_outcome(self, jid: str, status: str, error: Any = None, *, result_ptr: str = "",
                            output_sha256: str = "") -> None:
        """Apply a step job's outcome (``status`` a CAP JobStatus name) to its run. Outcomes that
        queue for the same run meanwhile are applied together, in one persist and one advance;
        each caller returns once its own outcome was applied (or raises if its operation failed,
        so its message is redelivered)."""
        parsed = rs.parse_job_id(jid)
        if parsed is None:
            return
        run_id = parsed[0]
        mine = _Outcome(jid, status, error, result_ptr, output_sha256)
        inbox = self._inbox.setdefault(run_id, [])
        inbox.append(mine)
        batch: list[_Outcome] = []
        try:
            async with self._local_turn(run_id, self.lock_wait):
                if mine.done:
                    return  # an operation that had the turn before us applied it
                batch = self._inbox.pop(run_id, [])
                await self._apply_batch(run_id, batch)
        except (OperationDropped, LeaseLost) as exc:
            log.warning("workflow.operation_dropped", run_id=run_id, op="result", job_id=jid, error=repr(exc))
        finally:
            if mine in self._inbox.get(run_id, ()):
                self._inbox[run_id].remove(mine)  # never got the turn: our caller retries
            if not self._inbox.get(run_id, True):
                del self._inbox[run_id]
            others = [o for o in batch if not o.done and o is not mine]
            if others:  # our operation failed: their own callers get the turn and try them
                self._inbox.setdefault(run_id, [])[:0] = others

    async def _apply_batch(self, run_id: str, batch: Sequence[_Outcome]) -> None:
        async with self.run_locked(run_id) as (run, fence):
            if run is None:
                log.info("workflow.result_unknown_run", run_id=run_id)
                for outcome in batch:
                    outcome.done = True
                return
            current = [o for o in batch if not run.terminal and run.step(rs.parse_job_id(o.job_id)[1]).job_id == o.job_id]
            workflow = await self.load_workflow(run) if current else None
            if workflow is None:  # all stale or repeated (or the workflow is gone): nothing to apply
                for outcome in batch:
                    outcome.done = True
                return
            before, effects = run, []
            for outcome in current:
                status, error, output = outcome.status, outcome.error, None
                if status == "SUCCEEDED":
                    try:
                        output = await self._read_output(outcome.job_id, outcome.result_ptr, outcome.output_sha256)
                    except OutputChanged:
                        status, error = "FAILED", {"code": "output_changed", "message": (
                            "the job's output changed after the output policy checked it; it is not used")}
                run, fx = rs.apply_result(workflow, run, outcome.job_id, status, output, error,
                                          self.clock(), result_ptr=outcome.result_ptr)
                effects += fx
            if run is not before:
                await self._advance(run, fence, workflow, unsaved=effects, saved=before)
            for outcome in batch:
                outcome.done = True

    async def cancel_run(self, run_id: str, tenant: str, reason: str = "workflow run cancelled") -> bool:
        """Cancel a tenant's run (JobCancel for its running step jobs). False when missing or
        another tenant's; True also when it was already terminal."""
        try:
            async with self.run_locked(run_id) as (run, fence):
                if run is None or run.org_id != tenant:
                    return False
                new, effects = rs.cancel(run, reason, self.clock())
                if new is not run:
                    await self._commit(new, fence, effects, before=run)
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
                for jid, status, error, result_ptr, checked in outcomes:
                    await self.apply_outcome(jid, status, error, result_ptr=result_ptr, output_sha256=checked)
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
                            ) -> tuple[list[tuple[str, str, Any, str, str]], list[str]]:
        """(outcomes of ended step jobs, paths whose job record is missing past ``stale_after``)."""
        live = [(path, sr) for path, sr in run.steps.items() if sr.status in (rs.RUNNING, rs.WAITING) and sr.job_id]
        if not live:
            return [], []
        metas = await self.jobs.get_many([sr.job_id for _, sr in live])
        outcomes: list[tuple[str, str, Any, str, str]] = []
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
            if state is JobState.SUCCEEDED and meta.get(output_check.CHECK_FIELD) in output_check.UNCHECKED:
                continue  # its output is still being checked: the scheduler sends the outcome
            status = _STATUS_OF_STATE.get(state, "FAILED")
            error = None
            if status != "SUCCEEDED":
                error = {"message": str(meta.get("failure_reason") or f"job {state.value.lower()}")}
            outcomes.append((sr.job_id, status, error, str(meta.get("result_ptr") or ""),
                             str(meta.get(output_check.HASH_FIELD) or "")))
        return outcomes, lost

    async def _republish(self, run_id: str, paths: Sequence[str]) -> None:
        async with self.run_locked(run_id) as (run, _fence):
            if run is None or run.terminal:
                return
            workflow = await self.load_workflow(run)
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
                if await self._publish_steps(run, [job]):
                    await self._arm(run, self.clock() + PUBLISH_RETRY_S)

    async def cancel_strays(self, run_id: str) -> int:
        """A finished run's step jobs that still run (a cancel that never went out): cancel them
        again. Returns how many were cancelled."""
        doc = await self.store.get_run(run_id)
        if doc is None:
            return 0
        run = Run.from_dict(doc, copy_values=False)
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

    async def _advance(self, run: Run, fence: int, workflow: Workflow | None = None, *,
                       unsaved: Sequence[rs.Effect] = (), saved: Run | None = None) -> None:
        """Move the run on as far as it goes now. ``unsaved``/``saved``: a transition the caller
        made but did not persist (``saved`` is the run as stored): it is persisted with the first
        step dispatch of this advance, or at its end: one write instead of two."""
        saved = run if saved is None else saved
        if workflow is None:
            workflow = await self.load_workflow(run)
        if workflow is None:
            log.warning("workflow.definition_missing", run_id=run.id, workflow_id=run.workflow_id)
            return
        if run.terminal:
            if run is not saved or unsaved:
                await self._commit(run, fence, unsaved, before=saved)
            return
        pending = list(unsaved)
        for _ in range(MAX_PASSES):
            passed = await self._pass(run, fence, workflow, saved, pending)
            pending = []
            if passed is None:
                return  # a publish failed: its retry timer is armed
            run, spawned = passed
            saved = run
            if not spawned or run.terminal:
                break  # else: child runs started in that pass may have ended already
        wake = rs.next_wake(workflow, run)
        if wake is not None and wake > self.clock():
            await self._arm(run, wake)

    async def _pass(self, run: Run, fence: int, workflow: Workflow, saved: Run,
                    effects: list[rs.Effect]) -> tuple[Run, bool] | None:
        """One pass of advance: returns the stored run and whether child runs were started.
        Step jobs made ready in the pass are marked dispatched in memory, persisted together (with
        whatever else the pass changed), and only then published, concurrently."""
        now = self.clock()
        spawned = False
        run, fx = rs.start(run, now, workflow)
        effects += fx
        run, fx = rs.time_out(workflow, run, now)
        effects += fx
        run, fx = await self._look_at_children(workflow, run, now)
        effects += fx
        jobs: list[tuple[str, tuple[JobRequest, Any]]] = []  # (step path, its job)
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
                    dispatch = next(e for e in fx if isinstance(e, rs.DispatchStep))
                    if dispatch.job_id != job[0].job_id:  # runstate and our prediction disagree
                        job = self.build_step_job(workflow, run, step, path, dispatch.job_id, dispatch.attempt)
                    jobs.append((path, job))
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
        spawned = _spawns(effects)
        if run is not saved or effects:
            await self._commit(run, fence, effects, before=saved)
        # persist before publish: every job below is named by a step stored running/waiting
        jobs = [(path, job) for path, job in jobs if run.step(path).job_id == job[0].job_id and
                run.step(path).status in (rs.RUNNING, rs.WAITING)]
        failed = await self._publish_steps(run, [job for _, job in jobs])
        for delay in PUBLISH_RETRIES:
            if not failed:
                break
            await trio.sleep(delay)
            self._check_lease(run.id)
            failed = await self._publish_steps(run, [job for _, job in jobs if job[0].job_id in failed])
        if failed:
            # The steps stay running under their job ids (never reverted: a job whose record was
            # written may be picked up by the scheduler's pending replayer, and must stay
            # cancellable with the run). A record that exists is re-sent by that replayer; one
            # that was never written is published again by our reconciler (``_job_outcomes``).
            log.error("workflow.dispatch_deferred", run_id=run.id, job_ids=sorted(failed))
            await self.store.append_timeline(run.id, *[self._event(rs.TimelineEvent(
                "step_dispatch_failed", step_id=path, job_id=request.job_id,
                message="publish to sys.job.submit failed; the reconciler or the scheduler re-sends it"))
                for path, (request, _) in jobs if request.job_id in failed])
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
        problems = memory_id_problems(memory_scope(tenant, memory_id))
        if problems:  # refused here (the step fails naming it), not by the context engine later
            raise ValueError(f"memory_id: {'; '.join(problems)}")
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

    def _check_lease(self, run_id: str) -> None:
        """LeaseLost unless this operation's run lock is still ours by our own clock: checked right
        before a step job goes out, so a replica that was paused past the lock TTL (and may find
        the run cancelled by its successor) publishes nothing."""
        lease = _HELD.get().get((id(self), run_id))
        if lease is not None and (lease.lost or trio.current_time() >= lease.valid_until):
            raise LeaseLost(lease.key)

    async def _publish_steps(self, run: Run, jobs: Sequence[tuple[JobRequest, Any]]) -> set[str]:
        """Publish step jobs concurrently; the ids of those that could not be published."""
        failed: set[str] = set()
        if jobs:
            self._check_lease(run.id)

        async def one(job: tuple[JobRequest, Any]) -> None:
            if not await self._publish_step(run, job):
                failed.add(job[0].job_id)

        if len(jobs) == 1:
            await one(jobs[0])
        elif jobs:
            async with trio.open_nursery() as nursery:
                for job in jobs:
                    nursery.start_soon(one, job)
        return failed

    async def _publish_step(self, run: Run, job: tuple[JobRequest, Any]) -> bool:
        """Create the job record (PENDING, with its context) and publish the request; False when
        either failed (the caller reverts the step)."""
        request, context = job
        jid = request.job_id
        fields = {"topic": request.topic, "tenant": run.org_id, "trace_id": run.id, "labels": dict(request.labels),
                  "idempotency_key": request.meta.idempotency_key, "memory_id": request.memory_id,
                  "submitted_by": SENDER}
        starter = run.metadata.get("started_by")
        if isinstance(starter, Mapping):  # the approvals route refuses the run's starter (self-approval)
            fields["principal"] = str(starter.get("principal") or "")
            fields["submitted_key"] = str(starter.get("key") or "")
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
        log.debug("job.submitted", job_id=jid, trace_id=run.id, run_id=run.id, topic=request.topic)
        return True

    async def _read_output(self, job_id: str, result_ptr: str, checked_sha256: str = "") -> Any:
        """The JSON output a worker stored at ``res:<jobID>`` (None if absent or over 256 KiB: one
        round trip, and a larger value never leaves Redis)."""
        if not result_ptr:
            return None
        if self._small_get is None:
            self._small_get = self.redis.script(_GET_IF_SMALL)
        # the job's own output, or the redacted copy its pointer names (never another key)
        key = output_check.served_result_key({"id": job_id, "result_ptr": result_ptr}) or keys.result(job_id)
        text = await self._small_get([key], [MAX_RESULT_BYTES])
        if not output_check.unchanged({"id": job_id, output_check.HASH_FIELD: checked_sha256}, key, text or None):
            log.warning("workflow.output_changed_after_check", job_id=job_id)
            raise OutputChanged(job_id)
        if not text:
            return None
        try:
            return json.loads(text)
        except ValueError:
            return text
