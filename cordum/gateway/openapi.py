"""`GET /api/v1/openapi.json`: the gateway's REST API as an OpenAPI 3.1 document (public: it holds
nothing secret). Every route of the app is here (a test compares the two, and runs schemathesis
against a running gateway with it). Bodies are described as loosely as the handlers accept them;
answers by their fields. `GET /api/v1/stream` (a WebSocket) is described in the README instead.
"""

from __future__ import annotations

from typing import Any

import cordum

OBJECT: dict[str, Any] = {"type": "object"}
STRING: dict[str, Any] = {"type": "string"}
ITEMS = {"type": "array", "items": OBJECT}
CURSOR = {"type": ["string", "null"]}
ERROR_STATUSES = ("400", "401", "403", "404", "405", "409", "413", "415", "429", "503")
ROLE_NOTE = {"viewer": "any key of the tenant", "operator": "operator or admin", "admin": "admin"}


def _page(**extra: Any) -> dict[str, Any]:
    return {"type": "object", "required": ["items"], "properties": {"items": ITEMS, "next_cursor": CURSOR, **extra}}


# The SDK reads workflow listings as bare arrays; the next page's cursor is the X-Next-Cursor header.
ARRAY_PAGE = {"type": "array", "items": OBJECT}


def _query(name: str, schema: dict[str, Any] | None = None, description: str = "") -> dict[str, Any]:
    param: dict[str, Any] = {"name": name, "in": "query", "required": False, "schema": schema or STRING}
    if description:
        param["description"] = description
    return param


def _path(name: str, description: str = "") -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string", "minLength": 1},
            **({"description": description} if description else {})}


LIMIT = _query("limit", {"type": "integer", "minimum": 1}, "page size (capped per route)")
CURSOR_Q = _query("cursor", STRING, "the next_cursor of the previous page")
JOB_ID = _path("job_id", "a job id: letters, digits and -_.:@[]")


def _op(summary: str, role: str, ok: str, ok_schema: dict[str, Any] | None, *, params: list[dict[str, Any]] = (),
        body: dict[str, Any] | None = None, body_required: bool = True, tag: str) -> dict[str, Any]:
    responses: dict[str, Any] = {ok: {"description": "done"}}
    if ok_schema is not None:
        responses[ok]["content"] = {"application/json": {"schema": ok_schema}}
    for status in ERROR_STATUSES:
        responses[status] = {"$ref": "#/components/responses/Error"}
    operation: dict[str, Any] = {"summary": summary, "tags": [tag], "description": f"Role: {ROLE_NOTE[role]}.",
                                 "parameters": list(params), "responses": responses}
    if body is not None:
        operation["requestBody"] = {"required": body_required, "content": {"application/json": {"schema": body}}}
    return operation


COUNT: dict[str, Any] = {"type": "integer", "minimum": 0}
BOOL: dict[str, Any] = {"type": "boolean"}


def _record(required: tuple[str, ...], **properties: Any) -> dict[str, Any]:
    return {"type": "object", "required": list(required), "properties": properties}


# The fields Cordum's clients and release gates read (spec §1.5); admins see more.
STATUS = _record(
    ("time", "uptime_seconds", "goroutine_count", "build", "nats", "redis", "redis_pool_stats", "workers"),
    time=STRING, uptime_seconds=COUNT, goroutine_count=COUNT, active_ws_clients=COUNT, instance_id=STRING,
    build=_record(("version", "commit", "date"), version=STRING, commit=STRING, date=STRING),
    nats=_record(("connected", "status"), connected=BOOL, status=STRING, url=STRING),
    redis=_record(("ok", "status"), ok=BOOL, status={"enum": ["ok", "error"]}, error=STRING),
    redis_pool_stats=_record(("hits", "misses", "timeouts", "total_conns", "idle_conns", "stale_conns"),
                             hits=COUNT, misses=COUNT, timeouts=COUNT, total_conns=COUNT, idle_conns=COUNT,
                             stale_conns=COUNT, cluster=BOOL),
    workers=_record(("count",), count=COUNT), pipeline={"type": "object", "additionalProperties": COUNT},
)


