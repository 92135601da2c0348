"""The gateway's workflow routes (cordum/gateway/workflows.py) over real HTTP, against real Redis
and NATS servers of this module's own (processes share JetStream durables).

The gateway runs in the test's nursery like in test_gateway.py; its embedded WorkflowEngine
starts, cancels and reruns runs. In the route tests nothing else runs: an engine of the test
(`ResultDriver`) applies the answers the test gives to step jobs, so every run moves only when the
test says. The approval-gate test runs the real thing: safety kernel, scheduler,
cordum-workflow-engine and echo worker processes."""

from __future__ import annotations

import json
import threading
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

import pytest
import trio

from cordum.agent.v1.job_pb2 import JobResult, JobStatus
from cordum.protocol import subjects
from cordum.protocol.packets import decode, encode, new_packet
from cordum.runtime.lease import Leases
from cordum.store import keys
from cordum.store.jobs import JobStore
from cordum.store.workflows import WorkflowStore
from cordum.workflow.engine import UNSUPPORTED_TYPES, WorkflowEngine
from tests.conftest import unique
from tests.integration import stack as stack_module
from tests.integration.stack import Stack
from tests.integration import test_gateway as gateway_tests
from tests.integration.test_gateway import ACME, ACME_ADMIN, ADMIN, ALICE, BOB, VIEWER, Api

# fixtures: servers of this module's own, and test_gateway's in-process gateway and policy kernel
redis_server, nats_server = stack_module.redis_server, stack_module.nats_server
kernel, start_gateway = gateway_tests.kernel, gateway_tests.start_gateway

WAIT = 60  # generous: process start-up on a loaded 2-core machine
FAST_ENGINE = {"WORKFLOW_ENGINE_SCAN_INTERVAL": "1s", "WORKFLOW_ENGINE_DELAY_POLL_INTERVAL": "0.5s"}


async def eventually(check, timeout: float = 20, interval: float = 0.05, what: str = "condition") -> Any:
    last: Any = None
    with trio.move_on_after(timeout):
        while True:
            last = await check()
            if last:
                return last
            await trio.sleep(interval)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


@pytest.fixture
async def api(start_gateway) -> Api:
    return await start_gateway()


def worker(topic: str = "job.default", **extra: Any) -> dict[str, Any]:
    return {"type": "worker", "topic": topic, **extra}


async def define(api: Api, steps: dict[str, Any], *, key: str = ADMIN, **extra: Any) -> str:
    reply = await api.call("POST", "/api/v1/workflows", {"steps": steps, **extra}, key=key)
    assert reply.status == 201, reply.raw
    return reply.body["id"]


async def start(api: Api, workflow_id: str, body: Any = None, *, key: str = ADMIN, query: str = "",
                headers: dict[str, str] | None = None) -> str:
    reply = await api.call("POST", f"/api/v1/workflows/{workflow_id}/runs{query}", body if body is not None else {},
                           key=key, headers=headers)
    assert reply.status == 200, reply.raw
    assert reply.headers["X-Trace-Id"] == reply.body["run_id"]
    return reply.body["run_id"]


async def run_doc(api: Api, run_id: str, key: str = ADMIN) -> dict[str, Any]:
    reply = await api.call("GET", f"/api/v1/workflow-runs/{run_id}", key=key)
    assert reply.status == 200, reply.raw
    return reply.body


