"""cordum-mcp's pure parts: the tool and resource catalog (argument checks, the gateway call each
makes, result shapes), its configuration, reading a request's credential, and the id of a
too-long stdio message."""

from __future__ import annotations

import pytest

from cordum.infra.config import ConfigError, load_settings
from cordum.mcp import catalog
from cordum.mcp.catalog import ArgumentError, Reply, Unavailable, plan_resource, plan_tool
from cordum.mcp.config import load_config
from cordum.mcp.http import credential_from
from cordum.mcp.stdio import leading_id

CORE = {"cordum_submit_job", "cordum_get_job", "cordum_list_jobs", "cordum_cancel_job",
        "cordum_list_pending_approvals", "cordum_approve_job", "cordum_reject_job", "cordum_trigger_workflow",
        "cordum_get_run", "cordum_list_runs", "cordum_run_timeline", "cordum_list_workflows",
        "cordum_list_workers", "cordum_status", "cordum_query_policy"}


def test_core_tools_have_the_spec_names_and_mutating_ones_are_marked() -> None:
    assert set(catalog.TOOLS) == CORE
    assert catalog.MUTATING == {"cordum_submit_job", "cordum_cancel_job", "cordum_approve_job",
                                "cordum_reject_job", "cordum_trigger_workflow"}
    assert not set(catalog.UNAVAILABLE) & CORE
    for tool in catalog.TOOLS.values():
        assert tool.schema["type"] == "object" and tool.schema["additionalProperties"] is False


def test_submit_maps_priority_and_pack_and_requires_a_prompt() -> None:
    _, _, call = plan_tool("cordum_submit_job", {"prompt": " hi ", "priority": "low", "pack_id": "p1",
                                                 "labels": {"team": "a"}, "risk_tags": ["pii"]})
    assert (call.method, call.path) == ("POST", "/api/v1/jobs")
    assert call.body == {"prompt": "hi", "topic": "job.default", "priority": "batch", "risk_tags": ["pii"],
                         "labels": {"team": "a", "pack_id": "p1"}}
    assert plan_tool("cordum_submit_job", {"prompt": "x", "priority": "critical"})[2].body["priority"] == "critical"
    for bad, message in (({}, "prompt is required"), ({"prompt": "x", "priority": "urgent"}, "priority must be one of"),
                         ({"prompt": "x", "labels": {"a": 1}}, "labels must be an object of strings"),
                         ({"prompt": "x", "tenant_id": "acme"}, "unknown argument(s) tenant_id")):
        with pytest.raises(ArgumentError, match=message.replace("(", r"\(").replace(")", r"\)")):
            plan_tool("cordum_submit_job", bad)


def test_ids_are_one_path_segment() -> None:
    _, _, call = plan_tool("cordum_approve_job", {"job_id": "run:ask@1", "note": "ok"})
    assert (call.path, call.body) == ("/api/v1/approvals/run%3Aask%401/approve", {"note": "ok"})
    # a workflow child's job id keeps its brackets, quoted
    assert plan_tool("cordum_get_job", {"id": "r1:loop[0]@1"})[2].path == "/api/v1/jobs/r1%3Aloop%5B0%5D%401"
    assert plan_resource("cordum://jobs/r1:loop[0]@1").call.path == "/api/v1/jobs/r1%3Aloop%5B0%5D%401"
    with pytest.raises(ArgumentError, match="reason is required"):
        plan_tool("cordum_reject_job", {"job_id": "j"})


def test_tool_ids_that_could_reach_another_route_are_refused_naming_the_argument() -> None:
    cases = [("cordum_get_run", "id", "abc/timeline"), ("cordum_get_job", "id", "../approvals"),
             ("cordum_get_job", "id", ".."), ("cordum_run_timeline", "id", "r%2F..%2Fx"),
             ("cordum_cancel_job", "job_id", "j/../../workflows"), ("cordum_approve_job", "job_id", "j?x=1"),
             ("cordum_reject_job", "job_id", "j#frag"), ("cordum_trigger_workflow", "workflow_id", "wf/runs"),
             ("cordum_get_job", "id", "j\nx"), ("cordum_get_job", "id", "j x")]
    for tool, name, value in cases:
        args = {name: value, **({"reason": "r"} if tool == "cordum_reject_job" else {})}
        with pytest.raises(ArgumentError) as refused:
            plan_tool(tool, args)
        assert str(refused.value).startswith(f"{name} {value!r} is not a valid id"), (tool, str(refused.value))
    for uri in ("cordum://jobs/..", "cordum://jobs/a%2Fb", "cordum://workflows/wf/runs/r%2F..%2Fx"):
        with pytest.raises(ArgumentError, match="is not a valid id"):
            plan_resource(uri)


def test_trigger_workflow_sends_input_dry_run_and_idempotency_key() -> None:
    _, args, call = plan_tool("cordum_trigger_workflow", {"workflow_id": "wf", "input": {"a": 1}, "dry_run": True,
                                                          "idempotency_key": "k1"})
    assert (call.path, call.body, dict(call.query), dict(call.headers)) == \
        ("/api/v1/workflows/wf/runs", {"a": 1}, {"dry_run": "true"}, {"Idempotency-Key": "k1"})
    shaped = catalog.TOOLS["cordum_trigger_workflow"].shape(args, Reply({"run_id": "r1"}))
    assert shaped == {"run_id": "r1", "workflow_id": "wf", "status": "pending", "dry_run": True}
    with pytest.raises(ArgumentError, match="input must be an object"):
        plan_tool("cordum_trigger_workflow", {"workflow_id": "wf", "input": [1]})


