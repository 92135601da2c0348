"""The pure job model: state machine (§2.1/§2.2), result and error-code mapping (§2.9/§1.4),
backoff (§2.6), DLQ rule (§2.10) and ingress validation (§1.5). No servers needed."""

from __future__ import annotations

import itertools

import pytest

from cordum.agent.v1 import job_pb2
from cordum.store import jobstate as js
from cordum.store.jobstate import JobState as S
from cordum.store.validate import tenant_name_problem, tenant_problems, validate_job_request, validate_job_result

St = job_pb2.JobStatus
EC = job_pb2.ErrorCode

# ---- states and transitions ---------------------------------------------------------------------

# The table of spec §2.2, written out independently of the module's data, with our one widening: a
# job waiting to run again (RETRYING, SCHEDULED) passes the policy again and may be denied or held.
SPEC_ALLOWED: dict[S | None, set[S]] = {
    None: {S.PENDING, S.APPROVAL_REQUIRED, S.SCHEDULED, S.DISPATCHED, S.RUNNING, S.FAILED, S.CANCELLED},
    S.PENDING: {S.APPROVAL_REQUIRED, S.SCHEDULED, S.DISPATCHED, S.RUNNING, S.DENIED, S.FAILED,
                S.TIMEOUT, S.SUCCEEDED, S.CANCELLED, S.RETRYING},
    S.APPROVAL_REQUIRED: {S.PENDING, S.SCHEDULED, S.DISPATCHED, S.RUNNING, S.DENIED, S.FAILED,
                          S.TIMEOUT, S.SUCCEEDED, S.CANCELLED},
    S.SCHEDULED: {S.SCHEDULED, S.APPROVAL_REQUIRED, S.DISPATCHED, S.RUNNING, S.DENIED, S.FAILED, S.TIMEOUT, S.SUCCEEDED,
                  S.CANCELLED, S.OUTPUT_QUARANTINED, S.RETRYING},
    S.DISPATCHED: {S.SCHEDULED, S.RUNNING, S.SUCCEEDED, S.FAILED, S.CANCELLED, S.TIMEOUT,
                   S.OUTPUT_QUARANTINED, S.RETRYING},
    S.RUNNING: {S.RUNNING, S.SUCCEEDED, S.FAILED, S.CANCELLED, S.TIMEOUT, S.OUTPUT_QUARANTINED,
                S.RETRYING},
    S.RETRYING: {S.SCHEDULED, S.DISPATCHED, S.RUNNING, S.RETRYING, S.SUCCEEDED, S.FAILED,
                 S.CANCELLED, S.TIMEOUT, S.DENIED, S.APPROVAL_REQUIRED},
    S.SUCCEEDED: {S.OUTPUT_QUARANTINED},
    S.FAILED: set(),
    S.CANCELLED: set(),
    S.TIMEOUT: set(),
    S.DENIED: set(),
    S.OUTPUT_QUARANTINED: set(),
}

ALL_FROM = [None, *S]
ALLOWED_PAIRS = [(f, t) for f in ALL_FROM for t in sorted(SPEC_ALLOWED[f])]
FORBIDDEN_PAIRS = [(f, t) for f, t in itertools.product(ALL_FROM, S) if t not in SPEC_ALLOWED[f]]


def test_state_strings_are_the_internal_ones():
    assert [s.value for s in S] == [
        "PENDING", "APPROVAL_REQUIRED", "SCHEDULED", "DISPATCHED", "RUNNING", "RETRYING",
        "SUCCEEDED", "FAILED", "CANCELLED", "TIMEOUT", "DENIED", "OUTPUT_QUARANTINED",
    ]
    assert S("RUNNING") is S.RUNNING and S.RUNNING == "RUNNING" and f"{S.RUNNING}" == "RUNNING"
    assert S.APPROVAL_REQUIRED.index_name == "approval_required"


