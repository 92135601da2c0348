"""Jobs: the submit pipeline (spec cordum-services §1.6, jobpath §2.3/§2.5) and the job reads.

Submit: validate the body (every integer bounded by its protobuf type; reserved label prefixes
refused) → the caller's identity from the credential (`bound_identity`: principal and actor are
the key's; another one in the body → 403 `principal_mismatch`/`actor_mismatch`; only admin keys
act on another's behalf) → build the JobRequest and run the scheduler's own
ingress validation on it (a problem → 400 naming the field; nothing persisted) → idempotency
pre-check (tenant-scoped) → submit-time policy (kernel `Evaluate`, 5 s) → by verdict:
- ALLOW / ALLOW_WITH_CONSTRAINTS: reserve the idempotency key (a lost race returns the holder's
  job), persist PENDING with `ctx:`, `job:req:` and meta, publish the JobRequest on
  `sys.job.submit` → 200 `{job_id, trace_id}`. Publish failure → FAILED, key released, 503.
- DENY: persisted PENDING → DENIED, DLQ entry `policy_denied` written (then the event published,
  best effort), decision recorded → 403 with the job id. "Policy check unavailable" (unless
  POLICY_CHECK_FAIL_MODE=open) is denied the same way but does not hold the idempotency key.
- THROTTLE: nothing persisted → 429, Retry-After: 30.
- REQUIRE_APPROVAL: persisted in APPROVAL_REQUIRED, not published → 200 `approval_required`.

The idempotency key never points at a job that does not exist: released (compare-and-delete) if
create fails, and a key whose job is gone is treated as free (see `idempotency`). The job meta
records `submitted_key`, the submitting API key's fingerprint, for the self-approval check.
"""

from __future__ import annotations

import datetime
import json
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import json_format
from quart import Quart, request

from cordum.agent.v1 import job_pb2, safety_pb2
from cordum.context.window import memory_id_problems
from cordum.gateway import audit, deadletter
from cordum.gateway.auth import Principal
from cordum.gateway.context import MAX_BODY, SENDER, Gateway, caller, cursor_text, json_body, optional_str, optional_str_list, optional_str_map, query_int, require
from cordum.gateway.errors import ApiError, not_found
from cordum.protocol import subjects
from cordum.protocol.packets import encode, new_packet
from cordum.protocol.pointers import context_key, ptr
from cordum.runtime.log import get_logger
from cordum.safety.client import SafetyDecision, Verdict
from cordum.store.validate import job_id_problems, tenant_problems, validate_job_request
from cordum.store.jobs import InvalidTransition, JobNotFound, decode_output, now_us
from cordum.store.keys import memory_scope
from cordum.store import keys
from cordum.store import output as output_check
from cordum.store.jobstate import TERMINAL, JobState, parse_state

log = get_logger("gateway.jobs")

TOPIC_RE = re.compile(r"^job(\.[A-Za-z0-9_-]+)+$")
MAX_PROMPT = 50_000
MAX_TOPIC = 256
MAX_LABELS = 50
# Set by the control plane only (governance, bus dedupe ids, approvals): a caller may not forge them.
RESERVED_LABEL_PREFIXES = ("_governance.", "_ma.", "cordum.", "approval_")
INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1
# Integer fields of the body and the protobuf type they end up in (max_input_tokens also goes to
# ContextHints.max_input_tokens, an int32).
INT_LIMITS = {"max_input_tokens": INT32_MAX, "max_output_tokens": INT64_MAX,
              "max_total_tokens": INT64_MAX, "deadline_ms": INT64_MAX}
PRIORITIES = {
    "interactive": job_pb2.JOB_PRIORITY_INTERACTIVE,
    "batch": job_pb2.JOB_PRIORITY_BATCH,
    "critical": job_pb2.JOB_PRIORITY_CRITICAL,
}
ACTOR_TYPES = {"": job_pb2.ACTOR_TYPE_UNSPECIFIED, "human": job_pb2.ACTOR_TYPE_HUMAN,
               "service": job_pb2.ACTOR_TYPE_SERVICE}
THROTTLE_RETRY_AFTER = "30"
TENANT_LIMIT_RETRY_AFTER = "2"
# Kept on a job for the self-approval check, never shown: key names are not for anybody's eyes.
PRIVATE_FIELDS = frozenset({"submitted_key", "retried_key"})
POLICY_UNAVAILABLE = "policy check unavailable"