class Submits:
    """JobRequests published on sys.job.submit (a JetStream consumer of the test's own)."""

    def __init__(self) -> None:
        self.requests: list[Any] = []

    async def run(self, bus, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with bus.consume(subjects.SUBMIT, unique("wf-gw-test")) as messages:
            task_status.started()
            async for msg in messages:
                packet = decode(msg.data)
                if packet.WhichOneof("payload") == "job_request":
                    self.requests.append(packet.job_request)
                await msg.ack()

    def of(self, job_id: str) -> list[Any]:
        return [r for r in self.requests if r.job_id == job_id]

    async def wait(self, job_id: str) -> Any:
        async def seen():
            return self.of(job_id)

        return (await eventually(seen, what=f"submit of {job_id}"))[0]


@asynccontextmanager
async def submits(bus) -> AsyncIterator[Submits]:
    tap = Submits()
    async with trio.open_nursery() as nursery:
        await nursery.start(tap.run, bus)
        yield tap
        nursery.cancel_scope.cancel()


class ResultDriver:
    """What cordum-workflow-engine does with results, played by the test: an engine of its own
    applies the answers the test gives (`answer`), so runs move only when the test says."""

    def __init__(self, redis, bus, settings) -> None:
        self.engine = WorkflowEngine(store=WorkflowStore(redis), jobs=JobStore(redis), bus=bus,
                                     leases=Leases(redis, f"{settings.instance_id}-engine"), redis=redis)

    async def answer(self, job_id: str, status: str = "SUCCEEDED", output: Any = None, error: str = "") -> None:
        """A worker's answer to a step job: output at `res:<id>`, then the result, applied."""
        result = JobResult(job_id=job_id, status=JobStatus.Value("JOB_STATUS_" + status), worker_id="test-worker",
                           error_message=error)
        if output is not None:
            await self.engine.redis.execute("SET", keys.result(job_id), json.dumps(output))
            result.result_ptr = f"redis://{keys.result(job_id)}"
        await self.engine.handle_result(new_packet(result, sender_id="test-worker", trace_id=job_id.split(":")[0]))


class Results:
    """Every JobResult published on `sys.job.result` and `sys.job.dlq`, by subject (durables of the
    test's own: it only watches)."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, JobResult]] = []

    async def consume(self, bus, subject: str, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with bus.consume(subject, unique("wf-results")) as messages:
            task_status.started()
            async for msg in messages:
                packet = decode(msg.data)
                if packet.WhichOneof("payload") == "job_result":
                    self.seen.append((subject, packet.job_result))
                await msg.ack()


@asynccontextmanager
async def results(bus) -> AsyncIterator[Results]:
    tap = Results()
    async with trio.open_nursery() as nursery:
        await nursery.start(tap.consume, bus, subjects.RESULT)
        await nursery.start(tap.consume, bus, subjects.DLQ)
        yield tap
        nursery.cancel_scope.cancel()


# ---- definitions ----------------------------------------------------------------------------------


async def test_definition_crud_and_tenants(api: Api) -> None:
    created = await api.call("POST", "/api/v1/workflows", {
        "name": "fetch and act", "description": "d", "version": "1", "timeout_sec": 600,
        "steps": {"fetch": worker(), "act": worker(depends_on=["fetch"], input={"x": "${steps.fetch.output.x}"})},
    })
    assert created.status == 201 and set(created.body) == {"id"}, created.raw
    workflow_id = created.body["id"]

    got = await api.call("GET", f"/api/v1/workflows/{workflow_id}", key=VIEWER)
    assert got.status == 200, got.raw
    doc = got.body
    assert doc["id"] == workflow_id and doc["name"] == "fetch and act" and doc["org_id"] == "default"
    assert doc["timeout_sec"] == 600 and doc["created_by"] == "admin" and doc["created_at"] == doc["updated_at"]
    assert doc["steps"]["fetch"] == {"id": "fetch", "type": "worker", "topic": "job.default"}
    assert doc["steps"]["act"]["depends_on"] == ["fetch"]

    # upsert by id: a new version, same creation
    await trio.sleep(1.1)
    again = await api.call("POST", "/api/v1/workflows", {"id": workflow_id, "steps": {"only": worker()}})
    assert again.status == 201 and again.body == {"id": workflow_id}
    doc2 = (await api.call("GET", f"/api/v1/workflows/{workflow_id}")).body
    assert list(doc2["steps"]) == ["only"] and doc2["name"] == ""  # the SDK's model needs a name
    assert doc2["created_at"] == doc["created_at"] and doc2["updated_at"] > doc["updated_at"]

    named = await api.call("POST", "/api/v1/workflows", {"id": "named-flow", "steps": {"a": worker()}})
    assert named.status == 201 and named.body == {"id": "named-flow"}
    listed = await api.call("GET", "/api/v1/workflows", key=VIEWER)
    assert listed.status == 200 and sorted(d["id"] for d in listed.body) == sorted([workflow_id, "named-flow"])
    page = await api.call("GET", "/api/v1/workflows?limit=1")
    assert len(page.body) == 1 and page.headers["X-Next-Cursor"]
    rest = await api.call("GET", f"/api/v1/workflows?limit=1&cursor={page.headers['X-Next-Cursor']}")
    assert [d["id"] for d in page.body + rest.body] == [d["id"] for d in listed.body]

    # another tenant: nothing of it exists
    assert (await api.call("GET", "/api/v1/workflows", key=ACME)).body == []
    for method, path in (("GET", f"/api/v1/workflows/{workflow_id}"), ("DELETE", f"/api/v1/workflows/{workflow_id}"),
                         ("GET", f"/api/v1/workflows/{workflow_id}/runs"),
                         ("POST", f"/api/v1/workflows/{workflow_id}/dry-run")):
        reply = await api.call(method, path, key=ACME_ADMIN)
        assert reply.status == 404 and reply.body["error"] == "workflow not found", (method, path, reply.raw)
    taken = await api.call("POST", "/api/v1/workflows", {"id": workflow_id, "steps": {"a": worker()}}, key=ACME_ADMIN)
    assert taken.status == 409 and taken.body["code"] == "workflow_id_taken"
    assert (await api.call("GET", "/api/v1/workflows?org_id=acme")).status == 403

    # roles: viewers read, operators may not write definitions
    assert (await api.call("POST", "/api/v1/workflows", {"steps": {"a": worker()}}, key=VIEWER)).status == 403
    assert (await api.call("POST", "/api/v1/workflows", {"steps": {"a": worker()}}, key=ALICE)).status == 403
    assert (await api.call("DELETE", f"/api/v1/workflows/{workflow_id}", key=ALICE)).status == 403

    deleted = await api.call("DELETE", f"/api/v1/workflows/{workflow_id}")
    assert deleted.status == 204 and deleted.raw == b""
    assert (await api.call("GET", f"/api/v1/workflows/{workflow_id}")).status == 404
    assert (await api.call("DELETE", f"/api/v1/workflows/{workflow_id}")).status == 404
    bad_id = await api.call("GET", "/api/v1/workflows/bad%7Bid%7D")
    assert bad_id.status == 400 and bad_id.body["code"] == "invalid_workflow_id"


async def test_invalid_definitions_are_named(api: Api) -> None:
    async def create(body: Any = None, **kw: Any):
        return await api.call("POST", "/api/v1/workflows", body, **kw)

    cycle = await create({"id": "cyc", "steps": {"a": worker(depends_on=["b"]), "b": worker(depends_on=["a"])}})
    assert cycle.status == 400 and cycle.body["code"] == "invalid_workflow", cycle.raw
    assert "dependency cycle: a → b → a" in cycle.body["error"]
    dangling = await create({"id": "dang", "steps": {"a": worker(depends_on=["ghost"])}})
    assert dangling.status == 400 and "'ghost'" in dangling.body["error"] and dangling.body["step"] == "a"
    assert dangling.body["field"] == "depends_on"
    typo = await create(raw=b'{\n  "id": "typo",\n  "steps": {\n    "a": {"topc": "job.default"}\n  }\n}',
                        headers={"Content-Type": "application/json"})
    assert typo.status == 400 and "workflow:4: step 'a': field 'topc'" in typo.body["error"], typo.raw
    assert typo.body["line"] == 4
    assert cycle.body["line"] == 1  # the body as sent: one line of JSON
    for body, problem in (({"steps": {}}, "at least one step"), ({"steps": {"a": worker()}, "timeout_sec": 10**6},
                                                                 "timeout_sec must be between 0 and 604800"),
                          ({"steps": {"a": worker()}, "name": "n" * 300}, "name must be at most 256")):
        reply = await create(body)
        assert reply.status == 400 and problem in reply.body["error"], (body, reply.raw)
        assert "line" not in reply.body  # given an id, the body is a document: no lines to name
    not_json = await create(raw=b"{nope", headers={"Content-Type": "application/json"})
    assert not_json.status == 400 and not_json.body["error"].startswith("invalid JSON body")
    assert (await create([1, 2])).status == 400
    assert (await create({"org_id": "acme", "steps": {"a": worker()}})).status == 403
    assert (await api.call("GET", "/api/v1/workflows/cyc")).status == 404  # nothing was stored

    # YAML by Content-Type: errors name the line, a good one is stored
    bad_yaml = await create(raw=b"id: y1\nsteps:\n  a:\n    topic: job.default\n    depends_on: [zzz]\n",
                            headers={"Content-Type": "application/yaml"})
    assert bad_yaml.status == 400 and "workflow:5: step 'a': field 'depends_on'" in bad_yaml.body["error"], bad_yaml.raw
    good_yaml = await create(raw=b"id: y1\nname: from yaml\nsteps:\n  a: {topic: job.default}\n"
                                 b"  b: {topic: job.default, depends_on: [a]}\n",
                             headers={"Content-Type": "application/x-yaml"})
    assert good_yaml.status == 201 and good_yaml.body == {"id": "y1"}, good_yaml.raw
    assert (await api.call("GET", "/api/v1/workflows/y1")).body["steps"]["b"]["depends_on"] == ["a"]
    broken_yaml = await create(raw=b"id: [\n", headers={"Content-Type": "text/yaml"})
    assert broken_yaml.status == 400 and broken_yaml.body["error"].startswith("invalid YAML body at line")

    # the public SDK's step shape (type job, config, retry{max_attempts, backoff_sec}) maps onto ours
    sdk = await create({"id": "sdk-shape", "name": "sdk", "steps": {
        "a": {"id": "a", "type": "job", "config": {"topic": "job.default", "input": {"k": 1}},
              "retry": {"max_attempts": 3, "backoff_sec": 2}, "timeout_sec": 30}}})
    assert sdk.status == 201, sdk.raw
    step = (await api.call("GET", "/api/v1/workflows/sdk-shape")).body["steps"]["a"]
    assert step["type"] == "worker" and step["topic"] == "job.default" and step["input"] == {"k": 1}
    assert step["retry"]["max_retries"] == 2 and step["retry"]["initial_backoff_sec"] == 2
    clash = await create({"id": "clash", "steps": {"a": {"type": "job", "topic": "job.a", "config": {"topic": "job.b"}}}})
    assert clash.status == 400 and "field 'topic' is given twice" in clash.body["error"]
    zero = await create({"id": "zero", "steps": {"a": {"topic": "job.a", "retry": {"max_attempts": 0}}}})
    assert zero.status == 400 and "retry.max_attempts must be a whole number >= 1" in zero.body["error"]


# ---- runs --------------------------------------------------------------------------------------------


async def test_start_with_idempotency_keys_and_tenant_isolation(api: Api, bus, redis) -> None:
    workflow_id = await define(api, {"a": worker(input={"n": "${input.n}"})},
                               input_schema={"type": "object", "required": ["n"],
                                             "properties": {"n": {"type": "integer"}}})
    other_id = await define(api, {"a": worker()})
    async with submits(bus) as seen:
        run_id = await start(api, workflow_id, {"n": 1}, key=ALICE, headers={"Idempotency-Key": "k-1"})
        request = await seen.wait(f"{run_id}:a@1")
        assert request.topic == "job.default" and request.tenant_id == "default"
        assert await JobStore(redis).get_context(f"{run_id}:a@1") == {"n": 1}
        # the same key (any of its three spellings) answers with the same run and starts nothing
        assert await start(api, workflow_id, {"n": 2}, headers={"X-Idempotency-Key": "k-1"}) == run_id
        assert await start(api, workflow_id, {"n": 3}, query="?idempotency_key=k-1") == run_id
        conflict = await api.call("POST", f"/api/v1/workflows/{other_id}/runs", {}, headers={"Idempotency-Key": "k-1"})
        assert conflict.status == 409 and conflict.body["code"] == "RUN_IDEMPOTENCY_CONFLICT", conflict.raw
        # another tenant's key space is its own; its start of our workflow is a 404
        missing = await api.call("POST", f"/api/v1/workflows/{workflow_id}/runs", {"n": 1}, key=ACME,
                                 headers={"Idempotency-Key": "k-1"})
        assert missing.status == 404 and missing.body["error"] == "workflow not found"
        other_run = await start(api, other_id, {}, headers={"Idempotency-Key": "k-2"})
        assert other_run != run_id
        await seen.wait(f"{other_run}:a@1")
        await trio.sleep(0.3)
        assert len(seen.of(f"{run_id}:a@1")) == 1

        # input checked against the workflow's input_schema, problems named
        for body, problem in (({}, "missing required field 'n'"), ({"n": "one"}, "input.n must be integer (got string)")):
            bad = await api.call("POST", f"/api/v1/workflows/{workflow_id}/runs", body)
            assert bad.status == 400 and bad.body["code"] == "invalid_input" and problem in bad.body["error"], bad.raw
        assert (await api.call("POST", f"/api/v1/workflows/{workflow_id}/runs", raw=b"[1]",
                               headers={"Content-Type": "application/json"})).status == 400
        assert (await api.call("POST", f"/api/v1/workflows/{workflow_id}/runs?dry_run=maybe", {"n": 1})).status == 400
        assert (await api.call("POST", f"/api/v1/workflows/{workflow_id}/runs", {"n": 1}, key=VIEWER)).status == 403

        # dry run: flagged on the run and on its step jobs
        dry = await start(api, workflow_id, {"n": 5}, query="?dry_run=true")
        assert (await seen.wait(f"{dry}:a@1")).env["dry_run"] == "true"
        assert (await run_doc(api, dry))["dry_run"] is True

    # the run went pending → running in the gateway's engine: counted there
    metrics = await trio.to_thread.run_sync(stack_module.http_get, api.port, "/metrics")
    assert stack_module.metric(metrics, "cordum_workflows_started_total") == 3  # run_id, other_run, dry
    doc = await run_doc(api, run_id, key=VIEWER)
    assert doc["id"] == run_id and doc["workflow_id"] == workflow_id and doc["org_id"] == "default"
    assert doc["status"] == "running" and doc["input"] == {"n": 1} and doc["idempotency_key"] == "k-1"
    assert doc["created_by"] == doc["triggered_by"] == "alice" and doc["dry_run"] is False
    for path in (f"/api/v1/workflow-runs/{run_id}", f"/api/v1/workflow-runs/{run_id}/timeline"):
        reply = await api.call("GET", path, key=ACME)
        assert reply.status == 404 and reply.body["error"] == "workflow run not found", path
    for path in (f"/api/v1/workflow-runs/{run_id}/cancel", f"/api/v1/workflows/{workflow_id}/runs/{run_id}/cancel",
                 f"/api/v1/workflow-runs/{run_id}/rerun"):
        assert (await api.call("POST", path, {}, key=ACME)).status == 404, path
    assert (await api.call("DELETE", f"/api/v1/workflow-runs/{run_id}", key=ACME_ADMIN)).status == 404
    assert (await api.call("GET", "/api/v1/workflow-runs", key=ACME)).body == {"items": [], "next_cursor": None}
    assert (await api.call("GET", f"/api/v1/workflow-runs/{run_id}")).status == 200  # still there
    bad = await api.call("GET", "/api/v1/workflow-runs/x%7By%7D")
    assert bad.status == 400 and bad.body["code"] == "invalid_run_id"


async def test_run_listing_pages_and_filters(api: Api, bus) -> None:
    first = await define(api, {"a": worker()})
    second = await define(api, {"a": worker()})
    runs = [await start(api, first) for _ in range(3)] + [await start(api, second) for _ in range(2)]
    await ResultDriver(api.gw.redis, bus, api.gw.settings).answer(f"{runs[0]}:a@1", output={"ok": 1})
    assert (await run_doc(api, runs[0]))["status"] == "succeeded"

    listed = await api.call("GET", "/api/v1/workflow-runs", key=VIEWER)
    assert listed.status == 200 and listed.body["next_cursor"] is None
    items = listed.body["items"]
    assert sorted(i["id"] for i in items) == sorted(runs)
    stamps = [i["updated_at"] for i in items]
    assert stamps == sorted(stamps, reverse=True)  # most recently updated first
    summary = next(i for i in items if i["id"] == runs[0])
    assert summary["status"] == "succeeded" and summary["workflow_id"] == first and summary["error"] is None
    assert summary["started_at"].endswith("Z") and summary["completed_at"].endswith("Z")
    assert "steps" not in summary and "input" not in summary

    paged, cursor, pages = [], None, 0
    while True:
        reply = await api.call("GET", "/api/v1/workflow-runs?limit=2" + (f"&cursor={cursor}" if cursor else ""))
        assert reply.status == 200, reply.raw
        paged += [i["id"] for i in reply.body["items"]]
        cursor, pages = reply.body["next_cursor"], pages + 1
        if cursor is None:
            break
        assert isinstance(cursor, str) and len(reply.body["items"]) == 2
    assert paged == [i["id"] for i in items] and pages == 3

    by_workflow = (await api.call("GET", f"/api/v1/workflow-runs?workflow_id={second}")).body["items"]
    assert sorted(i["id"] for i in by_workflow) == sorted(runs[3:])
    done = (await api.call("GET", "/api/v1/workflow-runs?status=succeeded")).body["items"]
    assert [i["id"] for i in done] == [runs[0]]
    running = (await api.call("GET", f"/api/v1/workflow-runs?status=running&workflow_id={first}")).body["items"]
    assert sorted(i["id"] for i in running) == sorted(runs[1:3])
    of_first = await api.call("GET", f"/api/v1/workflows/{first}/runs")
    assert of_first.status == 200 and sorted(i["id"] for i in of_first.body) == sorted(runs[:3])
    one = await api.call("GET", f"/api/v1/workflows/{first}/runs?limit=1")
    assert len(one.body) == 1 and one.headers["X-Next-Cursor"]

    for query, problem in (("status=sleeping", "status must be one of"), ("cursor=zzz", "cursor must be"),
                           ("limit=0", "limit must be >= 1"), ("workflow_id=a%3Ab", "invalid workflow id")):
        reply = await api.call("GET", f"/api/v1/workflow-runs?{query}")
        assert reply.status == 400 and problem in reply.body["error"], (query, reply.raw)
    assert (await api.call("GET", "/api/v1/workflow-runs?org_id=acme")).status == 403


async def test_run_detail_timeline_and_timers(api: Api, bus) -> None:
    workflow_id = await define(api, {"a": worker(), "b": worker(depends_on=["a"])}, timeout_sec=300)
    run_id = await start(api, workflow_id, {"x": 1})
    await ResultDriver(api.gw.redis, bus, api.gw.settings).answer(f"{run_id}:a@1", "FAILED_FATAL", error="boom")
    doc = await run_doc(api, run_id)
    assert doc["status"] == "failed" and doc["error"]["message"] == "step a failed: boom"
    assert doc["started_at"].endswith("Z") and doc["completed_at"].endswith("Z")
    a, b = doc["steps"]["a"], doc["steps"]["b"]
    assert a["status"] == "failed" and a["job_id"] == f"{run_id}:a@1" and a["attempts"] == 1
    assert a["error"] == "boom" and a["error_detail"]["message"] == "boom"  # the SDK reads a string
    assert a["started_at"].endswith("Z") and a["completed_at"].endswith("Z")
    assert b["status"] == "skipped" and b["job_id"] is None and b["started_at"] is None
    assert doc["timers"] == []  # the run ended: no timeout to wait for

    timeline = await api.call("GET", f"/api/v1/workflow-runs/{run_id}/timeline", key=VIEWER)
    assert timeline.status == 200, timeline.raw
    events = timeline.body
    types = [e["type"] for e in events]
    assert types[0] == "run_created" and "step_dispatched" in types and types[-1] == "run_status"
    dispatched = next(e for e in events if e["type"] == "step_dispatched")
    assert dispatched["step_id"] == "a" and dispatched["job_id"] == f"{run_id}:a@1"
    assert dispatched["timestamp"].endswith("Z") and dispatched["run_id"] == run_id
    assert [e["timestamp"] for e in events] == sorted(e["timestamp"] for e in events)
    last = await api.call("GET", f"/api/v1/workflow-runs/{run_id}/timeline?limit=1")
    assert last.body == events[-1:]

    # a running run with a workflow timeout has its timer
    pending = await start(api, workflow_id)
    timers = (await run_doc(api, pending))["timers"]
    assert len(timers) == 1 and timers[0]["workflow_id"] == workflow_id and timers[0]["run_id"] == pending
    assert 290_000 < timers[0]["remaining_ms"] <= 300_000 and timers[0]["fires_at"].endswith("Z")


async def test_cancel_publishes_job_cancel_and_busy_runs_are_409(api: Api, bus, redis) -> None:
    workflow_id = await define(api, {"a": worker(), "b": worker(depends_on=["a"])})
    run_id = await start(api, workflow_id)
    assert (await run_doc(api, run_id))["steps"]["a"]["status"] == "running"

    # someone else holds the run lock: a retryable 409, nothing changed
    await Leases(redis, "other-engine").try_acquire(keys.workflow_run_lock(run_id), 30)
    busy = await api.call("POST", f"/api/v1/workflow-runs/{run_id}/cancel", key=ALICE)
    assert busy.status == 409 and busy.body["code"] == "RUN_NOT_CANCELLABLE", busy.raw
    assert busy.body["error"] == "workflow run is busy, retry"
    assert (await run_doc(api, run_id))["status"] == "running"
    await redis.delete(keys.workflow_run_lock(run_id))

    assert (await api.call("POST", f"/api/v1/workflow-runs/{run_id}/cancel", key=VIEWER)).status == 403
    wrong = await api.call("POST", f"/api/v1/workflows/{await define(api, {'z': worker()})}/runs/{run_id}/cancel")
    assert wrong.status == 404  # the run is not that workflow's
    async with bus.subscribe(subjects.CANCEL) as messages:
        reply = await api.call("POST", f"/api/v1/workflows/{workflow_id}/runs/{run_id}/cancel", key=ALICE)
        assert reply.status == 204 and reply.raw == b"", reply.raw
        with trio.fail_after(10):
            packet = decode((await messages.receive()).data)
    assert packet.job_cancel.job_id == f"{run_id}:a@1" and packet.job_cancel.reason
    doc = await run_doc(api, run_id)
    assert doc["status"] == "cancelled" and doc["steps"]["a"]["status"] == "cancelled"
    again = await api.call("POST", f"/api/v1/workflow-runs/{run_id}/cancel")
    assert again.status == 204  # already cancelled
    assert (await api.call("POST", "/api/v1/workflow-runs/no-such-run/cancel")).status == 404


async def test_delete_run_only_once_finished(api: Api) -> None:
    workflow_id = await define(api, {"a": worker()})
    run_id = await start(api, workflow_id)
    active = await api.call("DELETE", f"/api/v1/workflow-runs/{run_id}")
    assert active.status == 409 and active.body["code"] == "RUN_NOT_TERMINAL"
    assert (await api.call("DELETE", f"/api/v1/workflow-runs/{run_id}", key=ALICE)).status == 403
    assert (await api.call("POST", f"/api/v1/workflow-runs/{run_id}/cancel")).status == 204
    deleted = await api.call("DELETE", f"/api/v1/workflow-runs/{run_id}")
    assert deleted.status == 204
    assert (await api.call("GET", f"/api/v1/workflow-runs/{run_id}")).status == 404
    assert (await api.call("GET", f"/api/v1/workflow-runs/{run_id}/timeline")).status == 404
    assert (await api.call("DELETE", f"/api/v1/workflow-runs/{run_id}")).status == 404
    assert (await api.call("GET", f"/api/v1/workflows/{workflow_id}/runs")).body == []


async def test_rerun_from_a_step(api: Api, bus, redis) -> None:
    workflow_id = await define(api, {"a": worker(output_path="fetched"),
                                     "b": worker(depends_on=["a"], input={"v": "${steps.a.output.v}"}),
                                     "c": worker(depends_on=["b"])})
    driver = ResultDriver(redis, bus, api.gw.settings)
    async with submits(bus) as seen:
        old = await start(api, workflow_id, {"q": "x"})
        await driver.answer(f"{old}:a@1", output={"v": 7})
        await seen.wait(f"{old}:b@1")
        await driver.answer(f"{old}:b@1", "FAILED_FATAL", error="flaky downstream")
        before = await run_doc(api, old)
        assert before["status"] == "failed"

        reply = await api.call("POST", f"/api/v1/workflow-runs/{old}/rerun", {"from_step": "b"}, key=ALICE)
        assert reply.status == 200, reply.raw
        new = reply.body["run_id"]
        assert new != old and reply.headers["X-Trace-Id"] == new
        # a is taken over, b runs again with a's output, c waits for it
        request = await seen.wait(f"{new}:b@1")
        assert await JobStore(redis).get_context(f"{new}:b@1") == {"v": 7}
        assert request.labels["run_id"] == new
        doc = await run_doc(api, new)
        assert doc["rerun_of"] == old and doc["rerun_step"] == "b" and doc["input"] == {"q": "x"}
        assert doc["status"] == "running" and doc["created_by"] == "alice"
        assert doc["steps"]["a"]["status"] == "succeeded" and doc["steps"]["a"]["job_id"] is None
        assert doc["steps"]["b"]["status"] == "running" and "c" not in doc["steps"]
        assert doc["context"]["fetched"] == {"v": 7}
        assert doc["metadata"]["rerun"] == {"run_id": old, "from_step": "b", "kept_jobs": {"a": f"{old}:a@1"}}
        assert seen.of(f"{new}:a@1") == []
        timeline = (await api.call("GET", f"/api/v1/workflow-runs/{new}/timeline")).body
        assert timeline[0]["type"] == "run_created" and timeline[0]["data"] == {"rerun_of": old, "from_step": "b"}
        # the old run and its jobs are still its own
        assert await run_doc(api, old) == before
        assert await WorkflowStore(redis).run_for_job(f"{old}:a@1") == (old, "a")

        await driver.answer(f"{new}:b@1", output={})
        await seen.wait(f"{new}:c@1")
        await driver.answer(f"{new}:c@1", output={})
        assert (await run_doc(api, new))["status"] == "succeeded"

        # the whole run again (no from_step), as a dry run
        whole = await api.call("POST", f"/api/v1/workflow-runs/{old}/rerun", {"dry_run": True})
        assert whole.status == 200, whole.raw
        assert (await seen.wait(f"{whole.body['run_id']}:a@1")).env["dry_run"] == "true"

    for body, problem in (({"from_step": "nope"}, "from_step 'nope' is not a step of workflow"),
                          ({"from_step": 3}, "from_step must be a string"),
                          ({"dry_run": "yes"}, "dry_run must be true or false")):
        bad = await api.call("POST", f"/api/v1/workflow-runs/{old}/rerun", body)
        assert bad.status == 400 and problem in bad.body["error"], (body, bad.raw)
    assert (await api.call("POST", f"/api/v1/workflow-runs/{old}/rerun", {}, key=VIEWER)).status == 403
    assert (await api.call("POST", "/api/v1/workflow-runs/no-such-run/rerun", {})).status == 404


async def test_dry_run_plans_without_running(api: Api) -> None:
    workflow_id = await define(api, {
        "fetch": worker(), "check": {"type": "condition", "depends_on": ["fetch"], "condition": "input.n > 1"},
        "ask": {"type": "approval", "depends_on": ["check"]},
        "pause": {"type": "delay", "delay_sec": 30, "depends_on": ["ask"]},
        "act": worker("job.act", depends_on=["pause"], for_each="input.items"),
    }, input_schema={"type": "object", "required": ["n"], "properties": {"n": {"type": "number"}}})
    reply = await api.call("POST", f"/api/v1/workflows/{workflow_id}/dry-run", {"input": {"items": [1]}}, key=ALICE)
    assert reply.status == 200, reply.raw
    result = reply.body
    assert [s["step_id"] for s in result["steps"]] == ["fetch", "check", "ask", "pause", "act"]
    assert [s["wave"] for s in result["steps"]] == [0, 1, 2, 3, 4]
    assert all(s["status"] == "pending" for s in result["steps"])
    by_id = {s["step_id"]: s for s in result["steps"]}
    assert by_id["fetch"]["topic"] == "job.default" and by_id["ask"]["topic"] == "job.cordum.approval-gate"
    assert by_id["act"]["topic"] == "job.act" and by_id["act"]["for_each"] == "input.items"
    warnings = result["warnings"]
    assert "input: missing required field 'n'" in warnings
    # (the engine gains step types as it grows: the warning follows what it cannot run today)
    assert any("step 'pause': step type delay is not supported" in w for w in warnings) == \
        ("delay" in UNSUPPORTED_TYPES)
    assert result["estimated_duration_sec"] == 30 and result["valid"] is False
    ok = (await api.call("POST", f"/api/v1/workflows/{workflow_id}/dry-run", {"input": {"n": 2}})).body
    assert ok["valid"] is True and not any(w.startswith("input") for w in ok["warnings"])
    assert (await api.call("POST", f"/api/v1/workflows/{workflow_id}/dry-run", {"input": [1]})).status == 400
    assert (await api.call("POST", f"/api/v1/workflows/{workflow_id}/dry-run", {}, key=VIEWER)).status == 403
    assert (await api.call("POST", "/api/v1/workflows/missing/dry-run", {})).status == 404
    # nothing ran
    assert (await api.call("GET", f"/api/v1/workflows/{workflow_id}/runs")).body == []


async def test_stream_relays_workflow_events_to_their_tenant(api: Api) -> None:
    from cordum.cli.ws import WebSocketClient

    def open_client(key: str) -> WebSocketClient:
        client = WebSocketClient(f"ws://127.0.0.1:{api.port}/api/v1/stream", headers={"X-API-Key": key}, timeout=5)
        client.connect()
        return client

    clients = {"mine": await trio.to_thread.run_sync(open_client, ADMIN),
               "theirs": await trio.to_thread.run_sync(open_client, ACME)}
    frames: dict[str, list[dict]] = {"mine": [], "theirs": []}

    def reader(name: str) -> None:
        try:
            for frame in clients[name].messages():
                frames[name].append(frame if isinstance(frame, dict) else json.loads(frame))
        except Exception:
            pass

    threads = [threading.Thread(target=reader, args=(name,), daemon=True) for name in clients]
    for thread in threads:
        thread.start()
    try:
        async def connected():
            return api.gw.hub.client_count == 2

        await eventually(connected, what="two stream clients")
        # a notify step runs inline in the gateway's engine when the run starts: its Alert goes out
        # on sys.workflow.event, relayed to the run's tenant only
        workflow_id = await define(api, {"tell": {"type": "notify", "input": {"level": "info",
                                                                              "message": "hello ${input.who}"}}})
        run_id = await start(api, workflow_id, {"who": "world"})

        async def alert():
            return next((f["alert"] for f in frames["mine"] if "alert" in f), None)

        seen = await eventually(alert, what="the notify alert on the stream")
        assert seen["message"] == "hello world" and seen["details"]["run_id"] == run_id
        assert seen["details"]["tenant_id"] == "default" and seen["details"]["step_id"] == "tell"
        # the other tenant's client is alive (heartbeats reach it) but got no alert
        from cordum.agent.v1.heartbeat_pb2 import Heartbeat

        await api.gw.bus.publish(subjects.HEARTBEAT, encode(new_packet(Heartbeat(worker_id="w-wf"), sender_id="w-wf")))

        async def heartbeat():
            return any("heartbeat" in f for f in frames["theirs"])

        await eventually(heartbeat, what="a heartbeat on the other tenant's stream")
        assert not any("alert" in f for f in frames["theirs"])
    finally:
        for client in clients.values():
            client.close()


# ---- workflow approval gates through the normal approvals path (real scheduler, kernel, worker) ---

GATE_POLICY = """
version: gate-test
default_decision: deny
rules:
  - id: no-gates-for-acme
    match: {topics: ["job.cordum.approval-gate"], tenants: [acme]}
    decision: deny
    reason: acme may not open approval gates
  - id: gates-are-held-for-humans
    match: {topics: ["job.cordum.approval-gate"]}
    decision: allow
  - id: allow-default
    match: {topics: ["job.default", "job.default.*"]}
    decision: allow
"""


async def wait_job(redis, job_id: str, states: set[str]) -> dict[str, Any]:
    async def reached():
        meta = await JobStore(redis).get(job_id)
        return meta if meta is not None and meta.get("state") in states else None

    return await eventually(reached, timeout=WAIT, interval=0.1, what=f"job {job_id} in {states}")


async def wait_run(api: Api, run_id: str, statuses: set[str], key: str = ADMIN) -> dict[str, Any]:
    async def reached():
        doc = await run_doc(api, run_id, key)
        return doc if doc["status"] in statuses else None

    return await eventually(reached, timeout=WAIT, interval=0.1, what=f"run {run_id} in {statuses}")


async def test_approval_gate_is_held_approved_and_completed_by_the_scheduler(spawn, tmp_path, start_gateway, redis,
                                                                              bus) -> None:
    policy = tmp_path / "gate-policy.yaml"
    policy.write_text(GATE_POLICY)
    stack = Stack.create(spawn, tmp_path, SAFETY_POLICY_PATH=str(policy), **FAST_ENGINE)
    stack.kernel()
    stack.scheduler()
    stack.workflow_engine()
    stack.worker()
    await stack.ready(timeout=WAIT)
    await trio.sleep(1.0)  # the worker's heartbeats reach the scheduler
    api = await start_gateway(SAFETY_KERNEL_ADDR=stack.env["SAFETY_KERNEL_ADDR"])
    steps = {"ask": {"type": "approval", "input": {"amount": "${input.amount}"}},
             "act": worker(depends_on=["ask"], input={"prompt": "pay ${input.amount}"})}

    async with results(bus) as driver:
        workflow_id = await define(api, steps)
        run_id = await start(api, workflow_id, {"amount": 5}, key=BOB)
        gate = f"{run_id}:ask@1"
        held = await wait_job(redis, gate, {"APPROVAL_REQUIRED"})
        assert held["topic"] == "job.cordum.approval-gate" and held["safety_decision"] == "ALLOW"
        assert (await run_doc(api, run_id))["status"] == "waiting"

        listed = await api.call("GET", "/api/v1/approvals", key=VIEWER)
        item = next(i for i in listed.body["items"] if i["job"]["id"] == gate)
        assert (item["workflow_id"], item["workflow_run_id"], item["workflow_step_id"], item["gate_type"]) == \
            (workflow_id, run_id, "ask", "workflow_approval")
        assert item["approval_status"] == "pending"
        context = (await api.call("GET", f"/api/v1/jobs/{gate}")).body["context"]
        assert context["kind"] == "workflow_approval_context" and context["decision"] == {"amount": 5}

        own = await api.call("POST", f"/api/v1/approvals/{gate}/approve", {"reason": "mine"}, key=BOB)
        assert own.status == 403 and own.body["code"] == "self_approval_denied", own.raw  # the run's starter
        approved = await api.call("POST", f"/api/v1/approvals/{gate}/approve", {"reason": "fine"}, key=ALICE)
        assert approved.status == 200, approved.raw
        done = await wait_job(redis, gate, {"SUCCEEDED", "FAILED", "DENIED"})
        assert done["state"] == "SUCCEEDED" and done["worker_id"] == "cordum-scheduler"
        finished = await wait_run(api, run_id, {"succeeded", "failed", "denied"})
        assert finished["status"] == "succeeded" and finished["steps"]["ask"]["status"] == "succeeded"
        # the gate never reached a worker; the step after it ran exactly once
        assert await redis.execute("HGET", stack_module.EXECUTIONS_KEY, gate) is None
        assert await redis.execute("HGET", stack_module.EXECUTIONS_KEY, f"{run_id}:act@1") == "1"
        await eventually(lambda: _seen(driver, gate), what="the gate's result on the bus")
        gate_results = [r for s, r in driver.seen if r.job_id == gate]
        assert [(s, r.worker_id) for s, r in driver.seen if r.job_id == gate] == [(subjects.RESULT, "cordum-scheduler")]
        assert gate_results[0].status == JobStatus.JOB_STATUS_SUCCEEDED
        assert not any(i["job"]["id"] == gate for i in (await api.call("GET", "/api/v1/approvals")).body["items"])

        # rejected: DENIED, announced on sys.job.result (and the DLQ), the run is denied
        rejected_run = await start(api, workflow_id, {"amount": 9})
        gate2 = f"{rejected_run}:ask@1"
        await wait_job(redis, gate2, {"APPROVAL_REQUIRED"})
        rejected = await api.call("POST", f"/api/v1/approvals/{gate2}/reject", {"reason": "too much"}, key=ALICE)
        assert rejected.status == 200 and rejected.body["state"] == "DENIED", rejected.raw
        denied = await wait_run(api, rejected_run, {"succeeded", "failed", "denied"})
        assert denied["status"] == "denied" and denied["steps"]["ask"]["status"] == "denied"
        assert denied["steps"]["act"]["status"] == "skipped"

        async def announced():
            return {s for s, r in driver.seen if r.job_id == gate2} >= {subjects.RESULT, subjects.DLQ}

        await eventually(announced, what="the rejection on sys.job.result and sys.job.dlq")
        on_result = next(r for s, r in driver.seen if r.job_id == gate2 and s == subjects.RESULT)
        assert on_result.status == JobStatus.JOB_STATUS_DENIED and on_result.error_code == "approval_rejected"
        assert await redis.execute("HGET", stack_module.EXECUTIONS_KEY, f"{rejected_run}:act@1") is None

        # a policy that denies the gate denies it: never held, never in the approvals list
        acme_workflow = await define(api, steps, key=ACME_ADMIN)
        acme_run = await start(api, acme_workflow, {"amount": 1}, key=ACME)
        gate3 = f"{acme_run}:ask@1"
        refused = await wait_job(redis, gate3, {"DENIED", "APPROVAL_REQUIRED", "SUCCEEDED"})
        assert refused["state"] == "DENIED" and refused["safety_reason"] == "acme may not open approval gates"
        outcome = await wait_run(api, acme_run, {"succeeded", "failed", "denied"}, key=ACME)
        assert outcome["status"] == "denied"
        assert (await api.call("GET", "/api/v1/approvals", key=ACME)).body["items"] == []


async def test_concurrent_run_limit(api: Api, redis) -> None:
    workflow_id = await define(api, {"a": worker()}, config={"max_concurrent_runs": 2})
    first = await start(api, workflow_id, headers={"Idempotency-Key": "first"})
    second = await start(api, workflow_id)
    full = await api.call("POST", f"/api/v1/workflows/{workflow_id}/runs", {})
    assert full.status == 429 and full.body["code"] == "RUN_NOT_RUNNABLE", full.raw
    assert full.body["error"] == "2 runs are active; max_concurrent_runs is 2" and full.headers["Retry-After"]
    assert await start(api, workflow_id, headers={"Idempotency-Key": "first"}) == first  # a repeat is no new run
    assert (await api.call("POST", f"/api/v1/workflow-runs/{first}/cancel")).status == 204
    third = await start(api, workflow_id)

    # the org's config can be tighter than the definition's; other tenants are not counted
    org = await api.call("PUT", "/api/v1/config", {"scope": "org", "scope_id": "default",
                                                   "data": {"max_concurrent_runs": 1}})
    assert org.status == 204, org.raw
    assert (await api.call("POST", f"/api/v1/workflow-runs/{third}/cancel")).status == 204
    assert (await api.call("POST", f"/api/v1/workflows/{workflow_id}/runs", {})).status == 429  # second is active
    assert (await api.call("POST", f"/api/v1/workflow-runs/{second}/cancel")).status == 204
    only = await start(api, workflow_id)
    assert only and (await api.call("POST", f"/api/v1/workflows/{workflow_id}/runs", {})).status == 429
    acme_flow = await define(api, {"a": worker()}, key=ACME_ADMIN)
    await start(api, acme_flow, key=ACME)

    # someone holds the admission lock past the wait: a retryable 429, no run created
    before = await WorkflowStore(redis).active_runs("default")
    await Leases(redis, "other-gateway").try_acquire(keys.workflow_run_admission("default"), 30)
    busy = await api.call("POST", f"/api/v1/workflows/{workflow_id}/runs", {})
    assert busy.status == 429 and busy.body["error"] == "run admission is busy, retry"
    assert await WorkflowStore(redis).active_runs("default") == before


async def _seen(driver, job_id: str) -> bool:
    return any(r.job_id == job_id for _, r in driver.seen)
