"""cordum-mcp against the real job path, driven by the official MCP client (`mcp.ClientSession`).

Processes: safety kernel, scheduler, workflow engine, echo worker and gateway (keys file of
test_gateway: alice and bob are operators of tenant default, ann of tenant acme), and the MCP
servers under test, over stdio (spawned by the SDK's stdio client) and over HTTP (stateless
streamable HTTP, two replicas behind a client that alternates between them)."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
from collections import Counter
from contextlib import asynccontextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, AsyncIterator

import anyio
import httpx2
import mcp_types as types
import pytest
import trio
import trio.testing
from mcp import ClientSession, StdioServerParameters, stdio_client
from mcp.client.sse import sse_client
from mcp.client.streamable_http import streamable_http_client
from mcp.server.lowlevel import Server
from mcp.shared.exceptions import MCPError
from mcp.shared.message import SessionMessage

from cordum.cli.http import Client
from cordum.dev.servers import free_port
from cordum.mcp.catalog import MUTATING, Call
from cordum.mcp.http import KEY_CHECKS, KeyCheck
from cordum.mcp.server import Credential, GatewayClient, InFlight
from cordum.mcp.stdio import MAX_LINE
from tests.conftest import ROOT
from tests.integration import stack as stack_module
from tests.integration.stack import Stack, http_get, metric
from tests.integration.test_gateway import ACME, ADMIN, ALICE, BOB, _keys_file
from tests.integration.test_gateway_workflows import eventually

redis_server, nats_server = stack_module.redis_server, stack_module.nats_server

WAIT = 60  # generous: process start-up and job round trips on a loaded 2-core machine
CORE_TOOLS = 15
INITIALIZE = {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "test", "version": "1"}}


class McpStack:
    def __init__(self, stack: Stack, gateway: str, tmp: Path) -> None:
        self.stack, self.gateway, self.tmp = stack, gateway, tmp

    def rest(self, key: str) -> Client:
        return Client(self.gateway, api_key=key, timeout=10)

    def http_replica(self, name: str, **env: str) -> str:
        port = free_port()
        self.stack.start(name, "cordum.mcp.service", MCP_TRANSPORT="http", MCP_HTTP_ADDR=f"127.0.0.1:{port}",
                         CORDUM_GATEWAY_ADDR=self.gateway, **env)
        return f"http://127.0.0.1:{port}"

    @asynccontextmanager
    async def stdio(self, key: str, **env: str) -> AsyncIterator[ClientSession]:
        params = StdioServerParameters(command=sys.executable, args=["-m", "cordum.mcp.service"], cwd=str(ROOT), env={
            "PYTHONPATH": str(ROOT), "CORDUM_GATEWAY_ADDR": self.gateway, "CORDUM_API_KEY": key,
            "REDIS_URL": self.stack.env.get("REDIS_URL", ""), **env})
        with (self.tmp / f"mcp-stdio-{key[:5]}.err").open("a") as errlog:
            async with stdio_client(params, errlog=errlog) as (read, write), ClientSession(read, write) as session:
                await session.initialize()
                yield session


@pytest.fixture
async def mcp_stack(spawn, tmp_path, server_env) -> McpStack:
    stack = Stack.create(spawn, tmp_path, WORKFLOW_ENGINE_SCAN_INTERVAL="1s", **server_env)
    base = await stack_module.gateway_stack(stack, workflow_engine=True, timeout=WAIT, CORDUM_API_KEY=ADMIN,
                                            CORDUM_API_KEYS_PATH=str(_keys_file(tmp_path)))
    return McpStack(stack, base, tmp_path)


async def call(session: ClientSession, tool: str, **args: Any) -> dict[str, Any]:
    """A tool call that must succeed: its structured result."""
    result = await session.call_tool(tool, args)
    assert not result.is_error, result.content[0].text
    assert result.content[0].type == "text" and result.structured_content is not None
    return result.structured_content


async def failure(session: ClientSession, tool: str, **args: Any) -> dict[str, Any]:
    """A tool call that must fail as a tool error: its `error` object."""
    result = await session.call_tool(tool, args)
    assert result.is_error, result.structured_content
    return result.structured_content["error"]


async def job_in(session: ClientSession, job_id: str, states: set[str]) -> dict[str, Any]:
    async def reached():
        job = await call(session, "cordum_get_job", id=job_id)
        return job if job["state"] in states else None

    return await eventually(reached, timeout=WAIT, interval=0.2, what=f"job {job_id} in {states}")


async def test_stdio_submit_watch_approve_and_workflow_run(mcp_stack: McpStack) -> None:
    steps = {"echo": {"type": "worker", "topic": "job.default", "input": {"prompt": "${input.text}"}}}
    workflow_id = (await trio.to_thread.run_sync(lambda: mcp_stack.rest(ADMIN).post(
        "/api/v1/workflows", {"steps": steps})))["id"]

    async with mcp_stack.stdio(ALICE) as alice, mcp_stack.stdio(BOB) as bob:
        listed = await alice.list_tools()
        assert {t.name for t in listed.tools} >= {"cordum_submit_job", "cordum_approve_job", "cordum_get_run"}
        assert len(listed.tools) == CORE_TOOLS

        # submit, watch it succeed
        submitted = await call(alice, "cordum_submit_job", prompt="hello from mcp", labels={"via": "stdio"})
        assert submitted["status"] == "pending" and submitted["job_id"]
        done = await job_in(alice, submitted["job_id"], {"SUCCEEDED", "FAILED", "DENIED", "TIMEOUT"})
        assert done["state"] == "SUCCEEDED"
        listed_jobs = await call(alice, "cordum_list_jobs", filter={"state": "SUCCEEDED"})
        assert submitted["job_id"] in {j["id"] for j in listed_jobs["items"]}

        # a held job: its submitter may not approve it, another operator may
        held = await call(alice, "cordum_submit_job", prompt="needs a human", topic="job.approve")
        assert held["status"] == "approval_required"
        pending = await call(bob, "cordum_list_pending_approvals")
        assert held["job_id"] in {item["job"]["id"] for item in pending["items"]}
        own = await failure(alice, "cordum_approve_job", job_id=held["job_id"])
        assert own["status"] == 403 and own["code"] == "self_approval_denied" and "HTTP 403" in own["message"]
        approved = await call(bob, "cordum_approve_job", job_id=held["job_id"], note="looks fine")
        assert approved["approved"] is True and approved["job_id"] == held["job_id"]
        assert (await job_in(bob, held["job_id"], {"SUCCEEDED", "FAILED", "DENIED"}))["state"] == "SUCCEEDED"

        # bad input and a missing job are tool errors that say what is wrong
        assert "prompt is required" in (await failure(alice, "cordum_submit_job", topic="job.default"))["message"]
        missing = await failure(alice, "cordum_get_job", id="no-such-job")
        assert missing["status"] == 404 and "HTTP 404" in missing["message"]
        assert ALICE not in missing["message"]
        with pytest.raises(MCPError, match="not available"):
            await alice.call_tool("cordum_list_packs", {})

        # trigger a workflow and read its run
        started = await call(alice, "cordum_trigger_workflow", workflow_id=workflow_id, input={"text": "hi"})
        run_id = started["run_id"]

        async def finished():
            run = await call(alice, "cordum_get_run", id=run_id)
            return run if run["status"] in ("succeeded", "failed", "cancelled", "denied", "timed_out") else None

        run = await eventually(finished, timeout=WAIT, interval=0.2, what=f"run {run_id} finished")
        assert run["status"] == "succeeded" and run["workflow_id"] == workflow_id
        timeline = await call(alice, "cordum_run_timeline", id=run_id)
        assert timeline["run_id"] == run_id and timeline["items"]
        runs = await call(alice, "cordum_list_runs", filter={"workflow_id": workflow_id})
        assert run_id in {r["id"] for r in runs["items"]}

        # resources
        read = await alice.read_resource(f"cordum://workflows/{workflow_id}/runs/{run_id}")
        assert read.contents[0].mime_type == "application/json" and run_id in read.contents[0].text
        assert submitted["job_id"] in (await alice.read_resource(f"cordum://jobs/{submitted['job_id']}")).contents[0].text
        with pytest.raises(MCPError) as not_found:
            await alice.read_resource(f"cordum://workflows/other-workflow/runs/{run_id}")
        assert not_found.value.code == -32002


@asynccontextmanager
async def http_session(url: str, key: str | None, transport: httpx2.AsyncBaseTransport | None = None, *,
                       modern: bool = False) -> AsyncIterator[ClientSession]:
    """A session over streamable HTTP: the initialize handshake, or (modern) the 2026-07-28
    per-request envelope negotiated with server/discover."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with httpx2.AsyncClient(headers=headers, transport=transport, timeout=30) as client, \
            streamable_http_client(f"{url}/mcp", http_client=client) as (read, write), \
            ClientSession(read, write) as session:
        await (session.discover() if modern else session.initialize())
        yield session


