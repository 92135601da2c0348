"""Workflow definitions and runs (spec cordum-services §1.5 "Workflows and runs", §2).

Routes (tenant-scoped like jobs: another tenant's workflow or run is a 404, exactly like a missing
one; roles: viewer reads, operator starts/cancels/reruns/dry-runs, admin writes definitions and
deletes):

    GET    /api/v1/workflows                          → [WorkflowDefinition]  (X-Next-Cursor if more)
    POST   /api/v1/workflows                          → 201 {id}   JSON, or YAML by Content-Type
    GET    /api/v1/workflows/{id}                     → WorkflowDefinition
    DELETE /api/v1/workflows/{id}                     → 204 (its runs are kept)
    POST   /api/v1/workflows/{id}/dry-run             → {steps, warnings, estimated_duration_sec}
    POST   /api/v1/workflows/{id}/runs                → {run_id} + X-Trace-Id   body = run input
    GET    /api/v1/workflows/{id}/runs                → [RunSummary]
    POST   /api/v1/workflows/{id}/runs/{run}/cancel   → 204
    GET    /api/v1/workflow-runs                      → {items: [RunSummary], next_cursor}
    GET    /api/v1/workflow-runs/{run}                → RunDetail + pending `timers`
    DELETE /api/v1/workflow-runs/{run}                → 204 (a finished run only)
    GET    /api/v1/workflow-runs/{run}/timeline       → [TimelineEvent]
    POST   /api/v1/workflow-runs/{run}/cancel         → 204
    POST   /api/v1/workflow-runs/{run}/rerun          → {run_id} + X-Trace-Id   body {from_step, dry_run}

A start is refused with 429 `RUN_NOT_RUNNABLE` while the tenant has `max_concurrent_runs` runs
active (effective config or the definition's `config`; checked under the tenant's admission lock);
a repeated idempotency key answers with its run before that check.

Start, cancel and rerun go through the gateway's own `WorkflowEngine` (`gw.workflow_engine`),
which takes the run lock like every engine replica; results are never processed here (the
cordum-workflow-engine service owns them). A busy run lock is a 409 (`RUN_NOT_CANCELLABLE` for a
cancel) that the caller retries. Shapes: `workflow_views`.
"""

from __future__ import annotations

import dataclasses
import datetime
import re
import uuid
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Awaitable, Callable

import yaml
from quart import Quart, request

from cordum.gateway.context import (MAX_JSON_DEPTH, Gateway, caller, json_body, json_problem, optional_str,
                                    parse_json_object, query_int, require)
from cordum.gateway.errors import ApiError, not_found
from cordum.gateway.workflow_views import (
    ShapeError,
    definition_view,
    normalise_definition,
    run_detail,
    run_summary,
    timeline_view,
    timer_view,
)
from cordum.infra.config import parse_bool
from cordum.runtime.lifecycle import close_scope
from cordum.runtime.log import get_logger
from cordum.store import keys
from cordum.store.workflows import DefinitionOwned, TERMINAL_STATUSES
from cordum.workflow import engine as wf_engine
from cordum.workflow.definition import ID_MAX_LENGTH, ID_PATTERN, DefinitionError, Workflow, parse_workflow
from cordum.workflow.preflight import input_problems, plan
from cordum.workflow.rerun import RerunError, rerun_run
from cordum.workflow.runstate import RUN_STATUSES, Run

log = get_logger("gateway.workflows")

MAX_NAME = 256
MAX_TIMEOUT_SEC = 604_800  # 7 days (spec §1.5)
MAX_IDEMPOTENCY_KEY = 256
RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
LIST_MAX = 500
ADMISSION_TTL, ADMISSION_WAIT = 10.0, 2.0  # spec §1.5: admission lock TTL 10 s, wait ≤ 2 s


# ---- request parsing (path ids, bodies, queries) ------------------------------------------------


def checked_workflow_id(workflow_id: str) -> str:
    """A workflow id from the path: the definition's own id rules, before any key is built from it."""
    if len(workflow_id) > ID_MAX_LENGTH or not ID_PATTERN.match(workflow_id) or workflow_id != workflow_id.strip():
        raise ApiError(400, f"invalid workflow id {workflow_id!r}: letters, digits, '.', '_' and '-', "
                            f"starting with a letter or digit, at most {ID_MAX_LENGTH} characters",
                       code="invalid_workflow_id")
    return workflow_id


def checked_run_id(run_id: str) -> str:
    if not RUN_ID_RE.match(run_id):
        raise ApiError(400, f"invalid run id {run_id!r}", code="invalid_run_id")
    return run_id


