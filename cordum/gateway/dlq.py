"""The dead-letter queue: REST routes, the queue-grouped DLQ writer and the cleanup leader.

Writer: `sys.job.dlq` in queue group `cordum-gateway` (one write per event across replicas). Each
JobResult becomes `dlq:entry:<job_id>` (tenant/topic/state/attempts from the job's meta) and, if
the job has no result yet, a synthetic `res:<job_id>` with the error and the job's `result_ptr`.
A Redis failure raises, so the message is redelivered; an unusable packet is acked and counted.
The write itself is `deadletter.record`, which the gateway also calls directly for the jobs it
dead-letters (policy DENY at submit, approval reject).

Cleanup: one replica at a time (leader key `cordum:dlq:cleanup`) drops index members whose entry
expired, every DLQ_CLEANUP_INTERVAL (1h).
"""

from __future__ import annotations

import json
import re
import secrets
from typing import Any

import trio
from quart import Quart, Response, request

from cordum.agent.v1.buspacket_pb2 import BusPacket
from cordum.gateway import deadletter
from cordum.gateway.context import Gateway, caller, cursor_text, query_int, require
from cordum.gateway.errors import ApiError, not_found
from cordum.gateway.jobs import checked_job_id, publish_request
from cordum.infra.bus import Message
from cordum.protocol import subjects
from cordum.protocol.pointers import context_key, ptr
from cordum.runtime.consumer import ConsumerMetrics, serve_packets
from cordum.runtime.lease import Lease
from cordum.runtime.leader import LeaderElection, LeaderMetrics, every
from cordum.runtime.log import get_logger
from cordum.store import keys
from cordum.store.jobstate import JobState
from cordum.store.validate import MAX_JOB_ID_LEN
from cordum.runtime.lifecycle import close_scope

log = get_logger("gateway.dlq")

CLEANUP_LEASE_TTL = 30.0
_COPIED_META = ("topic", "tenant", "team", "principal", "capability", "risk_tags", "requires", "submitted_by",
                "actor_id", "actor_type", "memory_id", "idempotency_key", "labels", "submitted_key")


# ---- the writer ---------------------------------------------------------------------------------


async def write_dlq_entry(gw: Gateway, packet: BusPacket) -> bool:
    """Persist one `sys.job.dlq` event; returns False for a packet that is not a job result."""
    if packet.WhichOneof("payload") != "job_result" or not packet.job_result.job_id:
        return False
    result = packet.job_result
    await deadletter.record(gw, result.job_id, status=result.status, reason_code=result.error_code,
                            reason=result.error_message)
    return True