class Alternating(httpx2.AsyncBaseTransport):
    """A plain round-robin load balancer: each request goes to the next replica."""

    def __init__(self, urls: list[str]) -> None:
        self.ports = [int(u.rsplit(":", 1)[1]) for u in urls]
        self.inner = httpx2.AsyncHTTPTransport()
        self.sent: list[int] = []

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        port = self.ports[len(self.sent) % len(self.ports)]
        self.sent.append(port)
        request.url = request.url.copy_with(port=port)
        request.headers["Host"] = f"127.0.0.1:{port}"
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


def tool_calls(url: str) -> float:
    return metric(http_get(int(url.rsplit(":", 1)[1]), "/metrics"), "cordum_mcp_tool_calls_total")


async def test_http_credentials_tenants_read_only_and_two_replicas(mcp_stack: McpStack) -> None:
    first, second = mcp_stack.http_replica("mcp-1"), mcp_stack.http_replica("mcp-2")
    read_only = mcp_stack.http_replica("mcp-ro", CORDUM_MCP_READ_ONLY="true")
    await mcp_stack.stack.ready("mcp-1", "mcp-2", "mcp-ro", timeout=WAIT)

    # no credential, or one the gateway does not know: 401 before any MCP exchange
    async with httpx2.AsyncClient(timeout=30) as plain:
        request = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}
        anonymous = await plain.post(f"{first}/mcp", json=request)
        assert anonymous.status_code == 401 and anonymous.headers["www-authenticate"].startswith("Bearer")
        wrong = await plain.post(f"{first}/mcp", json=request, headers={"X-API-Key": "not-a-key-0123456789"})
        assert wrong.status_code == 401 and "invalid API key" in wrong.json()["error"]
        assert (await plain.get(f"{first}/health")).json()["status"] == "ok"

    # a client whose requests alternate between the two replicas: initialize on one, the rest anywhere
    balancer = Alternating([first, second])
    before = tool_calls(first), tool_calls(second)
    async with http_session(first, ALICE, balancer) as alice:
        assert len((await alice.list_tools()).tools) == CORE_TOOLS
        job = await call(alice, "cordum_submit_job", prompt="over http")
        assert (await job_in(alice, job["job_id"], {"SUCCEEDED", "FAILED", "DENIED"}))["state"] == "SUCCEEDED"
        status = await call(alice, "cordum_status")
        assert status["redis"]["ok"] is True
    assert set(balancer.sent) == set(balancer.ports) and len(balancer.sent) >= 6
    after = tool_calls(first), tool_calls(second)
    assert after[0] > before[0] and after[1] > before[1], (before, after)  # both replicas served tool calls

    # both replicas are listed in the gateway's status (instance registration)
    async def listed():
        replicas = (await trio.to_thread.run_sync(lambda: mcp_stack.rest(ADMIN).get("/api/v1/status")))["replicas"]
        return {r["id"] for r in replicas.get("cordum-mcp", [])} >= {"mcp-1", "mcp-2"}

    await eventually(listed, timeout=WAIT, interval=0.5, what="the MCP replicas in /api/v1/status")

    # the per-request-envelope protocol era works through the same credential path
    async with http_session(second, ALICE, Alternating([second, first]), modern=True) as modern:
        assert modern.protocol_version == "2026-07-28"
        assert (await call(modern, "cordum_get_job", id=job["job_id"]))["state"] == "SUCCEEDED"

    # another tenant's key sees none of it
    async with http_session(second, ACME) as ann:
        missing = await failure(ann, "cordum_get_job", id=job["job_id"])
        assert missing["status"] == 404
        assert job["job_id"] not in {j["id"] for j in (await call(ann, "cordum_list_jobs"))["items"]}
        with pytest.raises(MCPError) as not_found:
            await ann.read_resource(f"cordum://jobs/{job['job_id']}")
        assert not_found.value.code == -32002

    # the SSE endpoints: GET /sse + POST /message?session_id= (a session answers only its own key), and
    # POST /message without a session answered in the response body
    async with sse_client(f"{first}/sse", headers={"X-API-Key": ALICE}) as (read, write), \
            ClientSession(read, write) as over_sse:
        await over_sse.initialize()
        assert (await call(over_sse, "cordum_get_job", id=job["job_id"]))["id"] == job["job_id"]
    ping = {"jsonrpc": "2.0", "id": 1, "method": "ping"}
    async with httpx2.AsyncClient(timeout=30) as plain:
        async with plain.stream("GET", f"{first}/sse", headers={"X-API-Key": ALICE}) as events:
            lines = events.aiter_lines()
            endpoint = ""
            while not endpoint.startswith("/message?session_id="):
                endpoint = (await lines.__anext__()).removeprefix("data: ")
            assert (await plain.post(f"{first}{endpoint}", json=ping, headers={"X-API-Key": BOB})).status_code == 404
            assert (await plain.post(f"{first}{endpoint}", json=ping, headers={"X-API-Key": ALICE})).status_code == 202
        get_job = {"jsonrpc": "2.0", "id": 7, "method": "tools/call",
                   "params": {"name": "cordum_get_job", "arguments": {"id": job["job_id"]}}}
        answer = await plain.post(f"{second}/message", json=get_job, headers={"X-API-Key": ALICE})
        assert answer.status_code == 200 and answer.json()["id"] == 7
        assert answer.json()["result"]["structuredContent"]["id"] == job["job_id"]
        notified = await plain.post(f"{second}/message", headers={"X-API-Key": ALICE},
                                    json={"jsonrpc": "2.0", "method": "notifications/initialized"})
        assert notified.status_code == 202

    # read-only: the mutating tools are neither listed nor callable; reads still work
    async with http_session(read_only, BOB) as bob:
        names = {t.name for t in (await bob.list_tools()).tools}
        assert names and not names & MUTATING and "cordum_get_job" in names
        with pytest.raises(MCPError, match="read-only"):
            await bob.call_tool("cordum_submit_job", {"prompt": "no"})
        assert (await call(bob, "cordum_get_job", id=job["job_id"]))["id"] == job["job_id"]

    # shutdown: SIGTERM drains and exits 0, the registration goes with it
    proc = mcp_stack.stack.procs["mcp-2"]
    proc.signal()
    assert await trio.to_thread.run_sync(proc.wait, 60) == 0
    assert [e["stage"] for e in proc.events() if e.get("event") == "stage.begin"] == ["transport drain"]


