"""The MCP tools and resources of cordum-mcp as a pure core: each one validates its arguments,
names the one gateway REST call that serves it (`Call`) and shapes the gateway's answer into the
tool's structured result. No I/O here; `cordum.mcp.server` runs the calls.

Names and argument shapes are spec cordum-services §4's. List tools share one envelope
`{cursor, page_size (1..500, default 50), filter: {name: value}}`; get tools take `{id}`. Tools of
the original whose backend this Cordum does not have yet are in `UNAVAILABLE`: never listed, and a
call is answered with an error naming what is missing.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping
from urllib.parse import parse_qs, quote, urlsplit


class ArgumentError(ValueError):
    """A tool's arguments or a resource URI are invalid; the message names what is wrong."""


@dataclass(frozen=True)
class Call:
    """One gateway REST request."""

    method: str
    path: str
    query: Mapping[str, Any] = field(default_factory=dict)
    body: Any = None
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Reply:
    """The gateway's 2xx answer: parsed JSON body and the response headers."""

    body: Any
    headers: Mapping[str, str] = field(default_factory=dict)


Shape = Callable[[dict[str, Any], Reply], dict[str, Any]]


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    schema: dict[str, Any]
    plan: Callable[[dict[str, Any]], Call]
    shape: Shape
    mutating: bool = False


# Ids that go into a gateway path: letters, digits and `._:@-[]` (job ids of workflow children are
# `<run>:<step>[i]@n`), never `/`, `%` or a leading dot, so no id can be read as another route
# (`abc/timeline`, `..`, or a `%2F` the gateway's router decodes back to `/`).
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@\[\]-]{0,255}")


def _valid_id(value: str, what: str) -> str:
    if not _ID.fullmatch(value):
        raise ArgumentError(f"{what} {value!r} is not a valid id: letters, digits and ._:@-[] only, "
                            "starting with a letter or digit")
    return value


def _seg(value: str) -> str:
    """A checked id as one path segment."""
    return quote(value, safe="")


# ---- argument readers ---------------------------------------------------------------------------


def _check_names(args: Mapping[str, Any], schema: Mapping[str, Any]) -> None:
    unknown = sorted(set(args) - set(schema["properties"]))
    if unknown:
        raise ArgumentError(f"unknown argument(s) {', '.join(unknown)}; expected {', '.join(schema['properties'])}")


def _str(args: Mapping[str, Any], name: str, *, required: bool = False, max_len: int = 256) -> str:
    value = args.get(name)
    if value is None:
        value = ""
    if not isinstance(value, str):
        raise ArgumentError(f"{name} must be a string")
    value = value.strip()
    if required and not value:
        raise ArgumentError(f"{name} is required")
    if len(value) > max_len:
        raise ArgumentError(f"{name} must be at most {max_len} characters")
    return value


def _str_list(args: Mapping[str, Any], name: str) -> list[str]:
    value = args.get(name)
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ArgumentError(f"{name} must be a list of strings")
    return [v.strip() for v in value if v.strip()]


def _str_map(args: Mapping[str, Any], name: str) -> dict[str, str]:
    value = args.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise ArgumentError(f"{name} must be an object of strings")
    return dict(value)


def _id(args: Mapping[str, Any], name: str) -> str:
    """A required id argument that becomes a path segment."""
    return _valid_id(_str(args, name, required=True), name)


def _bool(args: Mapping[str, Any], name: str) -> bool:
    value = args.get(name, False)
    if not isinstance(value, bool):
        raise ArgumentError(f"{name} must be true or false")
    return value


def _int(args: Mapping[str, Any], name: str, default: int, high: int) -> int:
    value = args.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= high:
        raise ArgumentError(f"{name} must be an integer between 1 and {high}")
    return value


PRIORITIES = ("low", "normal", "high", "critical")
# The gateway's classes: interactive (default), batch, critical.
GATEWAY_PRIORITY = {"low": "batch", "normal": "interactive", "high": "interactive", "critical": "critical"}


