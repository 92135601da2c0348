"""One JSON error envelope for every error the gateway returns:
`{"error": "<message>", "status": <code>[, "code": "<machine code>"][, extra fields]}`.

Handlers raise `ApiError`; routing errors (404/405), oversized bodies (413) and crashes (500) are
turned into the same envelope by the handlers `install` registers.
"""

from __future__ import annotations

import json
from typing import Any, Mapping

from quart import Quart, Response, has_request_context, request, websocket
from werkzeug.exceptions import HTTPException

from cordum.infra.redis import RedisError, RedisUnavailable
from cordum.runtime.log import get_logger

log = get_logger("gateway.errors")

_MESSAGES = {
    404: "not found",
    405: "method not allowed",
    413: "request body too large (limit 1 MiB)",
}


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        extra: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.extra = dict(extra or {})
        self.headers = dict(headers or {})


def envelope(status: int, message: str, *, code: str | None = None, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"error": message, "status": status}
    if code:
        body["code"] = code
    if extra:
        body.update(extra)
    return body


def error_response(status: int, message: str, *, code: str | None = None,
                   extra: Mapping[str, Any] | None = None, headers: Mapping[str, str] | None = None) -> Response:
    response = Response(json.dumps(envelope(status, message, code=code, extra=extra)), status=status,
                        content_type="application/json")
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


def bad_request(message: str, code: str | None = None) -> ApiError:
    return ApiError(400, message, code=code)


def not_found(what: str = "not found") -> ApiError:
    return ApiError(404, what)


def answer_for(exc: Exception, method: str, path: str) -> Response:
    """The answer to an exception a request's handling raised, in the error envelope: an
    ApiError as it says, an HTTP error by its status, the store unreachable 503, anything else
    500 (logged, with `method` and `path`)."""
    if isinstance(exc, ApiError):
        return error_response(exc.status, exc.message, code=exc.code, extra=exc.extra, headers=exc.headers)
    if isinstance(exc, HTTPException):
        status = exc.code or 500
        message = _MESSAGES.get(status) or (exc.name or "error").lower()
        headers = {}
        if status == 405 and getattr(exc, "valid_methods", None):
            headers["Allow"] = ", ".join(exc.valid_methods)  # type: ignore[attr-defined]
        return error_response(status, message, headers=headers)
    if isinstance(exc, (RedisError, *RedisUnavailable)):
        log.error("http.store_unavailable", method=method, path=path, error=repr(exc))
        return error_response(503, "store unavailable, try again", code="store_unavailable")
    log.error("http.handler_failed", method=method, path=path, error=repr(exc))
    return error_response(500, "internal error")


def install(app: Quart) -> None:
    async def _answer(exc: Exception) -> Response:
        return answer_for(exc, **_where())

    # Quart picks the handler of the most specific type: each of these answers the same way.
    for kind in (ApiError, HTTPException, RedisError, *RedisUnavailable, Exception):
        app.register_error_handler(kind, _answer)


def _where() -> dict[str, str]:
    """The failing request's method and path, for an HTTP request or a WebSocket alike."""
    if has_request_context():
        return {"method": request.method, "path": request.path}
    return {"method": "WEBSOCKET", "path": websocket.path}
