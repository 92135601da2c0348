"""cordumctl: argument parsing, rendering, exit codes, and the client's requests and parsing against a
tiny real local HTTP + WebSocket server serving canned answers (the end-to-end tests against the
gateway live elsewhere)."""

from __future__ import annotations

import io
import json
import socket
import threading
import time
import urllib.parse
from pathlib import Path
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Iterator

import pytest
import yaml
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, RejectConnection, Request, TextMessage

import cordum
from cordum.cli import http as cli_http
from cordum.cli import main as cli
from cordum.cli import render
from cordum.cli.ws import StreamError, WebSocketClient, stream_url
from tests.httpstub import send_json

SECRET = "sk-test-SECRET-9f8e7d"

# -- a canned gateway ------------------------------------------------------------------------------


@dataclass
class Seen:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: Any


Answer = tuple  # (status, body[, headers])


@dataclass
class FakeGateway:
    routes: dict[tuple[str, str], Callable[[Seen], Answer] | Answer] = field(default_factory=dict)
    requests: list[Seen] = field(default_factory=list)
    ws_frames: list[str] = field(default_factory=list)
    ws_reject: int = 0  # answer the upgrade with this HTTP status instead
    ws_handshakes: list[dict[str, str]] = field(default_factory=list)
    ws_sent: threading.Event = field(default_factory=threading.Event)
    ws_settle: float = 0.3  # pause after the frames before ws_sent is set
    addr: str = ""

    def route(self, method: str, path: str, answer: Callable[[Seen], Answer] | Answer) -> None:
        self.routes[(method, path)] = answer

    def last(self, method: str, path: str) -> Seen:
        for seen in reversed(self.requests):
            if seen.method == method and seen.path == path:
                return seen
        raise AssertionError(f"no {method} {path} in {[(s.method, s.path) for s in self.requests]}")


def _handler(gw: FakeGateway) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            if self.path.startswith("/api/v1/stream") and \
                    self.headers.get("Upgrade", "").lower() == "websocket":
                self._websocket()
            else:
                self._answer("GET")

        def do_POST(self) -> None:
            self._answer("POST")

        def do_DELETE(self) -> None:
            self._answer("DELETE")

        def _answer(self, method: str) -> None:
            parts = urllib.parse.urlsplit(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            seen = Seen(method, parts.path, dict(urllib.parse.parse_qsl(parts.query)),
                        {k.lower(): v for k, v in self.headers.items()},
                        json.loads(raw) if raw else None)
            gw.requests.append(seen)
            answer = gw.routes.get((method, parts.path))
            if answer is None:
                answer = (404, {"error": f"no route {method} {parts.path}", "status": 404})
            if callable(answer):
                answer = answer(seen)
            status, body, *rest = answer
            headers = rest[0] if rest else {}
            data = b"" if body is None else json.dumps(body).encode()
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            if data:
                self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _websocket(self) -> None:
            self.close_connection = True
            raw = (self.requestline + "\r\n"
                   + "".join(f"{k}: {v}\r\n" for k, v in self.headers.items()) + "\r\n").encode()
            conn = WSConnection(ConnectionType.SERVER)
            conn.receive_data(raw)
            sock = self.connection
            for event in conn.events():
                if isinstance(event, Request):
                    gw.ws_handshakes.append({k.decode().lower(): v.decode()
                                             for k, v in event.extra_headers})
            if gw.ws_reject:
                sock.sendall(conn.send(RejectConnection(status_code=gw.ws_reject)))
                return
            sock.sendall(conn.send(AcceptConnection()))
            for frame in gw.ws_frames:
                sock.sendall(conn.send(TextMessage(data=frame)))
            time.sleep(gw.ws_settle)
            gw.ws_sent.set()
            sock.settimeout(10)
            try:
                while True:
                    data = sock.recv(65536)
                    if not data:
                        return
                    conn.receive_data(data)
                    for event in conn.events():
                        if isinstance(event, CloseConnection):
                            sock.sendall(conn.send(event.response()))
                            return
            except OSError:
                return

    return Handler


@pytest.fixture
def gateway() -> Iterator[FakeGateway]:
    gw = FakeGateway()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(gw))
    server.daemon_threads = True
    gw.addr = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield gw
    server.shutdown()
    server.server_close()


@dataclass
class Run:
    code: int
    out: str
    err: str

    @property
    def json(self) -> Any:
        return json.loads(self.out)


def run(gw: FakeGateway | None, *argv: str, env: dict[str, str] | None = None) -> Run:
    out, err = io.StringIO(), io.StringIO()
    base = {"CORDUM_API_KEY": SECRET, "CORDUM_TENANT_ID": "acme"}
    if gw is not None:
        base["CORDUM_GATEWAY_ADDR"] = gw.addr
    base.update(env or {})
    code = cli.main(list(argv), env=base, stdout=out, stderr=err)
    result = Run(code, out.getvalue(), err.getvalue())
    assert SECRET not in result.out and SECRET not in result.err
    return result


# -- argument parsing and settings -------------------------------------------------------------------


def test_global_options_go_before_or_after_the_command() -> None:
    parser = cli.build_parser()
    a = parser.parse_args(["--json", "--addr", "h:1", "job", "get", "j1"])
    b = parser.parse_args(["job", "get", "j1", "--json", "--addr", "h:1"])
    for args in (a, b):
        assert (args.json, args.addr, args.job_id, args.func) == (True, "h:1", "j1", cli.cmd_job_get)
    c = parser.parse_args(["workers"])
    assert c.json is False and c.addr is None and c.tenant is None


def test_submit_options_parse() -> None:
    args = cli.build_parser().parse_args(
        ["job", "submit", "--prompt", "hi", "--label", "a=1", "--label", "b=x=y", "--priority", "batch",
         "--idempotency-key", "k1", "--wait", "--risk-tag", "pii"])
    assert args.topic == "job.default"
    assert args.label == [("a", "1"), ("b", "x=y")]
    assert (args.priority, args.idempotency_key, args.wait, args.risk_tag) == ("batch", "k1", True, ["pii"])


@pytest.mark.parametrize("argv", [
    ["job", "get"],
    ["job"],
    ["job", "submit", "--label", "novalue"],
    ["job", "submit", "--priority", "urgent"],
    ["job", "submit", "--input", "{}", "--input-file", "f"],
    ["job", "list", "--limit", "0"],
    ["policy", "evaluate"],
    ["frobnicate"],
])
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert run(None, *argv).code == 2
    assert "error" in capsys.readouterr().err


def test_no_command_prints_help_and_exits_2() -> None:
    result = run(None)
    assert result.code == 2 and "usage: cordumctl" in result.err


