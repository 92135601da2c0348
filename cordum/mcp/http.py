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
or one the gateway refuses, is a 401 before the SDK sees the request. A key the gateway accepted is
remembered (by digest) for KEY_TTL so a session costs one check, not one per message. An SSE
session belongs to the key that opened it (the SDK compares `scope["user"]`).
"""

from __future__ import annotations

import json
import time
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any, AsyncIterator, Awaitable, Callable

from mcp.server.auth.middleware.bearer_auth import AuthenticatedUser
from mcp.server.auth.provider import AccessToken
from mcp.server.lowlevel import Server
from mcp.server.sse import SseServerTransport
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager

from cordum.cli.http import GatewayError
from cordum.mcp.catalog import Call
from cordum.mcp.server import SCOPE_KEY, SCOPE_TENANT, Credential, GatewayClient, fingerprint
from cordum.runtime.log import get_logger

log = get_logger("mcp.http")

ASGIApp = Callable[[dict, Callable[..., Awaitable[Any]], Callable[..., Awaitable[Any]]], Awaitable[None]]
KEY_TTL = 30.0  # seconds a key the gateway accepted is trusted without asking again
KEY_CACHE_SIZE = 1024
# A cheap read every role may make: answers 401 for an unknown key, 403 for another tenant.
KEY_CHECK = Call("GET", "/api/v1/approvals", query={"limit": 1})


def credential_from(headers: list[tuple[bytes, bytes]]) -> tuple[str, str]:
    """(key, X-Tenant-ID) of a request: `Authorization: Bearer <key>`, else `X-API-Key`."""
    found: dict[str, str] = {}
    for name, value in headers:
        found.setdefault(name.decode("latin-1").lower(), value.decode("latin-1").strip())
    auth = found.get("authorization", "")
    key = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
    return key or found.get("x-api-key", ""), found.get("x-tenant-id", "")


async def respond(send: Any, status: int, body: dict[str, Any], headers: list[tuple[bytes, bytes]] = ()) -> None:
    payload = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": payload})


class KeyCheck:
    """Asks the gateway whether a key is valid; remembers accepted keys for KEY_TTL."""

    def __init__(self, gateway: GatewayClient) -> None:
        self.gateway = gateway
        self._accepted: dict[tuple[str, str], float] = {}

    async def refusal(self, who: Credential) -> GatewayError | None:
        """The gateway's 401/403 for this credential, or None (also when the gateway cannot be
        asked: then the calls themselves report it)."""
        entry = (fingerprint(who.api_key), who.tenant)
        now = time.monotonic()
        if self._accepted.get(entry, 0.0) > now:
            return None
        try:
            await self.gateway.run(KEY_CHECK, who)
        except GatewayError as exc:
            return exc if exc.status in (401, 403) else None
        if len(self._accepted) >= KEY_CACHE_SIZE:
            self._accepted = {k: t for k, t in self._accepted.items() if t > now}
            if len(self._accepted) >= KEY_CACHE_SIZE:
                self._accepted.clear()
        self._accepted[entry] = now + KEY_TTL
        return None


class McpHttpApp:
    def __init__(self, server: Server, gateway: GatewayClient, probes: ASGIApp, *, tenant: str = "") -> None:
        self.server = server
        self.probes = probes
        self.tenant = tenant
        self.keys = KeyCheck(gateway)
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
                                             "status": 404})
        if method not in routes[path]:
            return await respond(send, 405, {"error": f"{method} is not allowed on {path}", "status": 405},
                                 [(b"allow", ", ".join(routes[path]).encode())])
        who = await self._authenticate(scope, send)
        if who is None:
            return
        scope = {**scope, SCOPE_KEY: who.api_key, SCOPE_TENANT: who.tenant,
                 # the SDK binds SSE sessions to this principal (a digest, never the key)
                 "user": AuthenticatedUser(AccessToken(token="-", client_id=fingerprint(who.api_key), scopes=[]))}
        if path == "/mcp":
            await self.streamable.handle_request(scope, receive, send)
        elif path == "/sse":
            async with self.sse.connect_sse(scope, receive, send) as (read, write):
                await self.server.run(read, write, self.server.create_initialization_options())
        elif b"session_id=" in scope.get("query_string", b""):
            await self.sse.handle_post_message(scope, receive, send)
        else:
            await self.posts.handle_request(_json_exchange(scope), receive, send)

    async def _authenticate(self, scope: dict, send: Any) -> Credential | None:
        key, tenant = credential_from(scope.get("headers", []))
        challenge = [(b"www-authenticate", b'Bearer realm="cordum-mcp"')]
        if not key:
            await respond(send, 401, {"error": "missing credential: send Authorization: Bearer <API key> "
                                               "or X-API-Key", "status": 401}, challenge)
            return None
        if self.tenant and tenant and tenant != self.tenant:
            await respond(send, 403, {"error": f"this server serves tenant {self.tenant} only", "status": 403})
            return None
        who = Credential(key, self.tenant or tenant)
        refused = await self.keys.refusal(who)
        if refused is not None:
            status = 401 if refused.status == 401 else 403
            await respond(send, status, {"error": f"the gateway refused this credential: {refused.describe()}",
                                         "status": status}, challenge if status == 401 else [])
            return None
        return who


def _json_exchange(scope: dict) -> dict:
    """POST /message without a session: a plain JSON exchange, whatever Accept/Content-Type said."""
    headers = [(k, v) for k, v in scope.get("headers", []) if k.lower() not in (b"accept", b"content-type")]
    headers += [(b"accept", b"application/json, text/event-stream"), (b"content-type", b"application/json")]
    return {**scope, "headers": headers}
