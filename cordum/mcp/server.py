"""The MCP server proper: the SDK's low-level `Server` with cordum-mcp's handlers, and the gateway
client they call.

Every tool call and resource read is one gateway REST call made with the caller's credential:
over stdio the configured API key, over HTTP the key the request carried (`cordum.mcp.http` puts
it in the ASGI scope), so the gateway scopes the answer to that key's tenant. The client is
cordumctl's (`cordum.cli.http`, a blocking httpx client) run in a worker thread: one short request per call,
abandoned if the caller is cancelled, bounded by the request timeout.

Errors: a gateway error becomes a tool result with `isError` naming the HTTP status and the
gateway's message (never the key); bad arguments likewise (`invalid_arguments`), so a model can
correct itself. An unknown, switched-off or not-yet-available tool is a JSON-RPC error.
"""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping

import mcp_types as types
import trio
from mcp.server.lowlevel import Server
from mcp.shared.exceptions import MCPError
from mcp.shared.message import SessionMessage

from cordum import __version__
from cordum.cli.http import Client, GatewayError
from cordum.infra.metrics import Metrics
from cordum.mcp import catalog
from cordum.mcp.catalog import ArgumentError, Call, Reply, Unavailable
from cordum.mcp.config import McpConfig
from cordum.runtime.log import get_logger

log = get_logger("mcp.server")

NAME = "cordum-mcp"
RequestId = int | str | None
RESOURCE_NOT_FOUND = -32002  # MCP's code for a resource that does not exist
# ASGI scope keys set by cordum.mcp.http for an authenticated request
SCOPE_KEY, SCOPE_TENANT = "cordum.api_key", "cordum.tenant"


@dataclass(frozen=True)
class Credential:
    api_key: str
    tenant: str = ""
    address: str = ""  # the MCP client's address: the gateway counts failed keys per address

    def __repr__(self) -> str:
        return f"Credential(fingerprint={fingerprint(self.api_key)!r}, tenant={self.tenant!r})"


def client_host(scope: Mapping[str, Any]) -> str:
    """The address of the client an ASGI scope came from ("" when unknown)."""
    client = scope.get("client")
    return str(client[0]) if client else ""


def fingerprint(key: str) -> str:
    """Names a key in logs and session ownership without revealing it."""
    return hashlib.sha256(key.encode()).hexdigest()


class GatewayClient:
    """Runs a catalog `Call` against the gateway with one caller's credential."""

    def __init__(self, addr: str, timeout: float) -> None:
        self.addr = addr
        self.timeout = timeout

    async def run(self, call: Call, who: Credential, limiter: trio.CapacityLimiter | None = None) -> Reply:
        """The call's reply; its thread counts against `limiter` (default: Trio's shared one)."""
        client = Client(self.addr, api_key=who.api_key, tenant=who.tenant, timeout=self.timeout)

        # The gateway trusts this (from its trusted proxies) to count failed keys per MCP client,
        # not per MCP replica: one client guessing keys must not lock every other one out.
        headers = {**call.headers, "X-Forwarded-For": who.address} if who.address else call.headers

        def send() -> Reply:
            body = call.body if call.body is not None or call.method == "GET" else {}
            response = client.request(call.method, call.path, query=call.query, body=body, headers=headers)
            return Reply(response.body, dict(response.headers))

        # The client blocks: a thread per call, left to finish on its own (its timeout bounds it)
        # when the MCP request is cancelled.
        with trio.move_on_after(self.timeout + 5):
            return await trio.to_thread.run_sync(send, abandon_on_cancel=True, limiter=limiter)
        raise GatewayError(f"gateway {self.addr} did not answer {call.method} {call.path} within {self.timeout:g}s")


class Busy:
    """How many things are in progress, and a wait for none."""

    def __init__(self) -> None:
        self.count = 0
        self._idle = trio.Event()
        self._idle.set()

    def begin(self) -> None:
        self.count += 1
        if self._idle.is_set():
            self._idle = trio.Event()

    def end(self) -> None:
        self.count -= 1
        if self.count == 0:
            self._idle.set()

    @contextmanager
    def holding(self) -> Iterator[None]:
        self.begin()
        try:
            yield
        finally:
            self.end()

    async def idle(self) -> None:
        await self._idle.wait()