def test_help_documents_exit_codes_and_env(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(None, "--help").code == 0
    text = capsys.readouterr().out
    for needle in ("exit codes:", "3  not found", "4  authentication", "5  rate limited",
                   "6  gateway unreachable", "7  approval required", "CORDUM_API_KEY",
                   "CORDUM_GATEWAY_ADDR", "job", "approval", "dlq", "workers", "policy", "up"):
        assert needle in text
    assert SECRET not in text


def test_version_and_up_still_work(capsys: pytest.CaptureFixture[str]) -> None:
    result = run(None, "version")
    assert (result.code, result.out.strip()) == (0, f"cordumctl {cordum.__version__}")
    with pytest.raises(SystemExit) as exc:
        cli.main(["up", "--help"])
    assert exc.value.code == 0
    assert "usage: cordumctl up" in capsys.readouterr().out


def test_env_defaults_and_overrides() -> None:
    parser = cli.build_parser()
    args = parser.parse_args(["status"])
    assert cli.resolve(args, {}) == ("http://localhost:8081", "", "default", 10.0)
    env = {"CORDUM_API_URL": "http://api:9", "CORDUM_API_KEY": "k", "CORDUM_TENANT_ID": "t"}
    assert cli.resolve(args, env) == ("http://api:9", "k", "t", 10.0)
    env["CORDUM_GATEWAY_ADDR"] = "http://gw:1"
    assert cli.resolve(args, env)[0] == "http://gw:1"
    args = parser.parse_args(["status", "--addr", "x:2", "--api-key", "k2", "--tenant", "t2",
                              "--timeout", "3"])
    assert cli.resolve(args, env) == ("x:2", "k2", "t2", 3.0)


def test_normalize_addr() -> None:
    assert cli_http.normalize_addr("localhost:8081") == "http://localhost:8081"
    assert cli_http.normalize_addr("https://gw.example/api/v1/") == "https://gw.example"
    assert stream_url("http://h:8081") == "ws://h:8081/api/v1/stream"
    assert stream_url("https://h") == "wss://h/api/v1/stream"


# -- rendering -------------------------------------------------------------------------------------


def test_table_aligns_columns() -> None:
    text = render.table(("ID", "STATE", "N"), [("job-1", "RUNNING", 3), ("j2", None, 12.5)])
    assert text.splitlines() == [
        "ID     STATE    N",
        "job-1  RUNNING  3",
        "j2     -        12.5",
    ]


def test_cells_and_key_values() -> None:
    assert render.cell({"a": 1, "b": "x"}) == "a=1,b=x"
    assert render.cell({"a": {"b": 1}}) == '{"a":{"b":1}}'
    assert render.cell(True) == "yes" and render.cell([]) == "-"
    assert render.cell("two\nlines") == "two lines"
    assert render.table(("A",), [("x" * 100,)], max_width=10).splitlines()[1] == "x" * 9 + "…"
    assert render.key_values([("id", "j1"), ("skip", None), ("state", "RUNNING")]) == \
        "id     j1\nstate  RUNNING"


def test_progress_bar() -> None:
    assert render.progress_bar(50, width=10) == "[#####-----]  50%"
    assert render.progress_bar(0, width=4, state="RUNNING") == "[----]   0% RUNNING"
    assert render.progress_bar(250, width=4) == "[####] 100%"
    assert render.progress_bar(-5, width=4) == "[----]   0%"
    assert render.progress_bar(33.4, width=10, message="step\n2") == "[###-------]  33%  step 2"
    assert render.progress_bar(None, width=3, state="PENDING") == "[ ? ]    - PENDING"


def test_short_enum_and_timestamps() -> None:
    assert render.short_enum("JOB_STATUS_SUCCEEDED") == "SUCCEEDED"
    assert render.short_enum("DECISION_TYPE_REQUIRE_HUMAN") == "REQUIRE_HUMAN"
    assert render.short_enum("running") == "RUNNING"
    expected = "2024-01-01 00:00:00Z"
    for value in (1704067200, 1704067200_000, 1704067200_000_000, "1704067200"):
        assert render.timestamp(value) == expected
    for iso in ("2024-01-01T00:00:00Z", "2024-01-01T00:00:00.000000+00:00", "2024-01-01T01:00:00+01:00"):
        assert render.timestamp(iso) == expected
    assert render.timestamp("yesterday") == "yesterday" and render.epoch("yesterday") is None
    assert render.epoch("2024-01-01T00:00:00.5Z") == 1704067200.5 and render.epoch(True) is None
    assert render.timestamp(None) == "-"


# -- exit codes ------------------------------------------------------------------------------------


@pytest.mark.parametrize("status,code", [
    (200, 0), (204, 0), (400, 1), (409, 1), (404, 3), (401, 4), (403, 4), (429, 5),
    (500, 6), (502, 6), (503, 6), (0, 6),
])
def test_exit_code_for_status(status: int, code: int) -> None:
    assert cli_http.exit_code_for_status(status) == code


@pytest.mark.parametrize("state,code", [
    ("SUCCEEDED", 0), ("RUNNING", 0), ("PENDING", 0), ("FAILED", 1), ("DENIED", 1), ("CANCELLED", 1),
    ("TIMEOUT", 1), ("OUTPUT_QUARANTINED", 1), ("APPROVAL_REQUIRED", 7),
])
def test_job_get_exit_code_follows_state(gateway: FakeGateway, state: str, code: int) -> None:
    gateway.route("GET", "/api/v1/jobs/j1", (200, {"id": "j1", "state": state, "topic": "job.x"}))
    result = run(gateway, "job", "get", "j1")
    assert result.code == code
    assert f"state  {state}" in result.out


@pytest.mark.parametrize("status,code", [(404, 3), (401, 4), (403, 4), (429, 5), (500, 6), (503, 6),
                                         (400, 1)])
def test_http_errors_map_to_exit_codes_and_name_the_error(gateway: FakeGateway, status: int,
                                                         code: int) -> None:
    gateway.route("GET", "/api/v1/jobs/j1", (status, {"error": f"boom {status}", "status": status}))
    result = run(gateway, "job", "get", "j1")
    assert result.code == code
    assert result.out == ""
    assert f"HTTP {status}: boom {status}" in result.err


def test_unreachable_gateway_exits_6() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = run(None, "--addr", f"127.0.0.1:{port}", "workers")
    assert result.code == 6
    assert "unreachable" in result.err and f"127.0.0.1:{port}" in result.err


def test_error_without_envelope_and_with_code(gateway: FakeGateway) -> None:
    gateway.route("POST", "/api/v1/approvals/j1/approve",
                  (409, {"error": "approval already resolved", "status": 409,
                         "code": "approval_already_resolved"}))
    result = run(gateway, "approval", "approve", "j1")
    assert result.code == 1
    assert "HTTP 409: approval already resolved (approval_already_resolved)" in result.err
    gateway.route("DELETE", "/api/v1/dlq/j1", (502, None))
    result = run(gateway, "dlq", "delete", "j1")
    assert result.code == 6 and "HTTP 502" in result.err


# -- requests and output ---------------------------------------------------------------------------


def test_requests_carry_api_key_and_tenant_headers(gateway: FakeGateway) -> None:
    gateway.route("GET", "/api/v1/workers", (200, {"items": []}))
    assert run(gateway, "workers").code == 0
    seen = gateway.last("GET", "/api/v1/workers")
    assert seen.headers["x-api-key"] == SECRET
    assert seen.headers["x-tenant-id"] == "acme"
    assert run(gateway, "--tenant", "other", "workers").code == 0
    assert gateway.last("GET", "/api/v1/workers").headers["x-tenant-id"] == "other"


def test_job_get_json_mode_prints_the_servers_json(gateway: FakeGateway) -> None:
    job = {"id": "j1", "state": "SUCCEEDED", "result": {"answer": 42}, "labels": {"a": "b"}}
    gateway.route("GET", "/api/v1/jobs/j1", (200, job))
    result = run(gateway, "job", "get", "j1", "--json")
    assert result.code == 0 and result.json == job
    human = run(gateway, "job", "get", "j1")
    assert "result  answer=42" in human.out and "labels  a=b" in human.out


def test_job_submit_builds_the_request(gateway: FakeGateway, tmp_path: Any) -> None:
    gateway.route("POST", "/api/v1/jobs", (200, {"job_id": "j9", "trace_id": "t9"}))
    result = run(gateway, "job", "submit", "--topic", "job.echo", "--prompt", "hello",
                 "--label", "env=prod", "--idempotency-key", "idem-1", "--priority", "critical",
                 "--capability", "net", "--risk-tag", "pii", "--input", '{"x": 1}')
    assert result.code == 0
    assert "job_id    j9" in result.out and "trace_id  t9" in result.out
    assert gateway.last("POST", "/api/v1/jobs").body == {
        "prompt": "hello", "topic": "job.echo", "context": {"x": 1}, "priority": "critical",
        "idempotency_key": "idem-1", "labels": {"env": "prod"}, "capability": "net",
        "risk_tags": ["pii"]}
    path = tmp_path / "in.json"
    path.write_text('{"prompt": "from file", "k": [1]}')
    assert run(gateway, "job", "submit", "--input-file", str(path)).code == 0
    assert gateway.last("POST", "/api/v1/jobs").body == {
        "prompt": "from file", "topic": "job.default", "context": {"prompt": "from file", "k": [1]}}
    result = run(gateway, "job", "submit", "--prompt", "p", "--json")
    assert result.json == {"job_id": "j9", "trace_id": "t9"}


def test_job_submit_bad_input_is_a_usage_error(gateway: FakeGateway) -> None:
    result = run(gateway, "job", "submit", "--input", "{nope")
    assert result.code == 2 and "--input is not valid JSON" in result.err
    result = run(gateway, "job", "submit")
    assert result.code == 2 and "--prompt" in result.err
    assert gateway.requests == []


def test_job_submit_outcomes(gateway: FakeGateway) -> None:
    gateway.route("POST", "/api/v1/jobs", (200, {"job_id": "j1", "status": "approval_required",
                                                 "reason": "needs a human"}))
    result = run(gateway, "job", "submit", "--prompt", "p")
    assert result.code == 7
    assert "needs a human" in result.out and "held for approval" in result.err
    gateway.route("POST", "/api/v1/jobs", (403, {"error": "denied by rule no-prod", "status": 403,
                                                 "job_id": "j2", "trace_id": "t2"}))
    result = run(gateway, "job", "submit", "--prompt", "p", "--json")
    assert result.code == 4
    assert "job j2 denied by policy: HTTP 403: denied by rule no-prod" in result.err
    assert result.json["job_id"] == "j2"
    gateway.route("POST", "/api/v1/jobs", (429, {"error": "rate limited", "status": 429},
                                           {"Retry-After": "30"}))
    result = run(gateway, "job", "submit", "--prompt", "p")
    assert result.code == 5 and "rate limited; retry after 30s" in result.err
    gateway.route("POST", "/api/v1/jobs", (503, {"error": "bus unavailable", "status": 503}))
    assert run(gateway, "job", "submit", "--prompt", "p").code == 6


def test_job_list_query_and_table(gateway: FakeGateway) -> None:
    gateway.route("GET", "/api/v1/jobs", (200, {"items": [
        {"id": "j1", "state": "RUNNING", "topic": "job.a", "tenant": "acme",
         "updated_at": 1704067200_000_000},
        {"id": "job-22", "state": "SUCCEEDED", "topic": "job.bb", "tenant": "acme",
         "updated_at": 1704067260_000_000},
    ], "next_cursor": 1704067199999999}))
    result = run(gateway, "job", "list", "--state", "RUNNING", "--topic", "job.a", "--limit", "2")
    assert result.code == 0
    assert gateway.last("GET", "/api/v1/jobs").query == {"limit": "2", "state": "RUNNING",
                                                         "topic": "job.a"}
    assert result.out.splitlines() == [
        "ID      STATE      TOPIC   TENANT  UPDATED",
        "j1      RUNNING    job.a   acme    2024-01-01 00:00:00Z",
        "job-22  SUCCEEDED  job.bb  acme    2024-01-01 00:01:00Z",
    ]
    assert "--cursor 1704067199999999" in result.err
    assert run(gateway, "job", "list", "--json").json["items"][1]["id"] == "job-22"


def test_job_cancel(gateway: FakeGateway) -> None:
    gateway.route("POST", "/api/v1/jobs/j1/cancel", (200, {"id": "j1", "state": "CANCELLED"}))
    result = run(gateway, "job", "cancel", "j1")
    assert (result.code, result.out.strip()) == (0, "job j1: CANCELLED")
    gateway.route("POST", "/api/v1/jobs/j1/cancel",
                  (200, {"id": "j1", "state": "SUCCEEDED", "reason": "job already terminal"}))
    assert run(gateway, "job", "cancel", "j1").out.strip() == "job j1: SUCCEEDED (job already terminal)"


def test_approvals(gateway: FakeGateway) -> None:
    gateway.route("GET", "/api/v1/approvals", (200, {"items": [
        {"job": {"id": "j1", "topic": "job.x", "state": "APPROVAL_REQUIRED"},
         "decision": "DECISION_TYPE_REQUIRE_HUMAN", "policy_reason": "prod write",
         "approval_status": "pending"}], "next_cursor": None}))
    result = run(gateway, "approval", "list")
    assert result.out.splitlines() == [
        "JOB_ID  TOPIC  STATE              APPROVAL  DECISION       REASON",
        "j1      job.x  APPROVAL_REQUIRED  pending   REQUIRE_HUMAN  prod write",
    ]
    gateway.route("POST", "/api/v1/approvals/j1/approve", (200, {"job_id": "j1", "trace_id": "t1"}))
    result = run(gateway, "approval", "approve", "j1", "--reason", "ok", "--note", "looked")
    assert (result.code, result.out.strip()) == (0, "job j1: approved (trace t1)")
    assert gateway.last("POST", "/api/v1/approvals/j1/approve").body == {"reason": "ok",
                                                                         "note": "looked"}
    gateway.route("POST", "/api/v1/approvals/j1/reject", (200, {"job_id": "j1"}))
    result = run(gateway, "approval", "reject", "j1", "--reason", "no")
    assert (result.code, result.out.strip()) == (0, "job j1: rejected")
    assert gateway.last("POST", "/api/v1/approvals/j1/reject").body == {"reason": "no"}


def test_dlq(gateway: FakeGateway) -> None:
    gateway.route("GET", "/api/v1/dlq", (200, {"items": [
        {"job_id": "j1", "topic": "job.x", "status": "JOB_STATUS_FAILED", "reason": "worker crashed",
         "reason_code": "worker_error", "last_state": "RUNNING", "attempts": 3,
         "created_at": 1704067200}]}))
    result = run(gateway, "dlq", "list", "--limit", "5")
    assert gateway.last("GET", "/api/v1/dlq").query == {"limit": "5"}
    assert result.out.splitlines() == [
        "JOB_ID  TOPIC  STATUS  CODE          LAST_STATE  ATTEMPTS  CREATED               REASON",
        "j1      job.x  FAILED  worker_error  RUNNING     3         2024-01-01 00:00:00Z  worker crashed",
    ]
    gateway.route("POST", "/api/v1/dlq/j1/retry", (200, {"job_id": "j1-retry-abcd1234"}))
    result = run(gateway, "dlq", "retry", "j1")
    assert (result.code, result.out.strip()) == (0, "job j1 resubmitted as j1-retry-abcd1234")
    gateway.route("DELETE", "/api/v1/dlq/j1", (204, None))
    result = run(gateway, "dlq", "delete", "j1")
    assert (result.code, result.out.strip()) == (0, "DLQ entry j1 deleted")
    assert run(gateway, "dlq", "delete", "nope").code == 3


def test_workers_table(gateway: FakeGateway) -> None:
    gateway.route("GET", "/api/v1/workers", (200, {"items": [
        {"worker_id": "w-1", "pool": "default", "active_jobs": 2, "max_parallel_jobs": 8,
         "cpu_load": 12.5, "labels": {"zone": "a"}, "online": True, "heartbeat_age_seconds": 1.7},
    ]}))
    result = run(gateway, "workers")
    assert result.out.splitlines() == [
        "WORKER  POOL     ONLINE  JOBS  CPU   HEARTBEAT  LABELS",
        "w-1     default  yes     2/8   12.5  2s ago     zone=a",
    ]
    gateway.route("GET", "/api/v1/workers", (200, {"items": []}))
    result = run(gateway, "workers")
    assert (result.code, result.out, result.err.strip()) == (0, "", "no workers")


def test_status(gateway: FakeGateway) -> None:
    body = {"nats": {"connected": True, "status": "CONNECTED"}, "redis": {"ok": True},
            "workers": {"count": 2}, "pipeline": {"pending": 1, "running": 0},
            "rate_limiter": {"mode": "redis"},
            "replicas": {"api-gateway": [{"id": "gw-a", "version": "0.1.0",
                                          "started_at": 1704067200}]}}
    gateway.route("GET", "/api/v1/status", (200, body))
    result = run(gateway, "status")
    assert result.code == 0
    assert "nats          ok (CONNECTED)" in result.out
    assert "workers       2" in result.out and "pending=1 running=0" in result.out
    assert "api-gateway  gw-a     0.1.0    2024-01-01 00:00:00Z" in result.out
    assert run(gateway, "status", "--json").json == body
    body["redis"] = {"ok": False, "error": "timeout"}
    result = run(gateway, "status")
    assert result.code == 6 and "Redis not ready" in result.err and "DOWN (timeout)" in result.out


@pytest.mark.parametrize("decision,code", [
    ("DECISION_TYPE_ALLOW", 0), ("DECISION_TYPE_DENY", 4), ("DECISION_TYPE_THROTTLE", 5),
    ("DECISION_TYPE_REQUIRE_HUMAN", 7), ("DECISION_TYPE_ALLOW_WITH_CONSTRAINTS", 0),
])
def test_policy_evaluate(gateway: FakeGateway, decision: str, code: int) -> None:
    gateway.route("POST", "/api/v1/policy/evaluate",
                  (200, {"decision": decision, "reason": "rule matched", "ruleId": "r-7"}))
    result = run(gateway, "policy", "evaluate", "--topic", "job.x", "--label", "env=prod",
                 "--capability", "net", "--risk-tag", "pii")
    assert result.code == code
    assert gateway.last("POST", "/api/v1/policy/evaluate").body == {
        "topic": "job.x", "tenant": "acme", "labels": {"env": "prod"}, "capability": "net",
        "risk_tags": ["pii"]}
    assert "rule      r-7" in result.out and "reason    rule matched" in result.out
    run(gateway, "policy", "evaluate", "--topic", "job.x", "--tenant", "other")
    seen = gateway.last("POST", "/api/v1/policy/evaluate")
    assert seen.body["tenant"] == "other" and seen.headers["x-tenant-id"] == "acme"


def test_api_key_never_printed(gateway: FakeGateway, capsys: pytest.CaptureFixture[str]) -> None:
    gateway.route("GET", "/api/v1/jobs/j1",
                  (401, {"error": f"invalid api key {SECRET}", "status": 401}))
    result = run(gateway, "job", "get", "j1", "--json")  # run() asserts SECRET is absent
    assert result.code == 4 and "invalid api key ***" in result.err
    result = run(gateway, "--api-key", SECRET, "job", "get", "j1")
    assert result.code == 4
    run(gateway, "--api-key", SECRET, "--help")
    run(gateway, "job", "submit", "--help")
    captured = capsys.readouterr()
    assert SECRET not in captured.out + captured.err
    assert SECRET not in repr(cli_http.Client(gateway.addr, api_key=SECRET))


# -- watching a job: WebSocket progress + polling ----------------------------------------------------


def _packet(**kw: Any) -> str:
    return json.dumps({"traceId": "t1", "senderId": "gw", "protocolVersion": 1, **kw})


def _job_until_sent(gw: FakeGateway, final: str = "SUCCEEDED", **extra: Any) -> Callable[[Seen], Answer]:
    def answer(seen: Seen) -> Answer:
        state = final if gw.ws_sent.is_set() else "RUNNING"
        return 200, {"id": "j1", "state": state, **(extra if gw.ws_sent.is_set() else {})}
    return answer


def test_watch_shows_progress_from_the_stream_and_ends_on_the_polled_state(gateway: FakeGateway) -> None:
    gateway.ws_frames = [
        _packet(jobProgress={"jobId": "other", "percent": 90, "message": "not ours"}),
        _packet(jobProgress={"jobId": "j1", "percent": 50, "message": "halfway"}),
        "not json",
        _packet(jobProgress={"jobId": "j1", "percent": 80}),
        _packet(jobResult={"jobId": "j1", "status": "JOB_STATUS_SUCCEEDED"}),
    ]
    gateway.route("GET", "/api/v1/jobs/j1", _job_until_sent(gateway, result={"answer": 42}))
    result = run(gateway, "job", "watch", "j1", "--interval", "0.05")
    assert result.code == 0, result.err
    lines = result.out.splitlines()
    assert "[###############---------------]  50% RUNNING  halfway" in lines
    assert "[########################------]  80% RUNNING" in lines
    assert "[##############################] 100% SUCCEEDED" in lines
    assert "not ours" not in result.out
    assert "state   SUCCEEDED" in result.out and "result  answer=42" in result.out
    hs = gateway.ws_handshakes[0]
    assert hs["x-api-key"] == SECRET and hs["x-tenant-id"] == "acme"


def test_watch_failed_job_exits_1_and_json_mode_prints_lines(gateway: FakeGateway) -> None:
    gateway.ws_frames = [_packet(jobProgress={"jobId": "j1", "percent": 10, "message": "go"})]
    gateway.route("GET", "/api/v1/jobs/j1", _job_until_sent(gateway, "FAILED",
                                                            error_message="worker crashed"))
    result = run(gateway, "job", "watch", "j1", "--interval", "0.05", "--json")
    assert result.code == 1
    docs = [json.loads(line) for line in result.out.splitlines()]
    assert docs[0]["jobProgress"] == {"jobId": "j1", "percent": 10, "message": "go"}
    assert docs[-1] == {"id": "j1", "state": "FAILED", "error_message": "worker crashed"}


def test_watch_without_a_stream_polls(gateway: FakeGateway) -> None:
    gateway.ws_reject = 404
    polls = {"n": 0}

    def answer(seen: Seen) -> Answer:
        polls["n"] += 1
        return 200, {"id": "j1", "state": "CANCELLED" if polls["n"] >= 3 else "PENDING"}

    gateway.route("GET", "/api/v1/jobs/j1", answer)
    result = run(gateway, "job", "watch", "j1", "--interval", "0.05")
    assert result.code == 1 and polls["n"] == 3
    assert "progress stream unavailable (stream refused: HTTP 404)" in result.err
    assert "PENDING" in result.out and "state  CANCELLED" in result.out


def test_watch_unknown_job_exits_3_and_max_wait_gives_up(gateway: FakeGateway) -> None:
    gateway.ws_reject = 404
    assert run(gateway, "job", "watch", "nope").code == 3
    gateway.route("GET", "/api/v1/jobs/j1", (200, {"id": "j1", "state": "RUNNING"}))
    started = time.monotonic()
    result = run(gateway, "job", "watch", "j1", "--interval", "0.05", "--max-wait", "0.3")
    assert result.code == 1 and "still RUNNING after 0.3s" in result.err
    assert time.monotonic() - started < 3


def test_submit_wait_follows_the_job(gateway: FakeGateway) -> None:
    gateway.ws_frames = [_packet(jobProgress={"jobId": "j1", "percent": 40, "message": "working"}),
                         _packet(jobResult={"jobId": "j1", "status": "JOB_STATUS_SUCCEEDED"})]
    gateway.route("POST", "/api/v1/jobs", (200, {"job_id": "j1", "trace_id": "t1"}))
    gateway.route("GET", "/api/v1/jobs/j1", _job_until_sent(gateway))
    result = run(gateway, "job", "submit", "--prompt", "p", "--wait", "--interval", "0.05")
    assert result.code == 0, result.err
    assert "job_id    j1" in result.out and "40% RUNNING  working" in result.out
    assert "state  SUCCEEDED" in result.out


def test_ws_client_reads_packets_and_closes(gateway: FakeGateway) -> None:
    gateway.ws_frames = [_packet(jobProgress={"jobId": "a", "percent": 1}), "[1, 2]",
                         _packet(jobResult={"jobId": "a", "status": "JOB_STATUS_FAILED"})]
    gateway.ws_settle = 0.0
    with WebSocketClient(stream_url(gateway.addr), headers={"X-API-Key": "k"}, timeout=5) as ws:
        packets = ws.packets()
        first, second = next(packets), next(packets)
    assert first["jobProgress"]["jobId"] == "a" and second["jobResult"]["status"] == "JOB_STATUS_FAILED"
    assert cli.match_packet(first, "a") == ("progress", {"percent": 1.0, "message": ""})
    assert cli.match_packet(second, "a") == ("result", {"status": "FAILED"})
    assert cli.match_packet(second, "b") is None
    assert cli.match_packet({"job_progress": {"job_id": "b"}}, "b") == (
        "progress", {"percent": 0.0, "message": ""})
    gateway.ws_reject = 401
    with pytest.raises(StreamError, match="HTTP 401"):
        WebSocketClient(stream_url(gateway.addr), timeout=5).connect()


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_watch_on_a_terminal_redraws_one_line(gateway: FakeGateway) -> None:
    gateway.ws_frames = [_packet(jobProgress={"jobId": "j1", "percent": 50, "message": "half"})]
    gateway.route("GET", "/api/v1/jobs/j1", _job_until_sent(gateway))
    out, err = _Tty(), io.StringIO()
    code = cli.main(["job", "watch", "j1", "--interval", "0.05"],
                    env={"CORDUM_GATEWAY_ADDR": gateway.addr}, stdout=out, stderr=err)
    assert code == 0, err.getvalue()
    text = out.getvalue()
    assert "\r[###############---------------]  50% RUNNING  half\x1b[K" in text
    assert "\r[##############################] 100% SUCCEEDED  half\x1b[K\n" in text
    assert text.splitlines()[-1] == "state  SUCCEEDED"


# -- workflows and runs ----------------------------------------------------------------------------

FLOW_YAML = """\
id: order-flow
name: Orders
steps:
  fetch:
    topic: job.default
    input: {order: "${input.order}"}
  decide:
    type: condition
    depends_on: [fetch]
    condition: "steps.fetch.output != null"
"""


def _sequence(*docs: Any) -> Callable[[Seen], Answer]:
    """Answers the i-th request with docs[i] (the last one from then on)."""
    calls = {"n": 0}

    def answer(seen: Seen) -> Answer:
        doc = docs[min(calls["n"], len(docs) - 1)]
        calls["n"] += 1
        return doc if isinstance(doc, tuple) else (200, doc)
    return answer


def _run_doc(status: str, **steps: tuple[str, str]) -> dict[str, Any]:
    return {"id": "r1", "workflow_id": "order-flow", "status": status, "created_at": 1704067200,
            "steps": {sid: {"step_id": sid, "status": st, "job_id": job or None, "attempts": 1 if job else 0}
                      for sid, (st, job) in steps.items()}}


@pytest.mark.parametrize("argv", [
    ["workflow"],
    ["workflow", "create"],
    ["workflow", "get"],
    ["run", "start"],
    ["run", "start", "wf", "--input", "{}", "--input-file", "f"],
    ["run", "list", "--limit", "0"],
    ["run", "rerun"],
])
def test_workflow_and_run_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert run(None, *argv).code == 2
    assert "error" in capsys.readouterr().err  # argparse writes to sys.stderr


def test_workflow_create_validates_the_file_and_sends_the_definition(gateway: FakeGateway,
                                                                      tmp_path: Any) -> None:
    gateway.route("POST", "/api/v1/workflows", (201, {"id": "order-flow"}))
    path = tmp_path / "flow.yaml"
    path.write_text(FLOW_YAML)
    result = run(gateway, "workflow", "create", "-f", str(path))
    assert (result.code, result.out.strip()) == (0, "workflow order-flow saved (2 steps)")
    sent = gateway.last("POST", "/api/v1/workflows").body
    assert sent["id"] == "order-flow" and sent["name"] == "Orders"
    assert list(sent["steps"]) == ["fetch", "decide"]
    assert sent["steps"]["decide"]["depends_on"] == ["fetch"]
    assert sent["steps"]["fetch"]["input"] == {"order": "${input.order}"}
    # the same definition as JSON: the same request
    as_json = tmp_path / "flow.json"
    as_json.write_text(json.dumps(yaml.safe_load(FLOW_YAML)))
    assert run(gateway, "workflow", "create", "--file", str(as_json), "--json").json == {"id": "order-flow"}
    assert gateway.requests[-1].body == sent


@pytest.mark.parametrize("text,needle", [
    (FLOW_YAML.replace("depends_on: [fetch]", "depends_on: [fetsh]"), "flow.yaml:9: step 'decide'"),
    (FLOW_YAML.replace("    topic: job.default\n", "    topc: job.default\n"), "did you mean 'topic'"),
    ("id: x\nsteps: [unclosed\n", "invalid YAML"),
    ('{"id": "x", "steps": ', "invalid JSON"),
])
def test_workflow_create_refuses_an_invalid_file_before_sending(gateway: FakeGateway, tmp_path: Any,
                                                                text: str, needle: str) -> None:
    path = tmp_path / "flow.yaml"
    path.write_text(text)
    result = run(gateway, "workflow", "create", "-f", str(path))
    assert result.code == 2 and needle in result.err, result.err
    assert gateway.requests == []
    missing = run(gateway, "workflow", "create", "-f", str(tmp_path / "nope.yaml"))
    assert missing.code == 2 and "cannot read" in missing.err


def test_workflow_create_reports_the_gateways_refusal(gateway: FakeGateway, tmp_path: Any) -> None:
    gateway.route("POST", "/api/v1/workflows", (400, {"error": "step 'x': unknown topic", "status": 400}))
    path = tmp_path / "flow.yaml"
    path.write_text(FLOW_YAML)
    result = run(gateway, "workflow", "create", "-f", str(path))
    assert result.code == 1 and "HTTP 400: step 'x': unknown topic" in result.err


def test_workflow_list_get_delete(gateway: FakeGateway) -> None:
    doc = yaml.safe_load(FLOW_YAML)
    gateway.route("GET", "/api/v1/workflows", (200, [
        {**doc, "version": "3", "updated_at": 1704067200},
        {"id": "other", "steps": {"a": {}}}]))
    result = run(gateway, "workflow", "list")
    assert result.out.splitlines() == [
        "ID          NAME    VERSION  STEPS  UPDATED",
        "order-flow  Orders  3        2      2024-01-01 00:00:00Z",
        "other       -       -        1      -",
    ]
    gateway.route("GET", "/api/v1/workflows", (200, {"items": []}))
    assert run(gateway, "workflow", "list").err.strip() == "no workflows"

    gateway.route("GET", "/api/v1/workflows/order-flow", (200, doc))
    result = run(gateway, "workflow", "get", "order-flow")
    assert result.code == 0 and yaml.safe_load(result.out) == doc  # YAML that `create -f` takes back
    assert result.out.startswith("id: order-flow\nname: Orders\nsteps:\n")
    assert run(gateway, "workflow", "get", "order-flow", "--json").json == doc
    assert run(gateway, "workflow", "get", "nope").code == 3

    gateway.route("DELETE", "/api/v1/workflows/order-flow", (204, None))
    result = run(gateway, "workflow", "delete", "order-flow")
    assert (result.code, result.out.strip()) == (0, "workflow order-flow deleted")
    assert run(gateway, "workflow", "delete", "nope").code == 3


def test_run_start_builds_the_request(gateway: FakeGateway, tmp_path: Any) -> None:
    gateway.route("POST", "/api/v1/workflows/order-flow/runs", (200, {"run_id": "r1"}))
    result = run(gateway, "run", "start", "order-flow", "--input", '{"order": 7}',
                 "--idempotency-key", "idem-1", "--dry-run")
    assert result.code == 0 and result.out.splitlines() == ["run_id   r1", "dry_run  yes"]
    seen = gateway.last("POST", "/api/v1/workflows/order-flow/runs")
    assert seen.body == {"order": 7} and seen.query == {"dry_run": "true"}
    assert seen.headers["idempotency-key"] == "idem-1" and seen.headers["x-tenant-id"] == "acme"
    path = tmp_path / "in.json"
    path.write_text('{"order": 8}')
    assert run(gateway, "run", "start", "order-flow", "--input-file", str(path), "--json").json == {"run_id": "r1"}
    seen = gateway.last("POST", "/api/v1/workflows/order-flow/runs")
    assert seen.body == {"order": 8} and seen.query == {} and "idempotency-key" not in seen.headers
    assert run(gateway, "run", "start", "order-flow").code == 0
    assert gateway.last("POST", "/api/v1/workflows/order-flow/runs").body == {}
    assert run(gateway, "run", "start", "a/b").code == 3  # the id is one path segment: no such route


def test_run_start_refuses_input_that_is_not_an_object(gateway: FakeGateway) -> None:
    for text, needle in (("[1, 2]", "--input must be a JSON object"), ("{nope", "--input is not valid JSON")):
        result = run(gateway, "run", "start", "wf", "--input", text)
        assert result.code == 2 and needle in result.err
    assert gateway.requests == []
    gateway.route("POST", "/api/v1/workflows/wf/runs",
                  (409, {"error": "idempotency key used by another workflow", "status": 409,
                         "code": "RUN_IDEMPOTENCY_CONFLICT"}))
    result = run(gateway, "run", "start", "wf", "--idempotency-key", "k")
    assert result.code == 1 and "RUN_IDEMPOTENCY_CONFLICT" in result.err


@pytest.mark.parametrize("status,code", [
    ("succeeded", 0), ("running", 0), ("pending", 0), ("waiting", 0), ("failed", 1), ("denied", 1),
    ("cancelled", 1), ("timed_out", 1),
])
def test_run_get_exit_code_follows_status(gateway: FakeGateway, status: str, code: int) -> None:
    gateway.route("GET", "/api/v1/workflow-runs/r1", (200, _run_doc(status, fetch=("succeeded", "r1:fetch@1"))))
    assert run(gateway, "run", "get", "r1").code == code


def test_run_get_shows_the_run_and_its_steps(gateway: FakeGateway) -> None:
    doc = _run_doc("failed", fetch=("succeeded", "r1:fetch@1"), decide=("failed", "r1:decide@2"),
                   notify=("skipped", ""))
    doc["steps"]["decide"]["error"] = {"message": "worker crashed", "step_id": "decide"}
    doc["steps"]["notify"]["skip_reason"] = "dependency decide failed"
    doc["error"] = {"message": "step decide failed: worker crashed"}
    doc["completed_at"] = 1704067260
    gateway.route("GET", "/api/v1/workflow-runs/r1", (200, doc))
    result = run(gateway, "run", "get", "r1")
    assert result.code == 1
    assert result.out.splitlines() == [
        "id         r1",
        "workflow   order-flow",
        "status     failed",
        "created    2024-01-01 00:00:00Z",
        "completed  2024-01-01 00:01:00Z",
        "error      step decide failed: worker crashed",
        "",
        "STEP    STATUS     ATTEMPTS  JOB          ERROR",
        "fetch   succeeded  1         r1:fetch@1   -",
        "decide  failed     1         r1:decide@2  worker crashed",
        "notify  skipped    0         -            dependency decide failed",
    ]
    assert run(gateway, "run", "get", "r1", "--json").json == doc


def test_run_list_and_timeline(gateway: FakeGateway) -> None:
    gateway.route("GET", "/api/v1/workflow-runs", (200, {"items": [
        {"id": "r2", "workflow_id": "order-flow", "status": "running", "created_at": 1704067260},
        {"id": "r1", "workflow_id": "order-flow", "status": "succeeded", "created_at": 1704067200,
         "completed_at": 1704067230}], "next_cursor": "1704067200:r1"}))
    result = run(gateway, "run", "list", "--workflow", "order-flow", "--status", "running", "--limit", "2")
    assert gateway.last("GET", "/api/v1/workflow-runs").query == {
        "limit": "2", "status": "running", "workflow_id": "order-flow"}
    assert result.out.splitlines() == [
        "ID  WORKFLOW    STATUS     CREATED               COMPLETED",
        "r2  order-flow  running    2024-01-01 00:01:00Z  -",
        "r1  order-flow  succeeded  2024-01-01 00:00:00Z  2024-01-01 00:00:30Z",
    ]
    assert "--cursor 1704067200:r1" in result.err
    assert run(gateway, "run", "list", "--cursor", "c1").code == 0
    assert gateway.last("GET", "/api/v1/workflow-runs").query == {"limit": "50", "cursor": "c1"}

    events = [{"type": "run_created", "at": 1704067200.25, "status": "pending"},
              {"type": "step_dispatched", "at": 1704067201, "step_id": "fetch", "job_id": "r1:fetch@1",
               "status": "running"},
              {"type": "step_failed", "at": 1704067202, "step_id": "fetch", "message": "boom\nagain"}]
    gateway.route("GET", "/api/v1/workflow-runs/r1/timeline", (200, events))
    result = run(gateway, "run", "timeline", "r1", "--limit", "3")
    assert gateway.last("GET", "/api/v1/workflow-runs/r1/timeline").query == {"limit": "3"}
    assert result.out.splitlines() == [
        "AT                    TYPE             STEP   STATUS   JOB         MESSAGE",
        "2024-01-01 00:00:00Z  run_created      -      pending  -           -",
        "2024-01-01 00:00:01Z  step_dispatched  fetch  running  r1:fetch@1  -",
        "2024-01-01 00:00:02Z  step_failed      fetch  -        -           boom again",
    ]
    assert run(gateway, "run", "timeline", "r1", "--json").json == events
    assert run(gateway, "run", "timeline", "nope").code == 3


def test_run_cancel_rerun_delete(gateway: FakeGateway) -> None:
    gateway.route("POST", "/api/v1/workflow-runs/r1/cancel", (204, None))
    result = run(gateway, "run", "cancel", "r1")
    assert (result.code, result.out.strip()) == (0, "run r1: cancelled")
    assert run(gateway, "run", "cancel", "r1", "--json").json == {"run_id": "r1", "cancelled": True}
    gateway.route("POST", "/api/v1/workflow-runs/r1/cancel",
                  (409, {"error": "workflow run is busy, retry", "status": 409, "code": "RUN_NOT_CANCELLABLE"}))
    result = run(gateway, "run", "cancel", "r1")
    assert result.code == 1 and "workflow run is busy, retry (RUN_NOT_CANCELLABLE)" in result.err

    gateway.route("POST", "/api/v1/workflow-runs/r1/rerun", (200, {"run_id": "r9"}))
    result = run(gateway, "run", "rerun", "r1", "--from-step", "decide")
    assert (result.code, result.out.strip()) == (0, "run_id  r9")
    assert gateway.last("POST", "/api/v1/workflow-runs/r1/rerun").body == {"dry_run": False, "from_step": "decide"}
    run(gateway, "run", "rerun", "r1", "--dry-run")
    assert gateway.last("POST", "/api/v1/workflow-runs/r1/rerun").body == {"dry_run": True}

    gateway.route("DELETE", "/api/v1/workflow-runs/r1", (204, None))
    result = run(gateway, "run", "delete", "r1")
    assert (result.code, result.out.strip()) == (0, "run r1 deleted")
    assert run(gateway, "run", "delete", "nope").code == 3


def test_run_start_wait_prints_each_step_change_and_succeeds(gateway: FakeGateway) -> None:
    gateway.route("POST", "/api/v1/workflows/order-flow/runs", (200, {"run_id": "r1"}))
    final = _run_doc("succeeded", fetch=("succeeded", "r1:fetch@1"), approve=("succeeded", "r1:approve@1"))
    final["output"] = {"total": 42}
    gateway.route("GET", "/api/v1/workflow-runs/r1", _sequence(
        _run_doc("pending"),
        _run_doc("running", fetch=("running", "r1:fetch@1")),
        _run_doc("running", fetch=("running", "r1:fetch@1")),  # no change: no line
        (503, {"error": "gateway restarting", "status": 503}),  # a replica restarting: retried
        _run_doc("waiting", fetch=("succeeded", "r1:fetch@1"), approve=("waiting", "r1:approve@1")),
        final))
    result = run(gateway, "run", "start", "order-flow", "--wait", "--interval", "0.05")
    assert result.code == 0, result.err
    assert result.out.splitlines() == [
        "run_id  r1",
        "fetch     running    r1:fetch@1",
        "fetch     succeeded  r1:fetch@1",
        "approve   waiting    r1:approve@1  (cordumctl approval approve r1:approve@1)",
        "approve   succeeded  r1:approve@1",
        "run     r1",
        "status  succeeded",
        "output  total=42",
    ]
    assert "HTTP 503: gateway restarting (retrying)" in result.err


def test_run_start_wait_on_a_terminal_shows_a_progress_line_under_the_steps(gateway: FakeGateway) -> None:
    gateway.route("POST", "/api/v1/workflows/order-flow/runs", (200, {"run_id": "r1"}))
    gateway.route("GET", "/api/v1/workflow-runs/r1", _sequence(
        _run_doc("running", fetch=("running", "r1:fetch@1"), approve=("pending", "")),
        _run_doc("running", fetch=("succeeded", "r1:fetch@1"), approve=("running", "r1:approve@1")),
        _run_doc("succeeded", fetch=("succeeded", "r1:fetch@1"), approve=("succeeded", "r1:approve@1"))))
    out, err = _Tty(), io.StringIO()
    code = cli.main(["run", "start", "order-flow", "--wait", "--interval", "0.05"],
                    env={"CORDUM_API_KEY": SECRET, "CORDUM_GATEWAY_ADDR": gateway.addr}, stdout=out, stderr=err)
    assert code == 0, err.getvalue()
    text = out.getvalue()
    assert "0/2 steps ended" in text and "1/2 steps ended" in text and " 50% running" in text
    assert text.index("1/2 steps ended") > text.index("fetch     succeeded")  # the bar follows the step lines
    assert text.rstrip().endswith("status  succeeded")  # cleared before the summary


def test_step_changes_come_in_the_order_they_happened() -> None:
    from cordum.cli.workflows import step_changes

    seen: dict[str, tuple[str, str]] = {}
    run_doc = {"steps": {  # as the gateway sends them: keys sorted, times RFC 3339 or unix seconds
        "b": {"status": "succeeded", "job_id": "r:b@1", "started_at": "2024-01-01T00:00:02Z",
              "completed_at": "2024-01-01T00:00:03Z"},
        "fetch": {"status": "succeeded", "job_id": "r:fetch@1", "started_at": 1704067200,
                  "completed_at": 1704067201.5},
        "later": {"status": "pending"},
        "a": {"status": "running", "job_id": "r:a@1", "started_at": "2024-01-01T00:00:02.5Z"}}}
    assert step_changes(seen, run_doc) == [("fetch", "succeeded", "r:fetch@1"), ("a", "running", "r:a@1"),
                                           ("b", "succeeded", "r:b@1"), ("later", "pending", "")]
    assert step_changes(seen, run_doc) == []
    run_doc["steps"]["a"].update(status="failed", completed_at="2024-01-01T00:00:04Z")
    assert step_changes(seen, run_doc) == [("a", "failed", "r:a@1")]


@pytest.mark.parametrize("status", ["failed", "denied", "cancelled", "timed_out"])
def test_run_wait_exits_1_when_the_run_does_not_succeed(gateway: FakeGateway, status: str) -> None:
    gateway.route("POST", "/api/v1/workflow-runs/r0/rerun", (200, {"run_id": "r1"}))
    end = _run_doc(status, fetch=(status, "r1:fetch@1"))
    end["error"] = {"message": f"step fetch {status}"}
    gateway.route("GET", "/api/v1/workflow-runs/r1", _sequence(_run_doc("running", fetch=("running", "r1:fetch@1")),
                                                               end))
    result = run(gateway, "run", "rerun", "r0", "--wait", "--interval", "0.05")
    assert result.code == 1
    assert f"status  {status}" in result.out and f"error   step fetch {status}" in result.out


def test_run_wait_json_lines_max_wait_and_errors(gateway: FakeGateway) -> None:
    gateway.route("POST", "/api/v1/workflows/wf/runs", (200, {"run_id": "r1"}))
    end = _run_doc("succeeded", fetch=("succeeded", "r1:fetch@1"))
    gateway.route("GET", "/api/v1/workflow-runs/r1", _sequence(_run_doc("running", fetch=("running", "r1:fetch@1")),
                                                               end))
    result = run(gateway, "run", "start", "wf", "--wait", "--interval", "0.05", "--json")
    assert result.code == 0
    assert [json.loads(line) for line in result.out.splitlines()] == [
        {"run_id": "r1"},
        {"step_id": "fetch", "status": "running", "job_id": "r1:fetch@1"},
        {"step_id": "fetch", "status": "succeeded", "job_id": "r1:fetch@1"},
        end]

    gateway.route("GET", "/api/v1/workflow-runs/r1", (200, _run_doc("waiting")))
    started = time.monotonic()
    result = run(gateway, "run", "start", "wf", "--wait", "--interval", "0.05", "--max-wait", "0.3")
    assert result.code == 1 and "run r1 still waiting after 0.3s" in result.err
    assert time.monotonic() - started < 5
    gateway.route("GET", "/api/v1/workflow-runs/r1", (404, {"error": "workflow run not found", "status": 404}))
    result = run(gateway, "run", "start", "wf", "--wait", "--interval", "0.05")
    assert result.code == 3 and "workflow run not found" in result.err


# -- redirects -------------------------------------------------------------------------------------


def _recording_server(redirect: Callable[[str], str | None] = lambda path: None):
    """A server that records each request's headers and redirects where `redirect(path)` says."""
    seen: list[dict[str, str]] = []

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # what a WebSocket client accepts an answer in

        def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
            seen.append({k.lower(): v for k, v in self.headers.items()})
            location = redirect(self.path)
            if location is not None:
                self.send_response(302)
                self.send_header("Location", location)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            send_json(self, 200, {"ok": True})

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, seen


def test_the_api_key_is_not_forwarded_on_a_redirect_to_another_host():
    """A gateway (or something posing as one) redirecting elsewhere must not hand the caller's
    key and tenant to that host."""
    elsewhere, elsewhere_seen = _recording_server()
    other = f"http://localhost:{elsewhere.server_address[1]}"  # another host name and port
    gateway, gateway_seen = _recording_server(lambda path: other + path)
    try:
        client = cli_http.Client(f"http://127.0.0.1:{gateway.server_address[1]}", api_key=SECRET, tenant="acme")
        assert client.get("/api/v1/jobs") == {"ok": True}  # the redirect is still followed
        assert gateway_seen[0]["x-api-key"] == SECRET
        assert "x-api-key" not in elsewhere_seen[0] and "x-tenant-id" not in elsewhere_seen[0]
    finally:
        gateway.shutdown()
        elsewhere.shutdown()


def test_a_same_origin_redirect_keeps_the_api_key():
    server, seen = _recording_server(lambda path: "/api/v1/jobs" if path.startswith("/old") else None)
    try:
        client = cli_http.Client(f"http://127.0.0.1:{server.server_address[1]}", api_key=SECRET)
        assert client.get("/old/jobs") == {"ok": True}
        assert [request.get("x-api-key") for request in seen] == [SECRET, SECRET]
    finally:
        server.shutdown()


# -- TLS (--cacert, --insecure) ----------------------------------------------------------------------


@pytest.fixture
def tls_gateway(tmp_path: Path) -> Iterator[tuple[FakeGateway, Path]]:
    """The fake gateway over https, its certificate from a throwaway CA (returned: the CA's file)."""
    import ssl

    from tests.certs import TestCA

    ca = TestCA(tmp_path)
    issued = ca.issue("gateway", server=True)
    gw = FakeGateway()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(gw))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(issued.cert, issued.key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    server.daemon_threads = True
    gw.addr = f"https://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield gw, ca.cert
    server.shutdown()


def test_an_https_gateway_is_checked_against_the_system_cas_cacert_or_not_at_all(tls_gateway, tmp_path) -> None:
    gw, ca_file = tls_gateway
    gw.route("GET", "/api/v1/jobs", (200, {"items": [{"id": "j1", "state": "SUCCEEDED"}]}))
    unknown = run(gw, "job", "list")
    assert unknown.code == 6 and "certificate" in unknown.err.lower()  # a CA the system does not know
    trusted = run(gw, "job", "list", "--cacert", str(ca_file))
    assert trusted.code == 0 and "j1" in trusted.out
    assert run(gw, "job", "list", env={"CORDUM_CACERT": str(ca_file)}).code == 0
    assert run(gw, "--insecure", "job", "list").code == 0
    missing = run(gw, "job", "list", "--cacert", str(tmp_path / "nope.pem"))
    assert missing.code == 2 and "nope.pem" in missing.err


def test_the_stream_over_wss_uses_the_same_tls_options(tls_gateway) -> None:
    gw, ca_file = tls_gateway
    gw.ws_frames = [_packet(jobResult={"jobId": "a", "status": "JOB_STATUS_SUCCEEDED"})]
    gw.ws_settle = 0.0
    with pytest.raises(StreamError, match="certificate|handshake|SSL"):
        WebSocketClient(stream_url(gw.addr), timeout=5).connect()
    from cordum.cli.http import tls_verify

    with WebSocketClient(stream_url(gw.addr), timeout=5, tls=tls_verify(str(ca_file))) as ws:
        assert next(ws.packets())["jobResult"]["jobId"] == "a"


# -- shell completion -------------------------------------------------------------------------------


def _complete(script_text: str, line: str) -> list[str]:
    """What bash offers for `line` (completing its last word) with the script loaded."""
    import subprocess

    words = line.split(" ")
    probe = (f"{script_text}\nCOMP_WORDS=({' '.join(repr(w) for w in words)}); COMP_CWORD={len(words) - 1}\n"
             "_cordumctl; printf '%s\\n' \"${COMPREPLY[@]}\"")
    done = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, timeout=10)
    assert done.returncode == 0, done.stderr
    return [w for w in done.stdout.splitlines() if w]