def _priority(args: Mapping[str, Any]) -> str:
    value = _str(args, "priority").lower() or "normal"
    if value not in PRIORITIES:
        raise ArgumentError(f"priority must be one of {', '.join(PRIORITIES)}")
    return GATEWAY_PRIORITY[value]


# ---- schemas ------------------------------------------------------------------------------------

S = {"type": "string"}
STRINGS = {"type": "array", "items": {"type": "string"}}
STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}


def _schema(required: tuple[str, ...] = (), **props: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "object", "properties": props, "additionalProperties": False}
    if required:
        out["required"] = list(required)
    return out


def _described(schema: Mapping[str, Any], text: str, **extra: Any) -> dict[str, Any]:
    return {**schema, "description": text, **extra}


LIST_MAX = 500
ID_SCHEMA = _schema(("id",), id=_described(S, "The id (job_id for jobs, run_id for runs)."))


def _list_schema(filters: Mapping[str, str]) -> dict[str, Any]:
    props: dict[str, Any] = {
        "cursor": _described(S, "next_cursor of the previous page; empty for the first page."),
        "page_size": {"type": "integer", "minimum": 1, "maximum": LIST_MAX, "default": 50,
                      "description": f"Records per page (default 50, at most {LIST_MAX})."},
    }
    if filters:
        props["filter"] = {"type": "object", "description": "Filters: " + "; ".join(f"{k}: {v}" for k, v in filters.items()),
                           "properties": {k: S for k in filters}, "additionalProperties": False}
    return _schema(**props)


