"""The job state machine and the pure rules around it (spec §1.4, §2.1, §2.2, §2.6, §2.9, §2.10).

No I/O here: the Redis job store enforces these rules inside its transaction, the scheduler uses
them to map results, error codes and retry delays. Everything is data plus small functions, so the
whole lifecycle is unit-tested without a server.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from types import MappingProxyType

from cordum.agent.v1 import job_pb2

JobStatus = job_pb2.JobStatus
ErrorCode = job_pb2.ErrorCode


class JobState(str, enum.Enum):
    """Internal job state strings (`core/model/job.go`), stored verbatim in `job:meta:<id>.state`."""

    PENDING = "PENDING"
    APPROVAL_REQUIRED = "APPROVAL_REQUIRED"
    SCHEDULED = "SCHEDULED"
    DISPATCHED = "DISPATCHED"
    RUNNING = "RUNNING"
    RETRYING = "RETRYING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    TIMEOUT = "TIMEOUT"
    DENIED = "DENIED"
    OUTPUT_QUARANTINED = "OUTPUT_QUARANTINED"

    def __str__(self) -> str:  # "PENDING", not "JobState.PENDING", in messages and f-strings
        return self.value

    @property
    def index_name(self) -> str:
        """The lowercase suffix of this state's `job:index:<state>` zset."""
        return self.value.lower()


S = JobState

TERMINAL: frozenset[JobState] = frozenset(
    {S.SUCCEEDED, S.FAILED, S.CANCELLED, S.TIMEOUT, S.DENIED, S.OUTPUT_QUARANTINED}
)

# §2.2, as data. Key None = the job has no state yet (first write). Every state has an entry, so
# "no exits" is an explicit empty set rather than a missing key. One deliberate widening: a job
# waiting to run again (RETRYING, or SCHEDULED after a rolled-back dispatch) goes through the policy
# again, so it may also be DENIED or held for APPROVAL_REQUIRED (the Go table would strand it).
TRANSITIONS: Mapping[JobState | None, frozenset[JobState]] = MappingProxyType(
    {
        None: frozenset(
            {S.PENDING, S.APPROVAL_REQUIRED, S.SCHEDULED, S.DISPATCHED, S.RUNNING, S.FAILED, S.CANCELLED}
        ),
        S.PENDING: frozenset(
            {S.APPROVAL_REQUIRED, S.SCHEDULED, S.DISPATCHED, S.RUNNING, S.DENIED, S.FAILED,
             S.TIMEOUT, S.SUCCEEDED, S.CANCELLED, S.RETRYING}
        ),
        S.APPROVAL_REQUIRED: frozenset(
            {S.PENDING, S.SCHEDULED, S.DISPATCHED, S.RUNNING, S.DENIED, S.FAILED, S.TIMEOUT,
             S.SUCCEEDED, S.CANCELLED}
        ),
        S.SCHEDULED: frozenset(
            {S.SCHEDULED, S.APPROVAL_REQUIRED, S.DISPATCHED, S.RUNNING, S.DENIED, S.FAILED, S.TIMEOUT, S.SUCCEEDED,
             S.CANCELLED, S.OUTPUT_QUARANTINED, S.RETRYING}
        ),
        S.DISPATCHED: frozenset(
            {S.SCHEDULED, S.RUNNING, S.SUCCEEDED, S.FAILED, S.CANCELLED, S.TIMEOUT,
             S.OUTPUT_QUARANTINED, S.RETRYING}
        ),
        S.RUNNING: frozenset(
            {S.RUNNING, S.SUCCEEDED, S.FAILED, S.CANCELLED, S.TIMEOUT, S.OUTPUT_QUARANTINED,
             S.RETRYING}
        ),
        S.RETRYING: frozenset(
            {S.SCHEDULED, S.DISPATCHED, S.RUNNING, S.RETRYING, S.SUCCEEDED, S.FAILED, S.CANCELLED,
             S.TIMEOUT, S.DENIED, S.APPROVAL_REQUIRED}
        ),
        # The one exit from a terminal state: the async output check quarantines a success.
        S.SUCCEEDED: frozenset({S.OUTPUT_QUARANTINED}),
        S.FAILED: frozenset(),
        S.CANCELLED: frozenset(),
        S.TIMEOUT: frozenset(),
        S.DENIED: frozenset(),
        S.OUTPUT_QUARANTINED: frozenset(),
    }
)


class InvalidTransition(ValueError):
    """A state write the table of §2.2 forbids (the store's "invalid transition")."""

    def __init__(self, from_state: JobState | None, to_state: JobState | str) -> None:
        self.from_state = from_state
        self.to_state = to_state
        shown_from = "(none)" if from_state is None else str(from_state)
        super().__init__(f"invalid transition: {shown_from} -> {to_state}")