async def definition_body() -> tuple[str, dict[str, Any]]:
    """The body text and its decoded mapping: YAML when the Content-Type says yaml, else JSON."""
    data = await request.get_data(as_text=False)
    if not data or not data.strip():
        raise ApiError(400, "request body must be a workflow definition (JSON, or YAML with a yaml Content-Type)")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError(400, "invalid body: not UTF-8") from None
    if "yaml" in (request.mimetype or ""):
        try:
            doc = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark is not None else ""
            raise ApiError(400, f"invalid YAML body{where}: {getattr(exc, 'problem', None) or exc}") from None
        except RecursionError:
            raise ApiError(400, f"invalid YAML body: nested deeper than {MAX_JSON_DEPTH} levels") from None
        problem = json_problem(doc)
        if problem:
            raise ApiError(400, f"invalid YAML body: {problem}")
    else:
        doc = parse_json_object(data)
    if not isinstance(doc, dict):
        raise ApiError(400, "request body must be a workflow definition object")
    return text, doc


def _now_text() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def build_definition(text: str, doc: dict[str, Any], tenant: str, who: str,
                     existing: dict[str, Any] | None) -> Workflow:
    """Validate a definition body into the Workflow to store (400 naming the first problem)."""
    org = doc.get("org_id")
    if org not in (None, "", tenant):
        raise ApiError(403, "tenant access denied", code="tenant_access_denied")
    try:
        doc, changed = normalise_definition(doc)
    except ShapeError as exc:
        raise ApiError(400, f"invalid workflow: {exc}", code="invalid_workflow") from None
    if not doc.get("id"):
        doc["id"], changed = str(uuid.uuid4()), True
    try:
        # The text itself when it needs no mapping: then errors name its line.
        workflow = parse_workflow(doc if changed else text, origin="workflow")
    except DefinitionError as exc:
        where = {"step": exc.step, "field": exc.field, "line": exc.line}
        raise ApiError(400, f"invalid workflow: {exc}", code="invalid_workflow",
                       extra={k: v for k, v in where.items() if v is not None}) from None
    if len(workflow.name) > MAX_NAME:
        raise ApiError(400, f"invalid workflow: name must be at most {MAX_NAME} characters", code="invalid_workflow")
    if not 0 <= workflow.timeout_sec <= MAX_TIMEOUT_SEC:
        raise ApiError(400, f"invalid workflow: timeout_sec must be between 0 and {MAX_TIMEOUT_SEC}",
                       code="invalid_workflow")
    now = _now_text()
    previous = existing or {}
    return dataclasses.replace(
        workflow, org_id=tenant, updated_at=now, created_at=str(previous.get("created_at") or now),
        created_by=str(previous.get("created_by") or workflow.created_by or who),
    )


def stored_workflow(doc: dict[str, Any], parse: Callable[..., Workflow] = parse_workflow) -> Workflow:
    """A stored definition parsed again (`parse`: the engine's, which keeps what it parsed); one
    that no longer parses is a 409 naming the problem."""
    try:
        return parse(doc, origin=f"workflow {doc.get('id', '')}")
    except DefinitionError as exc:
        raise ApiError(409, f"stored workflow is invalid: {exc}", code="invalid_workflow") from None


def idempotency_key() -> str:
    key = (request.headers.get("Idempotency-Key") or request.headers.get("X-Idempotency-Key")
           or request.args.get("idempotency_key") or "").strip()
    if len(key) > MAX_IDEMPOTENCY_KEY:
        raise ApiError(400, f"idempotency key must be at most {MAX_IDEMPOTENCY_KEY} characters")
    return key


def query_bool(name: str) -> bool:
    raw = request.args.get(name)
    if raw is None or raw == "":
        return False
    try:
        return parse_bool(raw)
    except ValueError:
        raise ApiError(400, f"{name} must be true or false") from None