async def serve_dlq_writer(gw: Gateway, counters: ConsumerMetrics, *,
                           task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    async def handle(packet: BusPacket, msg: Message) -> None:
        if not await write_dlq_entry(gw, packet):
            log.warning("dlq.ignored_packet", kind=packet.WhichOneof("payload"), subject=msg.subject)

    await serve_packets(gw.bus, subjects.DLQ, handle, counters, queue=subjects.QUEUE_GATEWAY, task_status=task_status)


def cleanup_election(gw: Gateway, leaders: LeaderMetrics | None = None) -> tuple[LeaderElection, Any]:
    election = LeaderElection(gw.leases, keys.DLQ_CLEANUP_LEADER, CLEANUP_LEASE_TTL, metrics=leaders)

    async def step(lease: Lease) -> None:
        removed = await gw.dlq.cleanup()
        if removed:
            log.info("dlq.cleanup", removed=removed)
        await gw.jobs.index_held_jobs()  # approvals held since before the per-tenant index

    return election, every(gw.options.dlq_cleanup_interval, step)


# ---- retry --------------------------------------------------------------------------------------


async def _read_entry(gw: Gateway, job_id: str, tenant: str) -> tuple[str, dict[str, Any], int] | None:
    """The entry's stored JSON, parsed entry and remaining TTL (ms), if it exists in `tenant`."""
    text, pttl = await gw.redis.pipeline([("GET", keys.dlq_entry(job_id)), ("PTTL", keys.dlq_entry(job_id))])
    if text is None:
        return None
    entry = json.loads(text)
    if entry.get("tenant") != tenant:
        return None
    return text, entry, int(pttl) if isinstance(pttl, int) else -1


async def _claim(gw: Gateway, job_id: str) -> bool:
    """Take the entry for one retry: the request whose DEL removes it wins."""
    return int(await gw.redis.execute("DEL", keys.dlq_entry(job_id)) or 0) == 1


async def _restore(gw: Gateway, job_id: str, text: str, pttl: int) -> None:
    """Put a claimed entry back as it was (its index member was never removed)."""
    ttl = ("PX", pttl) if pttl > 0 else ("EX", gw.dlq.entry_ttl)
    try:
        with close_scope(2):
            await gw.redis.execute("SET", keys.dlq_entry(job_id), text, *ttl, "NX")
    except Exception as exc:
        log.error("dlq.retry_restore_failed", job_id=job_id, error=repr(exc))


_RETRY_CHAIN = re.compile(r"(-retry-[0-9a-f]{8})+$")


def retry_job_id(job_id: str, token: str | None = None) -> str:
    """The new job's id: `<old>-retry-<8 hex>`. A retry of a retry of ... would outgrow the job id
    limit (MAX_JOB_ID_LEN), so then the earlier `-retry-<hex>` links are dropped (and, if still too
    long, the base is shortened): the id always passes `job_id_problems`, and the new job's
    `retry_of_job` label still names the job it retries."""
    suffix = f"-retry-{token or secrets.token_hex(4)}"
    base = job_id
    if len(base) + len(suffix) > MAX_JOB_ID_LEN:
        base = (_RETRY_CHAIN.sub("", base) or base)[: MAX_JOB_ID_LEN - len(suffix)]
    return base + suffix


async def retry_entry(gw: Gateway, job_id: str, tenant: str) -> dict[str, Any]:
    """Re-run a dead-lettered job as a new job. The entry is claimed first (deleted atomically),
    so concurrent retries create one job: the others get 409 `retry_in_progress` (or 404 once it
    is gone). If the new job cannot be created or queued, the entry is put back."""
    found = await _read_entry(gw, job_id, tenant)
    if found is None:
        raise not_found("dlq entry not found")
    text, entry, pttl = found
    old = await gw.jobs.get(job_id, tenant=tenant)
    request_msg = await gw.jobs.get_request(job_id)
    if old is None or request_msg is None:
        raise ApiError(409, "the original job's request has expired; it cannot be retried", code="retry_unavailable")
    new_id = retry_job_id(job_id)
    trace_id = f"dlq-retry-{job_id}"
    request_msg.job_id = new_id
    request_msg.context_ptr = ptr(context_key(new_id))
    for name in list(request_msg.labels):
        if name == subjects.LABEL_BUS_MSG_ID or name.startswith("approval_"):
            del request_msg.labels[name]
    request_msg.labels.update({"retry": "true", "dlq_entry": job_id, "retry_of_job": job_id})
    request_msg.env["tenant_id"] = tenant
    request_msg.env["retry_of_job"] = job_id
    if entry.get("topic"):
        request_msg.topic = entry["topic"]
    fields = {name: old[name] for name in _COPIED_META if old.get(name) not in (None, "", [], {})}
    labels = dict(old.get("labels") or {}) if isinstance(old.get("labels"), dict) else {}
    labels = {k: v for k, v in labels.items() if k != subjects.LABEL_BUS_MSG_ID and not k.startswith("approval_")}
    labels.update({"retry": "true", "dlq_entry": job_id, "retry_of_job": job_id})
    fields.update(labels=labels, trace_id=trace_id, retry_of_job=job_id, topic=request_msg.topic, tenant=tenant)
    who = caller()
    if who.key_fingerprint:
        fields["retried_key"] = who.key_fingerprint  # the retrier may not approve the new job either
    fields.pop("idempotency_key", None)  # the key stays with the original job
    context = await gw.jobs.get_context(job_id)
    if context is None and entry.get("reason_code") == "policy_denied":
        raise ApiError(409, "a job denied at submit keeps no input; submit it again", code="retry_unavailable")

    if not await _claim(gw, job_id):
        raise ApiError(409, "this entry is being retried already", code="retry_in_progress")
    try:
        await gw.jobs.create(new_id, JobState.PENDING, request=request_msg, fields=fields, context=context)
    except BaseException:
        await _restore(gw, job_id, text, pttl)
        raise
    try:
        await publish_request(gw, request_msg, trace_id)
    except Exception as exc:
        log.error("dlq.retry_publish_failed", job_id=new_id, error=repr(exc))
        await _restore(gw, job_id, text, pttl)
        try:
            await gw.jobs.transition(new_id, JobState.FAILED, fields={"failure_reason": "publish to bus failed"})
        except Exception as store_exc:
            log.error("dlq.retry_fail_mark_failed", job_id=new_id, error=repr(store_exc))
        raise ApiError(503, "retry could not be queued (bus unavailable), try again", code="bus_unavailable") from None
    await gw.dlq.delete(job_id, tenant=tenant)  # the entry is gone already; drops its index member
    try:  # a late DLQ event for the old job must not bring its entry back (deadletter.record)
        await gw.jobs.set_fields(job_id, {"retried_as": new_id})
    except Exception as exc:
        log.warning("dlq.retry_mark_failed", job_id=job_id, error=repr(exc))
    return {"job_id": new_id}


# ---- routes -------------------------------------------------------------------------------------


def register(app: Quart, gw: Gateway) -> None:
    @app.get("/api/v1/dlq")
    @require("viewer")
    async def list_dlq() -> Any:
        items, _ = await gw.dlq.page(caller().tenant, limit=query_int("limit", 100, high=1000))
        return {"items": items}

    @app.get("/api/v1/dlq/page")
    @require("viewer")
    async def page_dlq() -> Any:
        cursor = request.args.get("cursor") or None
        if cursor is not None and not cursor.lstrip("-").isdigit():
            raise ApiError(400, "cursor must be an integer (created_at in unix seconds)")
        items, next_cursor = await gw.dlq.page(caller().tenant, limit=query_int("limit", 100, high=1000),
                                               cursor=int(cursor) if cursor else None)
        return {"items": items, "next_cursor": cursor_text(next_cursor)}

    @app.delete("/api/v1/dlq/<job_id>")
    @require("admin")
    async def delete_dlq(job_id: str) -> Any:
        checked_job_id(job_id)
        if await gw.dlq.get(job_id, tenant=caller().tenant) is None:
            raise not_found("dlq entry not found")
        await gw.dlq.delete(job_id, tenant=caller().tenant)
        return Response(b"", status=204)

    @app.post("/api/v1/dlq/<job_id>/retry")
    @require("operator")
    async def retry_dlq(job_id: str) -> Any:
        checked_job_id(job_id)
        return await retry_entry(gw, job_id, caller().tenant)