# ---- validation (pure) --------------------------------------------------------------------------


@dataclass
class SubmitInput:
    prompt: str
    topic: str = "job.default"
    context: Any = None
    priority: int = job_pb2.JOB_PRIORITY_INTERACTIVE
    idempotency_key: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    capability: str = ""
    risk_tags: list[str] = field(default_factory=list)
    requires: list[str] = field(default_factory=list)
    principal_id: str = ""
    actor_id: str = ""
    actor_type: str = ""
    memory_id: str = ""
    max_input_tokens: int = 8000
    max_output_tokens: int = 1024
    max_total_tokens: int = 0
    deadline_ms: int = 0


def _int_field(body: dict[str, Any], name: str, default: int) -> int:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ApiError(400, f"{name} must be a non-negative integer")
    high = INT_LIMITS[name]
    if value > high:
        raise ApiError(400, f"{name} must be at most {high}")
    return value


def parse_submit(body: dict[str, Any], tenant: str) -> SubmitInput:
    """Validate a submit body; ApiError 400 names the first bad field."""
    prompt = body.get("prompt")
    if prompt is None or (isinstance(prompt, str) and not prompt.strip()):
        raise ApiError(400, "prompt is required")
    if not isinstance(prompt, str):
        raise ApiError(400, "prompt must be a string")
    if len(prompt) > MAX_PROMPT:
        raise ApiError(400, f"prompt must be at most {MAX_PROMPT} characters")
    topic = optional_str(body, "topic") or "job.default"
    if len(topic) > MAX_TOPIC:
        raise ApiError(400, f"topic must be at most {MAX_TOPIC} characters")
    if not TOPIC_RE.match(topic):
        raise ApiError(400, "topic must look like job.<segment>(.<segment>)* (letters, digits, _ and -)")
    priority_name = optional_str(body, "priority").lower()
    if priority_name and priority_name not in PRIORITIES:
        raise ApiError(400, "priority must be one of interactive, batch, critical")
    for name in ("tenant_id", "org_id"):
        requested = optional_str(body, name)
        if requested and requested != tenant:
            raise ApiError(403, "tenant access denied")
    labels = optional_str_map(body, "labels", max_items=MAX_LABELS)
    cleaned: dict[str, str] = {}
    for key, value in labels.items():
        if key.startswith(RESERVED_LABEL_PREFIXES):
            raise ApiError(400, f"labels: key {key!r} is reserved (prefixes {', '.join(RESERVED_LABEL_PREFIXES)})")
        if key.startswith("_"):
            continue  # internal labels are set by the control plane, never by callers
        cleaned[key] = value
    cleaned["_source"] = "api"
    actor_type = optional_str(body, "actor_type").lower()
    if actor_type not in ACTOR_TYPES:
        raise ApiError(400, "actor_type must be human or service")
    return SubmitInput(
        prompt=prompt,
        topic=topic,
        context=body.get("context"),
        priority=PRIORITIES.get(priority_name, job_pb2.JOB_PRIORITY_INTERACTIVE),
        idempotency_key=optional_str(body, "idempotency_key", max_len=256),
        labels=cleaned,
        capability=optional_str(body, "capability", max_len=256),
        risk_tags=optional_str_list(body, "risk_tags"),
        requires=optional_str_list(body, "requires"),
        principal_id=optional_str(body, "principal_id", max_len=256),
        actor_id=optional_str(body, "actor_id", max_len=256),
        actor_type=actor_type,
        memory_id=_memory_id(body, tenant),
        max_input_tokens=_int_field(body, "max_input_tokens", 8000),
        max_output_tokens=_int_field(body, "max_output_tokens", 1024),
        max_total_tokens=_int_field(body, "max_total_tokens", 0),
        deadline_ms=_int_field(body, "deadline_ms", 0),
    )


def _memory_id(body: dict[str, Any], tenant: str) -> str:
    """The job's memory id, refused here (400) if the context engine would refuse it as this
    tenant's memory (whitespace, too long once scoped), not when a worker builds its window."""
    memory_id = optional_str(body, "memory_id", max_len=256)
    problems = memory_id_problems(memory_scope(tenant, memory_id))
    if problems:
        raise ApiError(400, f"memory_id: {'; '.join(problems)}", code="invalid_memory_id")
    return memory_id


