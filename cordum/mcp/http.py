"""cordum-mcp over HTTP: one ASGI app on hypercorn (Trio), in front of the SDK's transports.

    GET  /health, /metrics     no credential (probes)
    POST /mcp                  the SDK's streamable HTTP, stateless: any replica answers any request
    GET  /sse                  the SDK's SSE transport: an `endpoint` event names /message?session_id=…,
                               answers come on this stream (held by one replica: needs affinity)
    POST /message?session_id=  a message of that SSE session (202; the answer comes on the stream)
    POST /message              without a session: one JSON-RPC message answered in the response
                               body (notifications 202), Cordum's POST-only mode; stateless too

Every MCP request needs a credential, `Authorization: Bearer <key>` or `X-API-Key: <key>`: it is
the gateway key that request's calls use, so a client sees only its key's tenant. No credential,
or one the gateway refuses, is a 401 before the SDK sees the request. The gateway's verdict on a
key is remembered (by digest; KEY_TTL accepted, REFUSED_TTL refused) so a session costs one check,
not one per message (`KeyCheck`). An SSE session belongs to the key that opened it (the SDK
compares `scope["user"]`). `drain()` lets the requests in progress and the calls of SSE sessions
finish, then ends the SSE streams.
"""

from __future__ import annotations

import json
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any, AsyncIterator, Awaitable, Callable

import trio
from mcp.server.auth.middleware.bearer_auth import AuthenticatedUser
from mcp.server.auth.provider import AccessToken
from mcp.server.lowlevel import Server
from mcp.server.sse import SseServerTransport
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager

from cordum.cli.http import GatewayError
from cordum.mcp.catalog import Call
from cordum.mcp.server import (SCOPE_KEY, SCOPE_TENANT, Busy, Credential, GatewayClient, InFlight, client_host,
                               fingerprint)
from cordum.runtime.log import get_logger

log = get_logger("mcp.http")

ASGIApp = Callable[[dict, Callable[..., Awaitable[Any]], Callable[..., Awaitable[Any]]], Awaitable[None]]
KEY_TTL = 30.0  # seconds a key the gateway accepted is trusted without asking again
REFUSED_TTL = 5.0  # seconds a key the gateway refused is refused without asking again
KEY_CACHE_SIZE = 1024
KEY_CHECKS = 4  # key checks at once, in threads of their own: never those the tool calls use
# A cheap read every role may make: answers 401 for an unknown key, 403 for another tenant.
KEY_CHECK = Call("GET", "/api/v1/approvals", query={"limit": 1})
SCOPE_SSE = "cordum.sse_session"  # ASGI scope key: a message posted to an SSE session


def credential_from(headers: list[tuple[bytes, bytes]]) -> tuple[str, str]:
    """(key, X-Tenant-ID) of a request: `Authorization: Bearer <key>`, else `X-API-Key`."""
    found: dict[str, str] = {}
    for name, value in headers:
        found.setdefault(name.decode("latin-1").lower(), value.decode("latin-1").strip())
    auth = found.get("authorization", "")
    key = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
    return key or found.get("x-api-key", ""), found.get("x-tenant-id", "")


DRAIN_LIMIT = 1 << 20  # of a refused request's body, read before answering; past it the connection closes


async def respond(send: Any, status: int, body: dict[str, Any], headers: list[tuple[bytes, bytes]] = (), *,
                  receive: Any = None) -> None:
    """A JSON answer. With `receive`, the request's body is read to its end first: hypercorn (0.18)
    reuses a keep-alive connection only if the request was read through by the time the answer is
    complete, else the client's next request on it goes unanswered."""
    headers = list(headers)
    if receive is not None and not await _drained(receive):
        headers.append((b"connection", b"close"))
    payload = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": payload})


async def _drained(receive: Any) -> bool:
    """Read the request body to its end (False: it is longer than DRAIN_LIMIT, or the client left)."""
    read = 0
    while True:
        message = await receive()
        if message.get("type") != "http.request":
            return False
        read += len(message.get("body", b""))
        if not message.get("more_body"):
            return True
        if read > DRAIN_LIMIT:
            return False