def parse_state(value: JobState | str | None) -> JobState | None:
    """A stored state string → JobState; None or "" → None (no state yet).

    Raises ValueError for an unknown string.
    """
    if value is None or value == "":
        return None
    if isinstance(value, JobState):
        return value
    return JobState(value)


def is_terminal(state: JobState | str | None) -> bool:
    parsed = parse_state(state)
    return parsed is not None and parsed in TERMINAL


def is_active(state: JobState | str | None) -> bool:
    """Counted in `job:tenant:active:<tenant>`: any non-empty, non-terminal state."""
    parsed = parse_state(state)
    return parsed is not None and parsed not in TERMINAL


def can_transition(from_state: JobState | str | None, to_state: JobState | str) -> bool:
    """Whether the store may move a job from `from_state` (None/"" = no state yet) to `to_state`.

    Unknown state strings on either side are never allowed.
    """
    try:
        src = parse_state(from_state)
        dst = parse_state(to_state)
    except ValueError:
        return False
    if dst is None:
        return False
    return dst in TRANSITIONS[src]


def check_transition(from_state: JobState | str | None, to_state: JobState | str) -> None:
    """Raise InvalidTransition unless `can_transition(from_state, to_state)`."""
    if not can_transition(from_state, to_state):
        try:
            src = parse_state(from_state)
        except ValueError:
            src = from_state  # type: ignore[assignment]  # show the unknown string as given
        raise InvalidTransition(src, to_state)


def increments_attempts(from_state: JobState | str | None, to_state: JobState | str) -> bool:
    """A state write counts a scheduling attempt when it enters SCHEDULED from another state
    (§2.4; a dispatch rolled back counts), or enters DISPATCHED straight from a state before
    scheduling (our dispatch skips SCHEDULED). The job store applies exactly this rule."""
    source, target = parse_state(from_state), parse_state(to_state)
    if target is S.SCHEDULED:
        return source is not S.SCHEDULED
    if target is S.DISPATCHED:
        return source not in (S.SCHEDULED, S.DISPATCHED)
    return False


# ---- JobState <-> CAP JobStatus ----------------------------------------------------------------

_STATE_TO_STATUS: Mapping[JobState, int] = MappingProxyType(
    {
        S.PENDING: JobStatus.JOB_STATUS_PENDING,
        # No CAP status for "waiting for a human"; it has not been scheduled, so it reads as PENDING.
        S.APPROVAL_REQUIRED: JobStatus.JOB_STATUS_PENDING,
        S.SCHEDULED: JobStatus.JOB_STATUS_SCHEDULED,
        S.DISPATCHED: JobStatus.JOB_STATUS_DISPATCHED,
        S.RUNNING: JobStatus.JOB_STATUS_RUNNING,
        S.RETRYING: JobStatus.JOB_STATUS_FAILED_RETRYABLE,
        S.SUCCEEDED: JobStatus.JOB_STATUS_SUCCEEDED,
        S.FAILED: JobStatus.JOB_STATUS_FAILED,
        S.CANCELLED: JobStatus.JOB_STATUS_CANCELLED,
        S.TIMEOUT: JobStatus.JOB_STATUS_TIMEOUT,
        S.DENIED: JobStatus.JOB_STATUS_DENIED,
        # The sync output-quarantine DLQ entry carries status DENIED (§2.10).
        S.OUTPUT_QUARANTINED: JobStatus.JOB_STATUS_DENIED,
    }
)


def status_for_state(state: JobState | str) -> int:
    """The CAP JobStatus that represents an internal state (lossy: see the table above)."""
    parsed = parse_state(state)
    if parsed is None:
        return JobStatus.JOB_STATUS_UNSPECIFIED
    return _STATE_TO_STATUS[parsed]


# §2.9: worker result status → state. Anything not listed (UNSPECIFIED, PENDING, SCHEDULED,
# DISPATCHED, RUNNING, unknown numbers) → FAILED.
_RESULT_TO_STATE: Mapping[int, JobState] = MappingProxyType(
    {
        JobStatus.JOB_STATUS_SUCCEEDED: S.SUCCEEDED,  # Go alias COMPLETED has the same number
        JobStatus.JOB_STATUS_FAILED: S.FAILED,
        JobStatus.JOB_STATUS_FAILED_RETRYABLE: S.RETRYING,
        JobStatus.JOB_STATUS_FAILED_FATAL: S.FAILED,
        JobStatus.JOB_STATUS_TIMEOUT: S.TIMEOUT,
        JobStatus.JOB_STATUS_DENIED: S.DENIED,
        JobStatus.JOB_STATUS_CANCELLED: S.CANCELLED,
    }
)