def job_metadata(inp: SubmitInput, tenant: str) -> job_pb2.JobMetadata:
    return job_pb2.JobMetadata(
        tenant_id=tenant, actor_id=inp.actor_id, actor_type=ACTOR_TYPES[inp.actor_type],
        idempotency_key=inp.idempotency_key, capability=inp.capability, risk_tags=inp.risk_tags,
        requires=inp.requires, labels=inp.labels,
    )


def build_request(job_id: str, inp: SubmitInput, tenant: str) -> job_pb2.JobRequest:
    env = {"tenant_id": tenant, "max_input_tokens": str(inp.max_input_tokens),
           "max_output_tokens": str(inp.max_output_tokens)}
    if inp.memory_id:
        env["memory_id"] = inp.memory_id
    return job_pb2.JobRequest(
        job_id=job_id,
        topic=inp.topic,
        priority=inp.priority,
        context_ptr=ptr(context_key(job_id)),
        env=env,
        memory_id=inp.memory_id,
        tenant_id=tenant,
        principal_id=inp.principal_id,
        labels=inp.labels,
        meta=job_metadata(inp, tenant),
        budget=job_pb2.Budget(max_input_tokens=inp.max_input_tokens, max_output_tokens=inp.max_output_tokens,
                              max_total_tokens=inp.max_total_tokens, deadline_ms=inp.deadline_ms),
        context_hints=job_pb2.ContextHints(max_input_tokens=inp.max_input_tokens),
    )


def policy_request(job_id: str, inp: SubmitInput, tenant: str) -> safety_pb2.PolicyCheckRequest:
    return safety_pb2.PolicyCheckRequest(
        job_id=job_id, topic=inp.topic, tenant=tenant, priority=inp.priority,
        budget=job_pb2.Budget(max_input_tokens=inp.max_input_tokens, max_output_tokens=inp.max_output_tokens,
                              max_total_tokens=inp.max_total_tokens, deadline_ms=inp.deadline_ms),
        principal_id=inp.principal_id, labels=inp.labels, memory_id=inp.memory_id, meta=job_metadata(inp, tenant),
    )


def safety_fields(decision: SafetyDecision, verdict: Verdict, reason: str) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "safety_decision": verdict.value,
        "safety_reason": reason,
        "safety_rule_id": decision.rule_id,
        "safety_snapshot": decision.snapshot,
        "safety_checked_at": now_us(),
    }
    response = decision.response
    if response is not None:
        if response.HasField("constraints"):
            fields["safety_constraints"] = json_format.MessageToJson(response.constraints, indent=None)
        if response.remediations:
            fields["safety_remediations"] = [json_format.MessageToDict(r) for r in response.remediations]
    if verdict is Verdict.REQUIRE_APPROVAL:
        fields["safety_approval_required"] = "true"
        fields["safety_approval_ref"] = (response.approval_ref if response is not None else "")
    return {k: v for k, v in fields.items() if v not in ("", None)}


def decision_record(decision: SafetyDecision, verdict: Verdict, reason: str) -> dict[str, Any]:
    return {
        "decision": verdict.value, "reason": reason, "rule_id": decision.rule_id,
        "policy_snapshot": decision.snapshot, "approval_required": verdict is Verdict.REQUIRE_APPROVAL,
        "checked_at": now_us(), "source": "api-gateway", "by": SENDER,
    }


def job_fields(inp: SubmitInput, tenant: str, trace_id: str, submitted_by: str) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "topic": inp.topic, "tenant": tenant, "trace_id": trace_id, "principal": inp.principal_id,
        "labels": inp.labels, "capability": inp.capability, "risk_tags": inp.risk_tags,
        "requires": inp.requires, "idempotency_key": inp.idempotency_key, "submitted_by": submitted_by,
        "actor_id": inp.actor_id, "actor_type": inp.actor_type, "memory_id": inp.memory_id,
    }
    if inp.deadline_ms:
        fields["deadline_unix"] = now_us() + inp.deadline_ms * 1000
    return {k: v for k, v in fields.items() if v not in ("", None, [])}