def body_bool(body: dict[str, Any], name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ApiError(400, f"{name} must be true or false")
    return value


def check_org(tenant: str) -> None:
    """An `org_id` query naming another tenant is refused, as on the jobs routes."""
    org = (request.args.get("org_id") or "").strip()
    if org and org != tenant:
        raise ApiError(403, "tenant access denied", code="tenant_access_denied")


async def paged(load: Callable[[int, str | None], Awaitable[tuple[list[dict[str, Any]], str | None]]],
                ) -> tuple[list[dict[str, Any]], str | None]:
    """One page of a store listing by the `limit` and `cursor` queries (a bad cursor is a 400)."""
    limit, cursor = query_int("limit", 50, high=LIST_MAX), (request.args.get("cursor") or None)
    try:
        return await load(limit, cursor)
    except ValueError:
        raise ApiError(400, "cursor must be a next_cursor from an earlier page", code="invalid_cursor") from None


def array_page(items: list[dict[str, Any]], next_cursor: str | None) -> tuple[list[dict[str, Any]], int, dict[str, str]]:
    """The SDK reads these listings as bare arrays: the next page's cursor goes in a header."""
    return items, 200, ({"X-Next-Cursor": next_cursor} if next_cursor else {})


# ---- reads ---------------------------------------------------------------------------------------


async def find_definition(gw: Gateway, workflow_id: str, tenant: str) -> dict[str, Any]:
    doc = await gw.workflows.get_definition(checked_workflow_id(workflow_id), tenant=tenant)
    if doc is None:
        raise not_found("workflow not found")
    return doc


async def find_run(gw: Gateway, run_id: str, tenant: str, workflow_id: str | None = None) -> dict[str, Any]:
    doc = await gw.workflows.get_run(checked_run_id(run_id), tenant=tenant)
    if doc is None or (workflow_id is not None and doc.get("workflow_id") != workflow_id):
        raise not_found("workflow run not found")
    return doc


async def run_timers(gw: Gateway, doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The run's pending delay/retry/timeout timer (`cordum:wf:delay:timers`), if any. A finished
    run has none: the engine leaves its timer to fire into nothing rather than disarm it."""
    if doc.get("status") in TERMINAL_STATUSES:
        return []
    workflow_id, run_id = str(doc.get("workflow_id") or ""), str(doc.get("id") or "")
    due = await gw.workflows.timer_due(f"{workflow_id}:{run_id}")
    if due is None:
        return []
    return [timer_view(workflow_id, run_id, due, gw.workflow_engine.clock())]


# ---- operations ------------------------------------------------------------------------------------


def _started(run_id: str) -> tuple[dict[str, Any], int, dict[str, str]]:
    return {"run_id": run_id}, 200, {"X-Trace-Id": run_id}


async def start_run(gw: Gateway, workflow_id: str) -> tuple[dict[str, Any], int, dict[str, str]]:
    who = caller()
    check_org(who.tenant)
    run_input = await json_body(optional=True)
    key = idempotency_key()
    dry_run = query_bool("dry_run")
    workflow = stored_workflow(await find_definition(gw, workflow_id, who.tenant), gw.workflow_engine.parsed)
    problems = input_problems(workflow.input_schema, run_input)
    if problems:
        raise ApiError(400, f"invalid run input: {problems[0]}", code="invalid_input", extra={"problems": problems})
    if key:
        holder = await gw.redis.execute("GET", keys.wf_run_idempotency(who.tenant, key))
        held = await gw.workflows.get_run(holder, tenant=who.tenant) if holder else None
        if held is not None:  # a repeat: answered before any limit applies
            if held.get("workflow_id") != workflow_id:
                raise ApiError(409, "idempotency key already used for a run of another workflow",
                               code="RUN_IDEMPOTENCY_CONFLICT", extra={"run_id": held.get("id")})
            return _started(str(held["id"]))
    limit = await concurrent_run_limit(gw, who.tenant, workflow)
    async with admitted(gw, who.tenant, limit):
        try:
            run_id = await gw.workflow_engine.start_run(workflow_id, who.tenant, run_input,
                                                        idempotency_key=key or None, dry_run=dry_run,
                                                        triggered_by=who.identity, started_by=_starter(who))
        except LookupError:
            raise not_found("workflow not found") from None
        except wf_engine.RunBusy:
            raise ApiError(409, "workflow run is busy, retry", code="RUN_BUSY", headers={"Retry-After": "1"}) from None
    return _started(run_id)


def _starter(who: Any) -> dict[str, str]:
    """Who starts a run, as its approval gates record it (principal id, key fingerprint)."""
    return {"principal": who.principal_id, "key": who.key_fingerprint}


async def concurrent_run_limit(gw: Gateway, tenant: str, workflow: Workflow) -> int:
    """`max_concurrent_runs` of the effective config (system → org → workflow scope) and of the
    definition's own `config`: the smaller positive one applies (0 = no limit)."""
    merged = await gw.configs.effective(("system", "default"), ("org", tenant), ("workflow", f"{tenant}:{workflow.id}"))
    limits = [v for v in (merged.get("max_concurrent_runs"), (workflow.config or {}).get("max_concurrent_runs"))
              if isinstance(v, int) and not isinstance(v, bool) and v > 0]
    return min(limits, default=0)


@asynccontextmanager
async def admitted(gw: Gateway, tenant: str, limit: int) -> AsyncIterator[None]:
    """With a limit: under the tenant's admission lock (waited for ≤ 2 s), its active runs are
    below the limit (else 429 RUN_NOT_RUNNABLE) until the body has created the new run."""
    if limit <= 0:
        yield
        return
    lease = await gw.leases.acquire_within(keys.workflow_run_admission(tenant), ADMISSION_TTL, ADMISSION_WAIT)
    if lease is None:
        raise ApiError(429, "run admission is busy, retry", code="RUN_NOT_RUNNABLE", headers={"Retry-After": "1"})
    try:
        active = await gw.workflows.active_runs(tenant)
        if active >= limit:
            raise ApiError(429, f"{active} runs are active; max_concurrent_runs is {limit}", code="RUN_NOT_RUNNABLE",
                           headers={"Retry-After": "5"})
        yield
    finally:
        with close_scope(2):
            await gw.leases.release(lease)


async def cancel_run(gw: Gateway, run_id: str, workflow_id: str | None = None) -> tuple[str, int]:
    who = caller()
    await find_run(gw, run_id, who.tenant, workflow_id)
    try:
        found = await gw.workflow_engine.cancel_run(run_id, who.tenant, reason=f"workflow run cancelled by {who.identity}")
    except wf_engine.RunBusy:
        raise ApiError(409, "workflow run is busy, retry", code="RUN_NOT_CANCELLABLE",
                       headers={"Retry-After": "1"}) from None
    if not found:  # deleted meanwhile, or the write lost to a newer lock holder
        raise ApiError(409, "workflow run changed while cancelling, retry", code="RUN_NOT_CANCELLABLE")
    return "", 204


async def rerun(gw: Gateway, run_id: str) -> tuple[dict[str, Any], int, dict[str, str]]:
    who = caller()
    old = Run.from_dict(await find_run(gw, run_id, who.tenant))
    body = await json_body(optional=True)
    from_step = optional_str(body, "from_step", max_len=ID_MAX_LENGTH)
    dry_run = body_bool(body, "dry_run")
    definition = await gw.workflows.get_definition(old.workflow_id, tenant=who.tenant)
    if definition is None:
        raise not_found(f"workflow {old.workflow_id} of the run not found")
    engine = gw.workflow_engine
    now = engine.clock()
    try:
        new = rerun_run(stored_workflow(definition), old, new_id=str(uuid.uuid4()), from_step=from_step, now=now,
                        dry_run=dry_run, triggered_by=who.identity)
    except RerunError as exc:
        raise ApiError(400, str(exc), code="invalid_from_step") from None
    new = dataclasses.replace(new, metadata={**new.metadata, "started_by": _starter(who)})
    async with admitted(gw, who.tenant, await concurrent_run_limit(gw, who.tenant, stored_workflow(definition))):
        new_id, _ = await gw.workflows.create_run(new.to_dict(), tenant=who.tenant, definition=definition)
    await gw.workflows.append_timeline(new_id, {"type": "run_created", "at": now, "status": new.status,
                                                "data": {"rerun_of": old.id, "from_step": from_step}})
    try:
        await engine.advance(new_id)
    except wf_engine.RunBusy:  # nobody else knows the new run yet; the reconciler would start it anyway
        log.warning("workflow.rerun_advance_busy", run_id=new_id)
    return _started(new_id)


# ---- routes ----------------------------------------------------------------------------------------


def register(app: Quart, gw: Gateway) -> None:
    @app.get("/api/v1/workflows")
    @require("viewer")
    async def wf_list_workflows() -> Any:
        who = caller()
        check_org(who.tenant)
        docs, next_cursor = await paged(lambda limit, cursor: gw.workflows.list_definitions(
            who.tenant, limit=limit, cursor=cursor))
        return array_page([definition_view(d) for d in docs], next_cursor)

    @app.post("/api/v1/workflows")
    @require("admin")
    async def wf_create_workflow() -> Any:
        who = caller()
        text, doc = await definition_body()
        existing = None
        if isinstance(doc.get("id"), str) and doc["id"]:
            existing = await gw.workflows.get_definition(checked_workflow_id(doc["id"]), tenant=who.tenant)
        workflow = build_definition(text, doc, who.tenant, who.identity, existing)
        try:
            await gw.workflows.put_definition(workflow.to_dict(), who.tenant)
        except DefinitionOwned:
            raise ApiError(409, f"workflow id {workflow.id} is taken", code="workflow_id_taken") from None
        return {"id": workflow.id}, 201

    @app.get("/api/v1/workflows/<workflow_id>")
    @require("viewer")
    async def wf_get_workflow(workflow_id: str) -> Any:
        return definition_view(await find_definition(gw, workflow_id, caller().tenant))

    @app.delete("/api/v1/workflows/<workflow_id>")
    @require("admin")
    async def wf_delete_workflow(workflow_id: str) -> Any:
        if not await gw.workflows.delete_definition(checked_workflow_id(workflow_id), caller().tenant):
            raise not_found("workflow not found")
        return "", 204

    @app.post("/api/v1/workflows/<workflow_id>/dry-run")
    @require("operator")
    async def wf_dry_run(workflow_id: str) -> Any:
        workflow = stored_workflow(await find_definition(gw, workflow_id, caller().tenant))
        body = await json_body(optional=True)
        run_input = body.get("input", {})
        if not isinstance(run_input, dict):
            raise ApiError(400, "input must be an object")
        return plan(workflow, run_input, unsupported=wf_engine.UNSUPPORTED_TYPES)

    @app.post("/api/v1/workflows/<workflow_id>/runs")
    @require("operator")
    async def wf_start_run(workflow_id: str) -> Any:
        return await start_run(gw, workflow_id)

    @app.get("/api/v1/workflows/<workflow_id>/runs")
    @require("viewer")
    async def wf_list_workflow_runs(workflow_id: str) -> Any:
        who = caller()
        await find_definition(gw, workflow_id, who.tenant)
        docs, next_cursor = await paged(lambda limit, cursor: gw.workflows.list_runs(
            who.tenant, workflow_id=workflow_id, limit=limit, cursor=cursor))
        return array_page([run_summary(d) for d in docs], next_cursor)

    @app.post("/api/v1/workflows/<workflow_id>/runs/<run_id>/cancel")
    @require("operator")
    async def wf_cancel_of_workflow(workflow_id: str, run_id: str) -> Any:
        return await cancel_run(gw, run_id, checked_workflow_id(workflow_id))

    @app.get("/api/v1/workflow-runs")
    @require("viewer")
    async def wf_list_runs() -> Any:
        who = caller()
        check_org(who.tenant)
        status = (request.args.get("status") or "").strip().lower() or None
        if status is not None and status not in RUN_STATUSES:
            raise ApiError(400, f"status must be one of {', '.join(RUN_STATUSES)}")
        workflow_id = (request.args.get("workflow_id") or "").strip() or None
        if workflow_id is not None:
            checked_workflow_id(workflow_id)
        docs, next_cursor = await paged(lambda limit, cursor: gw.workflows.list_runs(
            who.tenant, workflow_id=workflow_id, status=status, limit=limit, cursor=cursor))
        return {"items": [run_summary(d) for d in docs], "next_cursor": next_cursor}

    @app.get("/api/v1/workflow-runs/<run_id>")
    @require("viewer")
    async def wf_get_run(run_id: str) -> Any:
        doc = await find_run(gw, run_id, caller().tenant)
        return run_detail(doc, await run_timers(gw, doc))

    @app.delete("/api/v1/workflow-runs/<run_id>")
    @require("admin")
    async def wf_delete_run(run_id: str) -> Any:
        who = caller()
        doc = await find_run(gw, run_id, who.tenant)
        if doc.get("status") not in TERMINAL_STATUSES:
            raise ApiError(409, f"workflow run is {doc.get('status')}: cancel it before deleting it",
                           code="RUN_NOT_TERMINAL")
        if not await gw.workflows.delete_run(run_id, who.tenant):
            raise not_found("workflow run not found")
        return "", 204

    @app.get("/api/v1/workflow-runs/<run_id>/timeline")
    @require("viewer")
    async def wf_timeline(run_id: str) -> Any:
        who = caller()
        doc = await find_run(gw, run_id, who.tenant)
        limit = query_int("limit", 0, low=0, high=1000) or None
        events = await gw.workflows.timeline(run_id, who.tenant, limit=limit)
        if events is None:
            raise not_found("workflow run not found")
        return [timeline_view(e, run_id, str(doc.get("workflow_id") or "")) for e in events]

    @app.post("/api/v1/workflow-runs/<run_id>/cancel")
    @require("operator")
    async def wf_cancel(run_id: str) -> Any:
        return await cancel_run(gw, run_id)

    @app.post("/api/v1/workflow-runs/<run_id>/rerun")
    @require("operator")
    async def wf_rerun(run_id: str) -> Any:
        return await rerun(gw, run_id)