def test_environment_errors_exit_2_naming_the_variable(tmp_path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MCP_TRANSPORT": "http", "MCP_HTTP_ADDR": "not-an-address"}
    done = subprocess.run([sys.executable, "-m", "cordum.mcp.service"], env=env, capture_output=True, text=True,
                          timeout=60, stdin=subprocess.DEVNULL)
    assert done.returncode == 2 and "MCP_HTTP_ADDR" in done.stderr and done.stdout == ""


class StubGateway:
    """A stand-in for the gateway where a test needs what the real one cannot do on cue: hold an
    answer until the test releases it. Each GET of `held` waits for its own event in `releases`
    (in the order they arrived; `holding` of them at once, at most `peak`); then KEY gets
    `{"redis": {"ok": true}}` and any other key a 401. Every other GET answers KEY with
    `{"items": []}` at once."""

    KEY = "k" * 24

    def __init__(self, held: str) -> None:
        self.held, self.arrived, self.releases = held, threading.Event(), [threading.Event() for _ in range(100)]
        self.lock = threading.Lock()
        self.arrivals = 0
        self.holding = self.peak = 0
        self.seen: Counter[str] = Counter()
        self.forwarded: list[str | None] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?")[0]
                with stub.lock:
                    stub.seen[path] += 1
                    stub.forwarded.append(self.headers.get("X-Forwarded-For"))
                if path == stub.held:
                    stub._hold()
                valid = self.headers.get("X-API-Key") == stub.KEY
                body = (({"redis": {"ok": True}} if path == stub.held else {"items": []}) if valid
                        else {"error": "invalid API key", "status": 401})
                payload = json.dumps(body).encode()
                self.send_response(200 if valid else 401)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}"

    def _hold(self) -> None:
        with self.lock:
            self.holding += 1
            self.peak = max(self.peak, self.holding)
            release, self.arrivals = self.releases[self.arrivals], self.arrivals + 1
        self.arrived.set()
        release.wait(WAIT * 2)
        with self.lock:
            self.holding -= 1

    def release_all(self) -> None:
        for release in self.releases:
            release.set()

    def close(self) -> None:
        self.release_all()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stub_gateway():
    gateways: list[StubGateway] = []

    def make(held: str = "/api/v1/status") -> StubGateway:
        gateways.append(StubGateway(held))
        return gateways[-1]

    yield make
    for gateway in gateways:
        gateway.close()