def context_payload(inp: SubmitInput, tenant: str) -> dict[str, Any]:
    return {"prompt": inp.prompt, "topic": inp.topic, "tenant_id": tenant,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "context": inp.context}


# ---- views --------------------------------------------------------------------------------------


def rfc3339_us(us: int) -> str:
    """µs since the epoch → RFC 3339 in UTC, to the microsecond (`2024-05-01T12:00:00.123456Z`)."""
    moment = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc) + datetime.timedelta(microseconds=us)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def job_summary(meta: dict[str, Any]) -> dict[str, Any]:
    """A job as listed: its meta without internal fields, plus the context pointer.

    Shaped for the public cordum-sdk client (DESIGN §1), whose models parse `updated_at` as an
    RFC 3339 date-time (the store keeps µs; the string is lossless) and `labels` as an object."""
    view = {k: v for k, v in meta.items() if not k.startswith("_") and k not in PRIVATE_FIELDS}
    view.setdefault("id", meta.get("id"))
    view["context_ptr"] = ptr(context_key(view["id"]))
    view.setdefault("attempts", 0)
    view["labels"] = view.get("labels") or {}
    if isinstance(view.get("updated_at"), int):
        view["updated_at"] = rfc3339_us(view["updated_at"])
    if output_check.SAFETY_FIELD in view:
        view[output_check.SAFETY_FIELD] = output_check.safety_record(meta) or {}
    return view


async def job_detail(gw: Gateway, meta: dict[str, Any], *, include_quarantined: bool = False) -> dict[str, Any]:
    """A job with its input, output and failure. An output the output policy has not cleared
    (still being checked, or quarantined) is withheld: `result` null and `result_withheld` saying
    why; an admin may ask for a quarantined one (`include_quarantined`)."""
    job_id = meta["id"]
    view = job_summary(meta)
    view["context"] = await gw.jobs.get_context(job_id)
    view["result_ptr"] = meta.get("result_ptr", "")
    view["result"] = None
    try:
        _, text = await gw.jobs.served_output(meta, include_quarantined=include_quarantined)
        view["result"] = decode_output(text)
    except output_check.Withheld as withheld:
        view["result_withheld"] = withheld.reason
    entry = await gw.dlq.get(job_id, tenant=meta.get("tenant", ""))
    if entry is not None:
        view.update(error_message=entry.get("reason", ""), error_status=entry.get("status", ""),
                    error_code=entry.get("reason_code", ""), last_state=entry.get("last_state", ""))
    return view


