"""HTTP: quart-trio apps on hypercorn's Trio worker, stoppable as a shutdown stage.

Every service's app gets `/health` and `/metrics`. `HttpServer.drain()` stops accepting, lets
in-flight requests finish (bounded by `graceful_timeout`, kept small: hypercorn holds
`Connection: close` sockets until it expires, DESIGN.md §4.5) and returns when the server is gone.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve
from quart import Response
from quart_trio import QuartTrio

from cordum.infra.metrics import CONTENT_TYPE, Metrics
from cordum.runtime.log import get_logger

log = get_logger("http")

HealthCheck = Callable[[], Awaitable[dict[str, Any]]]


def make_app(service: str, metrics: Metrics, health: HealthCheck | None = None) -> QuartTrio:
    app = QuartTrio(service)
    app.config["MAX_CONTENT_LENGTH"] = 1 << 20

    @app.get("/health")
    async def _health() -> tuple[dict[str, Any], int]:
        body: dict[str, Any] = {"status": "ok", "service": service, "instance": metrics.instance_id}
        if health is not None:
            try:
                body.update(await health())
            except Exception as exc:
                body.update(status="degraded", error=str(exc))
        return body, 200 if body["status"] == "ok" else 503

    @app.get("/metrics")
    async def _metrics() -> Response:
        return Response(metrics.exposition(), content_type=CONTENT_TYPE)

    return app


class HttpServer:
    def __init__(self, app: Any, host: str, port: int, *, graceful_timeout: float = 5.0) -> None:
        self.app = app
        self.config = HypercornConfig()
        self.config.bind = [f"{host}:{port}"]
        self.config.graceful_timeout = graceful_timeout
        self.config.accesslog = None
        self.config.errorlog = None
        self._stop = trio.Event()
        self._stopped = trio.Event()
        self.port: int | None = None

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
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