class StdioProcess:
    """cordum-mcp over stdio in a child process, spoken to line by line (what any MCP client
    writes); answers are read by a thread, so a missing answer fails the test instead of hanging it."""

    def __init__(self, tmp_path: Path, gateway: str) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "CORDUM_API_KEY": StubGateway.KEY, "CORDUM_GATEWAY_ADDR": gateway}
        with (tmp_path / "mcp-stdio.err").open("w") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "cordum.mcp.service"], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=err, env=env, cwd=ROOT)
        self.answers: queue.Queue[bytes] = queue.Queue()
        threading.Thread(target=lambda: [self.answers.put(line) for line in self.proc.stdout], daemon=True).start()

    def send(self, message: dict[str, Any] | bytes) -> None:
        self.proc.stdin.write((message if isinstance(message, bytes) else json.dumps(message).encode()) + b"\n")
        self.proc.stdin.flush()

    def receive(self) -> dict[str, Any]:
        try:
            return json.loads(self.answers.get(timeout=WAIT))
        except queue.Empty:
            raise AssertionError(f"no answer within {WAIT}s") from None

    def initialize(self) -> None:
        self.send({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": INITIALIZE})
        assert self.receive()["id"] == 1
        self.send({"jsonrpc": "2.0", "method": "notifications/initialized"})

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


@pytest.fixture
def stdio_process(tmp_path):
    started: list[StdioProcess] = []

    def start(gateway: str = "http://127.0.0.1:9") -> StdioProcess:
        started.append(StdioProcess(tmp_path, gateway))
        return started[-1]

    yield start
    for process in started:
        process.close()


def test_stdio_sigterm_lets_the_call_in_progress_answer(stub_gateway, stdio_process) -> None:
    """SIGTERM over stdio stops reading stdin, answers the call in progress, then exits 0."""
    gateway = stub_gateway()
    mcp = stdio_process(gateway.url)
    mcp.initialize()
    mcp.send({"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "cordum_status", "arguments": {}}})
    assert gateway.arrived.wait(WAIT), "the call never reached the gateway"
    mcp.proc.send_signal(signal.SIGTERM)
    threading.Timer(1.0, gateway.release_all).start()  # the gateway answers after the signal
    reply = mcp.receive()
    assert reply["id"] == 2 and reply["result"]["structuredContent"] == {"redis": {"ok": True}}
    assert mcp.proc.wait(WAIT) == 0


def test_stdio_a_message_over_the_limit_is_answered_with_invalid_request(stdio_process) -> None:
    """A line over MAX_LINE gets a -32600 answer (with its id when it leads the message, else
    null) instead of none, and the session goes on with the next line."""
    mcp = stdio_process()
    mcp.initialize()
    pad = "x" * (MAX_LINE + 100)
    mcp.send(json.dumps({"jsonrpc": "2.0", "id": 7, "method": "ping", "params": {"pad": pad}}).encode())
    too_large = mcp.receive()
    assert too_large["id"] == 7 and too_large["error"]["code"] == -32600
    assert "too large" in too_large["error"]["message"]
    # the id is not at the start: null, not a guess from the padding's "id"
    mcp.send(json.dumps({"params": {"id": 5, "pad": pad}, "jsonrpc": "2.0", "id": 8, "method": "ping"}).encode())
    anonymous = mcp.receive()
    assert anonymous["id"] is None and anonymous["error"]["code"] == -32600
    # nothing of the skipped lines leaks into the next message
    mcp.send({"jsonrpc": "2.0", "id": 9, "method": "ping"})
    assert mcp.receive() == {"jsonrpc": "2.0", "id": 9, "result": {}}


async def test_stdio_a_request_counts_until_its_answer_is_written() -> None:
    """The stdio drain closes the session once InFlight is idle, so a request must count until
    the SDK has handed its answer on, not only until its handler returned (a close in between
    loses the answer); a request the client cancels gets no answer and stops counting."""
    slow_started = trio.Event()

    async def call_tool(ctx: Any, params: types.CallToolRequestParams) -> types.CallToolResult:
        if params.name == "slow":
            slow_started.set()
            await trio.sleep_forever()
        return types.CallToolResult(content=[types.TextContent(type="text", text="done")])

    server = Server("in-flight-test", on_call_tool=call_tool)
    in_flight = InFlight()
    server.middleware.append(in_flight)
    to_server, server_reads = anyio.create_memory_object_stream(0)
    server_writes, from_server = anyio.create_memory_object_stream(0)

    def request(request_id: int, method: str, params: dict[str, Any]) -> SessionMessage:
        return SessionMessage(types.JSONRPCRequest(jsonrpc="2.0", id=request_id, method=method, params=params))

    def notification(method: str, params: dict[str, Any] | None = None) -> SessionMessage:
        return SessionMessage(types.JSONRPCNotification(jsonrpc="2.0", method=method, params=params))

    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.run, server_reads, in_flight.answers(server_writes),
                               server.create_initialization_options())
            await to_server.send(request(1, "initialize", INITIALIZE))
            assert (await from_server.receive()).message.id == 1
            await to_server.send(notification("notifications/initialized"))

            await to_server.send(request(2, "tools/call", {"name": "fast", "arguments": {}}))
            await trio.testing.wait_all_tasks_blocked()
            # the handler has returned; its answer waits for the writer (nobody reads yet)
            assert in_flight.count == 1
            answer = await from_server.receive()
            assert answer.message.id == 2 and answer.message.result["content"][0]["text"] == "done"
            await in_flight.idle()

            await to_server.send(request(3, "tools/call", {"name": "slow", "arguments": {}}))
            await slow_started.wait()
            assert in_flight.count == 1
            await to_server.send(notification("notifications/cancelled", {"requestId": 3}))
            await in_flight.idle()
            with pytest.raises(anyio.WouldBlock):
                from_server.receive_nowait()
            await to_server.aclose()  # the end of the session


async def test_http_sigterm_lets_slow_calls_finish_within_the_shutdown_budget(spawn, stub_gateway) -> None:
    """Over HTTP the drain gives the calls in flight (a POST exchange, then a call of an SSE
    session) the shutdown budget less the closes' reserve (here 40 s - 2 s), not a fixed few
    seconds: calls the gateway answers 6 s and more after SIGTERM still get their results, the SSE
    stream is cut only once its call answered, and the process exits 0 without waiting out the grace."""
    gateway = stub_gateway()
    port = free_port()
    url, headers = f"http://127.0.0.1:{port}", {"X-API-Key": StubGateway.KEY}
    proc = spawn("mcp-slow", ["-m", "cordum.mcp.service"], env={
        "MCP_TRANSPORT": "http", "MCP_HTTP_ADDR": f"127.0.0.1:{port}", "CORDUM_GATEWAY_ADDR": gateway.url,
        "CORDUM_SHUTDOWN_TIMEOUT": "40s"})

    async def logged(event: str) -> bool:
        return await trio.to_thread.run_sync(lambda: any(e.get("event") == event for e in proc.events()))

    async def held(count: int) -> None:
        await eventually(lambda: trio.to_thread.run_sync(lambda: gateway.holding == count), timeout=WAIT,
                         interval=0.05, what=f"{count} calls at the gateway")

    await eventually(lambda: logged("service.ready"), timeout=WAIT, interval=0.2, what="cordum-mcp ready")
    status = {"jsonrpc": "2.0", "method": "tools/call", "params": {"name": "cordum_status", "arguments": {}}}
    answers: list[httpx2.Response] = []
    async with httpx2.AsyncClient(timeout=WAIT * 2, headers=headers) as client, \
            client.stream("GET", f"{url}/sse") as events, trio.open_nursery() as nursery:
        lines = events.aiter_lines()

        async def data(prefix: str) -> str:  # the next SSE data line that starts so
            while not (line := await lines.__anext__()).startswith(f"data: {prefix}"):
                pass
            return line.removeprefix("data: ")

        endpoint = await data("/message?session_id=")
        assert (await client.post(f"{url}{endpoint}", json={"jsonrpc": "2.0", "id": 1, "method": "initialize",
                                                            "params": INITIALIZE})).status_code == 202
        assert json.loads(await data("{"))["id"] == 1
        await client.post(f"{url}{endpoint}", json={"jsonrpc": "2.0", "method": "notifications/initialized"})

        async def post() -> None:
            answers.append(await client.post(f"{url}/message", json={**status, "id": 4}))

        nursery.start_soon(post)
        await held(1)  # the POST exchange's call is the gateway's first
        assert (await client.post(f"{url}{endpoint}", json={**status, "id": 5})).status_code == 202
        await held(2)
        proc.signal()
        await eventually(lambda: logged("stage.begin"), timeout=WAIT, interval=0.2, what="the drain")
        await trio.sleep(6.0)  # longer than the fixed grace that used to cut the calls
        gateway.releases[0].set()
        await eventually(lambda: trio.to_thread.run_sync(lambda: bool(answers)), timeout=WAIT, interval=0.05,
                         what="the POST exchange's answer")
        await trio.sleep(1.0)  # no request in progress now, but the SSE session's call is
        gateway.releases[1].set()
        sse_answer = json.loads(await data("{"))
    assert sse_answer["id"] == 5 and sse_answer["result"]["structuredContent"] == {"redis": {"ok": True}}
    assert answers[0].status_code == 200, answers[0].text
    assert answers[0].json()["result"]["structuredContent"] == {"redis": {"ok": True}}
    started = trio.current_time()
    assert await trio.to_thread.run_sync(proc.wait, WAIT) == 0
    assert trio.current_time() - started < 30, "the drain waited out the grace after the last call answered"


async def test_bogus_keys_are_checked_in_threads_of_their_own_and_refusals_are_remembered(stub_gateway) -> None:
    """Key checks of unknown keys held by a slow gateway take at most KEY_CHECKS threads of their
    own, so a tool call of a known key still goes through; one key's concurrent checks are one
    gateway request, and its refusal is remembered."""
    gateway = stub_gateway(held="/api/v1/approvals")  # the key check's route
    client = GatewayClient(gateway.url, timeout=WAIT)
    keys = KeyCheck(client)
    bogus = [f"bogus-key-{i:04d}-0123456789" for i in range(50)] + ["same-bogus-key-0123456789"] * 10
    refusals: list[Any] = []

    async def check(key: str) -> None:
        refusals.append(await keys.refusal(Credential(key)))

    with trio.fail_after(WAIT * 2):
        async with trio.open_nursery() as nursery:
            for key in bogus:
                nursery.start_soon(check, key)
            await eventually(lambda: trio.to_thread.run_sync(lambda: gateway.holding == KEY_CHECKS),
                             timeout=WAIT, interval=0.05, what=f"{KEY_CHECKS} key checks at the gateway")
            # more checks wait than Trio's default thread limiter has threads: a tool call still runs
            assert len(bogus) > trio.to_thread.current_default_thread_limiter().total_tokens
            reply = await client.run(Call("GET", "/api/v1/status"), Credential(StubGateway.KEY))
            assert reply.body == {"items": []}
            gateway.release_all()
    assert len(refusals) == len(bogus) and all(r is not None and r.status == 401 for r in refusals)
    assert gateway.peak == KEY_CHECKS
    assert gateway.seen["/api/v1/approvals"] == 51  # 50 distinct keys, and one check for the 10 alike
    assert (await keys.refusal(Credential("same-bogus-key-0123456789"))).status == 401
    assert gateway.seen["/api/v1/approvals"] == 51  # remembered: not asked again


async def test_the_gateway_is_told_which_client_each_call_is_for(stub_gateway) -> None:
    """The gateway counts failed keys per client address: cordum-mcp names its client in
    X-Forwarded-For, so one MCP client guessing keys cannot lock the others out."""
    gateway = stub_gateway(held="/nowhere")
    client = GatewayClient(gateway.url, timeout=WAIT)
    await client.run(Call("GET", "/api/v1/jobs"), Credential(StubGateway.KEY, address="198.51.100.7"))
    await client.run(Call("GET", "/api/v1/jobs"), Credential(StubGateway.KEY))  # stdio: no address to name
    assert gateway.forwarded == ["198.51.100.7", None]



async def test_an_http_replica_refusing_a_request_before_its_body_still_serves_the_connection(mcp_stack: McpStack):
    """A 401 decided from the headers alone waits for the body: the client's next request on the
    same keep-alive connection is answered (hypercorn would leave it hanging otherwise)."""
    from tests.httpstub import early_answer_then_next

    base = mcp_stack.http_replica("mcp-keepalive")
    port = int(base.rsplit(":", 1)[1])
    await eventually(lambda: trio.to_thread.run_sync(_health_ok, port), WAIT, what="the MCP replica")

    body = b'{"jsonrpc": "2.0", "id": 1, "method": "ping"}'
    head = b"POST /mcp HTTP/1.1\r\nHost: mcp\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
    first, second = await trio.to_thread.run_sync(early_answer_then_next, port, head, body,
                                                  b"GET /health HTTP/1.1\r\nHost: mcp\r\n\r\n")
    assert first.startswith(b"HTTP/1.1 401") and second.startswith(b"HTTP/1.1 200"), (first, second)


def _health_ok(port: int) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as reply:
            return reply.status == 200
    except OSError:
        return False
