"""cordum-api-gateway: Cordum's REST API in front of the job path.

Nursery tree (`serve`):

    open_redis ─ open_bus ─ safety-kernel gRPC client (SAFETY_KERNEL_ADDR)
      ├─ bus taps (one cancel scope)
      │    ├─ DLQ writer      sys.job.dlq, queue group cordum-gateway
      │    └─ stream taps     sys.job.> and sys.heartbeat, broadcast → WebSocket clients
      ├─ instance registry    cordum:instance:cordum-api-gateway:<id> (TTL 15 s, renewed 5 s)
      ├─ keys reload          CORDUM_API_KEYS_PATH, checked every CORDUM_API_KEYS_RELOAD_INTERVAL
      ├─ DLQ cleanup leader   cordum:dlq:cleanup, every DLQ_CLEANUP_INTERVAL (1h)
      ├─ gauges               DLQ size, DLQ consumer backlog, safety breaker (every 15 s)
      └─ HTTP                 GATEWAY_HTTP_ADDR (:8081): /health, /metrics, /api/v1/..., /api/v1/stream

Shutdown stages (the guide's order): "bus taps" (stop the taps, end WebSocket streams) →
"http drain" (in-flight requests finish) → "grpc drain" (no gRPC API yet: nothing to do) →
"close stores" (flush the bus; Redis and NATS close as the tree unwinds).

Environment (beyond the common settings): CORDUM_API_KEY, TENANT_ID, CORDUM_API_KEYS_PATH,
CORDUM_ENV, GATEWAY_HTTP_ADDR, SAFETY_KERNEL_ADDR, POLICY_CHECK_FAIL_MODE (closed|open),
GATEWAY_POLICY_CHECK_TIMEOUT (5s), DLQ_CLEANUP_INTERVAL (1h), CORDUM_API_KEYS_RELOAD_INTERVAL (5s),
CORDUM_WS_CLIENT_BUFFER_SIZE (256), CORDUM_WS_MAX_CONNECTIONS_PER_TENANT (100, per replica),
GATEWAY_WS_PING_INTERVAL (30s), GATEWAY_WS_AUTH_RECHECK_INTERVAL (120s),
API_RATE_LIMIT_RPS (30), API_RATE_LIMIT_BURST (50), API_RATE_LIMIT_REDIS_TIMEOUT (200ms),
REDIS_RATE_LIMIT (true; false|0|no = per-replica in-memory limiting) — see `ratelimit`.
"""

from __future__ import annotations

import functools
import secrets

import trio

from cordum.gateway.app import create_app
from cordum.gateway.fastpath import with_submit_fast_path
from cordum.gateway.auth import KeyRing
from cordum.gateway.context import SERVICE, Gateway, GatewayOptions
from cordum.gateway.dlq import cleanup_election, serve_dlq_writer
from cordum.gateway.ratelimit import RateLimitConfig, RateLimiter
from cordum.gateway.stream import WS_MAX_CLIENT_MESSAGE, StreamHub
from cordum.infra.bus import open_bus
from cordum.infra.config import Settings
from cordum.infra.http import HttpServer
from cordum.infra.metrics import Metrics
from cordum.infra.redis import Redis, open_redis
from cordum.protocol import subjects
from cordum.runtime.audit import AuditLog
from cordum.runtime.consumer import ConsumerMetrics, serve_packets
from cordum.runtime.gauges import ConsumerBacklog, DlqSize, refresh_forever, watch_breaker, watch_redis_pool
from cordum.runtime.instances import serve_registration
from cordum.runtime.leader import LeaderMetrics
from cordum.runtime.lease import Leases
from cordum.runtime.lifecycle import Lifecycle
from cordum.runtime.log import get_logger
from cordum.runtime.service import run_service
from cordum.safety import client as safety_client
from cordum.store import keys
from cordum.store.audit import AuditChain

STAGES = ("bus taps", "http drain", "grpc drain", "close stores")

log = get_logger("gateway")


