"""cordum-api-gateway against the real Redis and NATS servers and a real gRPC safety kernel
(in process, evaluating a real policy with the pure policy modules), over real HTTP on hypercorn.

The gateway runs in the test's nursery (`serve`); one test runs it as a process for the shutdown
order. Every request goes through a socket with http.client (in a worker thread)."""

from __future__ import annotations

import http.client
import json
import signal
import threading
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio

from cordum.agent.v1 import job_pb2, safety_grpc, safety_pb2
from cordum.agent.v1.heartbeat_pb2 import Heartbeat
from cordum.dev.servers import free_port
from cordum.gateway.auth import KEY_SUBPROTOCOL, load_keyring
from cordum.gateway.context import SERVICE
from cordum.gateway.dlq import write_dlq_entry
from cordum.gateway.service import STAGES, serve
from cordum.gateway.stream import StreamHub
from cordum.infra.config import ConfigError, load_settings
from cordum.infra.grpc import GrpcServer
from cordum.protocol import subjects
from cordum.protocol.packets import decode, encode, new_packet
from cordum.runtime.instances import instance_key, list_instances, serve_registration
from cordum.runtime.lifecycle import Lifecycle
from cordum.safety.evaluate import check_input_from_proto, decision_to_proto, evaluate
from cordum.safety.policy import parse_policy
from cordum.store import keys
from cordum.store.dlq import dlq_packet
from cordum.store.workers import write_snapshot
from tests.conftest import unique

ADMIN = "admin-key-0123456789abcdef"
ALICE = "alice-key-0123456789abcdef"  # operator, tenant default
BOB = "bob-key-0123456789abcdef00"  # operator, tenant default
VIEWER = "viewer-key-0123456789abcdef"
ACME = "acme-key-0123456789abcdef00"  # operator, tenant acme
CAROL = "carol-key-0123456789abcdef0"  # operator, tenant default, no principal_id
NOROLE = "norole-key-0123456789abcdef"  # no role given: viewer
ACME_ADMIN = "acme-admin-key-0123456789ab"  # admin, tenant acme
AGENT = "agent-key-0123456789abcdef00"  # operator, tenant default, bound to actor agent-7 (service)

POLICY = """\
version: "gw-test"
default_decision: deny
rules:
  - id: slow-bulk
    match: {capabilities: [bulk.export]}
    decision: throttle
    retry_after: 30
  - id: allow-default
    match: {topics: ["job.default", "job.default.*"]}
    decision: allow
    reason: default topic is open
  - id: deny-vault
    match: {topics: ["job.vault.*"]}
    decision: deny
    reason: vault jobs are never allowed
  - id: deploys-need-approval
    match: {topics: ["job.deploy.*"]}
    decision: require_approval
    reason: a person approves deploys
"""


class PolicyKernel:
    """A real SafetyKernel servicer: the pure evaluator over a parsed policy."""

    def __init__(self, text: str) -> None:
        self.policy = parse_policy(text, "test-policy")
        self.calls = 0

    async def Evaluate(self, req: safety_pb2.PolicyCheckRequest) -> safety_pb2.PolicyCheckResponse:
        self.calls += 1
        decision = evaluate(self.policy, check_input_from_proto(req))
        return decision_to_proto(decision, self.policy, job_id=req.job_id)

    Check = Explain = Simulate = Evaluate

    async def ListSnapshots(self, req: safety_pb2.ListSnapshotsRequest) -> safety_pb2.ListSnapshotsResponse:
        return safety_pb2.ListSnapshotsResponse(snapshots=[self.policy.snapshot])


@dataclass
class Reply:
    status: int
    headers: Any
    raw: bytes

    @property
    def body(self) -> Any:
        return json.loads(self.raw) if self.raw else None


def _request(port: int, method: str, path: str, body: bytes | None, headers: dict[str, str]) -> Reply:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        return Reply(resp.status, resp.headers, resp.read())
    finally:
        conn.close()


class Api:
    def __init__(self, gw: Any) -> None:
        self.gw = gw
        self.port = gw.http_port

    async def call(self, method: str, path: str, body: Any = None, *, key: str | None = ADMIN,
                   raw: bytes | None = None, headers: dict[str, str] | None = None) -> Reply:
        sent = dict(headers or {})
        if key is not None:
            sent["X-API-Key"] = key
        data = raw
        if data is None and body is not None:
            data = json.dumps(body).encode()
            sent.setdefault("Content-Type", "application/json")
        return await trio.to_thread.run_sync(_request, self.port, method, path, data, sent)

    async def submit(self, key: str = ADMIN, **body: Any) -> Reply:
        body.setdefault("prompt", "hello")
        return await self.call("POST", "/api/v1/jobs", body, key=key)

    async def job(self, job_id: str, key: str = ADMIN) -> dict:
        reply = await self.call("GET", f"/api/v1/jobs/{job_id}", key=key)
        assert reply.status == 200, reply.raw
        return reply.body


def _keys_file(tmp_path: Path) -> Path:
    path = tmp_path / "keys.yaml"
    path.write_text(
        f"- {{key: {ALICE}, tenant: default, role: operator, principal_id: alice}}\n"
        f"- {{key: {BOB}, tenant: default, role: operator, principal_id: bob}}\n"
        f"- {{key: {VIEWER}, tenant: default, role: viewer, principal_id: vic}}\n"
        f"- {{key: {ACME}, tenant: acme, role: operator, principal_id: ann}}\n"
        f"- {{key: {CAROL}, tenant: default, role: operator}}\n"
        f"- {{key: {NOROLE}, tenant: default, principal_id: nora}}\n"
        f"- {{key: {ACME_ADMIN}, tenant: acme, role: admin, principal_id: aaron}}\n"
        f"- {{key: {AGENT}, tenant: default, role: operator, principal_id: ops, actor_id: agent-7, actor_type: service}}\n"
    )
    return path


@pytest.fixture
async def kernel(nursery):
    servicer = PolicyKernel(POLICY)
    server = GrpcServer([(safety_grpc.SafetyKernelBase, servicer)])
    port = await nursery.start(server.serve, "127.0.0.1", 0)
    servicer.port = port
    return servicer


@pytest.fixture
def start_gateway(nursery, redis, server_env, tmp_path, kernel):
    keys_path = _keys_file(tmp_path)

    async def start(**env: str) -> Api:
        full = {**server_env, "CORDUM_INSTANCE_ID": unique("gw"), "CORDUM_API_KEY": ADMIN,
                "CORDUM_API_KEYS_PATH": str(keys_path), "GATEWAY_HTTP_ADDR": f"127.0.0.1:{free_port()}",
                "SAFETY_KERNEL_ADDR": f"127.0.0.1:{kernel.port}", **env}
        gw = await nursery.start(serve, load_settings(full), Lifecycle(SERVICE, STAGES))
        return Api(gw)

    return start


@pytest.fixture
async def api(start_gateway) -> Api:
    return await start_gateway()


async def _next_request(messages, job_id: str, timeout: float = 5.0):
    with trio.fail_after(timeout):
        async for msg in messages:
            packet = decode(msg.data)
            await msg.ack()
            if packet.WhichOneof("payload") == "job_request" and packet.job_request.job_id == job_id:
                return msg, packet
    raise AssertionError("stream ended")


async def _eventually(check, timeout: float = 5.0, interval: float = 0.05):
    with trio.fail_after(timeout):
        while True:
            result = await check()
            if result:
                return result
            await trio.sleep(interval)


# ---- submit ------------------------------------------------------------------------------------


async def test_submit_allowed_persists_and_publishes(api: Api, bus, redis) -> None:
    async with bus.consume(subjects.SUBMIT, unique("q")) as messages:
        reply = await api.submit(prompt="say hi", topic="job.default.echo", context={"n": 1},
                                 labels={"team": "a", "_internal": "x"}, priority="batch",
                                 capability="echo", risk_tags=["low"], max_output_tokens=99)
        assert reply.status == 200, reply.raw
        job_id, trace_id = reply.body["job_id"], reply.body["trace_id"]
        assert reply.headers["X-Trace-Id"] == trace_id
        msg, packet = await _next_request(messages, job_id)
    assert msg.headers["Nats-Msg-Id"] == f"jobreq:{job_id}"
    assert packet.sender_id == "api-gateway" and packet.trace_id == trace_id
    req = packet.job_request
    assert req.topic == "job.default.echo" and req.tenant_id == "default"
    assert req.context_ptr == f"redis://ctx:{job_id}" and req.env["tenant_id"] == "default"
    assert req.priority == job_pb2.JOB_PRIORITY_BATCH and req.budget.max_output_tokens == 99
    assert req.meta.capability == "echo" and list(req.meta.risk_tags) == ["low"]
    assert dict(req.labels) == {"team": "a", "_source": "api"}
    ctx = json.loads(await redis.get(keys.context(job_id)))
    assert ctx["prompt"] == "say hi" and ctx["context"] == {"n": 1} and ctx["tenant_id"] == "default"

    job = await api.job(job_id)
    assert job["id"] == job_id and job["state"] == "PENDING" and job["trace_id"] == trace_id
    assert job["tenant"] == "default" and job["topic"] == "job.default.echo"
    assert job["safety_decision"] == "ALLOW" and job["safety_rule_id"] == "allow-default"
    assert job["context"]["prompt"] == "say hi" and job["context_ptr"] == f"redis://ctx:{job_id}"
    assert job["submitted_by"] == "admin" and job["labels"]["team"] == "a"
    listed = (await api.call("GET", "/api/v1/jobs?state=PENDING&limit=10")).body
    assert [item["id"] for item in listed["items"]] == [job_id] and listed["next_cursor"] is None
    metrics = await trio.to_thread.run_sync(
        lambda: urllib.request.urlopen(f"http://127.0.0.1:{api.port}/metrics", timeout=5).read().decode())
    assert 'cordum_jobs_total{outcome="accepted"' in metrics
    assert 'route="/api/v1/jobs"' in metrics


