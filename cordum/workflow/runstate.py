"""The workflow run state machine: pure transitions over the ``wf:run:<id>`` document (spec
§2.5–2.8, §2.11).

Pure, like ``definition.py`` and ``expr.py``: no I/O, no trio, no redis; time arrives as numbers
(unix seconds). The document and effect classes live in ``runmodel.py`` and are re-exported
here. Every transition takes a :class:`Run` and returns a NEW run plus a list of
*effects*, small dataclasses the I/O layer carries out after persisting the run (persist before
publish, §2.6):

- :class:`DispatchStep`: publish the step's JobRequest on ``sys.job.submit``;
- :class:`CancelJob`: publish ``JobCancel`` on ``sys.job.cancel``;
- :class:`ArmTimer`: wake the run at ``due_at`` (a retry's ``next_attempt_at``; ``step_path == ""``
  is the workflow timeout, answered with :func:`time_out`);
- :class:`TimelineEvent`: append to ``wf:run:timeline:<run>``;
- :class:`StartRun` / :class:`CancelRun`: create and advance / cancel a subworkflow's child run.

A transition that does not apply (stale or duplicate result, terminal run) returns the input run
object itself and no effects, so replays are idempotent.

The engine loop (I/O layer)::

    run, fx = start(run, now, workflow)
    for path in due_steps(workflow, run, now):     # delays whose time came
        run, fx = finish_delay(workflow, run, path, now)
    for path in next_dispatches(workflow, run, now):
        step, item = step_for_path(workflow, path)
        if step.for_each and not item:            # evaluate the items once, children follow
            run, fx = expand_for_each(workflow, run, path, items, now)
        elif step.dispatches or step.type == "approval":
            run, fx = mark_dispatched(workflow, run, path, now)   # persist, then publish
        else:                                       # the engine's own types (steps.py decides)
            run, fx = complete_step(workflow, run, path, status, output, error, now)
            # or start_delay / take_branch / start_parallel / loop_iterate / start_subworkflow
    # on sys.job.result:
    run, fx = apply_result(workflow, run, job_id, status, output, error, now)

Step paths: a step id; ``step[i]`` an item of its ``for_each``; ``loop[i]`` iteration i of a loop,
which runs the loop's body step (so ``loop[i][j]`` is item j of that iteration when the body has
a for_each; job ids stay ``<run>:loop[i]@n``). A parallel step's children are step ids of their
own. Each parent lists its children in ``children``; a child's outcome rolls up into its parent
(:func:`_roll_up`), and :func:`step_for_path` maps any path to the definition step it runs.
Outputs go to ``ctx.steps[id]`` for step ids only (not items or iterations).

A delay step waits ``running`` with ``next_attempt_at`` = due (:func:`start_delay`); once due it
is among :func:`due_steps` and :func:`finish_delay` completes it.

Inline step types (condition, switch, transform, storage, notify, delay, parallel, loop,
subworkflow) and the ``condition`` pre-gate are NOT evaluated here: their handler module computes
the outcome and reports it through :func:`complete_step` (or :func:`mark_dispatched` with
``status=WAITING`` for an approval gate). Templating a step's input (``StepRun.input["error"]``
of an activated ``on_error`` handler included) is the engine's.

Rules chosen here beyond the spec text:
- A failed/denied/timed_out/cancelled step with no recovering ``on_error`` chain ends the run at
  once: its pending dependents are ``skipped`` ("dependency X failed"), every other non-terminal
  step is ``cancelled`` (CancelJob for those with a running/waiting job). With several failures the
  run status is the first present of failed, denied, timed_out, cancelled.
- A pending step that can never become ready (a dependency skipped, or failed without recovery) is
  marked ``skipped`` with ``skip_reason = "dependency <dep> <status>"``; skips propagate, so a run
  always ends once all its jobs answered.
- A terminal run is sticky: no transition changes it.
- Parallel (:func:`_roll_up_parallel`): ``all`` needs every child, ``any`` one, ``n_of_m``
  ``input.required``; once met the parent succeeds with ``{child: output}`` and the children still
  going are cancelled (their jobs get CancelJob); once too few children can still succeed the
  parent fails (denied when every bad child was denied) and the rest are cancelled too. A child
  skipped by its own condition is one fewer that ``all`` needs and one fewer that could count for
  ``any``/``n_of_m``. A parallel child's output is also recorded at ``ctx.steps[child]``.
- Subworkflow (:func:`start_subworkflow`): the step is ``running`` with ``child_run_id`` until the
  engine completes it from the child run's end; cancelling the step (or the run) cancels the
  child (:class:`CancelRun`).
- Loop (:func:`loop_iterate`, :func:`_roll_up_loop`): one iteration at a time; a bad iteration
  (after the body's own retries) fails the loop; after a good one the loop is among
  :func:`due_steps` until the engine starts the next iteration or completes it.
- Switch joins (:func:`take_branch`): a target not taken is ``skipped`` with ``skip_reason =
  NOT_TAKEN``. A dependency not taken counts as satisfied for a step with at least one other
  dependency that succeeded, so a join after the branches runs after the branch that was taken; a
  step ALL of whose dependencies were not taken is skipped as ``NOT_TAKEN`` too (so the rule holds
  through chains of steps on a branch and through nested switches). Any other skip still skips
  the dependents ("dependency X skipped").
"""

from __future__ import annotations