def job_timeline(events: list[dict[str, Any]], decisions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A job's path in time order: its state changes (with what moved it, when recorded) and its
    policy decisions (which replica decided, under which rule and policy snapshot)."""
    merged: list[tuple[int, int, dict[str, Any]]] = []
    for order, event in enumerate(events):
        entry = {"kind": "state", "state": event.get("state", "")}
        if isinstance(event.get("ctx"), dict):
            entry["detail"] = event["ctx"]
        merged.append((_us(event.get("ts")), order, entry))
    for order, decision in enumerate(decisions):
        entry = {"kind": "decision", **{k: decision[k] for k in ("decision", "reason", "rule_id", "policy_snapshot", "by")
                                         if decision.get(k) not in (None, "")}}
        entry.setdefault("by", decision.get("source") or "")
        merged.append((_us(decision.get("checked_at")), len(events) + order, entry))
    merged.sort(key=lambda item: (item[0], item[1]))
    return [{"at": rfc3339_us(us) if us else None, **entry} for us, _, entry in merged]


def _us(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


# ---- publishing ---------------------------------------------------------------------------------


async def publish_request(gw: Gateway, request_msg: job_pb2.JobRequest, trace_id: str) -> None:
    packet = new_packet(request_msg, sender_id=SENDER, trace_id=trace_id)
    await gw.bus.publish(subjects.SUBMIT, encode(packet), msg_id=subjects.msg_id_for(packet, subjects.SUBMIT))


# ---- the pipeline -------------------------------------------------------------------------------


async def charge_stored_bytes(gw: Gateway, tenant: str, size: int) -> None:
    """Count `size` input bytes against the tenant's hourly allowance (CORDUM_TENANT_BYTES_PER_HOUR,
    shared by the gateway replicas in Redis): inputs are kept a day, so a tenant stores at most 24
    allowances. Over it: 429 until the next hour, nothing counted."""
    limit = gw.options.tenant_bytes_per_hour
    hour = int(time.time() // 3600)
    key = keys.tenant_bytes(tenant, hour)
    used, _ = await gw.redis.pipeline([("INCRBY", key, size), ("EXPIRE", key, 7200)])
    if isinstance(used, int) and used > limit:
        await gw.redis.execute("DECRBY", key, size)
        gw.submitted.labels(outcome="tenant_bytes_limit").inc()
        raise ApiError(429, f"tenant {tenant} has stored {used - size} input bytes this hour; its allowance is "
                       f"{limit} (CORDUM_TENANT_BYTES_PER_HOUR)", code="tenant_bytes_limit",
                       headers={"Retry-After": str(3600 - int(time.time()) % 3600)})


def bound_identity(who: Principal, principal_id: str, actor_id: str, actor_type: str) -> tuple[str, str, str]:
    """Who a job runs as: (principal_id, actor_id, actor_type) from the credential, never from
    what the body claims, since policy rules match on them. A key that names its principal or
    actor fixes it (the body may repeat it, not change it); a key that names none leaves it empty.
    Only an admin key may name them in the body: a trusted service acting on someone's behalf
    (the job still records the admin key as its submitter)."""
    if who.allows("admin") and not (who.principal_id or who.actor_id):
        return principal_id, actor_id, actor_type
    for claimed, bound, name in ((principal_id, who.principal_id, "principal_id"), (actor_id, who.actor_id, "actor_id")):
        if claimed and claimed != bound:
            raise ApiError(403, f"{name} {claimed!r} is not the API key's" + (f" ({bound!r})" if bound else
                           ": the key names none, and only an admin key may act on another's behalf"),
                           code="principal_mismatch" if name == "principal_id" else "actor_mismatch")
    if actor_type and who.actor_type and actor_type != who.actor_type:
        raise ApiError(403, f"actor_type {actor_type!r} is not the API key's ({who.actor_type!r})", code="actor_mismatch")
    return who.principal_id, who.actor_id, who.actor_type or (actor_type if who.actor_id else "")


def checked_job_id(job_id: str) -> str:
    """A caller-supplied job id (path segment), refused with 400 `invalid_job_id` before any Redis
    key or lock is built from it (a `{` or `}` would split a job's lock from its fence counter on
    Redis Cluster). The gateway never makes such ids, so no stored job becomes unreachable."""
    problems = job_id_problems(job_id)
    if problems:
        raise ApiError(400, f"invalid job id: {problems[0]}", code="invalid_job_id", extra={"problems": problems})
    return job_id


def _accepted(job_id: str, trace_id: str, **extra: Any) -> tuple[dict[str, Any], int, dict[str, str]]:
    return {"job_id": job_id, "trace_id": trace_id, **extra}, 200, {"X-Trace-Id": trace_id}


def request_problems(request_msg: job_pb2.JobRequest) -> list[str]:
    """What the scheduler's ingress validation would drop this request for (empty: accepted)."""
    return list(dict.fromkeys(validate_job_request(request_msg) + tenant_problems(request_msg)))