def _chunked(port: int, path: str, body: bytes, headers: dict[str, str]) -> Reply:
    """A request whose body comes chunked (no Content-Length): the submit fast path leaves it to
    the Quart app, so the two ways of answering can be compared."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("POST", path, body=iter([body]), headers=headers, encode_chunked=True)
        resp = conn.getresponse()
        return Reply(resp.status, resp.headers, resp.read())
    finally:
        conn.close()


@pytest.mark.parametrize("case", ["accepted", "approval", "denied", "throttled", "bad_json", "not_object",
                                  "no_key", "bad_key", "viewer", "other_tenant", "odd_tenant", "invalid_topic"])
async def test_submit_answers_alike_on_the_fast_path_and_through_the_app(api: Api, case: str) -> None:
    body = {"accepted": {"prompt": "hi"}, "approval": {"prompt": "hi", "topic": "job.deploy.x"},
            "denied": {"prompt": "hi", "topic": "job.vault.read"},
            "throttled": {"prompt": "hi", "capability": "bulk.export"},
            "other_tenant": {"prompt": "hi"}, "invalid_topic": {"prompt": "hi", "topic": "not a topic"}}
    raw = {"bad_json": b'{"prompt": ', "not_object": b'["prompt"]'}.get(case) or json.dumps(
        body.get(case, {"prompt": "hi"})).encode()
    headers = {"Content-Type": "application/json", "X-API-Key": {"no_key": "", "bad_key": "nope" * 5,
                                                                   "viewer": VIEWER}.get(case, ALICE)}
    if case in ("other_tenant", "odd_tenant"):
        # é as UTF-8 bytes: a header is latin-1 to Quart (two characters here), so to us too
        headers["X-Tenant-ID"] = "acme" if case == "other_tenant" else "t\u00e9st".encode()  # type: ignore[assignment]
    if not headers["X-API-Key"]:
        del headers["X-API-Key"]
    fast = await api.call("POST", "/api/v1/jobs", raw=raw, key=None, headers=headers)
    app = await trio.to_thread.run_sync(_chunked, api.port, "/api/v1/jobs", raw, headers)
    assert fast.status == app.status, (fast.raw, app.raw)
    assert fast.headers["Content-Type"] == app.headers["Content-Type"] == "application/json"
    assert int(fast.headers["Content-Length"]) == len(fast.raw)
    assert sorted(k.lower() for k in fast.headers if k.lower() not in ("date",)) == \
        sorted(k.lower() for k in app.headers if k.lower() not in ("date", "transfer-encoding"))
    ids = ("job_id", "trace_id")  # each submit makes a job of its own
    same = {k: v for k, v in fast.body.items() if k not in ids}
    assert same == {k: v for k, v in app.body.items() if k not in ids}
    assert fast.headers.get("X-Trace-Id") == fast.body.get("trace_id")
    if "job_id" not in fast.body:  # nothing was made: the answers are the same bytes
        assert fast.raw == app.raw
    if case == "accepted":
        assert fast.status == 200 and fast.raw.endswith(b"\n") and b": " not in fast.raw  # Quart's compact JSON


async def test_submit_denied_goes_to_dlq(api: Api, redis) -> None:
    reply = await api.submit(topic="job.vault.read")
    assert reply.status == 403, reply.raw
    body = reply.body
    assert body["status"] == 403 and "vault" in body["error"] and body["job_id"] and body["trace_id"]
    job_id = body["job_id"]

    async def entry():
        items = (await api.call("GET", "/api/v1/dlq")).body["items"]
        return next((i for i in items if i["job_id"] == job_id), None)

    found = await _eventually(entry)
    assert found["reason_code"] == "policy_denied" and found["status"] == "JOB_STATUS_DENIED"
    assert found["topic"] == "job.vault.read" and found["last_state"] == "DENIED"
    decisions = (await api.call("GET", f"/api/v1/jobs/{job_id}/decisions")).body["items"]
    assert [(d["decision"], d["rule_id"]) for d in decisions] == [("DENY", "deny-vault")]
    job = await _eventually(lambda: _job_with_result(api, job_id))
    assert job["state"] == "DENIED" and job["error_code"] == "policy_denied"
    assert job["result"]["error"]["message"] == "vault jobs are never allowed"
    assert job["result_ptr"] == f"redis://res:{job_id}"


async def _job_with_result(api: Api, job_id: str):
    job = await api.job(job_id)
    return job if job.get("result") else None


async def test_submit_throttled_persists_nothing(api: Api) -> None:
    reply = await api.submit(capability="bulk.export")
    assert reply.status == 429 and reply.headers["Retry-After"] == "30"
    assert reply.body["status"] == 429
    assert (await api.call("GET", "/api/v1/jobs")).body["items"] == []


async def test_kernel_unavailable_denies_unless_fail_open(start_gateway) -> None:
    closed = await start_gateway(SAFETY_KERNEL_ADDR=f"127.0.0.1:{free_port()}")
    reply = await closed.submit()
    assert reply.status == 403 and reply.body["error"] == "policy check unavailable"
    opened = await start_gateway(SAFETY_KERNEL_ADDR=f"127.0.0.1:{free_port()}", POLICY_CHECK_FAIL_MODE="open")
    reply = await opened.submit()
    assert reply.status == 200, reply.raw


async def test_idempotency_key_returns_same_job(api: Api) -> None:
    first = await api.submit(idempotency_key="k-1")
    second = await api.submit(idempotency_key="k-1", prompt="different")
    assert first.status == second.status == 200
    assert first.body == second.body
    other_tenant = await api.submit(key=ACME, idempotency_key="k-1")
    assert other_tenant.body["job_id"] != first.body["job_id"]
    assert len((await api.call("GET", "/api/v1/jobs")).body["items"]) == 1


async def test_list_pages_with_cursor(api: Api) -> None:
    ids = [(await api.submit(topic=f"job.default.t{i}")).body["job_id"] for i in range(3)]
    first = (await api.call("GET", "/api/v1/jobs?limit=2")).body
    assert [item["id"] for item in first["items"]] == ids[::-1][:2] and first["next_cursor"]
    second = (await api.call("GET", f"/api/v1/jobs?limit=2&cursor={first['next_cursor']}")).body
    assert [item["id"] for item in second["items"]] == [ids[0]] and second["next_cursor"] is None
    by_topic = (await api.call("GET", "/api/v1/jobs?topic=job.default.t1")).body["items"]
    assert [item["id"] for item in by_topic] == [ids[1]]


# ---- approvals ---------------------------------------------------------------------------------


async def test_approval_flow_approve(api: Api, bus) -> None:
    reply = await api.submit(key=ALICE, topic="job.deploy.web")
    assert reply.status == 200 and reply.body["status"] == "approval_required"
    assert reply.body["reason"] == "a person approves deploys"
    job_id = reply.body["job_id"]
    assert (await api.job(job_id))["state"] == "APPROVAL_REQUIRED"

    listed = (await api.call("GET", "/api/v1/approvals", key=VIEWER)).body
    assert [item["job"]["id"] for item in listed["items"]] == [job_id]
    item = listed["items"][0]
    assert item["approval_status"] == "pending" and item["policy_rule_id"] == "deploys-need-approval"
    assert item["decision"] == "REQUIRE_APPROVAL"

    self_approval = await api.call("POST", f"/api/v1/approvals/{job_id}/approve", {}, key=ALICE)
    assert self_approval.status == 403 and self_approval.body["code"] == "self_approval_denied"
    viewer = await api.call("POST", f"/api/v1/approvals/{job_id}/approve", {}, key=VIEWER)
    assert viewer.status == 403

    async with bus.consume(subjects.SUBMIT, unique("q")) as messages:
        approved = await api.call("POST", f"/api/v1/approvals/{job_id}/approve", {"reason": "ok", "note": "n"}, key=BOB)
        assert approved.status == 200, approved.raw
        assert approved.body == {"job_id": job_id, "trace_id": reply.body["trace_id"]}
        msg, packet = await _next_request(messages, job_id)
    assert msg.headers["Nats-Msg-Id"] == f"jobreq:sys.job.submit:approval:{job_id}"
    labels = packet.job_request.labels
    assert labels["approval_granted"] == "true" and labels["approval_reason"] == "ok"
    job = await api.job(job_id)
    assert job["state"] == "PENDING" and job["approval_status"] == "approved" and job["approval_by"] == "bob"
    again = await api.call("POST", f"/api/v1/approvals/{job_id}/approve", key=BOB)
    assert again.status == 200 and again.body["status"] == "already_approved"
    assert (await api.call("GET", "/api/v1/approvals")).body["items"] == []


async def test_approvals_are_listed_from_the_tenants_own_index(api: Api, redis) -> None:
    """Listing approvals reads the tenant's index of held jobs: another tenant's held jobs and
    the tenant's thousands of other jobs are never walked, and an approved job leaves it."""
    for _ in range(3):
        assert (await api.submit(key=ACME, topic="job.deploy.x")).status == 200
    mine = (await api.submit(topic="job.deploy.y")).body["job_id"]
    listed = (await api.call("GET", "/api/v1/approvals?limit=10")).body["items"]
    assert [item["job"]["id"] for item in listed] == [mine]
    assert await redis.zscore(keys.tenant_state_index("default", "APPROVAL_REQUIRED"), mine) is not None
    reply = await api.call("POST", f"/api/v1/approvals/{mine}/approve", {"reason": "ok"}, key=BOB)
    assert reply.status == 200, reply.raw
    assert await redis.zscore(keys.tenant_state_index("default", "APPROVAL_REQUIRED"), mine) is None
    assert (await api.call("GET", "/api/v1/approvals")).body["items"] == []
    assert len((await api.call("GET", "/api/v1/approvals", key=ACME)).body["items"]) == 3


