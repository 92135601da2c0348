"""Ingress validation of bus packets (spec §1.5, CAP `ValidateJobRequest` / `ValidateJobResult`).

Pure functions over the protobuf messages: they return a list of human-readable problems, each
naming the offending field; an empty list means the message is accepted. The scheduler logs the
problems, counts `validation_rejections_total`, and ACKs (drops) the packet.

Job ids (`job_id_problems`): 1 to 128 characters, each an ASCII letter, a digit or one of `-_.:@[]`.
That admits every id the system makes (gateway UUIDs, DLQ retries `<id>-retry-<8 hex>`, workflow
steps `<run>:<step>@<n>` and `<run>:<step>[i]@<n>`) and keeps out what breaks keys and subjects:
`{`/`}` (a Redis Cluster hash tag that would put a job's lock and its fence counter in different
slots), whitespace, control characters, `*`, `>`, `/` and everything else.
"""

from __future__ import annotations

import re

from cordum.agent.v1 import job_pb2

MAX_LIST_ENTRIES = 1000  # labels / risk_tags / requires
MAX_BUDGET_TOKENS = 10_000_000_000  # 1e10; larger is rejected, exactly 1e10 is accepted
PRIORITY_MIN = 0
PRIORITY_MAX = 3
TENANT_ENV_KEY = "tenant_id"

_BUDGET_TOKEN_FIELDS = ("max_input_tokens", "max_output_tokens", "max_total_tokens")

MAX_JOB_ID_LEN = 128
JOB_ID_PUNCTUATION = "-_.:@[]"
_JOB_ID_BAD_CHAR = re.compile(r"[^A-Za-z0-9\-_.:@\[\]]")
_SHOWN_BAD_CHARS = 5


def job_id_problems(job_id: str, field: str = "job_id") -> list[str]:
    """Problems with a job id (empty list = valid); each message names `field`.

    Pure and cheap (one regex pass), so it can run before any lock or Redis key is built from the id.
    """
    if job_id == "":
        return [f"{field} is empty"]
    problems: list[str] = []
    if len(job_id) > MAX_JOB_ID_LEN:
        problems.append(f"{field} is {len(job_id)} characters long (max {MAX_JOB_ID_LEN})")
    if "{" in job_id or "}" in job_id:
        problems.append(f"{field} contains '{{' or '}}' (a Redis Cluster hash tag: not allowed in job ids)")
    bad = [c for c in dict.fromkeys(_JOB_ID_BAD_CHAR.findall(job_id)) if c not in "{}"]
    if bad:
        shown = ", ".join(repr(c) for c in bad[:_SHOWN_BAD_CHARS]) + (", ..." if len(bad) > _SHOWN_BAD_CHARS else "")
        problems.append(f"{field} contains characters not allowed in job ids ({shown}); "
                        f"allowed: ASCII letters, digits and {JOB_ID_PUNCTUATION}")
    return problems


def validate_job_request(req: job_pb2.JobRequest) -> list[str]:
    """Problems with a JobRequest taken off `sys.job.submit` (empty list = valid)."""
    problems: list[str] = job_id_problems(req.job_id)
    if req.topic == "":
        problems.append("topic is empty")
    if not PRIORITY_MIN <= int(req.priority) <= PRIORITY_MAX:
        problems.append(f"priority {int(req.priority)} is outside {PRIORITY_MIN}..{PRIORITY_MAX}")
    if req.step_index < 0:
        problems.append(f"step_index {req.step_index} is negative")

    counted = [("labels", len(req.labels))]
    if req.HasField("meta"):
        counted += [
            ("meta.labels", len(req.meta.labels)),
            ("meta.risk_tags", len(req.meta.risk_tags)),
            ("meta.requires", len(req.meta.requires)),
        ]
    for name, count in counted:
        if count > MAX_LIST_ENTRIES:
            problems.append(f"{name} has {count} entries (max {MAX_LIST_ENTRIES})")

    if req.HasField("budget"):
        for name in _BUDGET_TOKEN_FIELDS:
            value = getattr(req.budget, name)
            if value < 0:
                problems.append(f"budget.{name} {value} is negative")
            elif value > MAX_BUDGET_TOKENS:
                problems.append(f"budget.{name} {value} exceeds {MAX_BUDGET_TOKENS}")
        if req.budget.deadline_ms < 0:
            problems.append(f"budget.deadline_ms {req.budget.deadline_ms} is negative")

    problems.extend(tenant_problems(req))
    return problems


# Tenant names become key prefixes and label values: lower case, no separators (`acme` and
# `acme:eu` would share key prefixes), so one tenant can never name another's keys.
TENANT_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
TENANT_RULE = "1-64 characters: lower-case letters, digits, '-' and '_', starting with a letter or digit"


def tenant_name_problem(name: str) -> str | None:
    """Why `name` is not a valid tenant name, or None."""
    return None if TENANT_NAME.match(name) else f"tenant {name!r} is invalid: {TENANT_RULE}"


def tenant_problems(req: job_pb2.JobRequest) -> list[str]:
    """The tenant checks: each of `tenant_id` and `env["tenant_id"]` a valid name when set, and the
    two the same when both are set → else drop."""
    env_tenant = req.env.get(TENANT_ENV_KEY, "")
    problems = [problem for name in dict.fromkeys((req.tenant_id, env_tenant)) if name
                for problem in [tenant_name_problem(name)] if problem]
    if req.tenant_id and env_tenant and req.tenant_id != env_tenant:
        problems.append(f"tenant_id {req.tenant_id!r} does not match env[{TENANT_ENV_KEY!r}] {env_tenant!r}")
    return problems


def validate_job_result(res: job_pb2.JobResult) -> list[str]:
    """Problems with a JobResult taken off `sys.job.result` (empty list = valid).

    A result without worker_id (the gateway's synthetic CANCELLED result, DLQ-style results) is
    rejected here on purpose: those exist for other listeners, not for the scheduler.
    """
    problems: list[str] = []
    if res.job_id == "":
        problems.append("job_id is empty")
    if int(res.status) == job_pb2.JobStatus.JOB_STATUS_UNSPECIFIED:
        problems.append("status is JOB_STATUS_UNSPECIFIED")
    if res.worker_id == "":
        problems.append("worker_id is empty")
    if res.execution_ms < 0:
        problems.append(f"execution_ms {res.execution_ms} is negative")
    return problems
