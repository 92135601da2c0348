"""cordum-context-engine: model context windows and conversation memory over gRPC. Stateless;
Redis only (no NATS), so any number of replicas serve the same memories.

Nursery tree (`serve`):

    open_redis
      ├─ metrics HTTP   CONTEXT_ENGINE_METRICS_ADDR (:9094): /health, /metrics
      ├─ registration   cordum:instance:cordum-context-engine:<id> (listed by /api/v1/status)
      └─ gRPC           CONTEXT_ENGINE_ADDR (:50070): cordum.v1.ContextEngine + grpc.health.v1.Health

Shutdown stages (the guide's order): "grpc drain" (health turns NOT_SERVING, new calls get
UNAVAILABLE, in-flight calls finish) → "metrics drain".

BuildWindow never fails for Redis: a read that errs or outlasts CONTEXT_ENGINE_REDIS_TIMEOUT leaves
its part out (fewer messages), logs `context.window_degraded` and counts
`cordum_context_windows_total{result="degraded"}`. UpdateMemory needs Redis: it answers
UNAVAILABLE ("memory store unavailable: …") when the write did not go through in time. Bad requests
answer INVALID_ARGUMENT, governance refusals PERMISSION_DENIED, the message naming the field: a
logical_payload or model_response over CONTEXT_ENGINE_MAX_PAYLOAD_BYTES, an id field over 512 bytes.
Memory contents are never logged, memory ids only as a short digest (`memory_ref`), and other
request fields only once checked to be bounded.

Environment (beyond the common settings): CONTEXT_ENGINE_ADDR, CONTEXT_ENGINE_METRICS_ADDR,
CONTEXT_ENGINE_REDIS_TIMEOUT (2s), CONTEXT_ENGINE_MAX_CHUNK_SCAN (1000),
CONTEXT_ENGINE_MAX_ENTRY_BYTES (65536), CONTEXT_ENGINE_MAX_PAYLOAD_BYTES (4194304).
CONTEXT_ENGINE_TLS_CERT/KEY are not supported: set, they stop the start instead of being silently
ignored.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import trio
from grpclib.health.check import ServiceStatus
from grpclib.health.service import Health

from cordum.context import window
from cordum.context.memory import MemoryStore, MemoryUnavailable
from cordum.infra.aio import aio
from cordum.infra.config import Settings, env_value, parse_listen_addr, parse_positive_duration, parse_positive_int
from cordum.infra.grpc import DEFAULT_MAX_MESSAGE, GrpcServer, RpcError
from cordum.infra.tls import GrpcTls
from cordum.infra.http import HttpServer, probe_app
from cordum.infra.metrics import Metrics
from cordum.infra.redis import Redis, open_redis
from cordum.runtime.gauges import watch_redis_pool
from cordum.runtime.instances import serve_registration
from cordum.runtime.lifecycle import Lifecycle
from cordum.runtime.log import get_logger
from cordum.runtime.service import run_service
from cordum.v1 import context_grpc
from cordum.v1 import context_pb2 as pb

SERVICE = "cordum-context-engine"
STAGES = ("grpc drain", "metrics drain")
GRPC_SERVICE = "cordum.v1.ContextEngine"
HEALTH_REDIS_TIMEOUT = 0.5

log = get_logger("context")


def _in_range(low: int, high: int):
    def parse(raw: str) -> int:
        value = parse_positive_int(raw)
        if not low <= value <= high:
            raise ValueError(f"expected an integer between {low} and {high}")
        return value

    return parse


@dataclass(frozen=True)
class EngineConfig:
    grpc_addr: tuple[str, int]
    metrics_addr: tuple[str, int]
    redis_timeout: float
    max_chunk_scan: int
    max_entry_bytes: int
    max_payload_bytes: int
    tls: GrpcTls

    @classmethod
    def from_settings(cls, settings: Settings) -> "EngineConfig":
        tls = GrpcTls.from_env(settings.extra, "CONTEXT_ENGINE")
        tls.server_context()  # a bad certificate file stops the start, naming it
        return cls(
            tls=tls,
            grpc_addr=env_value(settings, "CONTEXT_ENGINE_ADDR", ":50070", parse_listen_addr),
            metrics_addr=env_value(settings, "CONTEXT_ENGINE_METRICS_ADDR", ":9094", parse_listen_addr),
            redis_timeout=env_value(settings, "CONTEXT_ENGINE_REDIS_TIMEOUT", "2s", parse_positive_duration),
            max_chunk_scan=env_value(settings, "CONTEXT_ENGINE_MAX_CHUNK_SCAN", "1000", _in_range(1, 100_000)),
            max_entry_bytes=env_value(settings, "CONTEXT_ENGINE_MAX_ENTRY_BYTES", "65536", _in_range(256, 16 << 20)),
            max_payload_bytes=env_value(settings, "CONTEXT_ENGINE_MAX_PAYLOAD_BYTES",
                                        str(window.DEFAULT_MAX_PAYLOAD_BYTES), _in_range(1024, 1 << 30)),
        )


class EngineMetrics:
    def __init__(self, metrics: Metrics) -> None:
        self.windows = metrics.counter(
            "cordum_context_windows_total",
            "Windows built, by mode; result=degraded: Redis failed or was too slow, so parts are missing",
            ["mode", "result"])
        self.degraded = metrics.counter(
            "cordum_context_redis_degraded_total", "Window reads that lost a part to Redis, by reason", ["reason"])
        self.updates = metrics.counter(
            "cordum_context_memory_updates_total",
            "UpdateMemory calls by result (written, noop, invalid, refused, unavailable)", ["result"])
        self.trimmed = metrics.counter(
            "cordum_context_messages_trimmed_total", "Messages dropped to fit max_input_tokens")
        self.in_flight = metrics.gauge("cordum_context_calls_in_flight", "ContextEngine calls being answered")
        for mode in window.MODE_NAMES.values():
            for result in ("ok", "degraded"):
                self.windows.labels(mode=mode, result=result)
        for result in ("written", "noop", "invalid", "refused", "unavailable"):
            self.updates.labels(result=result)


def memory_ref(memory_id: str) -> str:
    """A memory id for logs: ids are tenant data, a digest still correlates lines."""
    return hashlib.sha256(memory_id.encode()).hexdigest()[:12] if memory_id else ""


class ContextEngineService:
    """cordum.v1.ContextEngine: the pure core (`window`) between thin Redis reads and writes."""

    def __init__(self, store: MemoryStore, config: EngineConfig, counters: EngineMetrics) -> None:
        self._store = store
        self._config = config
        self._counters = counters

    async def BuildWindow(self, request: pb.BuildWindowRequest) -> pb.BuildWindowResponse:
        with self._counters.in_flight.track_inprogress():
            return await self._build_window(request)

    async def UpdateMemory(self, request: pb.UpdateMemoryRequest) -> pb.UpdateMemoryResponse:
        with self._counters.in_flight.track_inprogress():
            return await self._update_memory(request)

    async def _build_window(self, request: pb.BuildWindowRequest) -> pb.BuildWindowResponse:
        try:
            mode, max_in, max_out = window.check_window_request(request, self._config.max_payload_bytes)
        except window.BadRequest as exc:
            raise RpcError("INVALID_ARGUMENT", str(exc)) from None
        payload = window.read_payload(request.logical_payload)
        history, summary, file_path = window.reads_for(mode, payload)
        view = await self._store.read(request.memory_id, history=history, summary=summary, file_path=file_path)
        built = window.assemble(mode, payload, view, max_in, max_out)
        result = "degraded" if view.degraded else "ok"
        self._counters.windows.labels(mode=window.MODE_NAMES[mode], result=result).inc()
        if built.dropped:
            self._counters.trimmed.inc(built.dropped)
        if view.degraded:
            self._counters.degraded.labels(reason=view.degraded.split(":")[0]).inc()
            log.warning("context.window_degraded", memory=memory_ref(request.memory_id), reason=view.degraded,
                        mode=window.MODE_NAMES[mode], messages=len(built.messages))
        return pb.BuildWindowResponse(
            messages=[pb.ModelMessage(role=m.role, content=m.content) for m in built.messages],
            input_tokens=built.input_tokens, output_tokens=built.output_tokens)

    async def _update_memory(self, request: pb.UpdateMemoryRequest) -> pb.UpdateMemoryResponse:
        updates = self._counters.updates
        if not request.memory_id:
            updates.labels(result="noop").inc()
            return pb.UpdateMemoryResponse()
        try:
            mode = window.check_update_request(request, self._config.max_payload_bytes)
            window.check_governance(request)
            entries = window.memory_events(request, self._config.max_entry_bytes) if mode != window.RAW else []
        except window.BadRequest as exc:
            updates.labels(result="invalid").inc()
            raise RpcError("INVALID_ARGUMENT", str(exc)) from None
        except window.Refused as exc:
            updates.labels(result="refused").inc()
            # writer_agent_id is bounded by check_update_request (MAX_ID_BYTES) before it is logged
            log.warning("context.write_refused", memory=memory_ref(request.memory_id), reason=str(exc),
                        write_kind=request.write_kind, writer=request.writer_agent_id)
            raise RpcError("PERMISSION_DENIED", str(exc)) from None
        if not entries:
            updates.labels(result="noop").inc()  # RAW: nothing is remembered
            return pb.UpdateMemoryResponse()
        try:
            await self._store.append(request.memory_id, entries)
        except MemoryUnavailable as exc:
            updates.labels(result="unavailable").inc()
            log.error("context.write_failed", memory=memory_ref(request.memory_id), error=str(exc))
            raise RpcError("UNAVAILABLE", f"{window.STORE_UNAVAILABLE}: {exc}") from None
        updates.labels(result="written").inc()
        return pb.UpdateMemoryResponse()


class _ContextEngineName:
    """Names cordum.v1.ContextEngine for the health service (which keys its checks by servable)."""

    def __mapping__(self) -> dict[str, None]:
        return {f"/{GRPC_SERVICE}/BuildWindow": None}


async def _set_status(status: ServiceStatus, value: bool) -> None:
    # On the asyncio side: it wakes the health service's Watch streams (asyncio events).
    async def set_value() -> None:
        status.set(value)

    await aio(set_value)()


async def _redis_state(redis: Redis) -> str:
    try:
        with trio.fail_after(HEALTH_REDIS_TIMEOUT):
            await redis.ping()
        return "ok"
    except Exception as exc:  # reported, not raised: windows still build without Redis
        return f"error: {type(exc).__name__}"


async def serve(settings: Settings, lifecycle: Lifecycle, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    config = EngineConfig.from_settings(settings)
    metrics = Metrics(settings.instance_id)
    counters = EngineMetrics(metrics)
    serving = ServiceStatus()

    async with open_redis(settings) as redis:
        watch_redis_pool(metrics, redis)

        async def health() -> dict[str, Any]:
            # Redis down degrades windows but does not take the replica out of service.
            return {"redis": await _redis_state(redis), "grpc_serving": bool(serving.__status__())}

        store = MemoryStore(redis, timeout=config.redis_timeout, max_chunk_scan=config.max_chunk_scan)
        impl = ContextEngineService(store, config, counters)
        # "" (the whole server) and the service's own name, as grpc-health-probe and k8s ask.
        checks = Health({_ContextEngineName(): [serving]})
        # A request carries at most one payload of max_payload_bytes (plus its small fields).
        grpc = GrpcServer([(context_grpc.ContextEngineBase, impl)], native=[checks], ssl=config.tls.server_context(),
                          max_message=max(DEFAULT_MAX_MESSAGE, config.max_payload_bytes + (1 << 20)))
        http = HttpServer(probe_app(SERVICE, metrics, health), *config.metrics_addr, graceful_timeout=1.0)

        async def grpc_drain() -> None:
            await _set_status(serving, False)
            await grpc.drain()

        async with trio.open_nursery() as nursery:
            await nursery.start(http.serve)
            await nursery.start(serve_registration, redis, SERVICE, settings.instance_id)
            await nursery.start(grpc.serve, *config.grpc_addr)
            await _set_status(serving, True)
            lifecycle.on("grpc drain", grpc_drain)
            lifecycle.on("metrics drain", http.drain)
            log.info("context.serving", grpc_port=grpc.port, metrics_port=http.port,
                     redis_timeout=config.redis_timeout, max_chunk_scan=config.max_chunk_scan,
                     max_entry_bytes=config.max_entry_bytes, max_payload_bytes=config.max_payload_bytes)
            task_status.started()


def main() -> None:
    run_service(SERVICE, STAGES, serve, check=EngineConfig.from_settings)


if __name__ == "__main__":
    main()