async def test_a_filtered_listing_does_bounded_work(api: Api, redis) -> None:
    """`/jobs?state=X&limit=1` looks at no more than LIST_SCAN_BUDGET recent jobs per call; a
    short page comes with a cursor to go on from."""
    from cordum.store.jobs import LIST_SCAN_BUDGET

    tenant = "default"
    now = 1_900_000_000_000_000
    await redis.zadd(keys.tenant_recent(tenant), {f"ghost-{n}": now + n for n in range(LIST_SCAN_BUDGET + 500)})
    try:
        before = (await redis.info("commandstats")).get("cmdstat_hgetall", {}).get("calls", 0)
        page = (await api.call("GET", "/api/v1/jobs?state=FAILED&limit=1")).body
        after = (await redis.info("commandstats")).get("cmdstat_hgetall", {}).get("calls", 0)
        assert page["items"] == [] and page["next_cursor"] is not None
        assert after - before <= LIST_SCAN_BUDGET + 50  # not the 1,500 + the real jobs
    finally:
        await redis.zrem(keys.tenant_recent(tenant), *[f"ghost-{n}" for n in range(LIST_SCAN_BUDGET + 500)])


async def test_approval_reject_and_lock_busy(api: Api, redis) -> None:
    job_id = (await api.submit(key=ALICE, topic="job.deploy.db")).body["job_id"]
    await redis.set(keys.job_lock(job_id), "someone-else", px=5000)
    busy = await api.call("POST", f"/api/v1/approvals/{job_id}/reject", key=BOB)
    assert busy.status == 409 and busy.body["code"] == "approval_retryable_lock"
    await redis.delete(keys.job_lock(job_id))

    other = await api.call("POST", f"/api/v1/approvals/{job_id}/reject", key=ACME)
    assert other.status == 404
    rejected = await api.call("POST", f"/api/v1/approvals/{job_id}/reject", {"reason": "not today"}, key=BOB)
    assert rejected.status == 200 and rejected.body == {"job_id": job_id, "state": "DENIED"}
    late = await api.call("POST", f"/api/v1/approvals/{job_id}/approve", key=BOB)
    assert late.status == 409 and late.body["code"] == "approval_already_resolved"

    async def entry():
        return (await api.call("GET", f"/api/v1/jobs/{job_id}")).body.get("error_code")

    assert await _eventually(entry) == "approval_rejected"
    job = await api.job(job_id)
    assert job["state"] == "DENIED" and job["approval_status"] == "rejected" and job["error_message"] == "not today"


# ---- cancel, tenants, auth, bad input --------------------------------------------------------------


async def test_cancel(api: Api, bus) -> None:
    job_id = (await api.submit()).body["job_id"]
    async with bus.subscribe(subjects.CANCEL) as messages:
        reply = await api.call("POST", f"/api/v1/jobs/{job_id}/cancel", key=ALICE)
        assert reply.status == 200 and reply.body == {"id": job_id, "state": "CANCELLED"}
        with trio.fail_after(5):
            packet = decode((await messages.receive()).data)
    assert packet.job_cancel.job_id == job_id and packet.job_cancel.reason == "cancelled via api"
    assert packet.job_cancel.requested_by == "api-gateway"
    again = await api.call("POST", f"/api/v1/jobs/{job_id}/cancel")
    assert again.status == 200 and again.body == {"id": job_id, "state": "CANCELLED", "reason": "job already terminal"}
    missing = await api.call("POST", "/api/v1/jobs/nope/cancel")
    assert missing.status == 404 and missing.body == {"error": "job not found", "status": 404}


async def test_auth_roles_and_tenants(api: Api) -> None:
    job_id = (await api.submit()).body["job_id"]
    health = await api.call("GET", "/health", key=None)
    assert health.status == 200 and health.body["redis"] == "ok"
    missing = await api.call("GET", "/api/v1/jobs", key=None)
    assert missing.status == 401 and missing.body["status"] == 401
    wrong = await api.call("GET", "/api/v1/jobs", key="not-a-key-0123456789")
    assert wrong.status == 401
    tenant = await api.call("GET", "/api/v1/jobs", headers={"X-Tenant-ID": "acme"})
    assert tenant.status == 403 and tenant.body["error"] == "tenant access denied"
    assert (await api.call("GET", "/api/v1/jobs", headers={"X-Tenant-ID": "default"})).status == 200
    viewer_submit = await api.submit(key=VIEWER)
    assert viewer_submit.status == 403
    assert (await api.call("GET", f"/api/v1/jobs/{job_id}", key=VIEWER)).status == 200
    # another tenant's job looks exactly like a missing one
    cross = await api.call("GET", f"/api/v1/jobs/{job_id}", key=ACME)
    unknown = await api.call("GET", "/api/v1/jobs/does-not-exist", key=ACME)
    assert cross.status == unknown.status == 404 and cross.body == unknown.body
    assert (await api.call("GET", f"/api/v1/jobs/{job_id}/decisions", key=ACME)).status == 404
    assert (await api.call("GET", "/api/v1/jobs", key=ACME)).body["items"] == []
    assert (await api.call("PUT", "/api/v1/config", {"a": 1}, key=ALICE)).status == 403
    assert (await api.submit(tenant_id="acme")).status == 403
    bad = await api.call("GET", "/api/v1/jobs", key=ACME, headers={"X-Tenant-ID": "ACME:eu"})
    assert bad.status == 400 and bad.body["code"] == "invalid_tenant" and "'ACME:eu' is invalid" in bad.body["error"]


async def test_an_address_guessing_keys_is_refused_before_its_keys_are_checked(start_gateway) -> None:
    api = await start_gateway(CORDUM_AUTH_FAILURES_PER_MINUTE="3")
    for n in range(3):
        assert (await api.call("GET", "/api/v1/jobs", key=f"guess-{n:02d}-0123456789abcdef")).status == 401
    refused = await api.call("GET", "/api/v1/jobs", key=ALICE)  # even a right key, from this address
    assert refused.status == 429 and refused.body["code"] == "auth_rate_limited"
    assert 50 <= int(refused.headers["Retry-After"]) <= 60
    assert (await api.call("GET", "/health")).status == 200  # probes need no key and are not refused


async def test_made_up_methods_do_not_grow_metric_series(api: Api) -> None:
    for method in ("FROBNICATE", "BREW", "X-1"):
        assert (await api.call(method, "/api/v1/jobs")).status in (400, 405)
    text = api.gw.metrics.exposition().decode()
    lines = [line for line in text.splitlines() if line.startswith("cordum_http_requests_total{")]
    assert not any(m in text for m in ("FROBNICATE", "BREW", "X-1"))
    assert any('method="other"' in line and line.endswith(" 3.0") for line in lines), lines


