"""The gateway's audit trail: every mutating API request and every submit-time policy decision is
recorded (`cordum.runtime.audit`) into its tenant's hash chain (`cordum.store.audit`); admins
read and verify their tenant's chain here.

- `GET /api/v1/audit/events?limit&cursor` → the chain, newest first (`next_cursor` to go on)
- `GET /api/v1/audit/verify` → `{valid, checked, head_seq, head_hash[, first_bad_seq, problem]}`
- `GET /api/v1/audit/export/config`, `GET /api/v1/audit/export/health`, `POST /api/v1/audit/export/test`
  (the calls of cordum-sdk's `audit_export`)
"""

from __future__ import annotations

import re
from typing import Any, Mapping

from quart import Quart, request

from cordum.gateway.auth import Principal
from cordum.gateway.context import Gateway, caller, query_int, require
from cordum.gateway.errors import ApiError
from cordum.protocol import subjects
from cordum.runtime.audit import new_event

MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
STREAM_ID = re.compile(r"\d{1,19}-\d{1,19}")  # what next_cursor holds (Redis stream ids are 64-bit)
READ_ONLY_POSTS = frozenset({"/api/v1/policy/evaluate", "/api/v1/workflows/<workflow_id>/dry-run"})


def record_request(gw: Gateway, who: Principal | None, method: str, rule: str, path: str,
                   view_args: Mapping[str, Any] | None, status: int) -> None:
    """After a mutating request that passed authentication: who did what to which object, and how
    it ended (refusals included: a denied attempt is worth recording too). `rule`: the route
    matched ("" for none)."""
    if gw.audit is None or who is None or method not in MUTATING or rule in READ_ONLY_POSTS:
        return
    gw.audit.record(new_event(
        who.tenant, "request", f"{method} {rule or path}", target=dict(view_args or {}),
        status=status, principal=who.principal_id, role=who.role, key=who.key_fingerprint))


def record_decision(gw: Gateway, tenant: str, job_id: str, topic: str, verdict: str, reason: str, rule_id: str,
                    snapshot: str, principal: str) -> None:
    if gw.audit is not None:
        gw.audit.record(new_event(tenant, "policy_decision", "submit", job_id=job_id, topic=topic, verdict=verdict,
                                  reason=reason, rule_id=rule_id, snapshot=snapshot, principal=principal))


def _audit(gw: Gateway) -> Any:
    if gw.audit is None:
        raise ApiError(503, "the audit trail is not running on this replica", code="audit_unavailable")
    return gw.audit


def register(app: Quart, gw: Gateway) -> None:
    @app.get("/api/v1/audit/events")
    @require("admin")
    async def audit_events() -> Any:
        limit = query_int("limit", 100, high=1000)
        cursor = request.args.get("cursor") or None
        if cursor is not None and not STREAM_ID.fullmatch(cursor):
            raise ApiError(400, "cursor must be a stream id (as next_cursor gave it)")
        entries, next_cursor = await _audit(gw).chain.page(caller().tenant, limit=limit, before=cursor)
        return {"items": [entry.view() for entry in entries], "next_cursor": next_cursor}

    @app.get("/api/v1/audit/verify")
    @require("admin")
    async def audit_verify() -> Any:
        result = await _audit(gw).chain.verify(caller().tenant)
        body = {"valid": result.valid, "checked": result.checked, "head_seq": result.head_seq,
                "head_hash": result.head_hash}
        if not result.valid:
            body.update(first_bad_seq=result.first_bad_seq, problem=result.problem)
        return body

    @app.get("/api/v1/audit/export/config")
    @require("admin")
    async def audit_export_config() -> Any:
        audit = _audit(gw)
        return {"transport": audit.transport, "subject": subjects.AUDIT_EXPORT,
                "queue_group": subjects.QUEUE_AUDIT_EXPORTERS, "buffer_size": audit.buffer_size,
                "chain": "redis stream audit:chain:{<tenant>}", "hmac": bool(audit.chain.hmac_key),
                "export_type": ""}

    @app.get("/api/v1/audit/export/health")
    @require("admin")
    async def audit_export_health() -> Any:
        return _audit(gw).health()

    @app.post("/api/v1/audit/export/test")
    @require("admin")
    async def audit_export_test() -> Any:
        who = caller()
        event = new_event(who.tenant, "test", "audit export test", principal=who.principal_id)
        _audit(gw).record(event)
        return {"ok": True, "event_id": event["id"], "transport": _audit(gw).transport}