async def submit_job(gw: Gateway, body: dict[str, Any], who: Principal) -> tuple[dict[str, Any], int, dict[str, str]]:
    """POST /api/v1/jobs for `who` (an operator or admin): (body, status, headers) of the answer;
    ApiError for a refusal. Also served by the gateway's fast path (cordum.gateway.fastpath)."""
    tenant = who.tenant
    inp = parse_submit(body, tenant)
    inp.principal_id, inp.actor_id, inp.actor_type = bound_identity(who, inp.principal_id, inp.actor_id, inp.actor_type)

    limit = gw.options.max_context_bytes
    if limit < MAX_BODY and inp.context is not None:  # at the default, the body limit decides
        size = len(json.dumps(inp.context, separators=(",", ":")).encode())
        if size > limit:
            raise ApiError(413, f"context is {size} bytes; the limit is {limit} (CORDUM_MAX_CONTEXT_BYTES)",
                           code="context_too_large", extra={"limit": limit, "size": size})

    job_id, trace_id = str(uuid.uuid4()), str(uuid.uuid4())
    request_msg = build_request(job_id, inp, tenant)
    problems = request_problems(request_msg)
    if problems:  # the scheduler would drop it, leaving a PENDING job forever: refuse it now
        raise ApiError(400, f"invalid job request: {problems[0]}", code="invalid_request",
                       extra={"problems": problems})

    key = inp.idempotency_key
    if key:
        holder = await gw.jobs.lookup_idempotency(tenant, key)
        if holder:
            duplicate = await _duplicate(gw, holder, tenant, key)
            if duplicate is not None:
                return duplicate

    decision = await gw.safety.check(policy_request(job_id, inp, tenant), method="Evaluate")
    verdict, reason = decision.verdict, decision.reason
    unavailable = verdict is Verdict.UNAVAILABLE
    if unavailable:
        if gw.options.fail_open:
            log.warning("submit.policy_fail_open", job_id=job_id, reason=reason)
            verdict, reason = Verdict.ALLOW, f"{POLICY_UNAVAILABLE} (fail mode open)"
        else:
            verdict, reason = Verdict.DENY, POLICY_UNAVAILABLE

    audit.record_decision(gw, tenant, job_id, inp.topic, verdict.value, reason, decision.rule_id, decision.snapshot,
                          inp.principal_id)
    if verdict is Verdict.THROTTLE:
        gw.submitted.labels(outcome="throttled").inc()
        raise ApiError(429, reason or "throttled by policy", code="throttled",
                       headers={"Retry-After": THROTTLE_RETRY_AFTER})

    admitted = verdict in (Verdict.ALLOW, Verdict.ALLOW_WITH_CONSTRAINTS, Verdict.REQUIRE_APPROVAL)
    quota = decision.response.constraints.budgets.max_concurrent_jobs if decision.response is not None else 0
    if admitted and quota > 0:
        unfinished = await gw.jobs.active_count(tenant)
        if unfinished >= quota:
            gw.submitted.labels(outcome="tenant_limit").inc()
            raise ApiError(429, f"tenant {tenant} has {unfinished} unfinished jobs; its limit is {quota} "
                           "(policy tenants.<tenant>.max_concurrent_jobs)", code="tenant_limit",
                           headers={"Retry-After": TENANT_LIMIT_RETRY_AFTER})

    context = context_payload(inp, tenant)
    if admitted and gw.options.tenant_bytes_per_hour:
        await charge_stored_bytes(gw, tenant, len(json.dumps(context).encode()))

    # A fail-closed denial is not the policy's answer: it does not hold the key, so the same submit
    # can succeed once the kernel is back.
    reserved = bool(key) and not (unavailable and verdict is Verdict.DENY)
    if reserved:
        for _ in range(3):
            holder = await gw.jobs.reserve_idempotency(tenant, key, job_id)
            if not holder or holder == job_id:
                break
            duplicate = await _duplicate(gw, holder, tenant, key)
            if duplicate is not None:
                return duplicate
        else:
            raise ApiError(409, "idempotency key is contended, retry", code="idempotency_in_progress",
                           headers={"Retry-After": "1"})

    fields = {**job_fields(inp, tenant, trace_id, who.identity), **safety_fields(decision, verdict, reason)}
    if who.key_fingerprint:
        fields["submitted_key"] = who.key_fingerprint  # never the key: see auth.key_fingerprint
    initial = JobState.APPROVAL_REQUIRED if verdict is Verdict.REQUIRE_APPROVAL else JobState.PENDING
    if initial is JobState.APPROVAL_REQUIRED:
        fields.update(approval_status="pending", approval_revision=1)
    if verdict is Verdict.DENY:
        context = None  # a denied job's input is not kept: nobody may run it, and it costs storage
    try:
        await gw.jobs.create(job_id, initial, request=request_msg, fields=fields, context=context,
                             decision=decision_record(decision, verdict, reason))
    except BaseException:
        if reserved:  # the key must not point at a job that does not exist
            await gw.idempotency.release_quietly(tenant, key, job_id)
        raise

    if verdict is Verdict.DENY:
        await gw.jobs.transition(job_id, JobState.DENIED, fields={"failure_reason": reason or "denied by policy"},
                                 event={"reason": reason})
        await deadletter.dead_letter(gw, job_id, status=job_pb2.JOB_STATUS_DENIED, reason_code="policy_denied",
                                     reason=reason or "denied by policy")
        gw.submitted.labels(outcome="denied").inc()
        raise ApiError(403, reason or "denied by policy", code="policy_denied",
                       extra={"job_id": job_id, "trace_id": trace_id}, headers={"X-Trace-Id": trace_id})

    if verdict is Verdict.REQUIRE_APPROVAL:
        gw.submitted.labels(outcome="approval_required").inc()
        return _accepted(job_id, trace_id, status="approval_required", reason=reason)

    # ALLOW, ALLOW_WITH_CONSTRAINTS (or fail-open): the decision went into the job's decision log
    # with its creation; the scheduler's check before dispatch follows it there.
    try:
        await publish_request(gw, request_msg, trace_id)
    except Exception as exc:
        log.error("submit.publish_failed", job_id=job_id, error=repr(exc))
        if reserved:
            # A request with the same key (a client's retry after its own timeout, through another
            # gateway) may have been answered with this job already: it is not failed but left
            # PENDING under its key, for the scheduler's pending replayer (or that retry) to queue.
            raise ApiError(503, "job accepted but not queued yet (bus unavailable): submit again with the same "
                           "idempotency_key to follow it", code="bus_unavailable",
                           extra={"job_id": job_id, "trace_id": trace_id}) from None
        try:
            await gw.jobs.transition(job_id, JobState.FAILED, allowed_from=[JobState.PENDING],
                                     fields={"failure_reason": "publish to bus failed"})
        except InvalidTransition:  # it moved on: the publish reached the scheduler after all (no ack came)
            gw.submitted.labels(outcome="accepted").inc()
            return _accepted(job_id, trace_id)
        except Exception as store_exc:
            log.error("submit.fail_mark_failed", job_id=job_id, error=repr(store_exc))
        raise ApiError(503, "job could not be queued (bus unavailable), try again", code="bus_unavailable",
                       extra={"job_id": job_id, "trace_id": trace_id}) from None
    gw.submitted.labels(outcome="accepted").inc()
    # Debug level: with CORDUM_LOG_LEVEL=debug, grep for a job id (or its trace id) follows the
    # job through every replica that handled it; at info a job costs no log line.
    log.debug("job.submitted", job_id=job_id, trace_id=trace_id, tenant=tenant, topic=inp.topic,
              decision=verdict.value)
    return _accepted(job_id, trace_id)