def test_bash_completion_follows_the_command_tree() -> None:
    script_text = run(None, "completion", "bash").out
    assert "complete -o default -F _cordumctl cordumctl" in script_text
    assert _complete(script_text, "cordumctl jo") == ["job"]
    assert set(_complete(script_text, "cordumctl job ")) >= {"submit", "watch", "list", "get", "cancel"}
    assert set(_complete(script_text, "cordumctl job submit --w")) == {"--wait"}
    assert "--cacert" in _complete(script_text, "cordumctl --api-key k run start --")  # options between words
    assert _complete(script_text, "cordumctl dev pa") == ["pause"]
    assert _complete(script_text, "cordumctl completion z") == ["zsh"]
    assert set(_complete(script_text, "cordumctl --tenant job job ")) >= {"submit", "watch"}  # a value named like a command
    zsh = run(None, "completion", "zsh")
    assert zsh.code == 0 and "bashcompinit" in zsh.out and "complete -o default -F _cordumctl cordumctl" in zsh.out
    assert run(None, "completion", "fish").code == 2


def test_tables_fit_the_terminal_by_narrowing_the_widest_columns() -> None:
    rows = [("job-" + "a" * 40, "SUCCEEDED", "job.default", "x" * 50)]
    wide = render.table(("ID", "STATE", "TOPIC", "NOTE"), rows)
    assert len(wide.splitlines()[1]) > 100  # unfitted: as wide as the content
    fitted = render.table(("ID", "STATE", "TOPIC", "NOTE"), rows, fit=80)
    assert all(len(line) <= 80 for line in fitted.splitlines()), fitted
    assert "SUCCEEDED" in fitted and "…" in fitted  # short columns intact, long ones cut
    assert render.fit_widths([30, 30], 10) == [render.MIN_COLUMN, render.MIN_COLUMN]  # never below the minimum