import copy
import re
from dataclasses import replace
from typing import Any, Iterable, Mapping

from cordum.workflow.definition import (
    FAILED_STATUSES,
    Step,
    Workflow,
    owned_steps,
    ready_steps,
    topological_order,
)
from cordum.workflow import runmodel
from cordum.workflow.runmodel import (
    CANCELLED,
    CHILD_PATH,
    DENIED,
    FAILED,
    PENDING,
    RESULT_STATUSES,
    RUN_STATUSES,
    RUNNING,
    SKIPPED,
    STEP_STATUSES,
    SUCCEEDED,
    TERMINAL_RUN_STATUSES,
    TERMINAL_STEP_STATUSES,
    TIMED_OUT,
    WAITING,
    ArmTimer,
    CancelJob,
    CancelRun,
    DispatchStep,
    Effect,
    Run,
    StartRun,
    StepRun,
    TimelineEvent,
    base_step,
    job_id,
    parse_job_id,
)

__all__ = [  # the run document and effects (runmodel) are re-exported
    *runmodel.__all__,
    # re-exports this module does not use itself, named so linters see them exported
    "RESULT_STATUSES",
    "RUN_STATUSES",
    "STEP_STATUSES",
    "base_step",
    "NOT_TAKEN",
    "aggregate",
    "apply_result",
    "cancel",
    "complete_step",
    "due_steps",
    "expand_for_each",
    "finish_delay",
    "is_step_path",
    "loop_iterate",
    "mark_dispatched",
    "next_dispatches",
    "parallel_required",
    "start",
    "start_delay",
    "start_parallel",
    "start_subworkflow",
    "step_for_path",
    "take_branch",
    "time_out",
]

#: step statuses that block dependents unless an ``on_error`` handler recovers them
_BAD = frozenset({FAILED, DENIED, TIMED_OUT, CANCELLED})
#: when several steps failed, the run takes the first of these present
_BAD_PRIORITY = (FAILED, DENIED, TIMED_OUT, CANCELLED)

#: JobResult statuses a retry policy may retry
_RETRYABLE_RESULTS = frozenset({"FAILED", "FAILED_RETRYABLE", "TIMEOUT"})

#: skip reason of a switch target whose branch was not taken (and of steps only it led to)
NOT_TAKEN = "switch_branch_not_taken"

_PATH_PARTS = re.compile(r"^([^\[]+)((?:\[[0-9]+\])*)$")
_INDEX = re.compile(r"\[([0-9]+)\]")


def step_for_path(workflow: Workflow, path: str) -> tuple[Step, bool]:
    """The definition step a step path runs and whether the path is a ``for_each`` item:
    ``fetch`` → (fetch, False); ``fetch[2]`` → (fetch, True); ``loop[2]`` (iteration 2 of a loop)
    → (the loop's body, False); ``loop[2][0]`` → (that body, True) when the body has a for_each.
    KeyError when ``path`` is not a step path of ``workflow``."""
    m = _PATH_PARTS.match(path)
    if m is None or m.group(1) not in workflow.steps:
        raise KeyError(path)
    step, item = workflow.steps[m.group(1)], False
    for _ in _INDEX.findall(m.group(2)):
        if step.for_each and not item:
            item = True
        elif step.type == "loop" and not item and step.owned():
            step = workflow.steps[step.owned()[0]]
        else:
            raise KeyError(path)
    return step, item


def is_step_path(workflow: Workflow, path: str) -> bool:
    """Whether ``path`` names a step (or item/iteration) of ``workflow``."""
    try:
        step_for_path(workflow, path)
    except KeyError:
        return False
    return True


def _parent(workflow: Workflow, path: str) -> str | None:
    """The step that rolls ``path`` up: ``x`` of ``x[i]`` (for_each item, loop iteration), or
    the parallel step that runs ``path``."""
    m = CHILD_PATH.match(path)
    if m:
        return m.group(1)
    return next((sid for sid, s in workflow.steps.items()
                 if s.type == "parallel" and path in s.owned()), None)


# --- working copy ------------------------------------------------------------------------------
class _Work:
    """A mutable copy of a run used inside one transition (the input run is never touched)."""

    def __init__(self, run: Run) -> None:
        self.orig = run
        self.steps: dict[str, StepRun] = dict(run.steps)
        self.context: dict[str, Any] = copy.deepcopy(dict(run.context))
        self.fields: dict[str, Any] = {}
        self.effects: list[Effect] = []

    def get(self, name: str) -> Any:
        return self.fields.get(name, getattr(self.orig, name))

    @property
    def status(self) -> str:
        return str(self.get("status"))

    def step(self, path: str) -> StepRun:
        return self.steps.get(path) or StepRun(step_id=path)

    def put(self, sr: StepRun, **changes: Any) -> StepRun:
        new = replace(sr, **changes)
        self.steps[new.step_id] = new
        return new

    def emit(self, *effects: Effect) -> None:
        self.effects.extend(effects)

    def set_status(self, status: str, now: float) -> None:
        if status == self.status:
            return
        self.fields["status"] = status
        if status == RUNNING and self.get("started_at") is None:
            self.fields["started_at"] = now
        if status in TERMINAL_RUN_STATUSES:
            self.fields["completed_at"] = now
        self.emit(TimelineEvent("run_status", status=status, message=f"run {status}"))

    def build(self, now: float) -> tuple[Run, list[Effect]]:
        new = replace(
            self.orig, steps=self.steps, context=self.context, updated_at=now, **self.fields
        )
        return new, self.effects


