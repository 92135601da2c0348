"""The workflow run document and what the run state machine emits (spec §2.5–2.6): statuses,
:class:`Run` (``wf:run:<id>``) and :class:`StepRun` with their JSON round trip, the effects a
transition yields, and step job ids ``<run>:<step path>@<attempt>``.

Pure data, no behaviour beyond (de)serialisation; ``runstate`` holds the transitions and
re-exports everything here, so callers import from ``cordum.workflow.runstate``.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from cordum.store.validate import job_id_problems

__all__ = [
    "CANCELLED",
    "CHILD_PATH",
    "DENIED",
    "FAILED",
    "PENDING",
    "RESULT_STATUSES",
    "RUNNING",
    "RUN_STATUSES",
    "SKIPPED",
    "STEP_STATUSES",
    "SUCCEEDED",
    "TERMINAL_RUN_STATUSES",
    "TERMINAL_STEP_STATUSES",
    "TIMED_OUT",
    "WAITING",
    "ArmTimer",
    "CancelJob",
    "CancelRun",
    "DispatchStep",
    "Effect",
    "Run",
    "StartRun",
    "StepRun",
    "TimelineEvent",
    "base_step",
    "job_id",
    "parse_job_id",
]

# --- statuses ----------------------------------------------------------------------------------
PENDING = "pending"
RUNNING = "running"
WAITING = "waiting"
SUCCEEDED = "succeeded"
FAILED = "failed"
DENIED = "denied"
CANCELLED = "cancelled"
TIMED_OUT = "timed_out"
SKIPPED = "skipped"

RUN_STATUSES = (PENDING, RUNNING, WAITING, SUCCEEDED, FAILED, DENIED, CANCELLED, TIMED_OUT)
TERMINAL_RUN_STATUSES = frozenset({SUCCEEDED, FAILED, DENIED, CANCELLED, TIMED_OUT})
STEP_STATUSES = RUN_STATUSES + (SKIPPED,)
TERMINAL_STEP_STATUSES = TERMINAL_RUN_STATUSES | {SKIPPED}

#: JobResult statuses (CAP ``JobStatus`` names) that :func:`apply_result` understands
RESULT_STATUSES = (
    "SUCCEEDED",
    "FAILED",
    "FAILED_RETRYABLE",
    "FAILED_FATAL",
    "TIMEOUT",
    "DENIED",
    "CANCELLED",
)

_STEP_PATH = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(\[[0-9]+\])*$")
#: ``parent[i]`` → (parent, i): for_each items and loop iterations
CHILD_PATH = re.compile(r"^(.*)\[([0-9]+)\]$")

_copy = copy.deepcopy


def _same(value: Any) -> Any:
    return value


# --- model -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StepRun:
    """One step (or one ``step[i]`` child) of a run; field names are the spec's JSON names."""

    step_id: str
    status: str = PENDING
    started_at: float | None = None
    completed_at: float | None = None
    #: set while a retry is scheduled (status pending) or a delay step waits (running)
    next_attempt_at: float | None = None
    #: dispatches so far (attempt n has job id ``<run>:<step>@n``)
    attempts: int = 0
    input: Any = None
    output: Any = None
    #: ``{"message": …, …}``
    error: Mapping[str, Any] | None = None
    job_id: str = ""
    item: Any = None
    #: paths of the children: for_each items ``step[i]``, loop iterations ``loop[i]``, parallel
    #: children (their step ids)
    children: tuple[str, ...] = ()
    resolved_items: tuple[Any, ...] | None = None
    skip_reason: str = ""
    audit_hash: str = ""
    #: the child run of a subworkflow step
    child_run_id: str = ""

    def to_dict(self, *, copy_values: bool = True) -> dict[str, Any]:
        """The step's JSON object; `copy_values=False` shares the values (see `Run.to_dict`)."""
        dup = _copy if copy_values else _same
        out: dict[str, Any] = {"step_id": self.step_id, "status": self.status}
        for name in _STEP_RUN_FIELDS[2:]:
            value = getattr(self, name)
            if value is None or (name in _STEP_RUN_STRINGS and value == "") or (
                name == "attempts" and value == 0
            ):
                continue
            if name in ("children", "resolved_items"):
                if name == "children" and not value:
                    continue
                value = list(value)
            out[name] = dup(value)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, copy_values: bool = True) -> StepRun:
        dup = _copy if copy_values else _same
        kw: dict[str, Any] = {}
        for name in _STEP_RUN_FIELDS:
            if name not in data or data[name] is None:
                continue
            value = dup(data[name])
            if name in ("children", "resolved_items"):
                value = tuple(value)
            kw[name] = value
        return cls(**kw)


_STEP_RUN_STRINGS = frozenset({"job_id", "skip_reason", "audit_hash", "child_run_id"})
_STEP_RUN_FIELDS = (
    "step_id",
    "status",
    "started_at",
    "completed_at",
    "next_attempt_at",
    "attempts",
    "input",
    "output",
    "error",
    "job_id",
    "item",
    "children",
    "resolved_items",
    "skip_reason",
    "audit_hash",
    "child_run_id",
)