class KeyCheck:
    """Asks the gateway whether a key is valid, and remembers the answer (by the key's digest):
    an accepted key for KEY_TTL, a refused one for REFUSED_TTL. Bogus keys cannot starve the tool
    calls: one check per key at a time (the others wait for its verdict), at most KEY_CHECKS
    checks at once, in threads of their own limiter."""

    def __init__(self, gateway: GatewayClient) -> None:
        self.gateway = gateway
        self._limiter = trio.CapacityLimiter(KEY_CHECKS)
        self._verdicts: dict[tuple[str, str], tuple[float, GatewayError | None]] = {}
        self._checking: dict[tuple[str, str], trio.Event] = {}

    async def refusal(self, who: Credential) -> GatewayError | None:
        """The gateway's 401/403 for this credential, or None (also when the gateway cannot be
        asked: then the calls themselves report it)."""
        entry = (fingerprint(who.api_key), who.tenant)
        known, verdict = self._remembered(entry)
        if known:
            return verdict
        checking = self._checking.get(entry)
        if checking is not None:  # the same key is being checked: its verdict serves this request too
            await checking.wait()
            return self._remembered(entry)[1]
        self._checking[entry] = done = trio.Event()
        try:
            return await self._ask(who, entry)
        finally:
            del self._checking[entry]
            done.set()

    def _remembered(self, entry: tuple[str, str]) -> tuple[bool, GatewayError | None]:
        until, verdict = self._verdicts.get(entry, (0.0, None))
        return until > trio.current_time(), verdict

    async def _ask(self, who: Credential, entry: tuple[str, str]) -> GatewayError | None:
        try:
            await self.gateway.run(KEY_CHECK, who, limiter=self._limiter)
        except GatewayError as exc:
            if exc.status not in (401, 403):
                return None  # not a verdict on the key: nothing remembered
            log.info("mcp.key_refused", key_fingerprint=entry[0][:16], tenant=who.tenant, status=exc.status)
            self._remember(entry, REFUSED_TTL, exc)
            return exc
        self._remember(entry, KEY_TTL, None)
        return None

    def _remember(self, entry: tuple[str, str], ttl: float, verdict: GatewayError | None) -> None:
        now = trio.current_time()
        if len(self._verdicts) >= KEY_CACHE_SIZE:
            self._verdicts = {k: v for k, v in self._verdicts.items() if v[0] > now}
            if len(self._verdicts) >= KEY_CACHE_SIZE:
                self._verdicts.clear()
        self._verdicts[entry] = (now + ttl, verdict)


def sse_session_request(ctx: Any) -> bool:
    """A request posted to an SSE session (its answer goes out on the session's stream)."""
    request = getattr(ctx, "request", None)
    return request is not None and bool(request.scope.get(SCOPE_SSE))