def state_for_result(status: int) -> JobState:
    """The state a worker `JobResult.status` moves the job to (before any output policy)."""
    return _RESULT_TO_STATE.get(int(status), S.FAILED)


def result_goes_to_dlq(status: int) -> bool:
    """§2.10: every non-success worker result is DLQ'd, except FAILED_RETRYABLE."""
    return int(status) not in (JobStatus.JOB_STATUS_SUCCEEDED, JobStatus.JOB_STATUS_FAILED_RETRYABLE)


# ---- error codes -------------------------------------------------------------------------------

_ERROR_CODE_BY_REASON: Mapping[str, int] = MappingProxyType(
    {
        "approval_rejected": ErrorCode.ERROR_CODE_SAFETY_DENIED,
        "policy_denied": ErrorCode.ERROR_CODE_SAFETY_DENIED,
        "policy_violation": ErrorCode.ERROR_CODE_SAFETY_POLICY_VIOLATION,
        "max_scheduling_retries": ErrorCode.ERROR_CODE_JOB_RESOURCE_EXHAUSTED,
        "timeout": ErrorCode.ERROR_CODE_JOB_TIMEOUT,
        "permission_denied": ErrorCode.ERROR_CODE_JOB_PERMISSION_DENIED,
    }
)


def error_code_enum(code: str) -> int:
    """§1.4 scheduler string→enum map (exact match); anything else → ERROR_CODE_UNSPECIFIED."""
    return _ERROR_CODE_BY_REASON.get(code, ErrorCode.ERROR_CODE_UNSPECIFIED)


# ---- retries and backoff (§2.6) ----------------------------------------------------------------

MAX_SCHEDULING_RETRIES = 50
BACKOFF_BASE_S = 1.0
BACKOFF_MAX_S = 30.0
BACKOFF_JITTER_FRACTION = 0.5  # jitter in [0, 0.5 * base) = [0, 500ms) with the default base
BACKOFF_MAX_EXPONENT = 10

# Fixed "retry after" delays (seconds) returned to the bus as the NAK delay.
RETRY_LOCK_BUSY_S = 0.5
RETRY_STORE_ERROR_S = 1.0
RETRY_PUBLISH_ERROR_S = 2.0
RETRY_DLQ_EMIT_FAILED_S = 2.0
RETRY_NO_WORKERS_S = 2.0
RETRY_TENANT_LIMIT_S = 2.0
RETRY_SAFETY_THROTTLE_S = 5.0
RETRY_HANDLER_PANIC_S = 1.0
RETRY_RESULT_PTR_WRITE_S = 1.0


def backoff_delay(
    attempt: int,
    base: float = BACKOFF_BASE_S,
    max_delay: float = BACKOFF_MAX_S,
    jitter_fraction: float = BACKOFF_JITTER_FRACTION,
    rand: float = 0.0,
) -> float:
    """Seconds to wait before retrying a retryable dispatch error:
    `min(base * 2**min(attempt, 10) + rand * jitter_fraction * base, max_delay)`.

    `rand` is a sample from [0, 1) supplied by the caller (e.g. `random.random()`), which keeps
    this function pure. A negative attempt counts as 0.
    """
    if not 0.0 <= rand < 1.0:
        raise ValueError(f"rand must be in [0, 1), got {rand!r}")
    if base < 0 or max_delay < 0 or jitter_fraction < 0:
        raise ValueError("base, max_delay and jitter_fraction must be non-negative")
    exponent = min(max(int(attempt), 0), BACKOFF_MAX_EXPONENT)
    delay = base * (2**exponent) + rand * jitter_fraction * base
    return min(delay, max_delay)


def scheduling_retries_exhausted(attempts: int | None) -> bool:
    """§2.6: at processing start, attempts ≥ 50 → FAILED + DLQ `max_scheduling_retries`.

    `None` means the attempt count could not be read: fail closed (treated as at max).
    """
    return attempts is None or attempts >= MAX_SCHEDULING_RETRIES


def retries_left(retries_done: int, max_retries: int) -> bool:
    """Whether a job that failed retryably `retries_done` times before may be retried once more
    under the policy's `budgets.max_retries` (0 = no policy limit). Our reading of §2.6: the limit
    counts the worker's retryable failures, not dispatch attempts (a job moved on from a worker that
    left, or a dispatch rolled back, was not a failure)."""
    return max_retries <= 0 or retries_done < max_retries