async def test_bad_input_is_named(api: Api) -> None:
    async def post(raw: bytes) -> dict:
        reply = await api.call("POST", "/api/v1/jobs", raw=raw, headers={"Content-Type": "application/json"})
        assert reply.status == 400, reply.raw
        assert reply.body["status"] == 400
        return reply.body

    assert "invalid JSON" in (await post(b"{not json"))["error"]
    assert (await post(b"[1, 2]"))["error"] == "request body must be a JSON object"
    assert (await post(b"{}"))["error"] == "prompt is required"
    assert (await post(b'{"prompt": 5}'))["error"] == "prompt must be a string"
    assert (await post(b'{"prompt": "x", "labels": ["a"]}'))["error"] == "labels must be an object of strings"
    assert (await post(b'{"prompt": "x", "labels": {"a": 1}}'))["error"] == "labels must be an object of strings"
    assert "labels" in (await post(b'{"prompt": "x", "labels": {"_governance.x": "1"}}'))["error"]
    assert (await post(b'{"prompt": "x", "max_input_tokens": "9"}'))["error"] == "max_input_tokens must be a non-negative integer"
    assert "topic" in (await post(b'{"prompt": "x", "topic": "nope"}'))["error"]
    assert "priority" in (await post(b'{"prompt": "x", "priority": "urgent"}'))["error"]
    assert "risk_tags" in (await post(b'{"prompt": "x", "risk_tags": "a"}'))["error"]
    assert "prompt" in (await post(json.dumps({"prompt": "x" * 50_001}).encode()))["error"]
    # Hostile shapes are a 400 naming the problem, never a 500.
    assert "nested deeper than 64" in (await post(b'{"prompt": "x", "context": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"))["error"]
    assert "nested deeper than 64" in (await post(b'{"prompt": "x", "context": ' + b"[" * 70 + b"]" * 70 + b"}"))["error"]
    assert "lone surrogate" in (await post(b'{"prompt": "x", "labels": {"team": "\\ud800"}}'))["error"]
    assert "$.labels" in (await post(b'{"prompt": "x", "labels": {"\\udfff": "a"}}'))["error"]
    assert "not UTF-8" in (await post(b'{"prompt": "x", "labels": {"k": "\xed\xa0\x80"}}'))["error"]  # an encoded surrogate
    assert "not UTF-8" in (await post('{"prompt": "x"}'.encode("utf-16")))["error"]
    paired = await api.call("POST", "/api/v1/jobs", {"prompt": "x \U0001f600", "labels": {"mood": "\U0001f600"}})
    assert paired.status == 200, paired.raw  # a real pair (an escaped emoji) is fine
    deep_yaml = "name: w\nsteps:\n" + "  " + "[" * 5000 + "]" * 5000 + "\n"
    flow = await api.call("POST", "/api/v1/workflows", raw=deep_yaml.encode(), headers={"Content-Type": "application/yaml"})
    assert flow.status == 400 and "nested" in flow.body["error"], flow.raw
    flow = await api.call("POST", "/api/v1/workflows", raw=b'{"name": "\\ud800"}', headers={"Content-Type": "application/json"})
    assert flow.status == 400 and "lone surrogate" in flow.body["error"], flow.raw

    big = await api.call("POST", "/api/v1/jobs", raw=b'{"prompt": "' + b"x" * (1 << 20) + b'"}',
                         headers={"Content-Type": "application/json"})
    assert big.status == 413 and big.body["status"] == 413
    nowhere = await api.call("GET", "/api/v1/nowhere")
    assert nowhere.status == 404 and nowhere.body == {"error": "not found", "status": 404}
    wrong_method = await api.call("PATCH", "/api/v1/jobs")
    assert wrong_method.status == 405 and wrong_method.body["status"] == 405
    assert (await api.call("GET", "/api/v1/jobs?limit=abc")).body["error"] == "limit must be an integer"
    assert (await api.call("GET", "/api/v1/jobs?state=bogus")).status == 400
    items = (await api.call("GET", "/api/v1/jobs")).body["items"]
    assert [item["id"] for item in items] == [paired.body["job_id"]]  # nothing else was persisted


def test_startup_refuses_missing_and_weak_keys() -> None:
    with pytest.raises(ConfigError, match="CORDUM_API_KEY"):
        load_keyring({})
    with pytest.raises(ConfigError, match="CORDUM_API_KEY") as weak:
        load_keyring({"CORDUM_API_KEY": "changeme"})
    assert "changeme" not in str(weak.value)
    with pytest.raises(ConfigError, match="CORDUM_API_KEY"):
        load_keyring({"CORDUM_API_KEY": "short-key"})
    assert len(load_keyring({"CORDUM_API_KEY": "changeme", "CORDUM_ENV": "dev"})) == 1
    with pytest.raises(ConfigError, match="TENANT_ID='Acme:EU' is invalid"):
        load_keyring({"CORDUM_API_KEY": ADMIN, "TENANT_ID": "Acme:EU"})


def test_a_keys_file_tenant_must_be_a_valid_name(tmp_path) -> None:
    path = tmp_path / "keys.yaml"
    path.write_text(f"- {{key: {ALICE}, tenant: acme}}\n- {{key: {BOB}, tenant: 'acme:eu'}}\n")
    with pytest.raises(ConfigError, match="entry 2 is invalid: tenant 'acme:eu'"):
        load_keyring({"CORDUM_API_KEY": ADMIN, "CORDUM_API_KEYS_PATH": str(path)})


# ---- workers, config, policy, DLQ retry, status ------------------------------------------------------


async def test_workers_from_snapshot(api: Api, redis) -> None:
    assert (await api.call("GET", "/api/v1/workers", key=VIEWER)).body == {"items": []}
    await write_snapshot(redis, {"captured_at": 1, "writer_id": "s1", "workers": [
        {"worker_id": "w-b", "pool": "p", "active_jobs": 1},
        {"worker_id": "w-a", "pool": "p", "active_jobs": 0},
    ]})
    items = (await api.call("GET", "/api/v1/workers", key=VIEWER)).body["items"]
    assert [w["worker_id"] for w in items] == ["w-a", "w-b"]
    assert (await api.call("GET", "/api/v1/workers/w-b")).body["active_jobs"] == 1
    assert (await api.call("GET", "/api/v1/workers/w-zzz")).status == 404


async def test_config_put_publishes_change(api: Api, bus) -> None:
    assert (await api.call("GET", "/api/v1/config")).body == {}
    async with bus.subscribe(subjects.CONFIG_CHANGED) as messages:
        reply = await api.call("PUT", "/api/v1/config", {"limits": {"max_concurrent_jobs": 5}})
        assert reply.status == 204
        with trio.fail_after(5):
            packet = decode((await messages.receive()).data)
        assert packet.alert.message == "config changed"
        assert packet.alert.details["scope"] == "system" and packet.alert.details["scope_id"] == "default"
        wrapped = await api.call("POST", "/api/v1/config", {"scope": "org", "scope_id": "default", "data": {"x": 1}})
        assert wrapped.status == 204
        with trio.fail_after(5):
            packet = decode((await messages.receive()).data)
        assert packet.alert.details["scope"] == "org"
    assert (await api.call("GET", "/api/v1/config")).body == {"limits": {"max_concurrent_jobs": 5}}
    assert (await api.call("GET", "/api/v1/config?scope=org&scope_id=default", key=VIEWER)).body == {"x": 1}
    assert (await api.call("GET", "/api/v1/config?scope=planet")).status == 400


async def test_policy_evaluate(api: Api) -> None:
    reply = await api.call("POST", "/api/v1/policy/evaluate", {"topic": "job.vault.x"}, key=ALICE)
    assert reply.status == 200, reply.raw
    assert reply.body["decision"] == "DECISION_TYPE_DENY" and reply.body["ruleId"] == "deny-vault"
    allowed = await api.call("POST", "/api/v1/policy/evaluate", {"topic": "job.default"})
    assert allowed.body["decision"] == "DECISION_TYPE_ALLOW"
    assert (await api.call("POST", "/api/v1/policy/evaluate", {})).body["error"] == "topic is required"


async def test_policy_evaluate_kernel_down(start_gateway) -> None:
    api = await start_gateway(SAFETY_KERNEL_ADDR=f"127.0.0.1:{free_port()}")
    reply = await api.call("POST", "/api/v1/policy/evaluate", {"topic": "job.default"})
    assert reply.status == 503 and reply.body["status"] == 503


async def _worker_failed(api: Api, **submit: Any) -> str:
    """A job that a worker failed: dead-lettered with its input kept (a retry can run it)."""
    job_id = (await api.submit(**submit)).body["job_id"]
    written = await write_dlq_entry(api.gw, dlq_packet(job_id, status=job_pb2.JOB_STATUS_FAILED,
                                                       reason_code="worker_failed", reason="boom", sender_id="test"))
    assert written
    return job_id


async def test_context_size_is_capped_before_anything_is_stored(start_gateway, redis) -> None:
    api = await start_gateway(CORDUM_MAX_CONTEXT_BYTES="1000")
    before = await redis.zcard(keys.tenant_recent("default"))
    big = await api.submit(context={"blob": "x" * 2000})
    assert big.status == 413 and big.body["code"] == "context_too_large"
    assert big.body["limit"] == 1000 and "CORDUM_MAX_CONTEXT_BYTES" in big.body["error"]
    assert await redis.zcard(keys.tenant_recent("default")) == before  # no job, no input stored
    assert (await api.submit(context={"blob": "x" * 500})).status == 200


async def test_a_tenants_unfinished_jobs_are_capped_by_policy(start_gateway, nursery) -> None:
    """`tenants.<t>.max_concurrent_jobs` in the policy: the gateway refuses a submit (429) while
    the tenant has that many unfinished jobs; other tenants are not affected."""
    tenant = unique("capped").replace(".", "-").lower()[:40]
    servicer = PolicyKernel(POLICY + f"tenants:\n  {tenant}:\n    max_concurrent_jobs: 2\n")
    server = GrpcServer([(safety_grpc.SafetyKernelBase, servicer)])
    port = await nursery.start(server.serve, "127.0.0.1", 0)
    api = await start_gateway(SAFETY_KERNEL_ADDR=f"127.0.0.1:{port}", TENANT_ID=tenant)
    assert [(await api.submit()).status for _ in range(2)] == [200, 200]  # PENDING: no scheduler here
    third = await api.submit()
    assert third.status == 429 and third.body["code"] == "tenant_limit", third.raw
    assert "2 unfinished jobs" in third.body["error"] and third.headers["Retry-After"]
    assert (await api.submit(key=ACME)).status == 200  # acme has no limit
    jobs = (await api.call("GET", "/api/v1/jobs")).body["items"]
    await api.call("POST", f"/api/v1/jobs/{jobs[0]['id']}/cancel")  # one finishes: room for one more
    assert (await api.submit()).status == 200


async def test_a_tenants_stored_input_bytes_are_capped_per_hour(start_gateway, redis) -> None:
    import time

    api = await start_gateway(CORDUM_TENANT_BYTES_PER_HOUR="3000")
    blob = {"blob": "x" * 1000}
    for _ in range(2):  # the allowance is per clock hour: a run that straddles one is done again
        hour = int(time.time() // 3600)
        accepted = [(await api.submit(key=ALICE, context=blob)).status for _ in range(2)]
        over = await api.submit(key=ALICE, context=blob)
        other = await api.submit(key=ACME, context=blob)  # another tenant has its own allowance
        small = await api.submit(key=ALICE, context={"small": 1})  # the refused one was not counted
        if int(time.time() // 3600) == hour:
            break
    assert accepted == [200, 200]
    assert over.status == 429 and over.body["code"] == "tenant_bytes_limit", over.raw
    assert 0 < int(over.headers["Retry-After"]) <= 3600 and "CORDUM_TENANT_BYTES_PER_HOUR" in over.body["error"]
    assert other.status == 200 and small.status == 200


async def test_a_denied_submit_keeps_no_input_and_cannot_be_retried(api: Api, redis) -> None:
    denied = (await api.submit(topic="job.vault.x", context={"secret": "v" * 1000})).body["job_id"]
    assert await redis.exists(keys.context(denied)) == 0  # nothing stored that nobody may run
    assert (await api.job(denied))["state"] == "DENIED"
    await _eventually(lambda: _dlq_entry(redis, denied))
    refused = await api.call("POST", f"/api/v1/dlq/{denied}/retry", key=ALICE)
    assert refused.status == 409 and refused.body["code"] == "retry_unavailable"
    assert await _dlq_entry(redis, denied) is not None  # the entry stays


async def test_dlq_retry_and_delete(api: Api, bus, redis) -> None:
    denied = await _worker_failed(api, topic="job.default.x", context={"k": "v"})
    second = await _worker_failed(api, topic="job.default.y")

    async def both_listed():
        items = (await api.call("GET", "/api/v1/dlq/page?limit=10")).body["items"]
        return {i["job_id"] for i in items} >= {denied, second}

    await _eventually(both_listed)
    assert (await api.call("GET", "/api/v1/dlq", key=ACME)).body["items"] == []
    assert (await api.call("POST", f"/api/v1/dlq/{denied}/retry", key=ACME)).status == 404
    assert (await api.call("POST", f"/api/v1/dlq/{denied}/retry", key=VIEWER)).status == 403

    async with bus.consume(subjects.SUBMIT, unique("q")) as messages:
        reply = await api.call("POST", f"/api/v1/dlq/{denied}/retry", key=ALICE)
        assert reply.status == 200, reply.raw
        new_id = reply.body["job_id"]
        assert new_id.startswith(f"{denied}-retry-") and len(new_id) == len(denied) + len("-retry-") + 8
        _, packet = await _next_request(messages, new_id)
    req = packet.job_request
    assert packet.trace_id == f"dlq-retry-{denied}"
    assert req.labels["retry"] == "true" and req.labels["retry_of_job"] == denied and req.labels["dlq_entry"] == denied
    assert req.context_ptr == f"redis://ctx:{new_id}" and req.topic == "job.default.x"
    assert json.loads(await redis.get(keys.context(new_id)))["context"] == {"k": "v"}
    job = await api.job(new_id)
    assert job["state"] == "PENDING" and job["trace_id"] == f"dlq-retry-{denied}"
    remaining = {i["job_id"] for i in (await api.call("GET", "/api/v1/dlq")).body["items"]}
    assert denied not in remaining and second in remaining

    assert (await api.call("DELETE", f"/api/v1/dlq/{second}", key=ALICE)).status == 403
    deleted = await api.call("DELETE", f"/api/v1/dlq/{second}")
    assert deleted.status == 204 and deleted.raw == b""
    assert (await api.call("DELETE", f"/api/v1/dlq/{second}")).status == 404


async def test_dlq_writer_records_worker_failures(api: Api, bus, redis) -> None:
    job_id = (await api.submit()).body["job_id"]
    result = job_pb2.JobResult(job_id=job_id, status=job_pb2.JOB_STATUS_FAILED, error_code="boom",
                               error_message="worker exploded", worker_id="w1")
    packet = new_packet(result, sender_id="cordum-scheduler", trace_id=job_id)
    await bus.publish(subjects.DLQ, encode(packet), msg_id=subjects.msg_id_for(packet, subjects.DLQ))
    # a malformed message on the same subject must not stop the writer
    await bus.publish(subjects.DLQ, b"\xff\x00garbage")

    async def entry():
        text = await redis.get(keys.dlq_entry(job_id))
        return json.loads(text) if text else None

    found = await _eventually(entry)
    assert found["status"] == "JOB_STATUS_FAILED" and found["reason"] == "worker exploded"
    assert found["reason_code"] == "boom" and found["tenant"] == "default" and found["last_state"] == "PENDING"
    stored = json.loads(await redis.get(keys.result(job_id)))
    assert stored["error"]["message"] == "worker exploded" and stored["processed_by"] == "api-gateway"


async def test_status_shape_and_instance_registry(api: Api, redis) -> None:
    await api.submit()
    await api.submit(topic="job.deploy.x")
    body = (await api.call("GET", "/api/v1/status", key=VIEWER)).body
    assert set(body) >= {"time", "uptime_seconds", "instance_id", "nats", "redis", "workers", "pipeline"}
    assert "replicas" not in body  # where the replicas run is for the system's admins
    assert body["nats"] == {"connected": True, "status": "connected"}  # the server's URL: admins only
    assert body["redis"] == {"ok": True, "status": "ok"}
    assert body["workers"] == {"count": 0}
    assert body["pipeline"] == {"PENDING": 1, "APPROVAL_REQUIRED": 1}
    replicas = (await api.call("GET", "/api/v1/status")).body["replicas"][SERVICE]
    assert [r["id"] for r in replicas] == [api.gw.instance_id] and replicas[0]["service"] == SERVICE


async def test_status_calls_reuse_what_they_read(api: Api, redis) -> None:
    """A viewer polling status costs Redis a ping, not hundreds of reads, between refreshes."""
    await api.submit()
    first = (await api.call("GET", "/api/v1/status", key=VIEWER)).body
    before = (await redis.info("commandstats")).get("cmdstat_hgetall", {}).get("calls", 0)
    for _ in range(5):
        again = (await api.call("GET", "/api/v1/status", key=VIEWER)).body
    after = (await redis.info("commandstats")).get("cmdstat_hgetall", {}).get("calls", 0)
    assert again["pipeline"] == first["pipeline"] and after - before < 5


async def test_instance_registry_renews_and_unregisters(redis) -> None:
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            await nursery.start(lambda task_status: serve_registration(
                redis, "svc-x", "i-1", ttl=0.3, every=0.1, task_status=task_status))
            await trio.sleep(0.5)  # longer than the TTL: only renewal keeps it
            assert [e["id"] for e in (await list_instances(redis))["svc-x"]] == ["i-1"]
            scope.cancel()
    assert await redis.get(instance_key("svc-x", "i-1")) is None


# ---- WebSocket stream ----------------------------------------------------------------------------


async def test_stream_filters_by_tenant(api: Api, bus) -> None:
    from cordum.cli.ws import WebSocketClient

    def open_client(key: str, *, subprotocol: bool) -> WebSocketClient:
        url = f"ws://127.0.0.1:{api.port}/api/v1/stream"
        offered = {"Sec-WebSocket-Protocol": f"{KEY_SUBPROTOCOL}.{_b64url(key)}"}  # a browser's way
        client = WebSocketClient(url, headers=offered if subprotocol else {"X-API-Key": key}, timeout=5)
        client.connect()
        return client

    assert not api.gw.hub.tapping  # no client: the gateway reads no job's messages
    mine = await trio.to_thread.run_sync(lambda: open_client(ADMIN, subprotocol=True))
    theirs = await trio.to_thread.run_sync(lambda: open_client(ACME, subprotocol=False))
    assert api.gw.hub.tapping  # a connect returns once the taps listen
    frames: dict[str, list[dict]] = {"mine": [], "theirs": []}

    def reader(name: str, client: WebSocketClient) -> None:
        try:
            for frame in client.messages():
                frames[name].append(frame if isinstance(frame, dict) else json.loads(frame))
        except Exception:
            pass

    threads = [threading.Thread(target=reader, args=(n, c), daemon=True) for n, c in (("mine", mine), ("theirs", theirs))]
    for thread in threads:
        thread.start()
    try:
        await _eventually(lambda: _const(api.gw.hub.client_count == 2))
        job_id = (await api.submit()).body["job_id"]
        heartbeat = new_packet(Heartbeat(worker_id="w-stream", pool="p"), sender_id="w-stream")
        await bus.publish(subjects.HEARTBEAT, encode(heartbeat))

        def kinds(name: str) -> set[str]:
            return {next(k for k in ("jobRequest", "heartbeat", "jobResult", "jobCancel") if k in f) for f in frames[name]
                    if any(k in f for k in ("jobRequest", "heartbeat", "jobResult", "jobCancel"))}

        await _eventually(lambda: _const({"jobRequest", "heartbeat"} <= kinds("mine")))
        await _eventually(lambda: _const("heartbeat" in kinds("theirs")))
        mine_request = next(f for f in frames["mine"] if "jobRequest" in f)
        assert mine_request["jobRequest"]["jobId"] == job_id
        assert "jobRequest" not in kinds("theirs")
        # a cancel is routed by the job's tenant from its meta
        await api.call("POST", f"/api/v1/jobs/{job_id}/cancel")
        await _eventually(lambda: _const("jobCancel" in kinds("mine")))
        assert "jobCancel" not in kinds("theirs")
    finally:
        for client in (mine, theirs):
            client.close()
    await _eventually(lambda: _const(not api.gw.hub.tapping))  # the last one left: taps stop
    rejected = await api.call("GET", "/api/v1/stream", key=None, headers={
        "Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="})
    assert rejected.status == 401


def _b64url(key: str) -> str:
    import base64

    return base64.urlsafe_b64encode(key.encode()).decode().rstrip("=")


@dataclass
class WsPeer:
    """A raw WebSocket client (wsproto over a socket), for what the CLI's client never does."""

    sock: Any
    conn: Any
    status: int  # 101 when accepted
    subprotocol: str | None = None

    def send_text(self, text: str) -> None:
        from wsproto.events import TextMessage

        self.sock.sendall(self.conn.send(TextMessage(data=text)))

    def close_code(self, timeout: float = 10.0) -> int | None:
        """The code of the server's close frame (None: the connection just ended)."""
        from wsproto.events import CloseConnection, Ping

        self.sock.settimeout(timeout)
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    return None
                self.conn.receive_data(data)
                for event in self.conn.events():
                    if isinstance(event, CloseConnection):
                        return event.code
                    if isinstance(event, Ping):
                        self.sock.sendall(self.conn.send(event.response()))
        except OSError:
            return None
        finally:
            self.sock.close()


def _ws_open(port: int, *, headers: dict[str, str] | None = None, target: str = "/api/v1/stream",
             subprotocols: list[str] | None = None) -> WsPeer:
    import socket

    from wsproto import ConnectionType, WSConnection
    from wsproto.events import AcceptConnection, RejectConnection, Request

    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    conn = WSConnection(ConnectionType.CLIENT)
    sock.sendall(conn.send(Request(host=f"127.0.0.1:{port}", target=target, subprotocols=subprotocols or [],
                                   extra_headers=[(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()])))
    while True:
        data = sock.recv(65536)
        if not data:
            raise AssertionError("connection closed during the handshake")
        conn.receive_data(data)
        for event in conn.events():
            if isinstance(event, AcceptConnection):
                return WsPeer(sock, conn, 101, event.subprotocol)
            if isinstance(event, RejectConnection):
                sock.close()
                return WsPeer(sock, conn, event.status_code)


async def test_stream_takes_no_client_messages(api: Api) -> None:
    """A client that sends anything is closed with 1008; one that sends a large frame is cut off
    by the server's small message limit, before it is buffered."""
    peer = await trio.to_thread.run_sync(lambda: _ws_open(api.port, headers={"X-API-Key": ALICE}))
    assert peer.status == 101
    await trio.to_thread.run_sync(peer.send_text, "hello?")
    assert await trio.to_thread.run_sync(peer.close_code) == 1008
    big = await trio.to_thread.run_sync(lambda: _ws_open(api.port, headers={"X-API-Key": ALICE}))
    await trio.to_thread.run_sync(big.send_text, "x" * (1 << 20))
    assert await trio.to_thread.run_sync(big.close_code) in (1009, None)  # message too big
    await _eventually(lambda: _const(api.gw.hub.client_count == 0))


async def test_stream_pings_its_clients(start_gateway) -> None:
    from wsproto.events import Ping

    api = await start_gateway(GATEWAY_WS_PING_INTERVAL="200ms")
    peer = await trio.to_thread.run_sync(lambda: _ws_open(api.port, headers={"X-API-Key": ALICE}))
    assert peer.status == 101

    def first_ping() -> bool:
        peer.sock.settimeout(30)
        while True:
            peer.conn.receive_data(peer.sock.recv(65536))
            if any(isinstance(event, Ping) for event in peer.conn.events()):
                return True

    try:
        assert await trio.to_thread.run_sync(first_ping)
    finally:
        peer.sock.close()


async def test_stream_key_in_the_url_is_refused_outside_dev_mode(start_gateway) -> None:
    api = await start_gateway()
    refused = await trio.to_thread.run_sync(lambda: _ws_open(api.port, target=f"/api/v1/stream?api_key={ALICE}"))
    assert refused.status == 401
    offered = await trio.to_thread.run_sync(
        lambda: _ws_open(api.port, subprotocols=[KEY_SUBPROTOCOL, _b64url(ALICE)]))  # the comma form
    assert offered.status == 101 and offered.subprotocol == KEY_SUBPROTOCOL  # echoed bare, never the key
    offered.sock.close()
    dev = await start_gateway(CORDUM_ENV="dev")
    allowed = await trio.to_thread.run_sync(lambda: _ws_open(dev.port, target=f"/api/v1/stream?api_key={ALICE}"))
    assert allowed.status == 101
    allowed.sock.close()


async def test_stream_connections_per_tenant_are_capped(start_gateway) -> None:
    api = await start_gateway(CORDUM_WS_MAX_CONNECTIONS_PER_TENANT="2")
    open_peers = [await trio.to_thread.run_sync(lambda: _ws_open(api.port, headers={"X-API-Key": key}))
                  for key in (ALICE, BOB)]
    assert [p.status for p in open_peers] == [101, 101]
    third = await trio.to_thread.run_sync(lambda: _ws_open(api.port, headers={"X-API-Key": CAROL}))
    assert third.status == 429
    other_tenant = await trio.to_thread.run_sync(lambda: _ws_open(api.port, headers={"X-API-Key": ACME}))
    assert other_tenant.status == 101
    for peer in [*open_peers, other_tenant]:
        peer.sock.close()
    await _eventually(lambda: _const(api.gw.hub.client_count == 0))
    again = await trio.to_thread.run_sync(lambda: _ws_open(api.port, headers={"X-API-Key": CAROL}))
    assert again.status == 101  # the slots came back
    again.sock.close()


async def test_a_revoked_key_loses_its_stream_and_its_access(start_gateway, tmp_path) -> None:
    api = await start_gateway(GATEWAY_WS_AUTH_RECHECK_INTERVAL="200ms", CORDUM_API_KEYS_RELOAD_INTERVAL="100ms")
    alice = await trio.to_thread.run_sync(lambda: _ws_open(api.port, headers={"X-API-Key": ALICE}))
    bob = await trio.to_thread.run_sync(lambda: _ws_open(api.port, headers={"X-API-Key": BOB}))
    assert (alice.status, bob.status) == (101, 101)
    keys_path = tmp_path / "keys.yaml"
    kept = [line for line in keys_path.read_text().splitlines() if ALICE not in line]
    tmp = keys_path.with_suffix(".tmp")
    tmp.write_text("\n".join(kept) + "\n")
    tmp.replace(keys_path)  # as a deploy tool does
    assert await trio.to_thread.run_sync(alice.close_code) == 1008
    assert (await api.call("GET", "/api/v1/jobs", key=ALICE)).status == 401
    assert (await api.call("GET", "/api/v1/jobs", key=BOB)).status == 200
    assert api.gw.hub.client_count == 1  # bob's stream stands
    bob.sock.close()


async def test_stream_hub_drops_a_slow_client() -> None:
    hub = StreamHub(gw=None, buffer=2)  # heartbeats need no tenant lookup
    heartbeat = new_packet(Heartbeat(worker_id="w1"), sender_id="w1")
    with hub.connect("default") as (slow, _slow_rx), hub.connect("acme") as (fast, fast_rx):
        for _ in range(3):
            await hub.dispatch(heartbeat)
            fast_rx.receive_nowait()  # keeps up
        assert slow.dropped and not fast.dropped and hub.client_count == 1
    assert hub.client_count == 0


async def _const(value: Any) -> Any:
    return value


# ---- the process ------------------------------------------------------------------------------------


GATEWAY_PROC = ["-m", "cordum.gateway.service"]


def _get_json(url: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status, json.loads(response.read())
    except Exception:
        return 0, None


def test_gateway_process_starts_and_shuts_down_in_order(spawn) -> None:
    import time

    port = free_port()
    proc = spawn("gw-proc", GATEWAY_PROC, env={
        "CORDUM_API_KEY": ADMIN, "GATEWAY_HTTP_ADDR": f"127.0.0.1:{port}",
        "SAFETY_KERNEL_ADDR": f"127.0.0.1:{free_port()}", "DLQ_CLEANUP_INTERVAL": "1s"})
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        status, body = _get_json(f"http://127.0.0.1:{port}/health")
        if status == 200:
            break
        assert proc.popen.poll() is None, proc.lines("err")[-5:]
        time.sleep(0.1)
    else:
        raise AssertionError("gateway never became healthy")
    proc.signal(signal.SIGTERM)
    assert proc.wait(15) == 0, proc.lines("err")[-10:]
    stages = [e["stage"] for e in proc.events() if e.get("event") == "stage.begin"]
    assert stages == list(STAGES)


def test_gateway_process_refuses_weak_key(spawn) -> None:
    proc = spawn("gw-weak", GATEWAY_PROC, env={"CORDUM_API_KEY": "changeme"})
    assert proc.wait(15) == 2
    err = "\n".join(proc.lines("err"))
    assert "CORDUM_API_KEY" in err and "changeme" not in err


# ---- review fixes: DLQ durability, retry claims, self-approval, config tenancy, validation, idempotency ----


def _break_publish(monkeypatch, gw: Any, subject: str) -> None:
    """Make this gateway's bus refuse publishes on `subject` (the others still go through)."""
    real = gw.bus.publish

    async def publish(subj: str, data: bytes, **kwargs: Any) -> None:
        if subj == subject:
            raise ConnectionError("bus unavailable (test)")
        await real(subj, data, **kwargs)

    monkeypatch.setattr(gw.bus, "publish", publish)


async def _dlq_entry(redis, job_id: str) -> dict | None:
    text = await redis.get(keys.dlq_entry(job_id))
    return json.loads(text) if text else None


async def test_deny_and_reject_write_the_dlq_entry_when_the_bus_fails(api: Api, redis, monkeypatch) -> None:
    _break_publish(monkeypatch, api.gw, subjects.DLQ)
    denied = await api.submit(topic="job.vault.read")
    assert denied.status == 403, denied.raw
    entry = await _dlq_entry(redis, denied.body["job_id"])  # written before the answer, no bus needed
    assert entry is not None and entry["reason_code"] == "policy_denied" and entry["last_state"] == "DENIED"
    assert entry["tenant"] == "default" and entry["topic"] == "job.vault.read"
    job = await api.job(denied.body["job_id"])
    assert job["error_code"] == "policy_denied" and job["result"]["error"]["message"] == "vault jobs are never allowed"

    held = (await api.submit(key=ALICE, topic="job.deploy.db")).body["job_id"]
    rejected = await api.call("POST", f"/api/v1/approvals/{held}/reject", {"reason": "no"}, key=BOB)
    assert rejected.status == 200, rejected.raw
    entry = await _dlq_entry(redis, held)
    assert entry is not None and entry["reason_code"] == "approval_rejected" and entry["reason"] == "no"
    listed = {i["job_id"] for i in (await api.call("GET", "/api/v1/dlq")).body["items"]}
    assert listed == {denied.body["job_id"], held}


async def test_concurrent_dlq_retries_create_one_job(api: Api, redis, monkeypatch) -> None:
    denied = await _worker_failed(api)
    assert await _dlq_entry(redis, denied) is not None

    # a retry that cannot be queued puts the entry back
    _break_publish(monkeypatch, api.gw, subjects.SUBMIT)
    failed = await api.call("POST", f"/api/v1/dlq/{denied}/retry", key=ALICE)
    assert failed.status == 503 and failed.body["code"] == "bus_unavailable"
    assert await _dlq_entry(redis, denied) is not None
    monkeypatch.undo()

    replies: list[Reply] = []

    async def retry() -> None:
        replies.append(await api.call("POST", f"/api/v1/dlq/{denied}/retry", key=ALICE))

    async with trio.open_nursery() as nursery:
        for _ in range(6):
            nursery.start_soon(retry)
    won = [r for r in replies if r.status == 200]
    lost = [r for r in replies if r.status != 200]
    assert len(won) == 1, [(r.status, r.body) for r in replies]
    assert all(r.status == 404 or (r.status == 409 and r.body["code"] == "retry_in_progress") for r in lost), \
        [(r.status, r.body) for r in lost]
    retries = [j["id"] for j in (await api.call("GET", "/api/v1/jobs?limit=100")).body["items"]
               if j["id"].startswith(f"{denied}-retry-") and j["state"] == "PENDING"]
    assert retries == [won[0].body["job_id"]]
    assert await _dlq_entry(redis, denied) is None
    assert (await api.call("POST", f"/api/v1/dlq/{denied}/retry", key=ALICE)).status == 404
    # the writer consuming the (late) DLQ event of the retried job does not bring the entry back
    await write_dlq_entry(api.gw, dlq_packet(denied, status=job_pb2.JOB_STATUS_FAILED, reason_code="worker_failed",
                                             reason="late", sender_id="test"))
    assert await _dlq_entry(redis, denied) is None


async def test_nobody_approves_a_job_submitted_with_their_own_key(api: Api, redis) -> None:
    import hashlib
    import hmac

    mine = (await api.submit(topic="job.deploy.web")).body["job_id"]  # the static admin key
    same = await api.call("POST", f"/api/v1/approvals/{mine}/approve", {})
    assert same.status == 403 and same.body["code"] == "self_approval_denied"

    carols = (await api.submit(key=CAROL, topic="job.deploy.web")).body["job_id"]  # key without principal_id
    meta = await redis.hgetall(keys.job_meta(carols))
    # The key's name is keyed by the deployment's secret: without it, nobody can test guesses of
    # the key against it offline; and no view shows it.
    secret = (await redis.get(keys.KEY_FINGERPRINT_SECRET)).encode()
    digest = hashlib.sha256(CAROL.encode()).digest()
    assert meta["submitted_key"] == hmac.new(secret, digest, hashlib.sha256).hexdigest()[:16]
    assert meta["submitted_key"] != digest.hex()[:16]
    assert not any(CAROL in str(v) for v in meta.values())
    for key in (VIEWER, ADMIN):
        view = await api.job(carols, key=key)
        assert CAROL not in json.dumps(view) and "submitted_key" not in view
    assert all("submitted_key" not in item for item in (await api.call("GET", "/api/v1/jobs")).body["items"])
    same = await api.call("POST", f"/api/v1/approvals/{carols}/approve", {}, key=CAROL)
    assert same.status == 403 and same.body["code"] == "self_approval_denied"
    assert (await api.call("POST", f"/api/v1/approvals/{carols}/approve", {}, key=BOB)).status == 200
    assert (await api.call("POST", f"/api/v1/approvals/{mine}/approve", {}, key=ALICE)).status == 200
    # a job recorded before keyed names (the bare SHA-256 prefix) is still recognised
    older = (await api.submit(key=CAROL, topic="job.deploy.api")).body["job_id"]
    await redis.hset(keys.job_meta(older), "submitted_key", digest.hex()[:16])
    same = await api.call("POST", f"/api/v1/approvals/{older}/approve", {}, key=CAROL)
    assert same.status == 403 and same.body["code"] == "self_approval_denied"

    # a keys-file entry without a role is a viewer, not an admin
    assert (await api.call("GET", "/api/v1/jobs", key=NOROLE)).status == 200
    refused = await api.submit(key=NOROLE)
    assert refused.status == 403 and refused.body["code"] == "forbidden"
    assert (await api.call("PUT", "/api/v1/config", {"a": 1}, key=NOROLE)).status == 403


async def test_config_scopes_are_tenant_bound(api: Api) -> None:
    assert (await api.call("PUT", "/api/v1/config", {"limit": 1})).status == 204
    assert (await api.call("PUT", "/api/v1/config", {"scope": "org", "scope_id": "default", "data": {"o": 1}})).status == 204
    # system: admins read it; only an admin of the operator's tenant writes it
    assert (await api.call("GET", "/api/v1/config", key=VIEWER)).status == 404
    assert (await api.call("GET", "/api/v1/config", key=ALICE)).status == 404
    assert (await api.call("GET", "/api/v1/config", key=ACME_ADMIN)).body == {"limit": 1}
    for body in ({"limit": 999}, {"scope": "system", "scope_id": "default", "data": {"limit": 999}}):
        hijack = await api.call("PUT", "/api/v1/config", body, key=ACME_ADMIN)
        assert hijack.status == 404 and hijack.body == {"error": "config not found", "status": 404}
    assert (await api.call("GET", "/api/v1/config")).body == {"limit": 1}
    # org: the scope id is the caller's tenant
    assert (await api.call("GET", "/api/v1/config?scope=org&scope_id=default", key=ACME)).status == 404
    assert (await api.call("PUT", "/api/v1/config", {"scope": "org", "scope_id": "default", "data": {"o": 2}},
                           key=ACME_ADMIN)).status == 404
    assert (await api.call("GET", "/api/v1/config?scope=org&scope_id=default", key=VIEWER)).body == {"o": 1}
    assert (await api.call("PUT", "/api/v1/config", {"scope": "org", "scope_id": "acme", "data": {"o": 3}},
                           key=ACME_ADMIN)).status == 204
    assert (await api.call("GET", "/api/v1/config?scope=org", key=ACME)).body == {"o": 3}
    # team / workflow / step: <tenant>:<id>
    put = {"scope": "team", "scope_id": "acme:payments", "data": {"t": 1}}
    assert (await api.call("PUT", "/api/v1/config", put, key=ACME_ADMIN)).status == 204
    assert (await api.call("GET", "/api/v1/config?scope=team&scope_id=acme:payments", key=ACME)).body == {"t": 1}
    assert (await api.call("GET", "/api/v1/config?scope=team&scope_id=acme:payments", key=VIEWER)).status == 404
    for scope_id in ("default:payments", "payments", "acme:"):
        put = {"scope": "workflow", "scope_id": scope_id, "data": {}}
        assert (await api.call("PUT", "/api/v1/config", put, key=ACME_ADMIN)).status == 404, scope_id
    assert (await api.call("GET", "/api/v1/config?scope=step", key=ACME)).status == 400


async def test_submit_refuses_what_the_scheduler_or_protobuf_would_reject(api: Api, redis) -> None:
    async def refused(**body: Any) -> str:
        reply = await api.submit(key=ALICE, idempotency_key="k-bad", **body)
        assert reply.status == 400, (body, reply.status, reply.raw)
        return reply.body["error"]

    assert "budget.max_total_tokens" in await refused(max_total_tokens=2**40)  # scheduler ingress limit
    assert "budget.max_output_tokens" in await refused(max_output_tokens=10_000_000_001)
    assert "max_input_tokens" in await refused(max_input_tokens=2**31)  # ContextHints is int32
    assert "max_output_tokens" in await refused(max_output_tokens=2**63)  # int64
    assert "deadline_ms" in await refused(deadline_ms=2**63)
    assert "cordum.bus_msg_id" in await refused(labels={"cordum.bus_msg_id": "forged"})
    assert "approval_granted" in await refused(labels={"approval_granted": "true"})
    assert (await api.call("GET", "/api/v1/jobs")).body["items"] == []  # nothing persisted...
    assert await redis.get(keys.idempotency("default", "k-bad")) is None  # ...nor reserved
    assert (await api.submit(key=ALICE, max_input_tokens=2**31 - 1, max_total_tokens=10**10)).status == 200


async def test_a_submit_the_bus_refused_fails_unless_its_key_may_have_answered_it(api: Api, bus, redis,
                                                                                    monkeypatch) -> None:
    # Without a key: the job FAILED (nobody was told of it but this caller, who gets 503).
    _break_publish(monkeypatch, api.gw, subjects.SUBMIT)
    plain = await api.submit()
    assert plain.status == 503 and plain.body["code"] == "bus_unavailable", plain.raw
    assert (await api.job(plain.body["job_id"]))["state"] == "FAILED"
    # With a key: a retry of the same submit (through another gateway, after the client's own
    # timeout) may have been answered with this job already, so it is not failed: it stays PENDING
    # under its key, and the same submit again answers it and queues it.
    key = unique("k-pub")
    failed = await api.submit(idempotency_key=key)
    assert failed.status == 503 and failed.body["code"] == "bus_unavailable", failed.raw
    job_id = failed.body["job_id"]
    assert (await api.job(job_id))["state"] == "PENDING"
    assert await redis.get(keys.idempotency("default", key)) == job_id
    monkeypatch.undo()
    async with bus.consume(subjects.SUBMIT, unique("q")) as messages:
        again = await api.submit(idempotency_key=key)
        assert again.status == 200 and again.body["job_id"] == job_id, again.raw
        _, packet = await _next_request(messages, job_id)  # queued by the retry
    assert packet.job_request.job_id == job_id


async def test_idempotency_key_is_released_when_the_job_never_ran(start_gateway, redis, monkeypatch) -> None:
    from cordum.store.jobs import IDEMPOTENCY_TTL

    api = await start_gateway()
    # a key whose job does not exist is stale: released, and the submit proceeds as a new one
    await redis.set(keys.idempotency("default", "k-ghost"), "ghost-job", ex=IDEMPOTENCY_TTL - 3600)
    fresh = await api.submit(idempotency_key="k-ghost")
    assert fresh.status == 200 and fresh.body["job_id"] != "ghost-job"
    assert await redis.get(keys.idempotency("default", "k-ghost")) == fresh.body["job_id"]
    # ...unless it was reserved just now (its job is being created): retry shortly
    await redis.set(keys.idempotency("default", "k-new"), "being-created", ex=IDEMPOTENCY_TTL)
    busy = await api.submit(idempotency_key="k-new")
    assert busy.status == 409 and busy.body["code"] == "idempotency_in_progress"

    # "policy check unavailable" (fail closed) does not take the key: a later submit can succeed
    closed = await start_gateway(SAFETY_KERNEL_ADDR=f"127.0.0.1:{free_port()}")
    down = await closed.submit(idempotency_key="k-kernel")
    assert down.status == 403 and down.body["error"] == "policy check unavailable"
    assert await redis.get(keys.idempotency("default", "k-kernel")) is None
    later = await api.submit(idempotency_key="k-kernel")
    assert later.status == 200 and later.body["job_id"] != down.body["job_id"]


_JOB_ID_ROUTES = [
    ("GET", "/api/v1/jobs/{}"), ("GET", "/api/v1/jobs/{}/decisions"), ("POST", "/api/v1/jobs/{}/cancel"),
    ("POST", "/api/v1/approvals/{}/approve"), ("POST", "/api/v1/approvals/{}/reject"),
    ("POST", "/api/v1/dlq/{}/retry"), ("DELETE", "/api/v1/dlq/{}"),
]


async def test_malformed_job_ids_are_400_before_any_store_access(api: Api, monkeypatch) -> None:
    async def touched(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a malformed job id reached the store")

    for target, name in ((api.gw.jobs, "get"), (api.gw.dlq, "get"), (api.gw.redis, "pipeline"),
                         (api.gw.leases, "hold")):
        monkeypatch.setattr(target, name, touched)
    for bad, says in (("a{b}", "job_id contains '{' or '}'"), ("j" * 129, "job_id is 129 characters long (max 128)")):
        for method, route in _JOB_ID_ROUTES:
            reply = await api.call(method, route.format(urllib.parse.quote(bad, safe="")))
            assert reply.status == 400, (method, route, bad, reply.status, reply.raw)
            assert reply.body == {"error": f"invalid job id: {reply.body['problems'][0]}", "status": 400,
                                  "code": "invalid_job_id", "problems": reply.body["problems"]}
            assert says in reply.body["error"], reply.body
    spaced = await api.call("GET", "/api/v1/jobs/a%20b")
    assert spaced.status == 400 and "' '" in spaced.body["error"]
    monkeypatch.undo()
    # ids the system makes (uuid, DLQ retry, workflow step) pass the check: unknown ones are 404
    for good in ("run-1:build@1", "run-1:fan[2]@1", "9b2f-retry-0a1b2c3d", "j" * 128):
        assert (await api.call("GET", f"/api/v1/jobs/{good}")).status == 404, good


async def test_another_tenants_job_is_404_even_while_locked(api: Api, redis) -> None:
    job_id = (await api.submit(key=ALICE, topic="job.deploy.db")).body["job_id"]
    await redis.set(keys.job_lock(job_id), "someone-else", px=5000)
    for action in ("approve", "reject"):
        other = await api.call("POST", f"/api/v1/approvals/{job_id}/{action}", key=ACME)
        assert other.status == 404 and other.body == {"error": "job not found", "status": 404}
    assert (await api.call("POST", f"/api/v1/approvals/{job_id}/approve", key=BOB)).status == 409


# ---- object-level authorization (BOLA) on every route -------------------------------------------

# Workers serve every tenant (they belong to pools, not tenants): not a tenant's object.
SHARED_OBJECT_ROUTES = {"/api/v1/workers/<worker_id>"}
# POSTs that change nothing: a viewer may make them.
READ_ONLY_POSTS = {"/api/v1/policy/evaluate", "/api/v1/workflows/<workflow_id>/dry-run"}


def _routes(gw: Any) -> list[tuple[str, str]]:
    from cordum.gateway.app import create_app

    app = create_app(gw)
    return sorted((method, rule.rule) for rule in app.url_map.iter_rules() if rule.rule.startswith("/api/")
                  and not getattr(rule, "websocket", False)
                  for method in rule.methods - {"HEAD", "OPTIONS"})


async def _default_tenants_objects(api: Api) -> dict[str, str]:
    """One object of tenant `default` for each kind of id a route takes."""
    import base64

    job = (await api.submit()).body["job_id"]
    held = (await api.submit(topic="job.deploy.x")).body["job_id"]
    failed = await _worker_failed(api)
    flow = await api.call("POST", "/api/v1/workflows", {"steps": {"a": {"type": "worker", "topic": "job.default"}}})
    assert flow.status == 201, flow.raw
    run = await api.call("POST", f"/api/v1/workflows/{flow.body['id']}/runs", {})
    assert run.status == 200, run.raw
    artifact = await api.call("POST", "/api/v1/artifacts", {"content_base64": base64.b64encode(b"x").decode(),
                                                           "content_type": "text/plain"})
    assert artifact.status == 200, artifact.raw
    return {"job": job, "held": held, "dlq": failed, "workflow_id": flow.body["id"], "run_id": run.body["run_id"],
            "ptr": urllib.parse.quote(artifact.body["artifact_ptr"], safe="")}


def _path(rule: str, ids: dict[str, str]) -> str:
    kind = "held" if "/approvals/" in rule else "dlq" if "/dlq/" in rule else "job"
    path = rule.replace("<job_id>", ids[kind]).replace("<path:ptr>", ids["ptr"])
    for name in ("workflow_id", "run_id"):
        path = path.replace(f"<{name}>", ids[name])
    assert "<" not in path, f"no object of tenant default for {rule}: add one to _default_tenants_objects"
    return path


async def test_another_tenants_objects_are_not_found_on_every_route(api: Api) -> None:
    """Tenant acme's admin, for every route that takes an object id, with tenant default's ids:
    404, exactly as for an id that does not exist (no 403 that would confirm the object)."""
    ids = await _default_tenants_objects(api)
    routes = [(m, r) for m, r in _routes(api.gw) if "<" in r and r not in SHARED_OBJECT_ROUTES]
    assert len(routes) >= 15, routes
    for method, rule in routes:
        reply = await api.call(method, _path(rule, ids), {} if method != "GET" else None, key=ACME_ADMIN)
        assert reply.status == 404, (method, rule, reply.status, reply.raw)
        assert reply.body["status"] == 404
    for method, rule in routes:  # and nothing above touched them: the owner still sees each one
        if method == "GET":
            assert (await api.call(method, _path(rule, ids))).status == 200, (method, rule)


async def test_a_viewer_is_refused_every_mutation(api: Api) -> None:
    ids = await _default_tenants_objects(api)
    mutations = [(m, r) for m, r in _routes(api.gw) if m != "GET" and r not in READ_ONLY_POSTS]
    assert len(mutations) >= 12, mutations
    for method, rule in mutations:
        path = _path(rule, ids) if "<" in rule else rule
        reply = await api.call(method, path, {}, key=VIEWER)
        assert reply.status == 403 and reply.body["code"] == "forbidden", (method, rule, reply.status, reply.raw)


async def test_body_principal_cannot_impersonate_the_keys(api: Api, bus) -> None:
    mismatch = await api.submit(key=ALICE, principal_id="bob")
    assert mismatch.status == 403 and mismatch.body["code"] == "principal_mismatch"
    async with bus.consume(subjects.SUBMIT, unique("q")) as messages:
        own = await api.submit(key=ALICE)
        assert own.status == 200, own.raw
        _, packet = await _next_request(messages, own.body["job_id"])
    assert packet.job_request.principal_id == "alice"
    assert (await api.job(own.body["job_id"]))["principal"] == "alice"
    assert (await api.submit(key=ALICE, principal_id="alice")).status == 200
    # an admin key that names nobody may act on another's behalf (a trusted service)
    named = await api.submit(principal_id="svc-7", actor_id="bot-1")
    assert named.status == 200 and (await api.job(named.body["job_id"]))["principal"] == "svc-7"
    # any other key: the identity is the credential's, never the body's (policy matches on it)
    unbound = await api.submit(key=CAROL, principal_id="svc-7")
    assert unbound.status == 403 and unbound.body["code"] == "principal_mismatch"
    claimed = await api.submit(key=ALICE, actor_id="trusted-agent")
    assert claimed.status == 403 and claimed.body["code"] == "actor_mismatch"
    agent = await api.submit(key=AGENT)
    job = await api.job(agent.body["job_id"])
    assert (job["principal"], job["actor_id"], job["actor_type"]) == ("ops", "agent-7", "service")
    assert (await api.submit(key=AGENT, actor_id="agent-8")).body["code"] == "actor_mismatch"
    assert (await api.submit(key=AGENT, actor_type="human")).body["code"] == "actor_mismatch"
    # the principal a key names cannot approve a job submitted under its name by another key
    held = (await api.submit(principal_id="bob", topic="job.deploy.x")).body["job_id"]
    assert (await api.call("POST", f"/api/v1/approvals/{held}/approve", key=BOB)).body["code"] == "self_approval_denied"


async def test_a_memory_id_the_context_engine_would_refuse_is_refused_at_submit(api: Api) -> None:
    refused = await api.submit(memory_id="conv 1")
    assert refused.status == 400 and refused.body["code"] == "invalid_memory_id", refused.raw
    assert "whitespace" in refused.body["error"]
    accepted = await api.submit(memory_id="conv-1")
    assert accepted.status in (200, 201, 202), accepted.raw


async def test_a_connection_answered_before_its_body_arrived_serves_the_next_request(api: Api) -> None:
    from tests.httpstub import early_answer_then_next

    body = b'{"a": 1}'
    head = (b"PUT /api/v1/artifacts HTTP/1.1\r\nHost: gw\r\nX-API-Key: " + ADMIN.encode() +
            b"\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body))
    second = b"GET /api/v1/jobs HTTP/1.1\r\nHost: gw\r\nX-API-Key: " + ADMIN.encode() + b"\r\n\r\n"
    first, second = await trio.to_thread.run_sync(early_answer_then_next, api.port, head, body, second)
    assert first.startswith(b"HTTP/1.1 405") and second.startswith(b"HTTP/1.1 200"), (first, second)