class McpHttpApp:
    def __init__(self, server: Server, gateway: GatewayClient, probes: ASGIApp, *, tenant: str = "",
                 sse_calls: InFlight | None = None) -> None:
        """`sse_calls`: the server's InFlight middleware for `sse_session_request`s."""
        self.server = server
        self.sse_calls = sse_calls or InFlight(only=sse_session_request)
        self.probes = probes
        self.tenant = tenant
        self.keys = KeyCheck(gateway)
        self.busy = Busy()  # the requests in progress, but the GET streams (they last until cut)
        self.sse_streams = Busy()
        self._sse_sessions: set[trio.CancelScope] = set()
        self._draining = False
        # Stateless: no session lives on a replica, so a client may alternate between replicas.
        self.streamable = StreamableHTTPSessionManager(app=server, stateless=True)
        self.posts = StreamableHTTPSessionManager(app=server, stateless=True, json_response=True)
        self.sse = SseServerTransport("/message")

    @asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """The session managers' task groups (the SDK requires them around every request)."""
        async with AsyncExitStack() as stack:
            await stack.enter_async_context(self.streamable.run())
            await stack.enter_async_context(self.posts.run())
            yield

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("path") in ("/health", "/metrics"):
            return await self.probes(scope, receive, send)  # lifespan, probes
        path, method = scope.get("path", ""), scope.get("method", "GET")
        routes = {"/mcp": ("POST", "GET", "DELETE"), "/sse": ("GET",), "/message": ("POST",)}
        if path not in routes:
            return await respond(send, 404, {"error": "not found; MCP is served at /mcp (and /sse, /message)",
                                             "status": 404}, receive=receive)
        if method not in routes[path]:
            return await respond(send, 405, {"error": f"{method} is not allowed on {path}", "status": 405},
                                 [(b"allow", ", ".join(routes[path]).encode())], receive=receive)
        if method == "GET":
            return await self._serve(path, scope, receive, send)
        with self.busy.holding():
            await self._serve(path, scope, receive, send)

    async def _serve(self, path: str, scope: dict, receive: Any, send: Any) -> None:
        who = await self._authenticate(scope, receive, send)
        if who is None:
            return
        scope = {**scope, SCOPE_KEY: who.api_key, SCOPE_TENANT: who.tenant,
                 # the SDK binds SSE sessions to this principal (a digest, never the key)
                 "user": AuthenticatedUser(AccessToken(token="-", client_id=fingerprint(who.api_key), scopes=[]))}
        if path == "/mcp":
            await self.streamable.handle_request(scope, receive, send)
        elif path == "/sse":
            await self._sse_session(scope, receive, send)
        elif b"session_id=" in scope.get("query_string", b""):
            await self.sse.handle_post_message({**scope, SCOPE_SSE: True}, receive, send)
        else:
            await self.posts.handle_request(_json_exchange(scope), receive, send)

    async def _sse_session(self, scope: dict, receive: Any, send: Any) -> None:
        if self._draining:
            return await respond(send, 503, {"error": "shutting down: open the SSE stream on another replica",
                                             "status": 503})
        with self.sse_streams.holding():
            async with self.sse.connect_sse(scope, receive, send) as (read, write):
                with trio.CancelScope() as session:
                    self._sse_sessions.add(session)
                    try:
                        await self.server.run(read, self.sse_calls.answers(write),
                                              self.server.create_initialization_options())
                    finally:
                        self._sse_sessions.discard(session)

    async def drain(self) -> None:
        """Return once the requests in progress have finished, the calls of SSE sessions are
        answered, and the SSE streams have ended. A session is ended by cancelling its server loop,
        never its stream: the stream then sends what it was handed (the last answers) and closes."""
        while self.busy.count or self.sse_calls.count:
            await self.busy.idle()
            await self.sse_calls.idle()
        self._draining = True
        for session in self._sse_sessions:
            session.cancel()
        await self.sse_streams.idle()

    async def _authenticate(self, scope: dict, receive: Any, send: Any) -> Credential | None:
        key, tenant = credential_from(scope.get("headers", []))
        challenge = [(b"www-authenticate", b'Bearer realm="cordum-mcp"')]
        if not key:
            await respond(send, 401, {"error": "missing credential: send Authorization: Bearer <API key> "
                                               "or X-API-Key", "status": 401}, challenge, receive=receive)
            return None
        if self.tenant and tenant and tenant != self.tenant:
            await respond(send, 403, {"error": f"this server serves tenant {self.tenant} only", "status": 403},
                          receive=receive)
            return None
        who = Credential(key, self.tenant or tenant, client_host(scope))
        refused = await self.keys.refusal(who)
        if refused is not None:
            status = 401 if refused.status == 401 else 403
            await respond(send, status, {"error": f"the gateway refused this credential: {refused.describe()}",
                                         "status": status}, challenge if status == 401 else [], receive=receive)
            return None
        return who


def _json_exchange(scope: dict) -> dict:
    """POST /message without a session: a plain JSON exchange, whatever Accept/Content-Type said."""
    headers = [(k, v) for k, v in scope.get("headers", []) if k.lower() not in (b"accept", b"content-type")]
    headers += [(b"accept", b"application/json, text/event-stream"), (b"content-type", b"application/json")]
    return {**scope, "headers": headers}