class InFlight(Busy):
    """Server middleware counting the requests of a session (stdio, or SSE over HTTP) until their
    answer is written, so a drain closes the session only after every answer went out. A
    handler's return is not enough: the SDK writes the answer after it, and a close in between
    loses the answer (or turns it into "Connection closed"). The session's write stream must be
    `answers(write)`; `only` picks the requests whose answers take that way (default: all).
    Answers are matched by request id: sessions that reuse ids share a count, which stays right
    as every counted request is answered once."""

    def __init__(self, only: Callable[[Any], bool] | None = None) -> None:
        super().__init__()
        self._only = only
        self._unanswered: dict[RequestId, int] = {}

    async def __call__(self, ctx: Any, call_next: Any) -> Any:
        if ctx.request_id is None or (self._only is not None and not self._only(ctx)):
            return await call_next(ctx)  # a notification, or a request answered elsewhere
        self._open(ctx.request_id)
        try:
            result = await call_next(ctx)
            # A cancel (the client's notifications/cancelled, or a shutdown) that came as the
            # handler returned is raised here, where it is counted; the SDK then writes no answer
            # (or its own "Connection closed").
            await trio.lowlevel.checkpoint_if_cancelled()
            return result
        except trio.Cancelled:
            self.answered(ctx.request_id)
            raise

    def answers(self, stream: Any) -> "_Answers":
        """`stream` (the session's write stream), counting the answers that pass."""
        return _Answers(stream, self)

    def _open(self, request_id: RequestId) -> None:
        self._unanswered[request_id] = self._unanswered.get(request_id, 0) + 1
        self.begin()

    def answered(self, request_id: RequestId) -> None:
        left = self._unanswered.get(request_id, 0)
        if not left:
            return  # an answer to a request the middleware never saw (refused before it)
        if left == 1:
            del self._unanswered[request_id]
        else:
            self._unanswered[request_id] = left - 1
        self.end()


class _Answers:
    """A session's write stream that tells `InFlight` when an answer has been handed on."""

    def __init__(self, inner: Any, in_flight: InFlight) -> None:
        self._inner, self._in_flight = inner, in_flight

    async def send(self, item: SessionMessage) -> None:
        message = item.message
        try:
            await self._inner.send(item)
        finally:  # sent, or never will be: either way nothing more to wait for
            if isinstance(message, (types.JSONRPCResponse, types.JSONRPCError)):
                self._in_flight.answered(message.id)

    async def aclose(self) -> None:
        await self._inner.aclose()

    async def __aenter__(self) -> "_Answers":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def error_result(code: str, message: str, status: int = 0, details: Any = None) -> types.CallToolResult:
    error: dict[str, Any] = {"code": code, "message": message}
    if status:
        error["status"] = status
    if details:
        error["details"] = details
    return types.CallToolResult(content=[types.TextContent(type="text", text=message)],
                                structured_content={"error": error}, is_error=True)


def gateway_error_result(exc: GatewayError) -> types.CallToolResult:
    details = {k: v for k, v in exc.body.items() if k not in ("error", "status", "code")} \
        if isinstance(exc.body, dict) else None
    return error_result(exc.code or ("gateway_unreachable" if not exc.status else f"http_{exc.status}"),
                        exc.describe(), exc.status, details)