async def serve(settings: Settings, lifecycle: Lifecycle, *,
                task_status: trio.TaskStatus[Gateway] = trio.TASK_STATUS_IGNORED) -> None:
    """Run one gateway replica; reports the `Gateway` (with its bound HTTP port) when ready."""
    options = GatewayOptions.from_settings(settings)  # ConfigError before anything is opened
    rate_limit = RateLimitConfig.from_settings(settings)
    metrics = Metrics(settings.instance_id)
    async with (
        open_redis(settings) as redis,
        open_bus(settings, name=SERVICE) as bus,
        safety_client.open_safety_client(options.safety_addrs, breaker := safety_client.CircuitBreaker(redis),
                                         timeout=options.policy_timeout, tls=options.safety_tls) as safety,
    ):
        watch_redis_pool(metrics, redis)
        options.keys.set_fingerprint_secret(await fingerprint_secret(redis, settings))
        gw = Gateway(settings=settings, options=options, redis=redis, bus=bus, metrics=metrics,
                     safety=safety, leases=Leases(redis, settings.instance_id))
        gw.hub = StreamHub(gw, buffer=options.ws_client_buffer)
        gw.ratelimiter = RateLimiter(rate_limit, redis, metrics)
        gw.audit = AuditLog(AuditChain(redis, hmac_key=options.audit_hmac_key), bus, transport=settings.audit_transport,
                            sender=settings.instance_id, buffer_size=options.audit_buffer_size)
        gw.audit.instrument(metrics)
        http = HttpServer(with_submit_fast_path(create_app(gw), gw), *options.http_addr, graceful_timeout=2.0,
                          websocket_max_message=WS_MAX_CLIENT_MESSAGE, websocket_ping_interval=options.ws_ping_interval)
        counters = ConsumerMetrics(metrics)
        consumed = [(subjects.DLQ, subjects.QUEUE_GATEWAY)]
        if settings.audit_transport == "nats":
            consumed.append((subjects.AUDIT_EXPORT, subjects.QUEUE_AUDIT_EXPORTERS))
        gauges = [DlqSize(metrics, redis).refresh, ConsumerBacklog(metrics, bus, consumed).refresh,
                  watch_breaker(metrics, breaker)]

        async with trio.open_nursery() as nursery:
            await nursery.start(gw.leases.keep_all)  # renews approvals' and the cleanup leader's leases
            taps = trio.CancelScope()

            async def run_taps(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
                with taps:
                    async with trio.open_nursery() as inner:
                        await inner.start(serve_dlq_writer, gw, counters)
                        await inner.start(gw.hub.serve_taps)
                        if settings.audit_transport == "nats":  # one exporter of every replica's events
                            await inner.start(functools.partial(
                                serve_packets, bus, subjects.AUDIT_EXPORT, gw.audit.export, counters,
                                queue=subjects.QUEUE_AUDIT_EXPORTERS, concurrency=8))
                        task_status.started()

            await nursery.start(run_taps)
            background = trio.CancelScope()

            async def run_background(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
                with background:
                    async with trio.open_nursery() as inner:
                        await inner.start(serve_registration, redis, SERVICE, settings.instance_id)
                        await inner.start(gw.audit.run)
                        inner.start_soon(reload_keys, options.keys, options.keys_reload_interval)
                        election, work = cleanup_election(gw, LeaderMetrics(metrics))
                        await inner.start(election.run, work)
                        await inner.start(refresh_forever, gauges)
                        task_status.started()

            await nursery.start(run_background)
            gw.http_port = await nursery.start(http.serve)

            async def stop_taps() -> None:
                taps.cancel()
                gw.hub.close()

            async def grpc_drain() -> None:
                pass  # no gRPC API yet

            async def close_stores() -> None:
                background.cancel()  # unregisters the instance, releases the cleanup lease
                await bus.flush()

            lifecycle.on("bus taps", stop_taps)
            lifecycle.on("http drain", http.drain)
            lifecycle.on("grpc drain", grpc_drain)
            lifecycle.on("close stores", close_stores)
            log.info("gateway.ready", http_port=gw.http_port, keys=len(options.keys),
                     rate_limiter=gw.ratelimiter.describe(),
                     safety_kernel=",".join(f"{h}:{p}" for h, p in options.safety_addrs), policy_fail_mode="open" if options.fail_open else "closed")
            task_status.started(gw)


async def fingerprint_secret(redis: Redis, settings: Settings) -> bytes:
    """The secret API keys are named under (`CORDUM_KEY_FINGERPRINT_SECRET`, else one made by the
    first gateway and kept in Redis, so that every replica names a key alike). A Redis that loses
    its data loses the secret, and jobs recorded before are then not recognised as a key's own:
    set the variable where Redis is not persistent."""
    configured = (settings.extra.get("CORDUM_KEY_FINGERPRINT_SECRET") or "").strip()
    if configured:
        return configured.encode()
    await redis.execute("SET", keys.KEY_FINGERPRINT_SECRET, secrets.token_hex(32), "NX")
    secret = await redis.execute("GET", keys.KEY_FINGERPRINT_SECRET)
    if not secret:  # evicted or flushed between the two: do not name keys under a made-up secret
        raise RuntimeError(f"{keys.KEY_FINGERPRINT_SECRET} vanished from Redis; set CORDUM_KEY_FINGERPRINT_SECRET")
    return str(secret).encode()


async def reload_keys(ring: KeyRing, interval: float) -> None:
    """Pick up changes to CORDUM_API_KEYS_PATH (keys added, removed, expiring, re-roled)."""
    reported = ""
    while True:
        await trio.sleep(interval)
        if ring.reload_if_changed():
            log.info("gateway.keys_reloaded", keys=len(ring))
        if ring.reload_error != reported:
            reported = ring.reload_error
            if reported:
                log.error("gateway.keys_reload_failed", error=reported, note="the keys in force are kept")


def main() -> None:
    run_service(SERVICE, STAGES, serve)


if __name__ == "__main__":
    main()