async def _duplicate(gw: Gateway, holder: str, tenant: str,
                     key: str) -> tuple[dict[str, Any], int, dict[str, str]] | None:
    """The answer for a submit whose idempotency key `holder` holds; None if the key is stale
    (its job does not exist: it was released here, and the caller proceeds as a new submit)."""
    meta = await gw.jobs.get(holder, tenant=tenant)
    if meta is None:
        if await gw.idempotency.in_flight(tenant, key):  # reserved just now: its job is being created
            raise ApiError(409, "a submit with this idempotency key is in progress, retry",
                           code="idempotency_in_progress", headers={"Retry-After": "1"})
        await gw.idempotency.release(tenant, key, holder)
        log.warning("submit.stale_idempotency_key", tenant=tenant, job_id=holder)
        return None
    trace_id = str(meta.get("trace_id", ""))
    gw.submitted.labels(outcome="duplicate").inc()
    if meta.get("state") == JobState.DENIED.value:
        raise ApiError(403, meta.get("safety_reason") or "denied by policy", code="policy_denied",
                       extra={"job_id": holder, "trace_id": trace_id})
    extra: dict[str, Any] = {}
    if meta.get("state") == JobState.APPROVAL_REQUIRED.value:
        extra = {"status": "approval_required", "reason": meta.get("safety_reason", "")}
    if meta.get("state") == JobState.PENDING.value and now_us() - int(meta.get("updated_at") or 0) < REQUEUE_WITHIN_US:
        await _queue_again(gw, holder, trace_id)
    return _accepted(holder, trace_id, **extra)


# A retried submit re-publishes a PENDING job only this soon after it was created: within the
# stream's duplicate window a repeat of a publish that landed is dropped; an older PENDING job is
# the scheduler's pending replayer's to queue again.
REQUEUE_WITHIN_US = 60 * 1_000_000