def _statuses(run_steps: Mapping[str, StepRun]) -> dict[str, str]:
    return {p: sr.status for p, sr in run_steps.items()}


# --- aggregation -------------------------------------------------------------------------------
def _handlers(workflow: Workflow) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for sid, s in workflow.steps.items():
        if s.on_error:
            out.setdefault(s.on_error, []).append(sid)
    return out


def _recovering(workflow: Workflow, statuses: Mapping[str, str], sid: str) -> bool:
    """True when ``sid`` failed but its ``on_error`` handler succeeded or may still succeed."""
    handler = workflow.steps[sid].on_error
    if not handler or statuses.get(sid, "") not in FAILED_STATUSES:
        return False
    return statuses.get(handler, PENDING) not in TERMINAL_STEP_STATUSES or (
        statuses.get(handler) == SUCCEEDED
    )


def _expected(workflow: Workflow, statuses: Mapping[str, str]) -> list[str]:
    """Top-level steps the run must complete: not parallel/loop-owned, not unactivated handlers."""
    owned = owned_steps(workflow)
    handlers = _handlers(workflow)
    out = []
    for sid in workflow.steps:
        if sid in owned:
            continue
        if sid in handlers and not (
            statuses.get(sid, PENDING) != PENDING
            or any(statuses.get(src, "") in FAILED_STATUSES for src in handlers[sid])
        ):
            continue
        out.append(sid)
    return out


def _dead(workflow: Workflow, statuses: Mapping[str, str], sid: str) -> bool:
    """A finished step that does not satisfy its dependents and never will."""
    status = statuses.get(sid, PENDING)
    if status == SKIPPED:
        return True
    return status in _BAD and not _recovering(workflow, statuses, sid)


def _not_taken(run_steps: Mapping[str, StepRun]) -> set[str]:
    return {p for p, sr in run_steps.items() if sr.status == SKIPPED and sr.skip_reason == NOT_TAKEN}


def _blocked(workflow: Workflow, run_steps: Mapping[str, StepRun]) -> dict[str, str]:
    """Not-started top-level steps that can never become ready → the skip reason. A dependency on
    a switch branch not taken blocks nothing by itself; a step ALL of whose dependencies were not
    taken is not taken either (reason ``NOT_TAKEN``, so joins further down see it the same way)."""
    statuses = _statuses(run_steps)
    not_taken = _not_taken(run_steps)
    handlers = _handlers(workflow)
    owned = owned_steps(workflow)
    out: dict[str, str] = {}
    for sid in topological_order(workflow):
        sr = run_steps.get(sid)
        if sid in owned or (sr is not None and (sr.status != PENDING or sr.attempts > 0)):
            continue
        if sid in handlers and any(statuses.get(s, "") in FAILED_STATUSES for s in handlers[sid]):
            continue  # an activated handler bypasses its dependency check
        deps = workflow.steps[sid].depends_on
        reason = next((f"dependency {dep} {statuses[dep]}" for dep in deps
                       if dep not in not_taken and _dead(workflow, statuses, dep)), None)
        if reason is None and deps and all(dep in not_taken for dep in deps):
            reason = NOT_TAKEN
            not_taken.add(sid)
        if reason is not None:
            out[sid] = reason
            statuses[sid] = SKIPPED
    return out


def aggregate(workflow: Workflow, run: Run) -> str:
    """The run status its steps imply (§2.5); a terminal run keeps its status.

    An unrecovered failed/denied/timed_out/cancelled step → that status (priority failed,
    denied, timed_out, cancelled); else any waiting step → waiting; else every expected step
    finished (steps that can never run count as skipped) → succeeded; else running (pending if
    never started). Expected: not parallel/loop-owned, not an unactivated ``on_error`` target.
    """
    if run.terminal:
        return run.status
    statuses = _statuses(run.steps)
    expected = _expected(workflow, statuses)
    bad = {statuses.get(sid, "") for sid in expected if _dead(workflow, statuses, sid)} - {SKIPPED}
    for status in _BAD_PRIORITY:
        if status in bad:
            return status
    if any(sr.status == WAITING for sr in run.steps.values()):
        return WAITING
    blocked = _blocked(workflow, run.steps)
    if all(statuses.get(s, PENDING) in TERMINAL_STEP_STATUSES or s in blocked for s in expected):
        return SUCCEEDED
    return PENDING if run.status == PENDING else RUNNING


def _settle(workflow: Workflow, w: _Work, now: float) -> None:
    """Skip blocked steps, recompute the run status, close the run out when it ended."""
    for sid, reason in _blocked(workflow, w.steps).items():
        w.put(w.step(sid), status=SKIPPED, skip_reason=reason, completed_at=now)
        w.emit(TimelineEvent("step_skipped", step_id=sid, status=SKIPPED, message=reason))
    snapshot = replace(w.orig, steps=w.steps, status=w.status)
    status = aggregate(workflow, snapshot)
    if status in TERMINAL_RUN_STATUSES and status != SUCCEEDED:
        statuses = _statuses(w.steps)
        culprit = next(
            (s for s in _expected(workflow, statuses)
             if _dead(workflow, statuses, s) and statuses.get(s) == status),
            "",
        )
        err = dict(w.step(culprit).error or {}) if culprit else {}
        cause = err.get("message")
        err["message"] = f"step {culprit} {status}" + (f": {cause}" if cause else "")
        err["step_id"] = culprit
        w.fields["error"] = err
        _close_steps(w, CANCELLED, f"workflow run {status}", now)
    w.set_status(status, now)