def test_terminal_and_active_sets():
    assert js.TERMINAL == {S.SUCCEEDED, S.FAILED, S.CANCELLED, S.TIMEOUT, S.DENIED,
                           S.OUTPUT_QUARANTINED}
    for s in S:
        assert js.is_terminal(s) == (s in js.TERMINAL)
        assert js.is_active(s) == (s not in js.TERMINAL)
        assert js.is_terminal(s.value) == js.is_terminal(s)
    assert js.is_active(S.RETRYING) and js.is_active(S.APPROVAL_REQUIRED)
    assert not js.is_active(None) and not js.is_active("") and not js.is_terminal(None)


def test_module_table_equals_spec_table():
    assert {k: set(v) for k, v in js.TRANSITIONS.items()} == SPEC_ALLOWED


@pytest.mark.parametrize(("src", "dst"), ALLOWED_PAIRS, ids=lambda s: str(s))
def test_every_allowed_transition(src, dst):
    assert js.can_transition(src, dst)
    assert js.can_transition(src.value if src else None, dst.value)  # stored strings work too
    js.check_transition(src, dst)  # does not raise


@pytest.mark.parametrize(("src", "dst"), FORBIDDEN_PAIRS, ids=lambda s: str(s))
def test_every_forbidden_transition(src, dst):
    assert not js.can_transition(src, dst)
    with pytest.raises(js.InvalidTransition) as info:
        js.check_transition(src, dst)
    message = str(info.value)
    assert "invalid transition" in message
    assert ("(none)" if src is None else src.value) in message and dst.value in message
    assert info.value.from_state == src and info.value.to_state == dst


@pytest.mark.parametrize(
    ("src", "dst"),
    [
        (S.PENDING, S.PENDING),  # callers must avoid the self-write
        (S.APPROVAL_REQUIRED, S.APPROVAL_REQUIRED),
        (S.RUNNING, S.PENDING),
        (S.RUNNING, S.SCHEDULED),  # only DISPATCHED rolls back to SCHEDULED
        (S.DISPATCHED, S.DISPATCHED),
        (S.DISPATCHED, S.DENIED),
        (S.APPROVAL_REQUIRED, S.RETRYING),
        (S.RETRYING, S.PENDING),
        (S.RETRYING, S.OUTPUT_QUARANTINED),
        (None, S.SUCCEEDED),
        (None, S.RETRYING),
        (S.CANCELLED, S.SUCCEEDED),  # late worker success after cancel
        (S.SUCCEEDED, S.FAILED),
        (S.OUTPUT_QUARANTINED, S.SUCCEEDED),
    ],
    ids=lambda s: str(s),
)
def test_notable_forbidden_transitions(src, dst):
    assert not js.can_transition(src, dst)


def test_self_transitions_allowed_only_where_the_spec_says():
    assert {s for s in S if js.can_transition(s, s)} == {S.SCHEDULED, S.RUNNING, S.RETRYING}


def test_terminal_states_have_no_exits_except_succeeded_to_quarantine():
    for src in js.TERMINAL:
        exits = {dst for dst in S if js.can_transition(src, dst)}
        assert exits == ({S.OUTPUT_QUARANTINED} if src is S.SUCCEEDED else set()), src


def test_empty_string_means_no_state_and_unknown_strings_are_rejected():
    assert js.can_transition("", S.PENDING) and not js.can_transition("", S.SUCCEEDED)
    assert not js.can_transition("BOGUS", S.PENDING)
    assert not js.can_transition(S.PENDING, "BOGUS")
    assert not js.can_transition(S.PENDING, "")
    with pytest.raises(js.InvalidTransition, match="BOGUS"):
        js.check_transition("BOGUS", S.PENDING)
    with pytest.raises(ValueError):
        js.parse_state("nope")


