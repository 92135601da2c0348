"""Configuration documents and the policy evaluate proxy.

`GET /api/v1/config?scope&scope_id` → the document's data (`{}` if none); `PUT|POST` (admin)
with `{scope, scope_id, data}` or flat data (system/default) → stored, then a SystemAlert
`config changed` on `sys.config.changed` → 204.

Scopes are tenant-bound (`visible`): `system` (scope_id `default`) is read by admins and written
only by an admin of the operator's own tenant (TENANT_ID); `org` documents are named by the tenant
(scope_id = the caller's tenant, the default); `team`, `workflow` and `step` scope ids are
`<tenant>:<id>` (e.g. `acme:payments`), so a tenant only reaches its own. Anything else is a 404,
like a missing document. `POST /api/v1/policy/evaluate` asks the safety
kernel's Evaluate and answers its protobuf-JSON response (503 if the kernel is unreachable).
"""

from __future__ import annotations

import time
from typing import Any

from google.protobuf import json_format
from quart import Quart, Response, request

from cordum.agent.v1 import job_pb2, safety_pb2
from cordum.agent.v1.alert_pb2 import SystemAlert
from cordum.gateway.context import SENDER, Gateway, caller, json_body, optional_str, optional_str_list, optional_str_map, require
from cordum.gateway.auth import Principal
from cordum.gateway.errors import ApiError, not_found
from cordum.gateway.jobs import TOPIC_RE
from cordum.infra.grpc import RpcError
from cordum.protocol import subjects
from cordum.protocol.packets import encode, new_packet
from cordum.runtime.log import get_logger
from cordum.store.config import SCOPES

log = get_logger("gateway.config")


def _scope_args(scope: str, scope_id: str, who: Principal) -> tuple[str, str]:
    scope = (scope or "system").strip().lower()
    if scope not in SCOPES:
        raise ApiError(400, f"scope must be one of {', '.join(SCOPES)}")
    scope_id = (scope_id or "").strip() or {"system": "default", "org": who.tenant}.get(scope, "")
    if not scope_id:
        raise ApiError(400, f"scope_id is required for scope {scope} (<tenant>:<id>)")
    return scope, scope_id


def visible(gw: Gateway, who: Principal, scope: str, scope_id: str, *, write: bool) -> bool:
    """May `who` read (or, with `write`, change) this document? The tenant rules:
    - `system`: read by admins; written only by an admin of the operator's own tenant (TENANT_ID);
    - `org`: the scope_id is the caller's tenant;
    - `team`, `workflow`, `step`: the scope_id is `<caller's tenant>:<id>`.
    A document the caller may not see answers 404, exactly like a missing one."""
    if scope == "system":
        if write:
            return who.allows("admin") and who.tenant == gw.options.default_tenant
        return who.allows("admin")
    if scope == "org":
        return scope_id == who.tenant
    return scope_id.startswith(who.tenant + ":") and len(scope_id) > len(who.tenant) + 1


def _check(gw: Gateway, who: Principal, scope: str, scope_id: str, *, write: bool) -> None:
    if not visible(gw, who, scope, scope_id, write=write):
        raise not_found("config not found")


def register(app: Quart, gw: Gateway) -> None:
    @app.get("/api/v1/config")
    @require("viewer")
    async def get_config() -> Any:
        who = caller()
        scope, scope_id = _scope_args(request.args.get("scope", ""), request.args.get("scope_id", ""), who)
        _check(gw, who, scope, scope_id, write=False)
        doc = await gw.configs.get(scope, scope_id)
        return (doc or {}).get("data") or {}

    async def put_config() -> Any:
        who = caller()
        body = await json_body()
        if "data" in body and ("scope" in body or "scope_id" in body):
            if not isinstance(body["data"], dict):
                raise ApiError(400, "data must be an object")
            if not isinstance(body.get("scope", ""), str) or not isinstance(body.get("scope_id", ""), str):
                raise ApiError(400, "scope and scope_id must be strings")
            scope, scope_id = _scope_args(body.get("scope", ""), body.get("scope_id", ""), who)
            data, meta = body["data"], body.get("meta") if isinstance(body.get("meta"), dict) else None
        else:
            scope, scope_id, data, meta = "system", "default", body, None
        _check(gw, who, scope, scope_id, write=True)
        await gw.configs.put(scope, scope_id, data, meta={**(meta or {}), "updated_by": who.identity})
        changed_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        alert = SystemAlert(level="INFO", message="config changed", component=SENDER, source_component=SENDER,
                            severity=1, details={"scope": scope, "scope_id": scope_id, "changed_at": changed_at})
        try:
            await gw.bus.publish(subjects.CONFIG_CHANGED, encode(new_packet(alert, sender_id=SENDER)))
        except Exception as exc:  # stored; the watchers' periodic poll picks it up
            log.warning("config.notify_failed", scope=scope, scope_id=scope_id, error=repr(exc))
        return Response(b"", status=204)

    app.add_url_rule("/api/v1/config", "put_config", require("admin")(put_config), methods=["PUT", "POST"])

    @app.post("/api/v1/policy/evaluate")
    @require("operator")
    async def evaluate() -> Any:
        body = await json_body()
        who = caller()
        topic = optional_str(body, "topic", max_len=256)
        if not topic:
            raise ApiError(400, "topic is required")
        if not TOPIC_RE.match(topic):
            raise ApiError(400, "topic must look like job.<segment>(.<segment>)*")
        tenant = optional_str(body, "tenant") or who.tenant
        if tenant != who.tenant:
            raise ApiError(403, "tenant access denied")
        labels = optional_str_map(body, "labels", max_items=50)
        meta = job_pb2.JobMetadata(tenant_id=tenant, capability=optional_str(body, "capability", max_len=256),
                                   risk_tags=optional_str_list(body, "risk_tags"),
                                   requires=optional_str_list(body, "requires"), labels=labels)
        req = safety_pb2.PolicyCheckRequest(topic=topic, tenant=tenant, labels=labels, meta=meta,
                                            principal_id=optional_str(body, "principal_id", max_len=256))
        try:
            response = await gw.safety.call("Evaluate", req)
        except RpcError as exc:
            raise ApiError(503, f"safety kernel unavailable: {exc.code}", code="safety_unavailable") from None
        return json_format.MessageToDict(response)
