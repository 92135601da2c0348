"""cordum-mcp: the MCP server, a tenant-scoped proxy over the gateway's REST API (spec §4).

    MCP_TRANSPORT=stdio (default)                 MCP_TRANSPORT=http
    root                                          root
    └── stdio session (one client)                ├── HTTP :8090  /mcp /sse /message /health /metrics
                                                  │     (SDK session managers around it)
                                                  └── instance registration  cordum:instance:cordum-mcp:<id>

Shutdown ("transport drain", ≤ CORDUM_SHUTDOWN_TIMEOUT): stdio stops reading stdin and closes the
session once every call in progress has its answer written; HTTP stops accepting, lets the requests
in flight finish (for up to the shutdown budget less the closes' reserve) and then cuts the open
SSE streams. Over stdio the end of stdin (the client went away) shuts the process down.
Configuration: `cordum.mcp.config` (bad values exit 2 naming the variable or flag).
"""

from __future__ import annotations

import sys
from typing import Sequence

import trio

from cordum.infra.lazy import skip_optional

# The SDK's transports import sse_starlette, which patches uvicorn's exit handler if uvicorn is
# installed (2 MB of imports); this process serves on hypercorn and never starts uvicorn.
skip_optional("uvicorn")

from cordum.infra.config import ConfigError, Settings, load_settings
from cordum.infra.http import HttpServer, probe_app
from cordum.infra.metrics import Metrics
from cordum.infra.redis import RedisError, RedisUnavailable, open_redis
from cordum.mcp.config import McpConfig, load_config
from cordum.mcp.http import McpHttpApp, sse_session_request
from cordum.mcp.server import NAME, GatewayClient, InFlight, build_server
from cordum.mcp.stdio import serve_stdio
from cordum.runtime.instances import serve_registration
from cordum.runtime.lifecycle import CLOSE_RESERVE, Lifecycle
from cordum.runtime.log import get_logger
from cordum.runtime.service import run_service

STAGES = ("transport drain",)
REGISTER_RETRY = 5.0
DRAIN_MARGIN = 1.0  # seconds between the end of HTTP's grace and the stages' deadline
log = get_logger("mcp.service")


def make_serve(argv: Sequence[str]):
    async def serve(settings: Settings, lifecycle: Lifecycle, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        config = load_config(settings, argv)
        metrics = Metrics(settings.instance_id)
        gateway = GatewayClient(config.gateway, config.request_timeout)
        log.info("mcp.config", transport=config.transport, gateway=config.gateway, tenant=config.tenant,
                 read_only=config.read_only, disabled=sorted(config.disabled))
        if config.transport == "http":
            sse_calls = InFlight(only=sse_session_request)
            server = build_server(config, gateway, metrics, sse_calls)
            app = McpHttpApp(server, gateway, probe_app(NAME, metrics), tenant=config.tenant, sse_calls=sse_calls)
            await serve_http(settings, config, lifecycle, app, task_status=task_status)
        else:
            in_flight = InFlight()
            server = build_server(config, gateway, metrics, in_flight)
            await serve_stdio_process(config, lifecycle, server, in_flight, task_status=task_status)

    return serve


async def serve_stdio_process(config: McpConfig, lifecycle: Lifecycle, server, in_flight: InFlight, *,
                              task_status) -> None:
    if not config.api_key:
        log.warning("mcp.no_api_key", hint="set CORDUM_API_KEY or --api-key: the gateway refuses calls without one")
    async with trio.open_nursery() as nursery:
        lines = await nursery.start(serve_stdio, server, in_flight)
        if lines is not None:
            async def drain() -> None:  # stop reading; the calls in progress answer (written) first
                lines.stop()
                await in_flight.idle()
                await lines.close()

            lifecycle.on("transport drain", drain)
        task_status.started()
    # stdin ended: nobody is left to serve
    await lifecycle.shutdown("stdin closed")


async def serve_http(settings: Settings, config: McpConfig, lifecycle: Lifecycle, app: McpHttpApp, *,
                     task_status) -> None:
    if config.api_key:
        log.info("mcp.http_ignores_api_key", hint="over HTTP every request's own credential is used")
    http = HttpServer(app, *config.http_addr, graceful_timeout=http_grace(settings.shutdown_timeout))
    serving = trio.CancelScope()

    async def serve_until_drained(*, task_status) -> None:
        with serving:
            await http.serve(task_status=task_status)

    async def drain() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(http.drain)  # stop accepting; hypercorn cuts what is left at its grace
            await app.drain()  # the calls in flight have answered, the SSE streams ended
            serving.cancel()  # idle connections need not hold the shutdown up

    async with app.running(), trio.open_nursery() as nursery:
        await nursery.start(serve_until_drained)
        nursery.start_soon(register, settings)
        lifecycle.on("transport drain", drain)
        task_status.started()


def http_grace(shutdown_timeout: float) -> float:
    """How long HTTP requests in flight get to finish once a shutdown begins: what the shutdown
    budget (CORDUM_SHUTDOWN_TIMEOUT) leaves after the closes, so a slow tool call is not cut
    before it must be."""
    return max(shutdown_timeout - CLOSE_RESERVE - DRAIN_MARGIN, shutdown_timeout / 4)


async def register(settings: Settings) -> None:
    """List this replica in /api/v1/status. Best effort: MCP needs no Redis to serve, so a Redis
    that is down delays the listing, never the service."""
    while True:
        try:
            async with open_redis(settings) as redis:
                await serve_registration(redis, NAME, settings.instance_id)
        except (RedisError, *RedisUnavailable) as exc:
            log.warning("mcp.registration_unavailable", error=repr(exc), retry_in=REGISTER_RETRY)
        await trio.sleep(REGISTER_RETRY)


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:  # validated before the runtime starts, so a bad flag or variable exits 2 at once
        load_config(load_settings(), argv)
    except ConfigError as exc:
        print(f"{NAME}: configuration error: {exc}", file=sys.stderr)
        sys.exit(2)
    run_service(NAME, STAGES, make_serve(argv))


if __name__ == "__main__":
    main()
