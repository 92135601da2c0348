"""HTTP on hypercorn's Trio worker, stoppable as a shutdown stage.

Every service serves `/health` and `/metrics`: `probe_app` is a bare ASGI app for the services
that serve nothing else (it spares them quart and its dependencies, about 8 MB of memory per
replica); `make_app` is a quart-trio app for the API gateway, with the same two routes. `HttpServer.drain()` stops accepting, lets
in-flight requests finish (bounded by `graceful_timeout`, kept small: hypercorn holds
`Connection: close` sockets until it expires, DESIGN.md §4.5) and returns when the server is gone.
"""

from __future__ import annotations

import json
import socket
from typing import Any, Awaitable, Callable

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve

from cordum.infra import keepalive
from cordum.infra.metrics import CONTENT_TYPE, Metrics
from cordum.runtime.log import get_logger

log = get_logger("http")

HealthCheck = Callable[[], Awaitable[dict[str, Any]]]


async def health_body(service: str, metrics: Metrics, health: HealthCheck | None) -> tuple[dict[str, Any], int]:
    body: dict[str, Any] = {"status": "ok", "service": service, "instance": metrics.instance_id}
    if health is not None:
        try:
            body.update(await health())
        except Exception as exc:  # the text may name hosts or credentials: logged, never served
            log.warning("health.check_failed", service=service, error=repr(exc))
            body.update(status="degraded", error="health check failed (see the service's log)")
    # "healthy" is the gateway's word (Cordum's /health shape); the other services say "ok"
    return body, 200 if body["status"] in ("ok", "healthy") else 503


async def answer_lifespan(receive: Any, send: Any) -> None:
    """The ASGI lifespan of an app with nothing to start or stop: startup and shutdown acknowledged."""
    while True:
        message = await receive()
        if message["type"] in ("lifespan.startup", "lifespan.shutdown"):
            await send({"type": message["type"] + ".complete"})
        if message["type"] == "lifespan.shutdown":
            return


def probe_app(service: str, metrics: Metrics, health: HealthCheck | None = None) -> Callable[..., Awaitable[None]]:
    """An ASGI app with `/health` and `/metrics` only."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await answer_lifespan(receive, send)
        if scope["type"] != "http":
            return
        path, method = scope.get("path", ""), scope.get("method", "GET")
        if method not in ("GET", "HEAD"):
            status, content, data = 405, "application/json", json.dumps({"error": "method not allowed", "status": 405})
        elif path == "/health":
            body, status = await health_body(service, metrics, health)
            content, data = "application/json", json.dumps(body)
        elif path == "/metrics":
            status, content, data = 200, CONTENT_TYPE, metrics.exposition().decode()
        else:
            status, content, data = 404, "application/json", json.dumps({"error": "not found", "status": 404})
        payload = data.encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", content.encode()), (b"content-length", str(len(payload)).encode())]})
        await send({"type": "http.response.body", "body": payload if method != "HEAD" else b""})

    return app


def make_app(service: str, metrics: Metrics, health: HealthCheck | None = None) -> Any:
    """A quart-trio app (imported here, so services without one never load quart)."""
    from quart import Response
    from quart_trio import QuartTrio

    app = QuartTrio(service, static_folder=None)  # no /static/<path> route: nothing is served from disk
    app.config["MAX_CONTENT_LENGTH"] = 1 << 20

    @app.get("/health")
    async def _health() -> tuple[dict[str, Any], int]:
        return await health_body(service, metrics, health)

    @app.get("/metrics")
    async def _metrics() -> Response:
        return Response(metrics.exposition(), content_type=CONTENT_TYPE)

    @app.after_request
    async def _read_request_to_its_end(response: Response) -> Response:
        return await finish_reading_body(response)

    return app


async def finish_reading_body(response: Any) -> Any:
    """Read what is left of the request's body before the response goes out. hypercorn (0.18)
    reuses a keep-alive connection only if the request was read to its end by the time the
    response is complete: an answer given before the body arrived (a 401, 404 or 405 decided from
    the headers) left the connection stuck, and the client's next request on it went unanswered
    (seen: schemathesis waiting 120 s). A body too large to read closes the connection instead."""
    from quart import request

    if request.content_length or "transfer-encoding" in request.headers:
        try:
            await request.get_data(cache=True)
        except Exception:  # over MAX_CONTENT_LENGTH, or the client stopped sending it
            response.headers["Connection"] = "close"
    return response


# A peer that vanished without closing (a crashed client, a dropped NAT entry) is noticed by the
# kernel after KEEPALIVE_IDLE_S of silence and KEEPALIVE_COUNT unanswered probes: its connection
# (a WebSocket stream in particular, which the server only ever writes to) then ends.
KEEPALIVE_IDLE_S, KEEPALIVE_INTERVAL_S, KEEPALIVE_COUNT = 30, 10, 3


def set_keepalive(sock: socket.socket) -> None:
    """TCP keepalive on a listening socket: the connections it accepts inherit it (Linux)."""
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (("TCP_KEEPIDLE", KEEPALIVE_IDLE_S), ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL_S),
                        ("TCP_KEEPCNT", KEEPALIVE_COUNT)):
        if hasattr(socket, name):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)


class _Config(HypercornConfig):
    def create_sockets(self) -> Any:
        sockets = super().create_sockets()
        for sock in [*sockets.secure_sockets, *sockets.insecure_sockets]:
            set_keepalive(sock)
        return sockets


class HttpServer:
    def __init__(self, app: Any, host: str, port: int, *, graceful_timeout: float = 5.0,
                 websocket_max_message: int = 64 * 1024, websocket_ping_interval: float | None = None) -> None:
        self.app = app
        self.config = _Config()
        self.config.bind = [f"{host}:{port}"]
        self.config.graceful_timeout = graceful_timeout
        # hypercorn's default (16 MiB, ten queued per connection) lets one client park 160 MiB.
        self.config.websocket_max_message_size = websocket_max_message
        self.config.websocket_ping_interval = websocket_ping_interval
        self.config.accesslog = None
        self.config.errorlog = None
        self._stop = trio.Event()
        self._stopped = trio.Event()
        self.port: int | None = None

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        keepalive.install()

        async def started_hook(*, task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
            await hypercorn_serve(self.app, self.config, shutdown_trigger=self._stop.wait, task_status=task_status)

        try:
            async with trio.open_nursery() as nursery:
                binds = await nursery.start(started_hook)
                self.port = int(binds[0].rsplit(":", 1)[1])
                log.info("http.listening", binds=binds)
                task_status.started(self.port)
        finally:
            self._stopped.set()

    async def drain(self) -> None:
        """Stop accepting; return when in-flight requests are done (or the grace ran out)."""
        self._stop.set()
        await self._stopped.wait()