def test_list_envelope_filters_and_pages() -> None:
    _, _, call = plan_tool("cordum_list_jobs", {"page_size": 5, "cursor": "17", "filter": {"state": "SUCCEEDED"}})
    assert dict(call.query) == {"limit": 5, "cursor": "17", "state": "SUCCEEDED"}
    with pytest.raises(ArgumentError, match="unknown filter"):
        plan_tool("cordum_list_jobs", {"filter": {"tenant": "acme"}})
    with pytest.raises(ArgumentError, match="between 1 and 500"):
        plan_tool("cordum_list_runs", {"page_size": 501})
    # a bare array with the cursor in a header becomes {items, next_cursor}
    page = catalog.listing({}, Reply([{"id": "wf"}], {"x-next-cursor": "c2"}))
    assert page == {"items": [{"id": "wf"}], "next_cursor": "c2"}


def test_cancel_says_whether_it_cancelled() -> None:
    shape = catalog.TOOLS["cordum_cancel_job"].shape
    assert shape({"job_id": "j"}, Reply({"id": "j", "state": "CANCELLED"}))["cancelled"] is True
    done = shape({"job_id": "j"}, Reply({"id": "j", "state": "SUCCEEDED", "reason": "job already terminal"}))
    assert done["cancelled"] is False and done["state"] == "SUCCEEDED"


def test_policy_decisions_are_named_as_the_spec_does() -> None:
    shaped = catalog.TOOLS["cordum_query_policy"].shape(
        {}, Reply({"decision": "DECISION_TYPE_REQUIRE_HUMAN", "reason": "ask", "ruleId": "r"}))
    assert (shaped["decision"], shaped["reason"], shaped["rule_id"]) == ("require_approval", "ask", "r")
    assert catalog.decision_name("DECISION_TYPE_ALLOW") == "allow"


def test_resource_uris() -> None:
    assert plan_resource("cordum://jobs/j-1").call.path == "/api/v1/jobs/j-1"
    jobs = plan_resource("cordum://jobs?status=running&limit=5").call
    assert (jobs.path, dict(jobs.query)) == ("/api/v1/jobs", {"limit": 5, "cursor": "", "state": "RUNNING"})
    assert dict(plan_resource("cordum://jobs").call.query)["limit"] == 20
    runs = plan_resource("cordum://workflows/wf/runs").call
    assert (runs.path, dict(runs.query)) == ("/api/v1/workflows/wf/runs", {"limit": 10})
    run = plan_resource("cordum://workflows/wf/runs/r1")
    assert (run.call.path, run.workflow_id) == ("/api/v1/workflow-runs/r1", "wf")
    assert plan_resource("cordum://health").call.path == "/health"
    for uri, error in (("cordum://jobs?limit=101", ArgumentError), ("cordum://jobs?tenant=x", ArgumentError),
                       ("cordum://nothing", ArgumentError), ("https://jobs/1", ArgumentError),
                       ("cordum://policies", Unavailable), ("cordum://audit", Unavailable)):
        with pytest.raises(error):
            plan_resource(uri)


def _config(argv=(), **env: str):
    return load_config(load_settings(env), argv)


def test_config_flags_win_and_read_only_switches_mutating_tools_off() -> None:
    config = _config(["--addr", "gw:9000", "--request-timeout", "2s"], CORDUM_GATEWAY_ADDR="http://other:1",
                     CORDUM_API_KEY="secret-key-0123456789", CORDUM_TENANT_ID="acme")
    assert (config.gateway, config.request_timeout, config.tenant) == ("http://gw:9000", 2.0, "acme")
    assert "secret" not in repr(config)
    assert all(config.enabled(name) for name in CORE)
    read_only = _config(CORDUM_MCP_READ_ONLY="true", CORDUM_MCP_DISABLED_TOOLS="cordum_status")
    assert {name for name in CORE if not read_only.enabled(name)} == catalog.MUTATING | {"cordum_status"}
    for argv, env, named in (([], {"CORDUM_MCP_DISABLED_TOOLS": "cordum_nope"}, "CORDUM_MCP_DISABLED_TOOLS"),
                             (["--addr", "ftp://x"], {}, "--addr"),
                             ([], {"CORDUM_MCP_REQUEST_TIMEOUT": "0"}, "CORDUM_MCP_REQUEST_TIMEOUT"),
                             ([], {"MCP_HTTP_ADDR": "nope"}, "MCP_HTTP_ADDR")):
        with pytest.raises(ConfigError, match=named):
            _config(argv, **env)


def test_credential_from_bearer_or_api_key_header() -> None:
    assert credential_from([(b"Authorization", b"Bearer abc"), (b"x-tenant-id", b"acme")]) == ("abc", "acme")
    assert credential_from([(b"x-api-key", b" k2 ")]) == ("k2", "")
    assert credential_from([(b"authorization", b"Basic zzz")]) == ("", "")


def test_the_id_of_a_too_long_message_is_read_from_its_start_only_when_unambiguous() -> None:
    pad = b'"params":{"pad":"' + b"x" * 2000
    assert leading_id(b'{"jsonrpc":"2.0","id":7,"method":"tools/call",' + pad) == 7
    assert leading_id(b'{ "method" : "ping", "jsonrpc": "2.0", "id": "req-1" ,' + pad) == "req-1"
    assert leading_id(b'{"id":-3}') == -3
    # the id is not among the leading members, or not a plain value: null, never a guess
    assert leading_id(b'{"jsonrpc":"2.0",' + pad) is None
    assert leading_id(b'{"params":{"id":5},"id":6') is None
    assert leading_id(b'{"jsonrpc":"2.0","id":1.5,') is None
    assert leading_id(b'{"jsonrpc":"2.0","id":"a\\"b",') is None
    assert leading_id(b'{"jsonrpc":"2.0","id":12') is None  # cut inside the number
    assert leading_id(b"") is None and leading_id(b"[1,2]") is None