def _status_op(tag: str) -> dict[str, Any]:
    operation = _op("Platform status", "viewer", "200", STATUS, tag=tag)
    operation["responses"]["200"]["headers"] = {"X-Cache": {
        "description": "HIT: what status reads from Redis all came from this replica's cache",
        "schema": {"enum": ["HIT", "MISS"]}}}
    return operation


SUBMIT = {
    "type": "object", "required": ["prompt"],
    "properties": {
        "prompt": {"type": "string", "maxLength": 50_000}, "topic": STRING, "context": {},
        "labels": {"type": "object", "additionalProperties": STRING}, "priority": {"enum": ["interactive", "batch", "critical"]},
        "idempotency_key": STRING, "capability": STRING, "risk_tags": {"type": "array", "items": STRING},
        "requires": {"type": "array", "items": STRING}, "memory_id": STRING, "principal_id": STRING,
        "actor_id": STRING, "actor_type": {"enum": ["human", "service"]}, "tenant_id": STRING, "org_id": STRING,
        "max_input_tokens": {"type": "integer", "minimum": 0}, "max_output_tokens": {"type": "integer", "minimum": 0},
        "max_total_tokens": {"type": "integer", "minimum": 0}, "deadline_ms": {"type": "integer", "minimum": 0},
    },
}
ACCEPTED = {"type": "object", "required": ["job_id", "trace_id"],
            "properties": {"job_id": STRING, "trace_id": STRING, "status": STRING, "reason": STRING}}
FINDING = {"type": "object", "properties": {
    "type": STRING, "severity": STRING, "detail": STRING, "scanner": STRING, "matched_pattern": STRING,
    "offset": {"type": ["string", "integer"]}, "length": {"type": ["string", "integer"]}, "confidence": {"type": "number"}}}
OUTPUT_SAFETY = {"type": "object", "properties": {
    "decision": {"enum": ["allow", "quarantine", "redact", "unavailable"]}, "reason": STRING, "rule_id": STRING,
    "phase": {"enum": ["metadata", "content"]}, "policy_snapshot": STRING, "redacted_ptr": STRING,
    "findings": {"type": "array", "items": FINDING}}}
JOB = {"type": "object", "required": ["id"], "properties": {
    "id": STRING, "state": STRING, "topic": STRING, "tenant": STRING, "labels": OBJECT,
    # what the output policy found, and why `result` is null while it has not cleared the output
    "output_check": {"enum": ["", "due", "pending", "allow", "redact", "skipped", "quarantine"]},
    "output_safety": OUTPUT_SAFETY, "result_withheld": STRING}}
REASON = {"type": "object", "properties": {"reason": STRING}}
ERROR = {"type": "object", "required": ["error", "status"],
         "properties": {"error": STRING, "status": {"type": "integer"}, "code": STRING}}