def build_server(config: McpConfig, gateway: GatewayClient, metrics: Metrics,
                 in_flight: InFlight | None = None) -> Server:
    calls = metrics.counter("cordum_mcp_tool_calls_total", "MCP tool calls by tool and outcome", ["tool", "outcome"])
    reads = metrics.counter("cordum_mcp_resource_reads_total", "MCP resource reads by outcome", ["outcome"])

    def credential(ctx: Any) -> Credential:
        request = getattr(ctx, "request", None)
        if request is None:  # stdio: the configured key
            return Credential(config.api_key, config.tenant)
        key = request.scope.get(SCOPE_KEY)
        if not key:  # cordum.mcp.http rejects such requests before they get here
            raise MCPError(types.INVALID_REQUEST, "no credential: send Authorization: Bearer <key> or X-API-Key")
        return Credential(key, request.scope.get(SCOPE_TENANT, ""), client_host(request.scope))

    async def list_tools(ctx: Any, params: Any) -> types.ListToolsResult:
        tools = [types.Tool(name=t.name, description=t.description, input_schema=t.schema,
                            annotations=types.ToolAnnotations(read_only_hint=not t.mutating,
                                                              destructive_hint=t.mutating, open_world_hint=False))
                 for t in catalog.TOOLS.values() if config.enabled(t.name)]
        return types.ListToolsResult(tools=tools)

    async def call_tool(ctx: Any, params: types.CallToolRequestParams) -> types.CallToolResult:
        name = params.name
        if name in catalog.UNAVAILABLE:
            calls.labels(tool=name, outcome="unavailable").inc()
            raise MCPError(types.INVALID_PARAMS, f"{name} is not available: {catalog.UNAVAILABLE[name]}",
                           data={"tool": name, "reason": "not_implemented"})
        if name not in catalog.TOOLS:
            raise MCPError(types.INVALID_PARAMS, f"unknown tool {name!r}", data={"tool": name})
        if not config.enabled(name):
            why = "the server is read-only (CORDUM_MCP_READ_ONLY)" if config.read_only and name in catalog.MUTATING \
                else "CORDUM_MCP_DISABLED_TOOLS"
            calls.labels(tool=name, outcome="disabled").inc()
            raise MCPError(types.INVALID_PARAMS, f"tool {name} is switched off on this server: {why}",
                           data={"tool": name, "reason": "disabled"})
        try:
            tool, args, call = catalog.plan_tool(name, params.arguments)
        except ArgumentError as exc:
            calls.labels(tool=name, outcome="invalid").inc()
            return error_result("invalid_arguments", f"{name}: {exc}")
        who = credential(ctx)
        try:
            reply = await gateway.run(call, who)
        except GatewayError as exc:
            calls.labels(tool=name, outcome="gateway_error").inc()
            log.info("mcp.tool_error", tool=name, status=exc.status, error=exc.describe())
            return gateway_error_result(exc)
        structured = tool.shape(args, reply)
        calls.labels(tool=name, outcome="ok").inc()
        return types.CallToolResult(content=[types.TextContent(type="text", text=catalog.result_text(structured))],
                                    structured_content=structured)

    async def list_resources(ctx: Any, params: Any) -> types.ListResourcesResult:
        return types.ListResourcesResult(resources=[
            types.Resource(uri=uri, name=name, description=text, mime_type="application/json")
            for uri, name, text in catalog.RESOURCES])

    async def list_templates(ctx: Any, params: Any) -> types.ListResourceTemplatesResult:
        return types.ListResourceTemplatesResult(resource_templates=[
            types.ResourceTemplate(uri_template=uri, name=name, description=text, mime_type="application/json")
            for uri, name, text in catalog.TEMPLATES])

    async def read_resource(ctx: Any, params: types.ReadResourceRequestParams) -> types.ReadResourceResult:
        uri = str(params.uri)
        try:
            read = catalog.plan_resource(uri)
        except Unavailable as exc:
            reads.labels(outcome="unavailable").inc()
            raise MCPError(RESOURCE_NOT_FOUND, str(exc), data={"uri": uri, "reason": "not_implemented"}) from None
        except ArgumentError as exc:
            reads.labels(outcome="invalid").inc()
            raise MCPError(types.INVALID_PARAMS, str(exc), data={"uri": uri}) from None
        try:
            reply = await gateway.run(read.call, credential(ctx))
        except GatewayError as exc:
            reads.labels(outcome="gateway_error").inc()
            code = RESOURCE_NOT_FOUND if exc.status == 404 else types.INTERNAL_ERROR
            raise MCPError(code, f"{uri}: {exc.describe()}", data={"uri": uri, "status": exc.status}) from None
        body = reply.body
        if read.workflow_id and isinstance(body, dict) and body.get("workflow_id") != read.workflow_id:
            reads.labels(outcome="gateway_error").inc()  # a run of another workflow: as if absent
            raise MCPError(RESOURCE_NOT_FOUND, f"{uri}: workflow run not found", data={"uri": uri, "status": 404})
        if isinstance(body, list):
            body = catalog.listing({}, reply)
        reads.labels(outcome="ok").inc()
        return types.ReadResourceResult(contents=[types.TextResourceContents(
            uri=uri, mime_type="application/json", text=catalog.result_text(body if body is not None else {}))])

    server = Server(NAME, version=__version__, instructions=(
        "Cordum's control plane for agent jobs: submit jobs and workflow runs, follow them, approve or "
        "reject what policy holds for a person. Every call acts as the API key of this connection."),
        on_list_tools=list_tools, on_call_tool=call_tool, on_list_resources=list_resources,
        on_list_resource_templates=list_templates, on_read_resource=read_resource)
    if in_flight is not None:
        server.middleware.append(in_flight)
    return server
