"""Approvals (spec cordum-jobpath §4.5, without the policy-drift re-check).

Approve and reject run under the job's lock `cordum:scheduler:job:<id>` (TTL 10 s; busy → 409
`approval_retryable_lock`), the same lease the scheduler takes, and every write carries its fence.
Approve: APPROVAL_REQUIRED → PENDING, the stored JobRequest gets `approval_granted=true` and
`cordum.bus_msg_id=approval:<id>`, and is re-published on `sys.job.submit`. Reject: → DENIED, its
DLQ entry `approval_rejected` written, then the DLQ event published (best effort).

Workflow approval gates (topic `job.cordum.approval-gate`) share the list, with their run's
`workflow_id` / `workflow_run_id` / `workflow_step_id` / `gate_type` from the job's labels. An
approved gate is completed by the scheduler (never a worker); a rejected one is also announced as
`JobResult{DENIED, approval_rejected}` on `sys.job.result`, so the engine denies its step.

The job is looked up in the caller's tenant before the lock is taken (another tenant's job is a
404, never a 409). Nobody approves a job they submitted (403 `self_approval_denied`): not with the
same API key (the job's `submitted_key` fingerprint, which covers the static admin key and keys
without a principal_id), nor as the same known principal.
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

from quart import Quart, request

from cordum.agent.v1 import job_pb2
from cordum.gateway import deadletter
from cordum.gateway.auth import Principal
from cordum.gateway.context import SENDER, Gateway, caller, cursor_text, json_body, optional_str, query_int, require
from cordum.gateway.errors import ApiError, not_found
from cordum.gateway.jobs import checked_job_id, job_summary, publish_request
from cordum.protocol import subjects
from cordum.protocol.packets import encode
from cordum.runtime.lease import Lease, LeaseUnavailable
from cordum.runtime.log import get_logger
from cordum.store import keys
from cordum.store.dlq import dlq_packet
from cordum.store.jobs import InvalidTransition, now_us
from cordum.store.jobstate import JobState

log = get_logger("gateway.approvals")

LOCK_TTL = 10.0


def approval_item(meta: dict[str, Any]) -> dict[str, Any]:
    labels = _labels(meta)
    return {
        "job": job_summary(meta),
        "decision": meta.get("safety_decision", ""),
        "policy_reason": meta.get("safety_reason", ""),
        "policy_rule_id": meta.get("safety_rule_id", ""),
        "policy_snapshot": meta.get("safety_snapshot", ""),
        "job_hash": meta.get("safety_job_hash", ""),
        "approval_status": meta.get("approval_status", "pending"),
        # a workflow approval gate's step (the engine's labels); empty for submit-time approvals
        "workflow_id": labels.get("workflow_id", ""),
        "workflow_run_id": labels.get("run_id", ""),
        "workflow_step_id": labels.get("step_id", ""),
        "gate_type": labels.get("gate_type", ""),
    }


def _is_self_approval(who: Principal, meta: dict[str, Any]) -> bool:
    """The approver submitted the job: with the same API key (by fingerprint: this covers the
    static admin key and keys without a principal_id; for a DLQ retry, the retrier's key too),
    or as the same known principal."""
    if who.key_fingerprint:
        submitted = {str(meta.get("submitted_key") or ""), str(meta.get("retried_key") or "")} - {""}
        if {who.key_fingerprint, who.legacy_fingerprint} & submitted:  # legacy: recorded before keyed names
            return True
    if not who.principal_id:
        return False
    submitters = {str(meta.get("principal") or "")}
    if not meta.get("submitted_key"):  # a job from before submitted_key: submitted_by named the principal
        submitters.add(str(meta.get("submitted_by") or ""))
    return who.principal_id in submitters - {""}


async def _find(gw: Gateway, job_id: str, tenant: str) -> dict[str, Any]:
    """The job in the caller's tenant, checked before its lock is taken: another tenant's job is a
    404 like a missing one, never a 409 because someone holds its lock."""
    meta = await gw.jobs.get(job_id, tenant=tenant)
    if meta is None:
        raise not_found("job not found")
    return meta


@asynccontextmanager
async def _locked(gw: Gateway, job_id: str, tenant: str) -> AsyncIterator[tuple[Lease, dict[str, Any]]]:
    """The job's lock and its meta read under it (a busy lock is a retryable 409)."""
    await _find(gw, job_id, tenant)
    try:
        async with gw.leases.hold(keys.job_lock(job_id), LOCK_TTL) as lease:
            yield lease, await _find(gw, job_id, tenant)
    except LeaseUnavailable:
        raise ApiError(409, "job is busy, retry", code="approval_retryable_lock") from None


async def _resolve(gw: Gateway, job_id: str, target: JobState, lease: Lease, fields: dict[str, Any],
                   event: dict[str, Any], held_since_us: int) -> None:
    """APPROVAL_REQUIRED → `target` under the lock's fence; a lost race is a 409. Counted by
    decision, with the time the job was held (its hash's `updated_at` while it waited)."""
    try:
        await gw.jobs.transition(job_id, target, fence=lease.fence, allowed_from=[JobState.APPROVAL_REQUIRED],
                                 fields=fields, event=event)
    except InvalidTransition:
        raise ApiError(409, "approval already resolved", code="approval_already_resolved") from None
    gw.approval_decisions.labels(decision=str(event.get("approval", ""))).inc()
    if held_since_us:
        gw.approval_latency.observe(max(now_us() - held_since_us, 0) / 1_000_000)


def _labels(meta: dict[str, Any]) -> dict[str, str]:
    labels = meta.get("labels")
    return dict(labels) if isinstance(labels, dict) else {}


async def approve(gw: Gateway, job_id: str, body: dict[str, Any]) -> dict[str, Any]:
    who = caller()
    reason = optional_str(body, "reason", max_len=2000)
    note = optional_str(body, "note", max_len=2000)
    async with _locked(gw, job_id, who.tenant) as (lease, meta):
        state = meta.get("state")
        if state != JobState.APPROVAL_REQUIRED.value:
            if _labels(meta).get("approval_granted") == "true" or meta.get("approval_status") == "approved":
                return {"job_id": job_id, "trace_id": meta.get("trace_id", ""), "status": "already_approved"}
            raise ApiError(409, f"approval already resolved (job is {state})", code="approval_already_resolved")
        if _is_self_approval(who, meta):
            raise ApiError(403, "self-approval is not allowed", code="self_approval_denied")
        request_msg = await gw.jobs.get_request(job_id)
        if request_msg is None:
            raise ApiError(409, "stored job request is missing", code="approval_stale_request")
        granted = {"approval_granted": "true", subjects.LABEL_BUS_MSG_ID: f"approval:{job_id}"}
        if reason:
            granted["approval_reason"] = reason
        if note:
            granted["approval_note"] = note
        if meta.get("safety_snapshot"):
            granted["approval_snapshot"] = str(meta["safety_snapshot"])
        request_msg.labels.update(granted)
        await gw.jobs.store_request(job_id, request_msg)
        revision = int(meta.get("approval_revision") or 1) + 1
        trace_id = str(meta.get("trace_id") or "")
        await _resolve(gw, job_id, JobState.PENDING, lease, fields={
            "labels": {**_labels(meta), **granted}, "approval_by": who.identity, "approval_role": who.role,
            "approval_at": now_us(), "approval_status": "approved", "approval_reason": reason,
            "approval_note": note, "approval_decision": "approve", "approval_revision": revision,
            "approval_actionability": "resolved", "approval_publish_status": "pending",
            "approval_publish_target": "submit",
        }, event={"approval": "approved", "by": who.identity}, held_since_us=int(meta.get("updated_at") or 0))
        try:
            await publish_request(gw, request_msg, trace_id or job_id)
            await gw.jobs.set_fields(job_id, {"approval_publish_status": "published",
                                              "approval_published_at": now_us()}, fence=lease.fence)
        except Exception as exc:  # the pending replayer re-drives approved PENDING jobs
            log.error("approve.publish_failed", job_id=job_id, error=repr(exc))
        return {"job_id": job_id, "trace_id": trace_id}


async def reject(gw: Gateway, job_id: str, body: dict[str, Any]) -> dict[str, Any]:
    who = caller()
    reason = optional_str(body, "reason", max_len=2000) or "approval rejected"
    note = optional_str(body, "note", max_len=2000)
    async with _locked(gw, job_id, who.tenant) as (lease, meta):
        state = meta.get("state")
        if state != JobState.APPROVAL_REQUIRED.value:
            if state == JobState.DENIED.value and meta.get("approval_status") == "rejected":
                return {"job_id": job_id, "state": JobState.DENIED.value, "status": "already_rejected"}
            raise ApiError(409, f"approval already resolved (job is {state})", code="approval_already_resolved")
        await _resolve(gw, job_id, JobState.DENIED, lease, fields={
            "approval_by": who.identity, "approval_role": who.role, "approval_at": now_us(),
            "approval_status": "rejected", "approval_reason": reason, "approval_note": note,
            "approval_decision": "reject", "approval_actionability": "resolved",
            "approval_publish_target": "dlq", "failure_reason": reason,
        }, event={"approval": "rejected", "by": who.identity}, held_since_us=int(meta.get("updated_at") or 0))
    await deadletter.dead_letter(gw, job_id, status=job_pb2.JOB_STATUS_DENIED, reason_code="approval_rejected",
                                 reason=reason)
    if meta.get("topic") == subjects.APPROVAL_GATE_TOPIC:
        await _announce_gate_result(gw, job_id, reason)
    return {"job_id": job_id, "state": JobState.DENIED.value}


async def _announce_gate_result(gw: Gateway, job_id: str, reason: str) -> None:
    """A rejected workflow gate also answers on `sys.job.result` (jobpath §4.5 item 6), where the
    workflow engine denies its step. Best effort: the job is DENIED in the store, which the
    engine's reconciler reads when this result is lost."""
    packet = dlq_packet(job_id, status=job_pb2.JOB_STATUS_DENIED, reason_code="approval_rejected", reason=reason,
                        sender_id=SENDER)
    try:
        await gw.bus.publish(subjects.RESULT, encode(packet), msg_id=subjects.msg_id_for(packet, subjects.RESULT))
    except Exception as exc:
        log.warning("reject.gate_result_publish_failed", job_id=job_id, error=repr(exc))


def register(app: Quart, gw: Gateway) -> None:
    @app.get("/api/v1/approvals")
    @require("viewer")
    async def list_approvals() -> Any:
        limit = query_int("limit", 50, high=500)
        cursor = request.args.get("cursor") or None
        if cursor is not None and not cursor.lstrip("-").isdigit():
            raise ApiError(400, "cursor must be an integer (updated_at in microseconds)")
        items, next_cursor = await gw.jobs.list(
            caller().tenant, state=JobState.APPROVAL_REQUIRED.value, limit=limit,
            cursor=int(cursor) if cursor else None,
        )
        return {"items": [approval_item(m) for m in items], "next_cursor": cursor_text(next_cursor)}

    @app.post("/api/v1/approvals/<job_id>/approve")
    @require("operator")
    async def approve_route(job_id: str) -> Any:
        checked_job_id(job_id)
        return await approve(gw, job_id, await json_body(optional=True))

    @app.post("/api/v1/approvals/<job_id>/reject")
    @require("operator")
    async def reject_route(job_id: str) -> Any:
        checked_job_id(job_id)
        return await reject(gw, job_id, await json_body(optional=True))