def _close_steps(w: _Work, status: str, reason: str, now: float) -> None:
    """Every non-terminal step → ``status``; CancelJob for the ones with a live job."""
    for path, sr in list(w.steps.items()):
        if sr.status in TERMINAL_STEP_STATUSES:
            continue
        _cancel_live(w, sr, reason)
        w.put(sr, status=status, completed_at=now, next_attempt_at=None, skip_reason=reason)


# --- transitions -------------------------------------------------------------------------------
def start(run: Run, now: float, workflow: Workflow | None = None) -> tuple[Run, list[Effect]]:
    """pending → running (``started_at``); with ``workflow`` also arm its timeout timer."""
    if run.status != PENDING:
        return run, []
    w = _Work(run)
    w.set_status(RUNNING, now)
    if workflow is not None and workflow.timeout_sec > 0:
        w.emit(ArmTimer("", w.get("started_at") + workflow.timeout_sec))
    return w.build(now)


def next_dispatches(workflow: Workflow, run: Run, now: float) -> list[str]:
    """Step paths the engine should start now: ready top-level steps (definition.ready_steps) whose
    retry is due, then due pending ``step[i]`` children of running for_each parents within
    ``max_parallel``. Empty when the run is pending or terminal, or when its workflow timeout is
    due (call :func:`time_out` then)."""
    if run.status not in (RUNNING, WAITING) or _timeout_due(workflow, run, now):
        return []
    out = []
    for sid in ready_steps(workflow, _statuses(run.steps), _not_taken(run.steps)):
        due = run.step(sid).next_attempt_at
        if due is None or due <= now:
            out.append(sid)
    for sid, sr in run.steps.items():
        if sr.status != RUNNING or not sr.children or not is_step_path(workflow, sid):
            continue
        limit = _child_limit(step_for_path(workflow, sid)[0])
        live = sum(run.step(c).status in (RUNNING, WAITING) for c in sr.children)
        for child in sr.children:
            if limit > 0 and live >= limit:
                break
            csr = run.step(child)
            due = csr.next_attempt_at is None or csr.next_attempt_at <= now
            if csr.status == PENDING and due:
                out.append(child)
                live += 1
    return out


def _child_limit(step: Step) -> int:
    """How many children of ``step`` may run at once (0: no limit); a loop runs one at a time."""
    limit = step.input.get("max_parallel") if step.type == "parallel" else None
    if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0:
        return limit
    return step.max_parallel


def mark_dispatched(
    workflow: Workflow, run: Run, path: str, now: float, *, status: str = RUNNING
) -> tuple[Run, list[Effect]]:
    """Persist-before-publish step of §2.6: step → running (or ``waiting`` for an approval gate),
    attempts+1, new job id; effects DispatchStep + timeline. ValueError if it cannot start."""
    if status not in (RUNNING, WAITING):
        raise ValueError(f"dispatch status must be running or waiting, got {status!r}")
    if run.terminal:
        raise ValueError(f"run {run.id} is {run.status}")
    if not is_step_path(workflow, path):
        raise ValueError(f"unknown step {path!r}")
    sr = run.step(path)
    if sr.status != PENDING:
        raise ValueError(f"step {path!r} is {sr.status}, not pending")
    attempt = sr.attempts + 1
    jid = job_id(run.id, path, attempt)
    w = _Work(run)
    w.set_status(RUNNING if run.status == PENDING else w.status, now)
    w.put(
        sr,
        status=status,
        attempts=attempt,
        job_id=jid,
        started_at=sr.started_at if sr.started_at is not None else now,
        next_attempt_at=None,
    )
    if status == WAITING:
        w.set_status(WAITING, now)
    kind = "step_waiting" if status == WAITING else "step_dispatched"
    w.emit(
        DispatchStep(path, jid, attempt),
        TimelineEvent(kind, step_id=path, job_id=jid, status=status, data={"attempt": attempt}),
    )
    return w.build(now)


def expand_for_each(
    workflow: Workflow, run: Run, path: str, items: Iterable[Any], now: float
) -> tuple[Run, list[Effect]]:
    """Record the evaluated ``for_each`` items (once) and create pending children ``step[i]``
    carrying ``item``; no items → the step succeeds at once with output ``[]``."""
    sr = run.step(path)
    if sr.status != PENDING or sr.resolved_items is not None:
        raise ValueError(f"step {path!r} is {sr.status} / already expanded")
    items = tuple(items)
    w = _Work(run)
    children = tuple(f"{path}[{i}]" for i in range(len(items)))
    w.put(sr, status=RUNNING, started_at=now, resolved_items=items, children=children)
    for child, item in zip(children, items):
        w.put(StepRun(step_id=child, item=copy.deepcopy(item)))
    if w.status == PENDING:
        w.set_status(RUNNING, now)
    if not items:
        _finish(workflow, w, path, SUCCEEDED, [], None, now, retryable=False)
    _settle(workflow, w, now)
    return w.build(now)