async def _queue_again(gw: Gateway, job_id: str, trace_id: str) -> None:
    """Publish a PENDING job's request once more (a retried submit found it): its first publish
    may have failed (the bus away), and the stream drops a repeat of one that landed (same message
    id). A failure leaves it to the scheduler's pending replayer."""
    try:
        request = await gw.jobs.get_request(job_id)
        if request is not None:
            await publish_request(gw, request, trace_id)
    except Exception as exc:
        log.warning("submit.queue_again_failed", job_id=job_id, error=repr(exc))


# ---- routes -------------------------------------------------------------------------------------


def register(app: Quart, gw: Gateway) -> None:
    @app.post("/api/v1/jobs")
    @require("operator")
    async def submit() -> Any:
        body = await json_body()
        payload, status, headers = await submit_job(gw, body, caller())
        return payload, status, headers

    @app.get("/api/v1/jobs")
    @require("viewer")
    async def list_jobs() -> Any:
        limit = query_int("limit", 50, high=500)
        cursor = request.args.get("cursor") or None
        if cursor is not None and not cursor.lstrip("-").isdigit():
            raise ApiError(400, "cursor must be an integer (updated_at in microseconds)")
        state = (request.args.get("state") or "").strip().upper() or None
        if state is not None:
            try:
                parse_state(state)
            except ValueError:
                raise ApiError(400, f"state {state!r} is not a job state") from None
        topic = (request.args.get("topic") or "").strip() or None
        items, next_cursor = await gw.jobs.list(caller().tenant, state=state, topic=topic, limit=limit,
                                                cursor=int(cursor) if cursor else None)
        return {"items": [job_summary(m) for m in items],
                "next_cursor": cursor_text(next_cursor)}

    async def tenants_job(job_id: str) -> dict[str, Any]:
        """The caller's tenant's job; another tenant's (or none) is a 404."""
        checked_job_id(job_id)
        meta = await gw.jobs.get(job_id, tenant=caller().tenant)
        if meta is None:
            raise not_found("job not found")
        return meta

    @app.get("/api/v1/jobs/<job_id>")
    @require("viewer")
    async def get_job(job_id: str) -> Any:
        include = request.args.get("include_quarantined", "").lower() in ("1", "true", "yes")
        if include and not caller().allows("admin"):
            raise ApiError(403, "only an admin may read a quarantined output", code="forbidden")
        return await job_detail(gw, await tenants_job(job_id), include_quarantined=include)

    @app.get("/api/v1/jobs/<job_id>/decisions")
    @require("viewer")
    async def get_decisions(job_id: str) -> Any:
        await tenants_job(job_id)
        return {"items": await gw.jobs.decisions(job_id)}

    @app.get("/api/v1/jobs/<job_id>/timeline")
    @require("viewer")
    async def get_timeline(job_id: str) -> Any:
        meta = await tenants_job(job_id)
        events, decisions = await gw.jobs.events(job_id), await gw.jobs.decisions(job_id)
        return {"id": job_id, "trace_id": meta.get("trace_id", job_id), "state": meta.get("state", ""),
                "items": job_timeline(events, decisions)}

    @app.post("/api/v1/jobs/<job_id>/cancel")
    @require("operator")
    async def cancel(job_id: str) -> Any:
        meta = await tenants_job(job_id)
        if parse_state(meta["state"]) in TERMINAL:
            return {"id": job_id, "state": meta["state"], "reason": "job already terminal"}
        try:
            moved = await gw.jobs.cancel(job_id, "cancelled via api")
        except JobNotFound:
            raise not_found("job not found") from None
        except InvalidTransition as exc:  # raced with a terminal write
            return {"id": job_id, "state": str(exc.current), "reason": "job already terminal"}
        if moved.state is not JobState.CANCELLED:
            return {"id": job_id, "state": moved.state.value, "reason": "job already terminal"}
        packet = new_packet(job_pb2.JobCancel(job_id=job_id, reason="cancelled via api", requested_by=SENDER),
                            sender_id=SENDER, trace_id=str(meta.get("trace_id") or job_id))
        try:
            await gw.bus.publish(subjects.CANCEL, encode(packet))
        except Exception as exc:  # best effort: the job is already CANCELLED in the store
            log.warning("cancel.publish_failed", job_id=job_id, error=repr(exc))
            gw.cancel_failures.inc()
        return {"id": job_id, "state": JobState.CANCELLED.value}