@pytest.mark.parametrize(
    ("src", "dst", "expected"),
    [
        (S.PENDING, S.SCHEDULED, True),
        (None, S.SCHEDULED, True),
        (S.RETRYING, S.SCHEDULED, True),
        (S.DISPATCHED, S.SCHEDULED, True),  # rollback re-enters SCHEDULED: counts
        (S.SCHEDULED, S.SCHEDULED, False),  # self-write does not
        (S.PENDING, S.RUNNING, False),
        (S.PENDING, S.DISPATCHED, True),  # a dispatch straight from PENDING is an attempt
        (S.RETRYING, S.DISPATCHED, True),
        (S.SCHEDULED, S.DISPATCHED, False),  # already counted when it entered SCHEDULED
        (S.DISPATCHED, S.DISPATCHED, False),
    ],
)
def test_attempts_increment_when_a_scheduling_attempt_starts(src, dst, expected):
    assert js.increments_attempts(src, dst) is expected


# ---- JobState <-> JobStatus, result mapping ---------------------------------------------------------


@pytest.mark.parametrize(
    ("state", "status"),
    [
        (S.PENDING, St.JOB_STATUS_PENDING),
        (S.APPROVAL_REQUIRED, St.JOB_STATUS_PENDING),
        (S.SCHEDULED, St.JOB_STATUS_SCHEDULED),
        (S.DISPATCHED, St.JOB_STATUS_DISPATCHED),
        (S.RUNNING, St.JOB_STATUS_RUNNING),
        (S.RETRYING, St.JOB_STATUS_FAILED_RETRYABLE),
        (S.SUCCEEDED, St.JOB_STATUS_SUCCEEDED),
        (S.FAILED, St.JOB_STATUS_FAILED),
        (S.CANCELLED, St.JOB_STATUS_CANCELLED),
        (S.TIMEOUT, St.JOB_STATUS_TIMEOUT),
        (S.DENIED, St.JOB_STATUS_DENIED),
        (S.OUTPUT_QUARANTINED, St.JOB_STATUS_DENIED),
    ],
)
def test_status_for_state(state, status):
    assert js.status_for_state(state) == status
    assert js.status_for_state(state.value) == status


def test_status_for_no_state_is_unspecified():
    assert js.status_for_state("") == St.JOB_STATUS_UNSPECIFIED


@pytest.mark.parametrize(
    ("status", "state"),
    [
        (St.JOB_STATUS_SUCCEEDED, S.SUCCEEDED),
        (St.JOB_STATUS_FAILED, S.FAILED),
        (St.JOB_STATUS_FAILED_RETRYABLE, S.RETRYING),
        (St.JOB_STATUS_FAILED_FATAL, S.FAILED),
        (St.JOB_STATUS_TIMEOUT, S.TIMEOUT),
        (St.JOB_STATUS_DENIED, S.DENIED),
        (St.JOB_STATUS_CANCELLED, S.CANCELLED),
        # anything else → FAILED
        (St.JOB_STATUS_UNSPECIFIED, S.FAILED),
        (St.JOB_STATUS_PENDING, S.FAILED),
        (St.JOB_STATUS_SCHEDULED, S.FAILED),
        (St.JOB_STATUS_DISPATCHED, S.FAILED),
        (St.JOB_STATUS_RUNNING, S.FAILED),
        (99, S.FAILED),
    ],
)
def test_state_for_result(status, state):
    assert js.state_for_result(status) is state


def test_completed_alias_is_succeeded():
    assert St.JOB_STATUS_SUCCEEDED == 5
    assert js.state_for_result(5) is S.SUCCEEDED


@pytest.mark.parametrize(
    ("status", "dlq"),
    [
        (St.JOB_STATUS_SUCCEEDED, False),
        (St.JOB_STATUS_FAILED_RETRYABLE, False),
        (St.JOB_STATUS_FAILED, True),
        (St.JOB_STATUS_FAILED_FATAL, True),
        (St.JOB_STATUS_TIMEOUT, True),
        (St.JOB_STATUS_DENIED, True),
        (St.JOB_STATUS_CANCELLED, True),
        (St.JOB_STATUS_RUNNING, True),  # maps to FAILED, which is DLQ'd
    ],
)
def test_result_goes_to_dlq(status, dlq):
    assert js.result_goes_to_dlq(status) is dlq