def complete_step(
    workflow: Workflow,
    run: Run,
    path: str,
    status: str,
    output: Any = None,
    error: Any = None,
    now: float = 0.0,
    *,
    context: Mapping[str, Any] | None = None,
) -> tuple[Run, list[Effect]]:
    """Finish a step without a job (inline types, condition pre-gate): ``status`` is a terminal step
    status. The hook where the inline step-type module reports its outcome. No retries.
    ``context``: the run context the step leaves behind (a storage write/delete)."""
    if status not in TERMINAL_STEP_STATUSES:
        raise ValueError(f"not a terminal step status: {status!r}")
    w = _begin(run, path, now)
    if w is None:
        return run, []
    if context is not None:
        w.context = copy.deepcopy(dict(context))
    _finish(workflow, w, path, status, output, error, now, retryable=False)
    _settle(workflow, w, now)
    return w.build(now)


def _begin(run: Run, path: str, now: float) -> _Work | None:
    """A working copy to finish ``path`` without a job; None when the run or the step ended."""
    if run.terminal or run.step(path).status in TERMINAL_STEP_STATUSES:
        return None
    w = _Work(run)
    if w.status == PENDING:
        w.set_status(RUNNING, now)
    if w.step(path).started_at is None:
        w.put(w.step(path), started_at=now)
    return w


def apply_result(
    workflow: Workflow,
    run: Run,
    jid: str,
    status: str,
    output: Any = None,
    error: Any = None,
    now: float = 0.0,
    *,
    result_ptr: str = "",
) -> tuple[Run, list[Effect]]:
    """Apply one ``sys.job.result`` (§2.7). ``output`` is the decoded result payload (or None),
    ``error`` a message or a mapping. Ignored (same run, no effects): an id that does not parse or
    names another run, a terminal run, a job id that is not the step's current one, a step that is
    not running/waiting (terminal, or pending with a scheduled retry)."""
    parsed = parse_job_id(jid)
    if parsed is None or parsed[0] != run.id or run.terminal:
        return run, []
    if _timeout_due(workflow, run, now):
        return time_out(workflow, run, now)
    path = parsed[1]
    sr = run.steps.get(path)
    if sr is None or sr.job_id != jid or sr.status not in (RUNNING, WAITING):
        return run, []
    if not is_step_path(workflow, path):
        return run, []
    mapped = {
        "SUCCEEDED": SUCCEEDED,
        "DENIED": DENIED,
        "CANCELLED": CANCELLED,
        "TIMEOUT": TIMED_OUT,
    }.get(status, FAILED)
    w = _Work(run)
    _finish(
        workflow,
        w,
        path,
        mapped,
        output,
        error,
        now,
        retryable=status in _RETRYABLE_RESULTS,
        result_ptr=result_ptr,
    )
    if w.status == WAITING and not any(s.status == WAITING for s in w.steps.values()):
        w.set_status(RUNNING, now)
    _settle(workflow, w, now)
    return w.build(now)


def _error_dict(error: Any, default: str) -> dict[str, Any]:
    if isinstance(error, Mapping):
        out = copy.deepcopy(dict(error))
        out.setdefault("message", default)
        return out
    return {"message": str(error) if error else default}


def _finish(
    workflow: Workflow,
    w: _Work,
    path: str,
    status: str,
    output: Any,
    error: Any,
    now: float,
    *,
    retryable: bool,
    result_ptr: str = "",
    narrow: bool = True,
) -> None:
    """Record a step's outcome (retry when allowed), then roll its parent up. ``narrow=False``:
    ``output`` is already the step's value (a parent's collected child outputs)."""
    step = step_for_path(workflow, path)[0]
    sr = w.step(path)
    parent = _parent(workflow, path)
    if status == SUCCEEDED:
        value = output
        if narrow and step.result_data_path:
            value = _get_path(output, step.result_data_path)
        w.put(sr, status=SUCCEEDED, output=copy.deepcopy(value), error=None, completed_at=now,
              next_attempt_at=None)
        w.emit(TimelineEvent("step_completed", step_id=path, job_id=sr.job_id, status=SUCCEEDED))
        if "[" not in path:  # a step id (top level or a parallel child), not an item/iteration
            _record_output(w, step, value, result_ptr)
    else:
        err = _error_dict(error, f"step {path} {status}")
        policy = step.retry
        if (
            retryable
            and status in (FAILED, TIMED_OUT)
            and policy is not None
            and policy.max_retries > 0
            and 0 < sr.attempts <= policy.max_retries
        ):
            due = now + policy.backoff(sr.attempts)
            w.put(sr, status=PENDING, error=err, next_attempt_at=due)
            w.emit(
                ArmTimer(path, due),
                TimelineEvent("step_failed", step_id=path, job_id=sr.job_id, status=PENDING,
                              message=err["message"], data={"retry_at": due,
                                                            "attempt": sr.attempts}),
            )
            return
        if status == SKIPPED:
            w.put(sr, status=SKIPPED, completed_at=now, next_attempt_at=None,
                  skip_reason=err["message"] if error else "skipped")
            w.emit(TimelineEvent("step_skipped", step_id=path, status=SKIPPED,
                                 message=w.step(path).skip_reason))
            if parent is not None:
                _roll_up(workflow, w, parent, now)
            return
        w.put(sr, status=status, error=err, completed_at=now, next_attempt_at=None)
        w.emit(TimelineEvent("step_failed", step_id=path, job_id=sr.job_id, status=status,
                             message=err["message"]))
        if parent is None and status in FAILED_STATUSES and step.on_error:
            _activate_handler(w, step, path, err, now)
    if parent is not None:
        _roll_up(workflow, w, parent, now)


