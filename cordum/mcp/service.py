"""cordum-mcp: the MCP server, a tenant-scoped proxy over the gateway's REST API (spec §4).

    MCP_TRANSPORT=stdio (default)                 MCP_TRANSPORT=http
    root                                          root
    └── stdio session (one client)                ├── HTTP :8090  /mcp /sse /message /health /metrics
                                                  │     (SDK session managers around it)
                                                  └── instance registration  cordum:instance:cordum-mcp:<id>

Shutdown ("transport drain", ≤ CORDUM_SHUTDOWN_TIMEOUT): stdio stops reading stdin and lets the
calls in progress answer; HTTP stops accepting and lets requests in flight finish (open SSE streams
are cut at the grace). Over stdio the end of stdin (the client went away) shuts the process down.
Configuration: `cordum.mcp.config` (bad values exit 2 naming the variable or flag).
"""

from __future__ import annotations

import sys
from typing import Sequence

import trio

from cordum.infra.config import ConfigError, Settings, load_settings
from cordum.infra.http import HttpServer, probe_app
from cordum.infra.metrics import Metrics
from cordum.infra.redis import RedisError, RedisUnavailable, open_redis
from cordum.mcp.config import McpConfig, load_config
from cordum.mcp.http import McpHttpApp
from cordum.mcp.server import NAME, GatewayClient, InFlight, build_server
from cordum.mcp.stdio import serve_stdio
from cordum.runtime.instances import serve_registration
from cordum.runtime.lifecycle import Lifecycle
from cordum.runtime.log import get_logger
from cordum.runtime.service import run_service

STAGES = ("transport drain",)
REGISTER_RETRY = 5.0
HTTP_GRACE = 5.0  # seconds in-flight HTTP requests (and open SSE streams) get to finish
log = get_logger("mcp.service")


def make_serve(argv: Sequence[str]):
    async def serve(settings: Settings, lifecycle: Lifecycle, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        config = load_config(settings, argv)
        metrics = Metrics(settings.instance_id)
        gateway = GatewayClient(config.gateway, config.request_timeout)
        in_flight = InFlight()
        server = build_server(config, gateway, metrics, in_flight)
        log.info("mcp.config", transport=config.transport, gateway=config.gateway, tenant=config.tenant,
                 read_only=config.read_only, disabled=sorted(config.disabled))
        if config.transport == "http":
            await serve_http(settings, config, lifecycle, server, gateway, metrics, task_status=task_status)
        else:
            await serve_stdio_process(config, lifecycle, server, in_flight, task_status=task_status)

    return serve


async def serve_stdio_process(config: McpConfig, lifecycle: Lifecycle, server, in_flight: InFlight, *,
                              task_status) -> None:
    if not config.api_key:
        log.warning("mcp.no_api_key", hint="set CORDUM_API_KEY or --api-key: the gateway refuses calls without one")
    async with trio.open_nursery() as nursery:
        lines = await nursery.start(serve_stdio, server)
        if lines is not None:
            async def drain() -> None:  # stop reading; the calls in progress answer first
                lines.stop()
                await in_flight.idle()
                await lines.close()

            lifecycle.on("transport drain", drain)
        task_status.started()
    # stdin ended: nobody is left to serve
    await lifecycle.shutdown("stdin closed")


async def serve_http(settings: Settings, config: McpConfig, lifecycle: Lifecycle, server, gateway: GatewayClient,
                     metrics: Metrics, *, task_status) -> None:
    if config.api_key:
        log.info("mcp.http_ignores_api_key", hint="over HTTP every request's own credential is used")
    app = McpHttpApp(server, gateway, probe_app(NAME, metrics), tenant=config.tenant)
    http = HttpServer(app, *config.http_addr, graceful_timeout=HTTP_GRACE)
    async with app.running(), trio.open_nursery() as nursery:
        await nursery.start(http.serve)
        nursery.start_soon(register, settings)
        lifecycle.on("transport drain", http.drain)
        task_status.started()


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