def document() -> dict[str, Any]:
    jobs, flows, ops = "jobs", "workflows", "operations"
    paths: dict[str, dict[str, Any]] = {
        "/api/v1/jobs": {
            "post": _op("Submit a job", "operator", "200", ACCEPTED, body=SUBMIT, tag=jobs),
            "get": _op("List the tenant's jobs, newest first", "viewer", "200", _page(),
                       params=[LIMIT, CURSOR_Q, _query("state"), _query("topic")], tag=jobs)},
        "/api/v1/jobs/{job_id}": {"get": _op(
            "A job, with its result (withheld while the output policy has not cleared it)", "viewer", "200", JOB,
            params=[JOB_ID, _query("include_quarantined", {"enum": ["true", "false"]},
                                   "true: an admin reads a quarantined output")], tag=jobs)},
        "/api/v1/jobs/{job_id}/decisions": {
            "get": _op("A job's policy decisions", "viewer", "200", _page(), params=[JOB_ID], tag=jobs)},
        "/api/v1/jobs/{job_id}/timeline": {
            "get": _op("A job's state changes and policy decisions in time order", "viewer", "200", _page(),
                       params=[JOB_ID], tag=jobs)},
        "/api/v1/jobs/{job_id}/cancel": {
            "post": _op("Cancel a job", "operator", "200", OBJECT, params=[JOB_ID], body=OBJECT, body_required=False,
                        tag=jobs)},
        "/api/v1/approvals": {"get": _op("Jobs waiting for approval", "viewer", "200", _page(),
                                         params=[LIMIT, CURSOR_Q], tag=jobs)},
        "/api/v1/approvals/{job_id}/approve": {
            "post": _op("Approve a held job", "operator", "200", OBJECT, params=[JOB_ID], body=REASON,
                        body_required=False, tag=jobs)},
        "/api/v1/approvals/{job_id}/reject": {
            "post": _op("Reject a held job", "operator", "200", OBJECT, params=[JOB_ID], body=REASON,
                        body_required=False, tag=jobs)},
        "/api/v1/dlq": {"get": _op("Dead-lettered jobs", "viewer", "200", _page(), params=[LIMIT], tag=jobs)},
        "/api/v1/dlq/page": {"get": _op("Dead-lettered jobs, paged", "viewer", "200", _page(),
                                        params=[LIMIT, CURSOR_Q], tag=jobs)},
        "/api/v1/dlq/{job_id}": {"delete": _op("Delete a DLQ entry", "admin", "204", None, params=[JOB_ID], tag=jobs)},
        "/api/v1/dlq/{job_id}/retry": {
            "post": _op("Run a dead-lettered job again", "operator", "200", ACCEPTED | {"required": ["job_id"]},
                        params=[JOB_ID], body=OBJECT, body_required=False, tag=jobs)},
        "/api/v1/workers": {"get": _op("Workers that announced themselves", "viewer", "200", _page(), tag=ops)},
        "/api/v1/workers/{worker_id}": {
            "get": _op("One worker", "viewer", "200", OBJECT, params=[_path("worker_id")], tag=ops)},
        "/api/v1/config": {
            "get": _op("A configuration document", "viewer", "200", OBJECT,
                       params=[_query("scope"), _query("scope_id")], tag=ops),
            "put": _op("Write a configuration document", "admin", "204", None, body=OBJECT, tag=ops),
            "post": _op("Write a configuration document", "admin", "204", None, body=OBJECT, tag=ops)},
        "/api/v1/policy/evaluate": {
            "post": _op("Evaluate the policy for a request, without submitting", "viewer", "200", OBJECT,
                        body=OBJECT, tag=ops)},
        "/api/v1/status": {"get": _status_op(ops)},
        "/api/v1/memory": {"get": _op("A memory entry of the tenant", "viewer", "200", OBJECT,
                                      params=[_query("key", STRING, "mem:<memory id>:events|chunks|summary, or a job's ctx:/res: key")],
                                      tag=ops)},
        "/api/v1/artifacts": {
            "post": _op("Store an artifact", "operator", "200",
                        {"type": "object", "required": ["artifact_ptr"],
                         "properties": {"artifact_ptr": STRING, "size_bytes": {"type": "integer"}}},
                        body={"type": "object", "required": ["content_base64", "content_type"],
                              "properties": {"content_base64": STRING, "content_type": STRING, "retention": STRING,
                                             "labels": {"type": "object", "additionalProperties": STRING}}},
                        tag=ops)},
        "/api/v1/artifacts/{ptr}": {"get": _op("An artifact", "viewer", "200", OBJECT, params=[_path("ptr")], tag=ops)},
        "/api/v1/workflows": {
            "get": _op("The tenant's workflow definitions (X-Next-Cursor: the next page)", "viewer", "200", ARRAY_PAGE,
                       params=[LIMIT, CURSOR_Q, _query("org_id")], tag=flows),
            "post": _op("Create or replace a workflow definition", "operator", "201",
                        {"type": "object", "required": ["id"], "properties": {"id": STRING}}, body=OBJECT, tag=flows)},
        "/api/v1/workflows/{workflow_id}": {
            "get": _op("A workflow definition", "viewer", "200", OBJECT, params=[_path("workflow_id")], tag=flows),
            "delete": _op("Delete a workflow definition", "operator", "204", None, params=[_path("workflow_id")],
                          tag=flows)},
        "/api/v1/workflows/{workflow_id}/dry-run": {
            "post": _op("Check a run's input against a definition", "viewer", "200", OBJECT,
                        params=[_path("workflow_id")], body=OBJECT, body_required=False, tag=flows)},
        "/api/v1/workflows/{workflow_id}/runs": {
            "post": _op("Start a run", "operator", "200",
                        {"type": "object", "required": ["run_id"], "properties": {"run_id": STRING}},
                        params=[_path("workflow_id"), _query("idempotency_key"), _query("dry_run")], body=OBJECT,
                        body_required=False, tag=flows),
            "get": _op("A workflow's runs (X-Next-Cursor: the next page)", "viewer", "200", ARRAY_PAGE,
                       params=[_path("workflow_id"), LIMIT, CURSOR_Q, _query("status")], tag=flows)},
        "/api/v1/workflows/{workflow_id}/runs/{run_id}/cancel": {
            "post": _op("Cancel a run", "operator", "200", OBJECT,
                        params=[_path("workflow_id"), _path("run_id")], body=REASON, body_required=False, tag=flows)},
        "/api/v1/workflow-runs": {
            "get": _op("The tenant's runs", "viewer", "200", _page(),
                       params=[LIMIT, CURSOR_Q, _query("status"), _query("workflow_id")], tag=flows)},
        "/api/v1/workflow-runs/{run_id}": {
            "get": _op("A run, with its steps", "viewer", "200", OBJECT, params=[_path("run_id")], tag=flows),
            "delete": _op("Delete a finished run", "operator", "204", None, params=[_path("run_id")], tag=flows)},
        "/api/v1/workflow-runs/{run_id}/timeline": {
            "get": _op("A run's events in order", "viewer", "200", OBJECT, params=[_path("run_id")], tag=flows)},
        "/api/v1/workflow-runs/{run_id}/cancel": {
            "post": _op("Cancel a run", "operator", "200", OBJECT, params=[_path("run_id")], body=REASON,
                        body_required=False, tag=flows)},
        "/api/v1/workflow-runs/{run_id}/rerun": {
            "post": _op("Run a finished run again (from a step)", "operator", "200", OBJECT,
                        params=[_path("run_id")], body=OBJECT, body_required=False, tag=flows)},
        "/api/v1/audit/events": {"get": _op("The tenant's audit chain, newest first", "admin", "200", _page(),
                                            params=[LIMIT, CURSOR_Q], tag=ops)},
        "/api/v1/audit/verify": {"get": _op("Verify the tenant's audit chain", "admin", "200",
                                            {"type": "object", "required": ["valid", "checked"],
                                             "properties": {"valid": {"type": "boolean"}, "checked": {"type": "integer"}}},
                                            tag=ops)},
        "/api/v1/audit/export/config": {"get": _op("How audit events are exported", "admin", "200", OBJECT, tag=ops)},
        "/api/v1/audit/export/health": {"get": _op("The audit export's health", "admin", "200", OBJECT, tag=ops)},
        "/api/v1/audit/export/test": {"post": _op("Record a test audit event", "admin", "200", OBJECT, body=OBJECT,
                                                  body_required=False, tag=ops)},
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "Cordum API (Python)", "version": cordum.__version__,
                 "description": "The gateway of the Cordum control plane. Errors share one envelope."},
        "servers": [{"url": "/"}],
        "security": [{"apiKey": []}, {"bearer": []}],
        "paths": paths,
        "components": {
            "securitySchemes": {"apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
                                "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT (OIDC)"}},
            "schemas": {"Error": ERROR},
            "responses": {"Error": {"description": "the error envelope",
                                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}},
        },
    }


def flask_rule(path: str) -> str:
    """An OpenAPI path as the app's route rule (`{ptr}` is a `path` converter there)."""
    return path.replace("{ptr}", "<path:ptr>").replace("{", "<").replace("}", ">")