def _activate_handler(w: _Work, step: Step, path: str, err: Mapping[str, Any], now: float) -> None:
    target = w.step(step.on_error)
    if target.status != PENDING or target.attempts > 0:
        return
    inp = dict(target.input) if isinstance(target.input, Mapping) else {}
    inp["error"] = {**err, "step_id": path}
    w.put(target, input=inp)
    w.emit(TimelineEvent("step_error_redirect", step_id=path, status=w.step(path).status,
                         message=f"on_error → {step.on_error}", data={"target": step.on_error}))


def _roll_up(workflow: Workflow, w: _Work, parent: str, now: float) -> None:
    """A parent after one of its children changed (§2.7 child aggregation)."""
    if w.step(parent).status != RUNNING:
        return  # finished already, or not started (a child a rerun kept)
    step, item = step_for_path(workflow, parent)
    if step.for_each and not item:
        _roll_up_items(workflow, w, parent, now)
    elif step.type == "parallel":
        _roll_up_parallel(workflow, w, parent, step, now)
    elif step.type == "loop":
        _roll_up_loop(workflow, w, parent, now)


def _roll_up_loop(workflow: Workflow, w: _Work, parent: str, now: float) -> None:
    """A failed/denied/timed_out/cancelled iteration fails the loop; after a good one the loop
    waits for the engine's decision (:func:`due_steps`, :func:`loop_iterate`)."""
    last = w.step(w.step(parent).children[-1])
    if last.status in _BAD:
        err = dict(last.error or {})
        cause = f": {err['message']}" if err.get("message") else ""
        err["message"] = f"loop iteration {last.step_id} {last.status}{cause}"
        status = DENIED if last.status == DENIED else FAILED
        _finish(workflow, w, parent, status, None, err, now, retryable=False)


def _roll_up_items(workflow: Workflow, w: _Work, parent: str, now: float) -> None:
    """for_each: the first bad child fails the parent (siblings cancelled); all succeeded → the
    list of their outputs."""
    kids = [w.step(c) for c in w.step(parent).children]
    bad = {k.status for k in kids} & (_BAD | {SKIPPED})
    if bad:
        status = DENIED if bad == {DENIED} else FAILED
        culprit = next(k for k in kids if k.status in bad)
        for k in kids:
            _cancel_tree(w, k.step_id, f"for_each sibling {culprit.step_id} {culprit.status}", now)
        err = dict(culprit.error or {})
        err["message"] = f"child {culprit.step_id} {culprit.status}"
        _finish(workflow, w, parent, status, None, err, now, retryable=False)
    elif all(k.status == SUCCEEDED for k in kids):
        outputs = [copy.deepcopy(k.output) for k in kids]
        _finish(workflow, w, parent, SUCCEEDED, outputs, None, now, retryable=False, narrow=False)


def parallel_required(step: Step) -> int:
    """How many children must succeed: all of them, one (``any``) or ``input.required``."""
    strategy = step.input.get("strategy") or "all"
    if strategy == "any":
        return 1
    if strategy == "n_of_m":
        return int(step.input.get("required") or 1)
    return len(step.owned())


def _roll_up_parallel(workflow: Workflow, w: _Work, parent: str, step: Step, now: float) -> None:
    """Succeed once enough children succeeded (the rest are cancelled), fail once too few still
    can. A child skipped by its own ``condition`` lowers what ``all`` needs; for ``any`` and
    ``n_of_m`` it is one child fewer that could succeed. Output: ``{child: output}`` of the
    children that succeeded."""
    kids = [w.step(c) for c in w.step(parent).children]
    ok = [k for k in kids if k.status == SUCCEEDED]
    open_ = [k for k in kids if k.status not in TERMINAL_STEP_STATUSES]
    need = parallel_required(step)
    if (step.input.get("strategy") or "all") == "all":
        need -= sum(k.status == SKIPPED for k in kids)
    if len(ok) >= need:
        for k in open_:
            _cancel_tree(w, k.step_id, f"parallel {parent} already satisfied", now)
        outputs = {k.step_id: copy.deepcopy(k.output) for k in ok}
        _finish(workflow, w, parent, SUCCEEDED, outputs, None, now, retryable=False, narrow=False)
    elif len(ok) + len(open_) < need:
        bad = [k for k in kids if k.status in _BAD] or [k for k in kids if k.status == SKIPPED]
        culprit = bad[0]
        for k in open_:
            _cancel_tree(w, k.step_id, f"parallel {parent} can no longer succeed", now)
        err = dict(culprit.error or {})
        cause = f": {err['message']}" if err.get("message") else ""
        err["message"] = (f"{len(ok)} of the {need} children parallel {parent} needs succeeded; "
                          f"child {culprit.step_id} {culprit.status}{cause}")
        status = DENIED if all(k.status == DENIED for k in bad) else FAILED
        _finish(workflow, w, parent, status, None, err, now, retryable=False)


def _cancel_live(w: _Work, sr: StepRun, reason: str) -> None:
    """The effects that stop what a non-terminal step has running (its job, its child run)."""
    if sr.status in (RUNNING, WAITING) and sr.job_id:
        w.emit(CancelJob(sr.job_id, reason))
    if sr.status == RUNNING and sr.child_run_id:
        w.emit(CancelRun(sr.child_run_id, reason))