@dataclass(frozen=True)
class Run:
    """The run document stored at ``wf:run:<id>`` (§2.5). Times are unix seconds."""

    id: str
    workflow_id: str
    org_id: str = ""
    team_id: str = ""
    input: Mapping[str, Any] = field(default_factory=dict)
    #: ``ctx``; ``context["steps"][step_id] = {"output": …, "result_ptr": …}``
    context: Mapping[str, Any] = field(default_factory=dict)
    status: str = PENDING
    started_at: float | None = None
    completed_at: float | None = None
    output: Any = None
    error: Mapping[str, Any] | None = None
    #: step path → StepRun; children (items, iterations, parallel children) are flattened in here
    steps: Mapping[str, StepRun] = field(default_factory=dict)
    total_cost: float = 0.0
    triggered_by: str = ""
    created_at: float | None = None
    updated_at: float | None = None
    labels: Mapping[str, Any] = field(default_factory=dict)
    metadata: Mapping[str, Any] = field(default_factory=dict)
    idempotency_key: str = ""
    rerun_of: str = ""
    rerun_step: str = ""
    dry_run: bool = False

    @property
    def tenant(self) -> str:
        return self.org_id

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL_RUN_STATUSES

    def step(self, path: str) -> StepRun:
        """The StepRun at ``path``, or a fresh pending one when the step has not started."""
        return self.steps.get(path) or StepRun(step_id=path)

    def to_dict(self, *, copy_values: bool = True) -> dict[str, Any]:
        """The run document. Its values are copies, so that what a caller does with the document
        never reaches this (frozen) run; `copy_values=False` shares them instead, for a caller that
        only serializes the document (the engine's save: a copy would cost several times the
        JSON encoding of a run with many steps)."""
        dup = _copy if copy_values else _same
        out: dict[str, Any] = {}
        for name in _RUN_FIELDS:
            value = getattr(self, name)
            if name == "steps":
                out[name] = {path: sr.to_dict(copy_values=copy_values) for path, sr in value.items()}
            elif name in ("id", "workflow_id", "status", "input", "context"):
                out[name] = dup(dict(value) if isinstance(value, Mapping) else value)
            elif value is None or (name in _RUN_OMIT_EMPTY and not value):
                continue
            else:
                out[name] = dup(value)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, copy_values: bool = True) -> Run:
        """The run a document describes; `copy_values=False` takes the document's values as they
        are, for a document nobody else holds (one just decoded from JSON)."""
        dup = _copy if copy_values else _same
        kw: dict[str, Any] = {}
        for name in _RUN_FIELDS:
            if name not in data or data[name] is None:
                continue
            if name == "steps":
                kw[name] = {p: StepRun.from_dict(s, copy_values=copy_values) for p, s in data[name].items()}
            else:
                kw[name] = dup(data[name])
        return cls(**kw)


#: omitted from the document when empty / zero / false (times and output only when None)
_RUN_OMIT_EMPTY = frozenset({
    "org_id", "team_id", "total_cost", "triggered_by", "labels", "metadata", "idempotency_key",
    "rerun_of", "rerun_step", "dry_run",
})
_RUN_FIELDS = (
    "id",
    "workflow_id",
    "org_id",
    "team_id",
    "input",
    "context",
    "status",
    "started_at",
    "completed_at",
    "output",
    "error",
    "steps",
    "total_cost",
    "triggered_by",
    "created_at",
    "updated_at",
    "labels",
    "metadata",
    "idempotency_key",
    "rerun_of",
    "rerun_step",
    "dry_run",
)


# --- effects -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class DispatchStep:
    step_path: str
    job_id: str
    attempt: int


@dataclass(frozen=True)
class CancelJob:
    job_id: str
    reason: str


@dataclass(frozen=True)
class ArmTimer:
    #: ``""`` = the workflow timeout of the whole run
    step_path: str
    due_at: float


@dataclass(frozen=True)
class TimelineEvent:
    type: str
    step_id: str = ""
    job_id: str = ""
    status: str = ""
    message: str = ""
    data: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class StartRun:
    """Create (if it does not exist yet) and advance the child run of a subworkflow step; the
    tenant, dry_run and triggered_by come from the parent run."""

    run_id: str
    workflow_id: str
    input: Mapping[str, Any]
    metadata: Mapping[str, Any]


@dataclass(frozen=True)
class CancelRun:
    """Cancel a subworkflow step's child run."""

    run_id: str
    reason: str


Effect = DispatchStep | CancelJob | ArmTimer | TimelineEvent | StartRun | CancelRun


# --- job ids -----------------------------------------------------------------------------------
def job_id(run_id: str, step_path: str, attempt: int) -> str:
    """``<run>:<step>@<n>`` (children ``<run>:<step>[i]@<n>``, §2.6); ValueError when the parts or
    the result are not a valid job id (``cordum.store.validate.job_id_problems``)."""
    if not run_id or ":" in run_id:
        raise ValueError(f"run id {run_id!r} must be non-empty and contain no ':'")
    if not _STEP_PATH.match(step_path):
        raise ValueError(f"step path {step_path!r} is not a step id or step[i]")
    if isinstance(attempt, bool) or not isinstance(attempt, int) or attempt < 1:
        raise ValueError(f"attempt must be an integer >= 1, got {attempt!r}")
    jid = f"{run_id}:{step_path}@{attempt}"
    problems = job_id_problems(jid)
    if problems:
        raise ValueError("; ".join(problems))
    return jid


def parse_job_id(jid: str) -> tuple[str, str, int] | None:
    """``(run_id, step_path, attempt)`` of a workflow job id, or None when it is not one."""
    if not isinstance(jid, str) or ":" not in jid:
        return None
    run_id, rest = jid.split(":", 1)
    path, sep, attempt = rest.rpartition("@")
    if not run_id or not sep or not attempt.isdigit() or not attempt.isascii():
        return None
    if not _STEP_PATH.match(path) or int(attempt) < 1:
        return None
    return run_id, path, int(attempt)


def base_step(path: str) -> str:
    """The workflow step id of a step path: ``fetch[3]`` → ``fetch``."""
    return path.split("[", 1)[0]