def test_a_listing_on_a_terminal_fits_its_width(gateway: FakeGateway, monkeypatch) -> None:
    import os

    gateway.route("GET", "/api/v1/jobs", (200, {"items": [{"id": "j" * 70, "state": "RUNNING", "topic": "t" * 40}]}))
    monkeypatch.setattr(cli.shutil, "get_terminal_size", lambda *a, **k: os.terminal_size((72, 24)))
    out, err = _Tty(), io.StringIO()
    code = cli.main(["job", "list"], env={"CORDUM_API_KEY": SECRET, "CORDUM_GATEWAY_ADDR": gateway.addr},
                    stdout=out, stderr=err)
    assert code == 0 and all(len(line) <= 72 for line in out.getvalue().splitlines()), out.getvalue()
    piped = run(gateway, "job", "list")  # not a terminal: nothing cut but the 60-character cell cap
    assert "t" * 40 in piped.out


def test_the_event_stream_follows_no_redirect_so_the_key_stays_with_the_gateway():
    elsewhere, elsewhere_seen = _recording_server()
    other = f"ws://localhost:{elsewhere.server_address[1]}"
    gateway, gateway_seen = _recording_server(lambda path: other + path)
    try:
        ws = WebSocketClient(stream_url(f"http://127.0.0.1:{gateway.server_address[1]}"),
                             headers={"X-API-Key": SECRET}, timeout=5)
        with pytest.raises(StreamError, match="HTTP 302.*not followed"):
            ws.connect()
        assert gateway_seen and gateway_seen[0]["x-api-key"] == SECRET
        assert not elsewhere_seen  # never contacted
    finally:
        gateway.shutdown()
        elsewhere.shutdown()


def test_a_redirect_from_https_to_http_is_refused():
    """The credentials would be dropped, but a 307 re-sends the body (a prompt, a job's input) in
    clear: cordumctl does not go there."""
    import httpx

    sent: list[str] = []

    def gateway(request: httpx.Request) -> httpx.Response:
        sent.append(str(request.url))
        return httpx.Response(307, headers={"Location": "http://gateway.example/api/v1/jobs"}, request=request)

    client = cli_http.Client("https://gateway.example", api_key=SECRET)
    client._http = httpx.Client(transport=httpx.MockTransport(gateway))  # no TLS server needed
    with pytest.raises(cli_http.GatewayError, match="refused a redirect from https"):
        client.post("/api/v1/jobs", {"prompt": "secret plans"})
    assert sent == ["https://gateway.example/api/v1/jobs"]