def test_result_mapping_from_running_and_the_denied_gap():
    # Every mapped result state is reachable from RUNNING except DENIED: §2.2 does not list
    # RUNNING/DISPATCHED -> DENIED, so the store rejects a worker's DENIED result for a running job
    # (spec inconsistency kept as written; the table is the authority).
    unreachable = {js.state_for_result(s) for s in St.values()
                   if not js.can_transition(S.RUNNING, js.state_for_result(s))}
    assert unreachable == {S.DENIED}
    assert js.can_transition(S.SCHEDULED, S.DENIED) and not js.can_transition(S.DISPATCHED, S.DENIED)


# ---- error codes ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "enum"),
    [
        ("approval_rejected", EC.ERROR_CODE_SAFETY_DENIED),
        ("policy_denied", EC.ERROR_CODE_SAFETY_DENIED),
        ("policy_violation", EC.ERROR_CODE_SAFETY_POLICY_VIOLATION),
        ("max_scheduling_retries", EC.ERROR_CODE_JOB_RESOURCE_EXHAUSTED),
        ("timeout", EC.ERROR_CODE_JOB_TIMEOUT),
        ("permission_denied", EC.ERROR_CODE_JOB_PERMISSION_DENIED),
        ("safety_denied", EC.ERROR_CODE_UNSPECIFIED),
        ("no_workers", EC.ERROR_CODE_UNSPECIFIED),
        ("", EC.ERROR_CODE_UNSPECIFIED),
        ("TIMEOUT", EC.ERROR_CODE_UNSPECIFIED),  # exact match only
    ],
)
def test_error_code_enum(code, enum):
    assert js.error_code_enum(code) == enum


def test_error_code_numbers_match_spec():
    assert EC.ERROR_CODE_SAFETY_DENIED == 300 and EC.ERROR_CODE_JOB_TIMEOUT == 200
    assert EC.ERROR_CODE_JOB_RESOURCE_EXHAUSTED == 201 and EC.ERROR_CODE_JOB_PERMISSION_DENIED == 202
    assert EC.ERROR_CODE_SAFETY_POLICY_VIOLATION == 301


# ---- backoff and retry limits -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("attempt", "expected"),
    [(0, 1.0), (1, 2.0), (2, 4.0), (3, 8.0), (4, 16.0), (5, 30.0), (10, 30.0), (1000, 30.0), (-3, 1.0)],
)
def test_backoff_defaults_without_jitter(attempt, expected):
    assert js.backoff_delay(attempt) == expected


def test_backoff_jitter_is_within_half_a_second():
    for attempt in range(5):
        low = js.backoff_delay(attempt, rand=0.0)
        high = js.backoff_delay(attempt, rand=0.999999)
        assert low == 2.0**attempt
        assert low <= high < low + 0.5


def test_backoff_grows_monotonically_and_never_exceeds_max():
    for rand in (0.0, 0.3, 0.999):
        delays = [js.backoff_delay(a, rand=rand) for a in range(-2, 40)]
        assert delays == sorted(delays)
        assert all(0 < d <= 30.0 for d in delays)
        assert delays[-1] == 30.0


def test_backoff_exponent_clamped_at_ten():
    # With no cap, the exponent stops growing at 2**10.
    assert js.backoff_delay(10, 1.0, 1e9) == 1024.0
    assert js.backoff_delay(11, 1.0, 1e9) == 1024.0
    assert js.backoff_delay(500, 0.001, 1e9, 0.0) == pytest.approx(1.024)


def test_backoff_custom_parameters():
    assert js.backoff_delay(2, 0.1, 10.0, 1.0, 0.5) == pytest.approx(0.4 + 0.05)
    assert js.backoff_delay(3, 2.0, 5.0, 0.0, 0.9) == 5.0


@pytest.mark.parametrize("rand", [-0.1, 1.0, 2.0])
def test_backoff_rejects_rand_outside_unit_interval(rand):
    with pytest.raises(ValueError, match="rand"):
        js.backoff_delay(1, rand=rand)


