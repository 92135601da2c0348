"""The gateway's quart-trio app: auth, tenant check and rate limit on `/api/`, the error envelope, request
metrics, and the routes of every module (jobs, approvals, DLQ, workers, config/policy, status,
stream, workflows, memory/artifacts). `/health` and `/metrics` come from `make_app` and need no key, nor
does the dashboard's page (`/dashboard/`, which holds no data)."""

from __future__ import annotations

import math
import time
from typing import Any

from quart import Response, g, request, websocket
from quart_trio import QuartTrio

from cordum.gateway import (approvals, audit, config, dashboard, dlq, errors, jobs, memory, openapi, status, stream,
                            workers, workflows)
from cordum.gateway.auth import KEY_SUBPROTOCOL, Principal, key_from_headers, key_from_subprotocols
from cordum.gateway.context import MAX_BODY, SERVICE, Gateway, client_address
from cordum.gateway.errors import error_response
from cordum.gateway.oidc import TokenRefused, looks_like_jwt
from cordum.infra.http import make_app
from cordum.store.validate import tenant_name_problem

OPENAPI_PATH = "/api/v1/openapi.json"  # public: describes the API, holds nothing secret
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


async def authenticate(gw: Gateway, headers: Any, args: Any | None, address: str) -> Principal | Response:
    """The caller, or the answer refusing it: 401/403 (429 for an address that failed too often)
    in the error envelope."""
    now = time.monotonic()
    wait = gw.auth_failures.blocked_for(address, now)
    if wait > 0:
        return error_response(429, "too many failed authentications from this address; try again later",
                              code="auth_rate_limited", headers={"Retry-After": str(math.ceil(wait))})
    found = await _check_credentials(gw, headers, args)
    if isinstance(found, Response) and found.status_code == 401:
        gw.auth_failures.record(address, now)
    return found


async def _check_credentials(gw: Gateway, headers: Any, args: Any | None) -> Principal | Response:
    token = bearer_token(headers)
    if not token and args is not None and gw.oidc is not None:
        # A browser cannot set headers on a WebSocket: the dashboard offers its token the way it
        # offers an API key, as the key subprotocol.
        offered = key_from_subprotocols(headers.get("Sec-WebSocket-Protocol")) or ""
        token = offered if looks_like_jwt(offered) else ""
    if token and gw.oidc is not None and looks_like_jwt(token):
        try:
            principal = await gw.oidc.principal(token)
        except TokenRefused as exc:
            return error_response(401, str(exc), code="unauthenticated",
                                  headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})
        return _tenant_checked(principal, headers, args)
    if args is not None and args.get("api_key") and not gw.options.dev:
        # A key in the URL ends up in proxies' and browsers' logs.
        return error_response(401, "an API key in the URL (?api_key=) is refused outside dev mode: send it in "
                              f"X-API-Key or, from a browser, as the WebSocket subprotocols {KEY_SUBPROTOCOL} "
                              "and the key's base64url", code="unauthenticated")
    key = key_from_headers(headers, args) or token
    if not key:
        return error_response(401, "missing API key (X-API-Key)", code="unauthenticated")
    principal = gw.options.keys.authenticate(key)
    if principal is None:
        return error_response(401, "invalid API key", code="unauthenticated")
    return _tenant_checked(principal, headers, args)


def bearer_token(headers: Any) -> str:
    auth = (headers.get("Authorization") or "").strip()
    return auth[7:].strip() if auth[:7].lower() == "bearer " else ""


def _tenant_checked(principal: Principal, headers: Any, args: Any | None) -> Principal | Response:
    """`principal`, unless the request asks for another tenant (403) or a malformed one (400)."""
    requested = (headers.get("X-Tenant-ID") or "").strip()
    if not requested and args is not None:
        requested = (args.get("tenant_id") or args.get("tenant") or "").strip()
    problem = tenant_name_problem(requested) if requested else None
    if problem:
        return error_response(400, problem, code="invalid_tenant")
    if requested and requested != principal.tenant:
        return error_response(403, "tenant access denied", code="tenant_access_denied")
    return principal


async def rate_limit(gw: Gateway, who: Principal, headers: Any, args: Any | None) -> Response | None:
    """After authentication: 429 (Retry-After, error envelope) when the tenant or key is over its limit."""
    if gw.ratelimiter is None:
        return None
    verdict = await gw.ratelimiter.check(who.tenant, key_from_headers(headers, args) or "")
    if verdict.allowed:
        return None
    return error_response(429, "rate limited", code="rate_limited",
                          headers={"Retry-After": str(verdict.retry_after)})


async def admit(gw: Gateway, headers: Any, args: Any | None, address: str) -> tuple[Principal | None, Response | None]:
    """Authentication, then the rate limit: (the caller if known, the answer refusing the
    request or None). A rate-limited caller is known: its refusal is audited as its request."""
    found = await authenticate(gw, headers, args, address)
    if isinstance(found, Response):
        return None, found
    return found, await rate_limit(gw, found, headers, args)


def count_request(gw: Gateway, method: str, rule: str, status: int, started: float | None) -> None:
    """The request metrics of an answered HTTP request (`rule`: the route, or "unmatched")."""
    method = method if method in HTTP_METHODS else "other"  # any word is a method to a client
    gw.http_requests.labels(method=method, route=rule, status=str(status)).inc()
    if started is not None:
        gw.http_duration.labels(method=method, route=rule).observe(time.perf_counter() - started)


def _admitted(admitted: tuple[Principal | None, Response | None]) -> Response | None:
    """A before-request hook's answer (the refusal, or None), the caller in `g.principal`."""
    who, refusal = admitted
    if who is not None:
        g.principal = who
    return refusal


def create_app(gw: Gateway) -> QuartTrio:
    async def health() -> dict[str, Any]:
        return await status.health(gw)

    app = make_app(SERVICE, gw.metrics, health)
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY
    errors.install(app)

    @app.before_request
    async def _start_clock() -> None:
        g.started = time.perf_counter()

    @app.before_request
    async def _auth() -> Response | None:
        if not request.path.startswith("/api/") or request.path == OPENAPI_PATH:
            return None
        address = client_address(request.remote_addr or "", request.headers.get("X-Forwarded-For"),
                                 gw.options.trusted_proxies)
        return _admitted(await admit(gw, request.headers, None, address))

    @app.before_websocket
    async def _ws_auth() -> Response | None:
        address = client_address(websocket.remote_addr or "", websocket.headers.get("X-Forwarded-For"),
                                 gw.options.trusted_proxies)
        return _admitted(await admit(gw, websocket.headers, websocket.args, address))

    @app.after_request
    async def _count(response: Response) -> Response:
        rule = request.url_rule.rule if request.url_rule is not None else ""
        count_request(gw, request.method, rule or "unmatched", response.status_code, g.get("started"))
        audit.record_request(gw, g.get("principal"), request.method, rule, request.path, request.view_args,
                             response.status_code)
        return response

    for module in (jobs, approvals, dlq, workers, config, status, stream, workflows, memory, audit):
        module.register(app, gw)
    dashboard.register(app)
    spec = openapi.document()

    @app.get(OPENAPI_PATH)
    async def openapi_document() -> Any:
        return spec

    return app