def _cancel_tree(w: _Work, path: str, reason: str, now: float) -> None:
    """Cancel a non-terminal step and, first, all its non-terminal descendants."""
    sr = w.step(path)
    if sr.status in TERMINAL_STEP_STATUSES:
        return
    for child in sr.children:
        _cancel_tree(w, child, reason, now)
    _cancel_live(w, sr, reason)
    w.put(sr, status=CANCELLED, completed_at=now, next_attempt_at=None, skip_reason=reason)


def _record_output(w: _Work, step: Step, value: Any, result_ptr: str) -> None:
    """``ctx.steps[id] = {result_ptr?, output}``; ``output_path`` gets the value (or pointer)."""
    entry: dict[str, Any] = {}
    if result_ptr:
        entry["result_ptr"] = result_ptr
    entry["output"] = copy.deepcopy(value)
    steps = w.context.get("steps")
    if not isinstance(steps, dict):
        steps = w.context["steps"] = {}
    steps[step.id] = entry
    if step.output_path:
        _set_path(w.context, step.output_path,
                  copy.deepcopy(value if value is not None or not result_ptr else result_ptr))


def _get_path(value: Any, path: str) -> Any:
    for part in path.split("."):
        if part == "":
            continue
        if isinstance(value, Mapping):
            value = value.get(part)
        elif isinstance(value, list) and part.lstrip("-").isdigit():
            i = int(part)
            value = value[i] if -len(value) <= i < len(value) else None
        else:
            return None
    return value


def _set_path(target: dict[str, Any], path: str, value: Any) -> None:
    parts = [p for p in path.split(".") if p]
    if not parts:
        return
    for part in parts[:-1]:
        nxt = target.get(part)
        if not isinstance(nxt, dict):
            nxt = target[part] = {}
        target = nxt
    target[parts[-1]] = value


def cancel(
    run: Run, reason: str = "workflow run cancelled", now: float = 0.0
) -> tuple[Run, list[Effect]]:
    """§2.11 CancelRun: no-op when terminal; every non-terminal step (and child) → cancelled,
    CancelJob for each running/waiting step job, run → cancelled."""
    if run.terminal:
        return run, []
    w = _Work(run)
    _close_steps(w, CANCELLED, reason, now)
    w.fields["error"] = {"message": reason}
    w.set_status(CANCELLED, now)
    return w.build(now)


def _timeout_due(workflow: Workflow, run: Run, now: float) -> bool:
    return (
        workflow.timeout_sec > 0
        and run.started_at is not None
        and not run.terminal
        and now >= run.started_at + workflow.timeout_sec
    )


def time_out(workflow: Workflow, run: Run, now: float) -> tuple[Run, list[Effect]]:
    """Workflow ``timeout_sec`` (§2.11): once ``now >= started_at + timeout_sec`` every
    non-terminal step → timed_out (CancelJob for live jobs), run → timed_out.
    Otherwise a no-op."""
    if not _timeout_due(workflow, run, now):
        return run, []
    w = _Work(run)
    _close_steps(w, TIMED_OUT, "workflow run timed out", now)
    w.fields["error"] = {"message": "workflow run timed out"}
    w.set_status(TIMED_OUT, now)
    return w.build(now)


def _start_running(run: Run, path: str, now: float, **changes: Any) -> _Work:
    """A working copy in which the pending step ``path`` went ``running`` (and the run too);
    ValueError when the step is not pending or the run ended."""
    sr = run.step(path)
    if run.terminal or sr.status != PENDING:
        raise ValueError(f"step {path!r} is {sr.status}, not pending")
    w = _Work(run)
    if w.status == PENDING:
        w.set_status(RUNNING, now)
    w.put(sr, status=RUNNING, started_at=now, **changes)
    return w


def take_branch(
    workflow: Workflow,
    run: Run,
    path: str,
    output: Any,
    not_taken: Iterable[str],
    now: float,
) -> tuple[Run, list[Effect]]:
    """A switch decided: it succeeds with ``output`` and each of ``not_taken`` that has not
    started is skipped with ``skip_reason = NOT_TAKEN`` (steps after them follow, see
    :func:`_blocked`). A no-op when the switch already finished."""
    w = _begin(run, path, now)
    if w is None:
        return run, []
    _finish(workflow, w, path, SUCCEEDED, output, None, now, retryable=False)
    for target in not_taken:
        sr = w.step(target)
        if sr.status == PENDING and sr.attempts == 0:
            w.put(sr, status=SKIPPED, skip_reason=NOT_TAKEN, completed_at=now)
            w.emit(TimelineEvent("step_skipped", step_id=target, status=SKIPPED, message=NOT_TAKEN,
                                 data={"switch": path}))
    _settle(workflow, w, now)
    return w.build(now)


def start_parallel(workflow: Workflow, run: Run, path: str, now: float) -> tuple[Run, list[Effect]]:
    """A parallel step starts: ``running`` with its ``input.steps`` as children, each pending
    (:func:`next_dispatches` starts them within ``max_parallel``; their outcomes roll up into
    the parent). ValueError unless it is a pending parallel step."""
    step = step_for_path(workflow, path)[0]
    if step.type != "parallel":
        raise ValueError(f"step {path!r} is not a parallel step")
    children = step.owned()
    w = _start_running(run, path, now, children=children)
    for child in children:
        if child not in w.steps:
            w.put(StepRun(step_id=child))
    w.emit(TimelineEvent("parallel_started", step_id=path, status=RUNNING,
                         data={"children": list(children),
                               "strategy": step.input.get("strategy") or "all"}))
    _roll_up(workflow, w, path, now)  # children a rerun kept may satisfy it already
    _settle(workflow, w, now)
    return w.build(now)