def test_backoff_rejects_negative_parameters():
    with pytest.raises(ValueError):
        js.backoff_delay(1, base=-1.0)


@pytest.mark.parametrize(
    ("attempts", "exhausted"), [(0, False), (49, False), (50, True), (51, True), (None, True)]
)
def test_scheduling_retries_exhausted(attempts, exhausted):
    assert js.scheduling_retries_exhausted(attempts) is exhausted


@pytest.mark.parametrize(("done", "limit", "left"), [(0, 0, True), (99, 0, True), (0, 1, True), (1, 1, False),
                                                     (2, 3, True), (3, 3, False), (-1, 1, True)])
def test_retries_left_under_the_policy_limit(done, limit, left):
    assert js.retries_left(done, limit) is left


def test_fixed_retry_delays():
    assert (js.RETRY_LOCK_BUSY_S, js.RETRY_STORE_ERROR_S, js.RETRY_PUBLISH_ERROR_S,
            js.RETRY_NO_WORKERS_S, js.RETRY_TENANT_LIMIT_S, js.RETRY_SAFETY_THROTTLE_S) == (
        0.5, 1.0, 2.0, 2.0, 2.0, 5.0)


# ---- ingress validation --------------------------------------------------------------------------------


def good_request(**changes) -> job_pb2.JobRequest:
    req = job_pb2.JobRequest(
        job_id="job-1",
        topic="job.default",
        priority=job_pb2.JobPriority.JOB_PRIORITY_INTERACTIVE,
        tenant_id="acme",
        env={"tenant_id": "acme"},
        labels={"a": "b"},
        budget=job_pb2.Budget(max_input_tokens=8000, max_output_tokens=1024, max_total_tokens=0,
                              deadline_ms=60000),
        meta=job_pb2.JobMetadata(risk_tags=["net"], requires=["gpu"]),
    )
    for key, value in changes.items():
        setattr(req, key, value)
    return req


def good_result(**changes) -> job_pb2.JobResult:
    res = job_pb2.JobResult(job_id="job-1", status=St.JOB_STATUS_SUCCEEDED, worker_id="w-1",
                            execution_ms=12, result_ptr="redis://res:job-1")
    for key, value in changes.items():
        setattr(res, key, value)
    return res


def only_problem(problems: list[str], field: str) -> str:
    assert len(problems) == 1, problems
    assert field in problems[0], problems
    return problems[0]


def test_valid_request_and_minimal_request_pass():
    assert validate_job_request(good_request()) == []
    assert validate_job_request(job_pb2.JobRequest(job_id="j", topic="t")) == []


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"job_id": ""}, "job_id"),
        ({"topic": ""}, "topic"),
        ({"priority": 4}, "priority"),
        ({"priority": -1}, "priority"),
        ({"step_index": -1}, "step_index"),
    ],
)
def test_request_scalar_rules(changes, field):
    only_problem(validate_job_request(good_request(**changes)), field)


@pytest.mark.parametrize("priority", [0, 1, 2, 3])
def test_request_priority_bounds_inclusive(priority):
    assert validate_job_request(good_request(priority=priority)) == []


def test_request_step_index_zero_ok():
    assert validate_job_request(good_request(step_index=0)) == []


@pytest.mark.parametrize("where", ["labels", "meta.labels", "meta.risk_tags", "meta.requires"])
def test_request_list_limits(where):
    for count, ok in ((1000, True), (1001, False)):
        req = good_request()
        if where == "labels":
            req.labels.update({f"k{i}": "v" for i in range(count)})
            req.labels.pop("a")
        elif where == "meta.labels":
            req.meta.labels.update({f"k{i}": "v" for i in range(count)})
        else:
            target = getattr(req.meta, where.split(".")[1])
            del target[:]
            target.extend(f"x{i}" for i in range(count))
        problems = validate_job_request(req)
        if ok:
            assert problems == [], (where, count)
        else:
            message = only_problem(problems, where)
            assert "1001" in message and "1000" in message


