"""`POST /api/v1/jobs` served straight from ASGI, in front of the Quart app.

Submitting is what agents do most, and Quart's request machinery (request and app contexts, a
routing match, two tasks and several events per request, werkzeug headers, before/after hooks,
a response object) cost about as much CPU as the submit itself. This path runs the very same
steps the app runs for the route, through the functions the app's hooks use: admission
(`app.admit`: authentication, tenant header, rate limit), the operator role, the body as a JSON
object, `jobs.submit_job`, the error envelope (`errors.answer_for`), the request metrics and the
audit record. What it does not take on goes to the app untouched: a body without a
Content-Length (chunked) or over the limit. A refusal or an error is the app's own answer (the
same `Response`), sent from here.
"""

from __future__ import annotations

import time
from typing import Any, Awaitable, Callable

import trio
from werkzeug.exceptions import RequestTimeout

from cordum.gateway import audit
from cordum.gateway.app import admit, count_request
from cordum.gateway.context import MAX_BODY, Gateway, body_object, check_role, client_address
from cordum.gateway.errors import answer_for
from cordum.gateway.jobs import submit_job

SUBMIT = "/api/v1/jobs"  # the path, and the route's rule in metrics and the audit trail

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
Asgi = Callable[[Scope, Receive, Send], Awaitable[None]]


class RequestHeaders:
    """A request's headers as the admission helpers read them: `get(name)`, any case, the first
    value of a repeated header (as werkzeug's `Headers.get`)."""

    __slots__ = ("_values",)

    def __init__(self, raw: list[tuple[bytes, bytes]]) -> None:
        values: dict[str, str] = {}
        for name, value in raw:  # latin-1, as Quart reads them
            values.setdefault(name.decode("latin1").lower(), value.decode("latin1"))
        self._values = values

    def get(self, name: str, default: str | None = None) -> str | None:
        return self._values.get(name.lower(), default)


def with_submit_fast_path(app: Any, gw: Gateway) -> Asgi:
    """The ASGI app to serve: `app` (the gateway's Quart app) with submits served here."""

    async def serve(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != SUBMIT or scope.get("root_path"):
            await app(scope, receive, send)
            return
        headers = RequestHeaders(scope["headers"])
        try:
            length = int(headers.get("content-length") or "")
        except ValueError:  # none (a chunked body), or not a number
            length = -1
        if not 0 <= length <= MAX_BODY:
            await app(scope, receive, send)
            return
        outcome, chunks, more = await read_body(receive, app.config["BODY_TIMEOUT"])
        if outcome == "gone":
            return  # gone before it finished sending: nobody to answer, nothing done
        if outcome == "over":  # more than it announced: the app answers it (413)
            await app(scope, _replay(chunks, more, receive), send)
            return
        await _submit(app, gw, scope, headers, b"".join(chunks) if outcome == "whole" else None, send)

    return serve


async def read_body(receive: Receive, timeout: float) -> tuple[str, list[bytes], bool]:
    """A request's body, read for at most `timeout` s (Quart's BODY_TIMEOUT: later it is a 408,
    as there): ("whole" | "over" (past MAX_BODY) | "gone" (the client left) | "late", the chunks
    read, whether more was to come)."""
    chunks: list[bytes] = []
    size = 0
    with trio.move_on_after(timeout):
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return "gone", chunks, False
            chunk = message.get("body", b"")
            chunks.append(chunk)
            size += len(chunk)
            more = bool(message.get("more_body", False))
            if size > MAX_BODY:
                return "over", chunks, more
            if not more:
                return "whole", chunks, False
    return "late", chunks, True


async def _submit(app: Any, gw: Gateway, scope: Scope, headers: RequestHeaders, body: bytes | None,
                  send: Send) -> None:
    """Answer a submit; `body` None: it did not arrive in time (admitted, it is a 408)."""
    started = time.perf_counter()
    client = scope.get("client") or ("", 0)
    address = client_address(client[0] or "", headers.get("X-Forwarded-For"), gw.options.trusted_proxies)
    who = None
    try:
        who, refusal = await admit(gw, headers, None, address)
        if refusal is not None:
            answer = refusal
        else:
            assert who is not None
            check_role(who, "operator")
            if body is None:
                raise RequestTimeout()
            payload, status, extra = await submit_job(gw, body_object(body), who)
            answer = app.json.response(payload)  # what Quart makes of the route's (body, status, headers)
            answer.status_code = status
            answer.headers.update(extra)
    except Exception as exc:
        answer = answer_for(exc, "POST", SUBMIT)
    data = await answer.get_data()
    count_request(gw, "POST", SUBMIT, answer.status_code, started)
    audit.record_request(gw, who, "POST", SUBMIT, SUBMIT, {}, answer.status_code)
    await send({"type": "http.response.start", "status": answer.status_code,
                "headers": [(name.lower().encode(), value.encode()) for name, value in answer.headers.items()]})
    await send({"type": "http.response.body", "body": data, "more_body": False})


def _replay(chunks: list[bytes], more: bool, receive: Receive) -> Receive:
    """`receive` for the app: what was read already, as one message, then the rest."""
    sent = False

    async def replay() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": b"".join(chunks), "more_body": more}

    return replay