def _page(args: Mapping[str, Any], filters: Mapping[str, str], renamed: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The gateway query of a list envelope: limit, cursor and the filters (renamed to the gateway's)."""
    given = args.get("filter") or {}
    if not isinstance(given, dict) or not all(isinstance(v, str) for v in given.values()):
        raise ArgumentError("filter must be an object of strings")
    unknown = sorted(set(given) - set(filters))
    if unknown:
        allowed = ", ".join(filters) or "none"
        raise ArgumentError(f"unknown filter(s) {', '.join(unknown)}; allowed: {allowed}")
    query: dict[str, Any] = {"limit": _int(args, "page_size", 50, LIST_MAX), "cursor": _str(args, "cursor", max_len=512)}
    for name, value in given.items():
        if value.strip():
            query[(renamed or {}).get(name, name)] = value.strip()
    return query


# ---- result shapes ------------------------------------------------------------------------------


def _body(_args: dict[str, Any], reply: Reply) -> dict[str, Any]:
    return reply.body if isinstance(reply.body, dict) else {"result": reply.body}


def listing(_args: dict[str, Any], reply: Reply) -> dict[str, Any]:
    """A gateway page (`{items, next_cursor}`, or a bare array with `X-Next-Cursor`) as `{items, next_cursor}`."""
    if isinstance(reply.body, list):
        return {"items": reply.body, "next_cursor": _header(reply.headers, "X-Next-Cursor") or None}
    body = reply.body if isinstance(reply.body, dict) else {}
    return {"items": body.get("items", []), "next_cursor": body.get("next_cursor") or None}


def _header(headers: Mapping[str, str], name: str) -> str:
    for key, value in headers.items():
        if key.lower() == name.lower():
            return value
    return ""


# ---- tools --------------------------------------------------------------------------------------

SUBMIT_SCHEMA = _schema(
    ("prompt",),
    prompt=_described(S, "Prompt text for the job."),
    topic=_described(S, "Job topic (job.<segment>...).", default="job.default"),
    priority={**S, "enum": list(PRIORITIES), "default": "normal", "description": "Priority class."},
    capability=_described(S, "Capability label for policy evaluation."),
    risk_tags=_described(STRINGS, "Risk tags for policy evaluation."),
    labels=_described(STRING_MAP, "Labels for policy and routing."),
    memory_id=_described(S, "Memory id the job's context is bound to."),
    pack_id=_described(S, "Pack the job belongs to (recorded as the label pack_id)."),
    idempotency_key=_described(S, "A repeat with the same key returns the first job instead of a new one."),
)


def _plan_submit(args: dict[str, Any]) -> Call:
    labels = _str_map(args, "labels")
    pack = _str(args, "pack_id")
    if pack:
        labels["pack_id"] = pack
    body: dict[str, Any] = {"prompt": _str(args, "prompt", required=True, max_len=50_000),
                            "topic": _str(args, "topic") or "job.default", "priority": _priority(args)}
    for name in ("capability", "memory_id", "idempotency_key"):
        if value := _str(args, name):
            body[name] = value
    if tags := _str_list(args, "risk_tags"):
        body["risk_tags"] = tags
    if labels:
        body["labels"] = labels
    return Call("POST", "/api/v1/jobs", body=body)


def _shape_submit(_args: dict[str, Any], reply: Reply) -> dict[str, Any]:
    body = reply.body or {}
    return {"job_id": body.get("job_id"), "trace_id": body.get("trace_id"), "status": body.get("status") or "pending",
            **({"reason": body["reason"]} if body.get("reason") else {})}


def _plan_cancel(args: dict[str, Any]) -> Call:
    body = {"reason": reason} if (reason := _str(args, "reason", max_len=2000)) else {}
    return Call("POST", f"/api/v1/jobs/{_seg(_id(args, 'job_id'))}/cancel", body=body)


def _plan_approval(action: str) -> Callable[[dict[str, Any]], Call]:
    def plan(args: dict[str, Any]) -> Call:
        job_id = _id(args, "job_id")
        if action == "approve":
            body = {"note": note} if (note := _str(args, "note", max_len=2000)) else {}
        else:
            body = {"reason": _str(args, "reason", required=True, max_len=2000)}
        return Call("POST", f"/api/v1/approvals/{_seg(job_id)}/{action}", body=body)

    return plan


def _with_job_id(key: str) -> Shape:
    def shape(args: dict[str, Any], reply: Reply) -> dict[str, Any]:
        body = reply.body if isinstance(reply.body, dict) else {}
        return {key: True, "job_id": args["job_id"].strip(), **body}

    return shape


def _shape_cancel(args: dict[str, Any], reply: Reply) -> dict[str, Any]:
    """A job that had already finished is left as it was: `cancelled` says which happened."""
    body = reply.body if isinstance(reply.body, dict) else {}
    return {"cancelled": body.get("state") == "CANCELLED", "job_id": args["job_id"].strip(), **body}


TRIGGER_SCHEMA = _schema(
    ("workflow_id",),
    workflow_id=_described(S, "The workflow to run."),
    input={"type": "object", "description": "The run's input (checked against the workflow's input_schema)."},
    dry_run={"type": "boolean", "default": False, "description": "Plan the run without running its jobs."},
    idempotency_key=_described(S, "A repeat with the same key returns the first run."),
)


def _plan_trigger(args: dict[str, Any]) -> Call:
    run_input = args.get("input")
    if run_input is None:
        run_input = {}
    if not isinstance(run_input, dict):
        raise ArgumentError("input must be an object")
    headers = {"Idempotency-Key": key} if (key := _str(args, "idempotency_key")) else {}
    query = {"dry_run": "true"} if _bool(args, "dry_run") else {}
    workflow_id = _id(args, "workflow_id")
    return Call("POST", f"/api/v1/workflows/{_seg(workflow_id)}/runs", query=query, body=run_input, headers=headers)


def _shape_trigger(args: dict[str, Any], reply: Reply) -> dict[str, Any]:
    return {"run_id": (reply.body or {}).get("run_id"), "workflow_id": args["workflow_id"].strip(), "status": "pending",
            "dry_run": bool(args.get("dry_run"))}


POLICY_SCHEMA = _schema(
    ("topic",),
    topic=_described(S, "Topic to evaluate."),
    priority={**S, "enum": list(PRIORITIES), "default": "normal", "description": "Priority class."},
    capability=_described(S, "Capability label."),
    risk_tags=_described(STRINGS, "Risk tags."),
    labels=_described(STRING_MAP, "Labels."),
)


def _plan_policy(args: dict[str, Any]) -> Call:
    _priority(args)  # validated; the gateway's evaluation does not take it
    body: dict[str, Any] = {"topic": _str(args, "topic", required=True)}
    if capability := _str(args, "capability"):
        body["capability"] = capability
    if tags := _str_list(args, "risk_tags"):
        body["risk_tags"] = tags
    if labels := _str_map(args, "labels"):
        body["labels"] = labels
    return Call("POST", "/api/v1/policy/evaluate", body=body)


def decision_name(raw: str) -> str:
    """`DECISION_TYPE_REQUIRE_HUMAN` → `require_approval`, `DECISION_TYPE_ALLOW` → `allow`, ..."""
    name = raw.lower().removeprefix("decision_type_")
    return "require_approval" if name == "require_human" else name or "unspecified"


def _shape_policy(_args: dict[str, Any], reply: Reply) -> dict[str, Any]:
    body = reply.body if isinstance(reply.body, dict) else {}
    out = {"decision": decision_name(str(body.get("decision", ""))), "reason": body.get("reason", ""),
           "rule_id": body.get("ruleId", ""), "policy_snapshot": body.get("policySnapshot", "")}
    for src, dst in (("constraints", "constraints"), ("remediations", "remediations"), ("approvalRef", "approval_ref")):
        if body.get(src):
            out[dst] = body[src]
    return out


def _plan_get(path: str) -> Callable[[dict[str, Any]], Call]:
    def plan(args: dict[str, Any]) -> Call:
        return Call("GET", path.format(id=_seg(_id(args, "id"))))

    return plan


def _plan_list(path: str, filters: Mapping[str, str], renamed: Mapping[str, str] | None = None,
               paged: bool = True) -> Callable[[dict[str, Any]], Call]:
    def plan(args: dict[str, Any]) -> Call:
        query = _page(args, filters, renamed)
        if not paged:
            if query.pop("cursor"):
                raise ArgumentError("this listing has one page: leave cursor empty")
            query.pop("limit")
        return Call("GET", path, query=query)

    return plan


def _shape_timeline(args: dict[str, Any], reply: Reply) -> dict[str, Any]:
    return {"run_id": args["id"].strip(), "items": reply.body if isinstance(reply.body, list) else []}


def _shape_workers(args: dict[str, Any], reply: Reply) -> dict[str, Any]:
    items = (reply.body or {}).get("items", []) if isinstance(reply.body, dict) else []
    return {"items": items[: _int(args, "page_size", 50, LIST_MAX)], "total": len(items)}


JOB_FILTERS = {"state": "job state, e.g. SUCCEEDED, APPROVAL_REQUIRED", "topic": "job topic"}
RUN_FILTERS = {"workflow_id": "runs of one workflow", "status": "run status, e.g. running, succeeded"}


def _tools() -> dict[str, Tool]:
    job_id = _described(S, "The job's id.")
    tools = [
        Tool("cordum_submit_job", "Submit a job to Cordum. It passes the safety policy first: the answer's status is "
             "pending (queued for a worker) or approval_required (held until a person approves it).",
             SUBMIT_SCHEMA, _plan_submit, _shape_submit, mutating=True),
        Tool("cordum_get_job", "Fetch one job by id: state, topic, safety decision, result pointer, context.",
             ID_SCHEMA, _plan_get("/api/v1/jobs/{id}"), _body),
        Tool("cordum_list_jobs", "List the tenant's jobs, most recently updated first.",
             _list_schema(JOB_FILTERS), _plan_list("/api/v1/jobs", JOB_FILTERS), listing),
        Tool("cordum_cancel_job", "Cancel a pending or running job (a finished job is left as it is).",
             _schema(("job_id",), job_id=job_id, reason=_described(S, "Why (kept for the audit trail).")),
             _plan_cancel, _shape_cancel, mutating=True),
        Tool("cordum_list_pending_approvals", "List the jobs waiting for a person's approval.",
             _list_schema({}), _plan_list("/api/v1/approvals", {}), listing),
        Tool("cordum_approve_job", "Approve a job held for approval; it is then dispatched. Nobody approves "
             "what they submitted with their own key.",
             _schema(("job_id",), job_id=job_id, note=_described(S, "Approval note.")),
             _plan_approval("approve"), _with_job_id("approved"), mutating=True),
        Tool("cordum_reject_job", "Reject a job held for approval; it ends DENIED.",
             _schema(("job_id", "reason"), job_id=job_id, reason=_described(S, "Why it is rejected.")),
             _plan_approval("reject"), _with_job_id("rejected"), mutating=True),
        Tool("cordum_trigger_workflow", "Start a run of a workflow with an input object.",
             TRIGGER_SCHEMA, _plan_trigger, _shape_trigger, mutating=True),
        Tool("cordum_get_run", "Fetch one workflow run by id: status, steps, output, timers.",
             ID_SCHEMA, _plan_get("/api/v1/workflow-runs/{id}"), _body),
        Tool("cordum_list_runs", "List the tenant's workflow runs, newest first.",
             _list_schema(RUN_FILTERS), _plan_list("/api/v1/workflow-runs", RUN_FILTERS), listing),
        Tool("cordum_run_timeline", "The ordered events of a workflow run (steps started, finished, waiting).",
             ID_SCHEMA, _plan_get("/api/v1/workflow-runs/{id}/timeline"), _shape_timeline),
        Tool("cordum_list_workflows", "List the tenant's workflow definitions.",
             _list_schema({}), _plan_list("/api/v1/workflows", {}), listing),
        Tool("cordum_list_workers", "List the workers that have announced themselves: pool, capacity, "
             "heartbeat age, online.", _list_schema({}), _plan_list("/api/v1/workers", {}, paged=False), _shape_workers),
        Tool("cordum_status", "Platform status: NATS and Redis, workers, the tenant's jobs by state, and "
             "(admin keys) the replicas of every service.", _schema(), lambda args: Call("GET", "/api/v1/status"), _body),
        Tool("cordum_query_policy", "Evaluate the safety policy for a topic without submitting a job.",
             POLICY_SCHEMA, _plan_policy, _shape_policy),
    ]
    return {tool.name: tool for tool in tools}


TOOLS: dict[str, Tool] = _tools()
MUTATING = frozenset(name for name, tool in TOOLS.items() if tool.mutating)
# Tools of the original with no backend here yet: the reason is the error a call gets.
UNAVAILABLE: dict[str, str] = {
    **{name: "this Cordum has no pack registry yet" for name in (
        "cordum_list_packs", "cordum_install_pack", "cordum_uninstall_pack")},
    **{name: "this Cordum has no audit chain yet" for name in ("cordum_audit_query", "cordum_audit_verify")},
    **{name: "this Cordum has no agent registry yet" for name in (
        "cordum_list_agents", "cordum_register_agent", "cordum_set_agent_scope")},
    "cordum_list_topics": "this Cordum has no topic registry yet (topics are free-form job.<segment>...)",
    "cordum_create_workflow": "create workflows with cordumctl workflow create or POST /api/v1/workflows",
    "cordum_update_policy_bundle": "the safety policy is a file of the safety kernel (SAFETY_POLICY_PATH)",
    "cordum_revoke_worker_session": "this Cordum has no worker sessions to revoke",
}


def plan_tool(name: str, args: Mapping[str, Any] | None) -> tuple[Tool, dict[str, Any], Call]:
    """The tool, its arguments and its gateway call; ArgumentError names a bad argument."""
    tool = TOOLS[name]
    given = dict(args or {})
    _check_names(given, tool.schema)
    return tool, given, tool.plan(given)


def result_text(structured: Mapping[str, Any]) -> str:
    return json.dumps(structured, separators=(",", ":"), default=str)


# ---- resources ----------------------------------------------------------------------------------

RESOURCES = [  # (uri, name, description)
    ("cordum://health", "health", "The gateway's health: NATS and Redis reachability."),
    ("cordum://jobs", "jobs", "The tenant's 20 most recently updated jobs."),
]
TEMPLATES = [  # (uri template, name, description)
    ("cordum://jobs/{id}", "job", "One job by id."),
    ("cordum://jobs{?status,limit,cursor}", "jobs-page", "A page of jobs (limit 20 by default, at most 100)."),
    ("cordum://workflows/{id}/runs{?limit}", "workflow-runs", "Runs of a workflow (limit 10 by default, at most 100)."),
    ("cordum://workflows/{id}/runs/{runId}", "workflow-run", "One run of a workflow."),
]
UNAVAILABLE_RESOURCES = {
    "policies": "cordum://policies is not available: this gateway does not list policy bundles yet "
                "(use the cordum_query_policy tool to evaluate a topic)",
    "audit": "cordum://audit is not available: this Cordum has no audit chain yet",
}


@dataclass(frozen=True)
class Read:
    """What a resource URI reads: the gateway call, and the workflow its run must belong to."""

    call: Call
    workflow_id: str = ""


class Unavailable(LookupError):
    """A resource or tool of the original this Cordum has no backend for."""


def _limit(params: Mapping[str, list[str]], default: int) -> int:
    raw = (params.get("limit") or [""])[-1]
    if not raw:
        return default
    if not raw.isdigit() or not 1 <= int(raw) <= 100:
        raise ArgumentError("limit must be an integer between 1 and 100")
    return int(raw)


def plan_resource(uri: str) -> Read:
    """The gateway call of a `cordum://` URI; ArgumentError for a malformed one, Unavailable for one
    without a backend."""
    parts = urlsplit(uri)
    if parts.scheme != "cordum":
        raise ArgumentError(f"{uri!r} is not a cordum:// URI")
    params = parse_qs(parts.query, keep_blank_values=True)
    segments = [s for s in (parts.netloc + parts.path).split("/") if s]
    if not segments:
        raise ArgumentError(f"{uri!r} names no resource")
    head, rest = segments[0], segments[1:]
    if head in UNAVAILABLE_RESOURCES and not rest:
        raise Unavailable(UNAVAILABLE_RESOURCES[head])
    if head == "health" and not rest:
        return Read(Call("GET", "/health"))
    if head == "jobs" and not rest:
        unknown = sorted(set(params) - {"status", "limit", "cursor"})
        if unknown:
            raise ArgumentError(f"unknown parameter(s) {', '.join(unknown)}; allowed: status, limit, cursor")
        query = {"limit": _limit(params, 20), "cursor": (params.get("cursor") or [""])[-1],
                 "state": (params.get("status") or [""])[-1].upper()}
        return Read(Call("GET", "/api/v1/jobs", query=query))
    if head == "jobs" and len(rest) == 1:
        return Read(Call("GET", f"/api/v1/jobs/{_seg(_valid_id(rest[0], 'job id'))}"))
    if head == "workflows" and len(rest) >= 2 and rest[1] == "runs":
        workflow_id = _valid_id(rest[0], "workflow id")
        if len(rest) == 2:
            query = {"limit": _limit(params, 10)}
            return Read(Call("GET", f"/api/v1/workflows/{_seg(workflow_id)}/runs", query=query))
        if len(rest) == 3:
            run_id = _valid_id(rest[2], "run id")
            return Read(Call("GET", f"/api/v1/workflow-runs/{_seg(run_id)}"), workflow_id=workflow_id)
    raise ArgumentError(f"unknown resource {uri!r}")