@pytest.mark.parametrize("name", ["max_input_tokens", "max_output_tokens", "max_total_tokens"])
def test_request_budget_tokens(name):
    for value, ok in ((0, True), (10_000_000_000, True), (10_000_000_001, False), (-1, False)):
        req = good_request()
        setattr(req.budget, name, value)
        problems = validate_job_request(req)
        if ok:
            assert problems == [], (name, value)
        else:
            only_problem(problems, f"budget.{name}")


def test_request_negative_deadline():
    req = good_request()
    req.budget.deadline_ms = -5
    assert "-5" in only_problem(validate_job_request(req), "budget.deadline_ms")
    req.budget.deadline_ms = 0
    assert validate_job_request(req) == []


def test_request_tenant_cross_check():
    req = good_request()
    req.env["tenant_id"] = "other"
    message = only_problem(validate_job_request(req), "tenant_id")
    assert "acme" in message and "other" in message and "env" in message
    # Either side unset → no check.
    req.tenant_id = ""
    assert validate_job_request(req) == []
    req = good_request()
    del req.env["tenant_id"]
    assert validate_job_request(req) == []


def test_request_reports_every_problem_at_once():
    req = job_pb2.JobRequest(priority=9, step_index=-2)
    req.budget.deadline_ms = -1
    problems = validate_job_request(req)
    for field in ("job_id", "topic", "priority", "step_index", "budget.deadline_ms"):
        assert any(field in p for p in problems), (field, problems)
    assert len(problems) == 5


def test_valid_result_passes():
    assert validate_job_result(good_result()) == []
    assert validate_job_result(good_result(execution_ms=0)) == []


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"job_id": ""}, "job_id"),
        ({"status": St.JOB_STATUS_UNSPECIFIED}, "status"),
        ({"worker_id": ""}, "worker_id"),
        ({"execution_ms": -1}, "execution_ms"),
    ],
)
def test_result_rules(changes, field):
    only_problem(validate_job_result(good_result(**changes)), field)


def test_gateway_synthetic_cancel_result_is_rejected_for_missing_worker_id():
    res = job_pb2.JobResult(job_id="job-1", status=St.JOB_STATUS_CANCELLED)
    only_problem(validate_job_result(res), "worker_id")


def test_result_reports_every_problem_at_once():
    problems = validate_job_result(job_pb2.JobResult(execution_ms=-3))
    assert len(problems) == 4


@pytest.mark.parametrize("name", ["default", "acme", "a", "team-7_eu", "0x", "a" * 64])
def test_valid_tenant_names(name):
    assert tenant_name_problem(name) is None


@pytest.mark.parametrize("name", ["", "Acme", "acme:eu", "acme eu", "-acme", "_x", "a" * 65, "acme/eu", "acmé", "acme{x}"])
def test_invalid_tenant_names_are_named(name):
    assert f"tenant {name!r} is invalid" in tenant_name_problem(name)


def test_a_request_naming_a_bad_tenant_is_dropped():
    """Published straight to the bus (no gateway in between), a job for `acme:eu` would share
    key prefixes with `acme`'s: the scheduler's ingress check drops it, naming the tenant."""
    request = job_pb2.JobRequest(job_id="j", topic="job.default", tenant_id="acme:eu")
    assert any("'acme:eu' is invalid" in p for p in tenant_problems(request))
    request = job_pb2.JobRequest(job_id="j", topic="job.default", env={"tenant_id": "ACME"})
    assert any("'ACME' is invalid" in p for p in tenant_problems(request))
    both = job_pb2.JobRequest(job_id="j", topic="job.default", tenant_id="acme", env={"tenant_id": "beta"})
    assert tenant_problems(both) == ["tenant_id 'acme' does not match env['tenant_id'] 'beta'"]
    assert tenant_problems(job_pb2.JobRequest(job_id="j", tenant_id="acme", env={"tenant_id": "acme"})) == []