def start_subworkflow(
    workflow: Workflow, run: Run, path: str, call: StartRun, now: float
) -> tuple[Run, list[Effect]]:
    """A subworkflow step starts its child run: ``running`` with ``child_run_id`` and ``input`` =
    ``{workflow_id, input}`` of the call (enough to create the child again should the engine die
    between persisting this and creating it); effect ``call``. The engine completes the step
    with :func:`complete_step` once the child run ended. ValueError unless it is pending."""
    w = _start_running(run, path, now, attempts=run.step(path).attempts + 1, child_run_id=call.run_id,
                       input={"workflow_id": call.workflow_id, "input": copy.deepcopy(dict(call.input))})
    w.emit(call, TimelineEvent("subworkflow_started", step_id=path, status=RUNNING,
                               data={"child_run_id": call.run_id, "workflow_id": call.workflow_id}))
    return w.build(now)


def start_delay(
    workflow: Workflow, run: Run, path: str, due: float, now: float
) -> tuple[Run, list[Effect]]:
    """A delay step starts waiting: ``running`` with ``next_attempt_at = due`` (persisted, so the
    wait survives engine restarts; :func:`next_wake` arms the timer). No job is dispatched;
    :func:`finish_delay` completes it once due. ValueError unless the step is pending."""
    w = _start_running(run, path, now, next_attempt_at=due)
    w.emit(ArmTimer(path, due), TimelineEvent("step_delay_started", step_id=path, status=RUNNING,
                                              data={"due_at": due}))
    return w.build(now)


def finish_delay(workflow: Workflow, run: Run, path: str, now: float) -> tuple[Run, list[Effect]]:
    """A waiting delay step whose time came succeeds (output ``{"due_at": …}``); a no-op when it
    is not a running delay or not due yet."""
    sr = run.steps.get(path)
    if run.terminal or sr is None or sr.status != RUNNING or sr.job_id or (
        sr.next_attempt_at is None or sr.next_attempt_at > now
    ):
        return run, []
    w = _Work(run)
    w.emit(TimelineEvent("step_delay_completed", step_id=path, status=SUCCEEDED,
                         data={"due_at": sr.next_attempt_at}))
    _finish(workflow, w, path, SUCCEEDED, {"due_at": sr.next_attempt_at}, None, now,
            retryable=False)
    _settle(workflow, w, now)
    return w.build(now)


def due_steps(workflow: Workflow, run: Run, now: float) -> list[str]:
    """Running steps without a job that the engine must move on now: delays whose time came
    (:func:`finish_delay`) and loops whose last iteration ended well (the engine decides: next
    iteration with :func:`loop_iterate`, or done with :func:`complete_step`)."""
    if run.terminal:
        return []
    out = []
    for path, sr in run.steps.items():
        if sr.status != RUNNING or sr.job_id:
            continue
        if sr.children:
            if is_step_path(workflow, path) and step_for_path(workflow, path)[0].type == "loop" and all(
                run.step(c).status in TERMINAL_STEP_STATUSES for c in sr.children
            ):
                out.append(path)
        elif sr.next_attempt_at is not None and sr.next_attempt_at <= now:
            out.append(path)
    return out


def loop_iterate(workflow: Workflow, run: Run, path: str, now: float) -> tuple[Run, list[Effect]]:
    """Start the next iteration of a loop step: a pending child ``<path>[i]`` (it runs the body
    step, see :func:`step_for_path`); the loop goes ``running``. ValueError unless the loop is
    pending, or running with every iteration so far finished."""
    step = step_for_path(workflow, path)[0]
    sr = run.step(path)
    if run.terminal or step.type != "loop" or sr.status not in (PENDING, RUNNING) or any(
        run.step(c).status not in TERMINAL_STEP_STATUSES for c in sr.children
    ):
        raise ValueError(f"step {path!r} is not a loop ready for its next iteration")
    w = _Work(run)
    if w.status == PENDING:
        w.set_status(RUNNING, now)
    child = f"{path}[{len(sr.children)}]"
    w.put(sr, status=RUNNING, started_at=sr.started_at if sr.started_at is not None else now,
          children=sr.children + (child,))
    w.put(StepRun(step_id=child))
    w.emit(TimelineEvent("loop_iteration", step_id=path, status=RUNNING,
                         data={"index": len(sr.children), "child": child}))
    return w.build(now)


def next_wake(workflow: Workflow, run: Run) -> float | None:
    """When the run next needs the engine without a result arriving: the earliest scheduled retry
    or delay (``next_attempt_at`` of a pending or running step) or the workflow timeout; None for
    a terminal run or nothing scheduled. Timers are derived from this, so a lost timer is re-armed
    by the next advance of the run."""
    if run.terminal:
        return None
    times = [sr.next_attempt_at for sr in run.steps.values()
             if sr.next_attempt_at is not None and sr.status in (PENDING, RUNNING)]
    if workflow.timeout_sec > 0 and run.started_at is not None:
        times.append(run.started_at + workflow.timeout_sec)
    return min(times) if times else None
