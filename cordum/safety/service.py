"""cordum-safety-kernel: policy decisions over gRPC, the policy hot-reloaded from a file.

Nursery tree (`serve`):

    open_redis ─ open_bus
      ├─ admin HTTP   SAFETY_KERNEL_ADMIN_ADDR (:9095): /health (+ policy version, snapshot), /metrics
      ├─ gRPC         SAFETY_KERNEL_ADDR (:50051): cordum.agent.v1.SafetyKernel, cordum.v1.PolicyBatch,
      │               cordum.v1.OutputPolicyService (output rules: safety.output_service)
      └─ policy watch (one cancel scope)
           ├─ poll the file every SAFETY_POLICY_RELOAD_INTERVAL (30s)
           └─ sys.config.changed broadcast → reload at once

Shutdown stages (the guide's order): "grpc drain" (in-flight checks finish, new calls get
UNAVAILABLE) → "policy watch" (cancel the watcher) → "wait for tasks" (admin HTTP drains).

Policy: SAFETY_POLICY_PATH (default: the packaged `default_policy.yaml`). Missing, unreadable or
invalid at start: exit 2 with the reason. Later, a file that cannot be read or parsed is refused:
an error is logged once per distinct problem (the PolicyError names the line),
`cordum_safety_policy_reloads_total{result="error"}` counts it, and the previous policy stays in
force. Each policy put in force bumps the version, clears the decision cache and records its
snapshot in the Redis sorted set `cordum:safety:snapshots` (score = load time, newest 10 kept),
shared by all replicas; ListSnapshots reads it newest first, or the local history if Redis fails.

Environment (beyond the common settings): SAFETY_KERNEL_ADDR, SAFETY_KERNEL_ADMIN_ADDR,
SAFETY_POLICY_PATH, SAFETY_POLICY_RELOAD_INTERVAL, SAFETY_POLICY_MAX_BYTES (2 MiB),
SAFETY_DECISION_CACHE_TTL (0 = off), SAFETY_DECISION_CACHE_MAX_SIZE (10000), SAFETY_OUTPUT_INLINE_BYTES
(64 KiB: outputs up to this size are checked whole in the scheduler's first output check; 0 = always
Cordum's two phases).
SAFETY_POLICY_URL (a remote policy in the Go original) is not supported: set, it stops the start
instead of being silently ignored.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from cordum.agent.v1 import safety_grpc, safety_pb2
from cordum.agent.v1.buspacket_pb2 import BusPacket
from cordum.infra.bus import Message, open_bus
from cordum.infra.config import ConfigError, Settings, env_value, parse_listen_addr, parse_positive_duration, parse_positive_int
from cordum.infra.grpc import GrpcServer, RpcError
from cordum.infra.tls import GrpcTls
from cordum.infra.http import HttpServer, probe_app
from cordum.infra.metrics import Metrics
from cordum.infra.redis import Redis, RedisError, open_redis
from cordum.runtime.instances import serve_registration
from cordum.protocol.subjects import CONFIG_CHANGED
from cordum.runtime.consumer import ConsumerMetrics, serve_packets
from cordum.runtime.gauges import watch_redis_pool
from cordum.runtime.lifecycle import Lifecycle
from cordum.runtime.log import get_logger
from cordum.runtime.service import run_service
from cordum.safety.kernel import (
    DEFAULT_MAX_BYTES,
    DEFAULT_POLICY_PATH,
    HISTORY_SIZE,
    Kernel,
    PolicyReadError,
    content_hash,
    decision_name,
    parse_policy_bytes,
    read_policy_file,
)
from cordum.safety.evaluate import NO_MATCH
from cordum.safety.policy import Policy, PolicyError
from cordum.store.keys import SAFETY_SNAPSHOTS
from cordum.safety.output_service import DEFAULT_INLINE_BYTES, OutputKernelMetrics, OutputPolicyServicer
from cordum.v1 import output_policy_grpc, policy_batch_grpc, policy_batch_pb2

SERVICE = "cordum-safety-kernel"
STAGES = ("grpc drain", "policy watch", "wait for tasks")

# Redis calls made while answering or reloading never wait longer than this.
REDIS_CALL_TIMEOUT = 2.0

log = get_logger("safety")


# ---- configuration -----------------------------------------------------------------------------


@dataclass(frozen=True)
class KernelConfig:
    grpc_addr: tuple[str, int]
    admin_addr: tuple[str, int]
    policy_path: Path
    reload_interval: float
    max_bytes: int
    tls: GrpcTls
    output_inline_bytes: int = 64 * 1024

    @classmethod
    def from_settings(cls, settings: Settings) -> "KernelConfig":
        if env_value(settings, "SAFETY_POLICY_URL", "", str).strip():
            raise ConfigError(
                "SAFETY_POLICY_URL is set, but remote policies are not supported by this safety kernel; "
                "unset it and point SAFETY_POLICY_PATH at a local file"
            )
        tls = GrpcTls.from_env(settings.extra, "SAFETY_KERNEL")
        tls.server_context()  # a bad certificate file stops the start, naming it
        return cls(
            tls=tls,
            grpc_addr=env_value(settings, "SAFETY_KERNEL_ADDR", ":50051", parse_listen_addr),
            admin_addr=env_value(settings, "SAFETY_KERNEL_ADMIN_ADDR", ":9095", parse_listen_addr),
            policy_path=env_value(settings, "SAFETY_POLICY_PATH", str(DEFAULT_POLICY_PATH), lambda raw: Path(raw.strip())),
            reload_interval=env_value(settings, "SAFETY_POLICY_RELOAD_INTERVAL", "30s", parse_positive_duration),
            max_bytes=env_value(settings, "SAFETY_POLICY_MAX_BYTES", str(DEFAULT_MAX_BYTES), parse_positive_int),
            output_inline_bytes=env_value(settings, "SAFETY_OUTPUT_INLINE_BYTES", str(DEFAULT_INLINE_BYTES), _bytes),
        )


class KernelMetrics:
    def __init__(self, metrics: Metrics) -> None:
        self.decisions = metrics.counter(
            "cordum_safety_decisions_total", "Policy decisions returned, by decision", ["decision"]
        )
        self.reloads = metrics.counter(
            "cordum_safety_policy_reloads_total",
            "Policy loads: ok = a new policy put in force, error = a policy file refused",
            ["result"],
        )
        self.version = metrics.gauge("cordum_safety_policy_version", "Version counter of the policy in force")
        self.defaulted = metrics.counter(
            "cordum_safety_default_decision_total", "Decisions no rule matched: the policy's default, by decision",
            ["decision"])
        for result in ("ok", "error"):
            self.reloads.labels(result=result)


# ---- snapshots in Redis ------------------------------------------------------------------------


class SnapshotLog:
    """The newest HISTORY_SIZE policy snapshots of all replicas: a sorted set scored by load time.
    A snapshot loaded again (by another replica, or after a revert) moves to the front instead of
    appearing twice. One key, so MULTI/EXEC is Redis-Cluster safe."""

    def __init__(self, redis: Redis) -> None:
        self._redis = redis

    async def record(self, snapshot: str, loaded_at: float) -> None:
        with trio.fail_after(REDIS_CALL_TIMEOUT):
            results = await self._redis.pipeline(
                [
                    ("ZADD", SAFETY_SNAPSHOTS, loaded_at, snapshot),
                    ("ZREMRANGEBYRANK", SAFETY_SNAPSHOTS, 0, -(HISTORY_SIZE + 1)),
                ],
                transaction=True,
            )
        for result in results:
            if isinstance(result, Exception):
                raise result

    async def newest(self) -> list[str]:
        with trio.fail_after(REDIS_CALL_TIMEOUT):
            return list(await self._redis.execute("ZREVRANGE", SAFETY_SNAPSHOTS, 0, HISTORY_SIZE - 1))


# ---- policy loading and the watcher ------------------------------------------------------------


def initial_policy(config: KernelConfig) -> Policy:
    """Read and parse the policy at start (blocking); any problem is a ConfigError."""
    try:
        return parse_policy_bytes(read_policy_file(config.policy_path, config.max_bytes), str(config.policy_path))
    except (PolicyReadError, PolicyError) as exc:
        raise ConfigError(f"SAFETY_POLICY_PATH={str(config.policy_path)!r} is invalid: {exc}") from None


class PolicyWatcher:
    """Reloads the policy file on a poll and on request; refuses broken files."""

    def __init__(self, kernel: Kernel, config: KernelConfig, counters: KernelMetrics) -> None:
        self._kernel = kernel
        self._config = config
        self._path = config.policy_path
        self._max_bytes = config.max_bytes
        self._interval = config.reload_interval
        self._counters = counters
        self._wake = trio.Event()
        self._trigger = "poll"
        self._problem: str | None = None  # the refused file's hash or read error, reported once
        self.last_error: str | None = None
        self.snapshots: SnapshotLog | None = None
        self._unrecorded: tuple[str, float] | None = None

    async def load_initial(self) -> None:
        """The first load: any problem is a startup (configuration) error."""
        self._install(await trio.to_thread.run_sync(initial_policy, self._config), "start")

    def request_reload(self, trigger: str) -> None:
        """Reload as soon as possible (requests arriving during a reload coalesce into one more)."""
        self._trigger = trigger
        self._wake.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            with trio.move_on_after(self._interval):
                await self._wake.wait()
            trigger = self._trigger if self._wake.is_set() else "poll"
            self._wake = trio.Event()
            self._trigger = "poll"
            await self.reload(trigger)
            await self.record_pending()

    async def reload(self, trigger: str) -> bool:
        """Read and, if changed and valid, put the file's policy in force; True if swapped."""
        try:
            data = await trio.to_thread.run_sync(read_policy_file, self._path, self._max_bytes)
        except PolicyReadError as exc:
            self._refuse(str(exc), str(exc), None, trigger)
            return False
        digest = content_hash(data)
        current = self._kernel.policy
        if current is not None and digest == current.content_hash:
            self._problem = self.last_error = None
            return False
        if digest == self._problem:
            return False  # the same broken file: reported already
        try:
            policy = await trio.to_thread.run_sync(parse_policy_bytes, data, str(self._path))
        except PolicyError as exc:
            self._refuse(digest, str(exc), exc.line, trigger)
            return False
        self._problem = self.last_error = None
        return await self._install_and_record(policy, trigger)

    def _refuse(self, problem: str, message: str, line: int | None, trigger: str) -> None:
        if problem == self._problem:
            return
        self._problem = problem
        self.last_error = message
        self._counters.reloads.labels(result="error").inc()
        log.error(
            "policy.refused",
            error=message,
            line=line,
            source=str(self._path),
            trigger=trigger,
            version=self._kernel.version,
            snapshot=self._kernel.snapshot,
            note="the previous policy stays in force",
        )

    def _install(self, policy: Policy, trigger: str) -> bool:
        loaded = self._kernel.install(policy)
        if loaded is None:
            return False
        self._counters.reloads.labels(result="ok").inc()
        self._counters.version.set(loaded.version)
        self._unrecorded = (loaded.snapshot, loaded.loaded_at)
        log.info(
            "policy.loaded",
            version=loaded.version,
            snapshot=loaded.snapshot,
            source=str(self._path),
            rules=len(policy.rules),
            output_rules=len(policy.output.rules) if policy.output.enabled else 0,
            default_decision=policy.default_decision,
            trigger=trigger,
        )
        return True

    async def _install_and_record(self, policy: Policy, trigger: str) -> bool:
        swapped = self._install(policy, trigger)
        await self.record_pending()
        return swapped

    async def record_pending(self) -> None:
        """Record the snapshot in force in Redis if that has not succeeded yet (retried each tick)."""
        if self._unrecorded is None or self.snapshots is None:
            return
        snapshot, loaded_at = self._unrecorded
        try:
            await self.snapshots.record(snapshot, loaded_at)
        except (RedisError, OSError, trio.TooSlowError) as exc:
            log.warning("policy.snapshot_record_failed", snapshot=snapshot, error=repr(exc), note="retried on the next poll")
            return
        if self._unrecorded == (snapshot, loaded_at):
            self._unrecorded = None


# ---- gRPC --------------------------------------------------------------------------------------


class SafetyKernelService:
    """cordum.agent.v1.SafetyKernel on top of the Kernel: Check, Evaluate and Simulate share one
    evaluation path; Explain adds the rule trace to `reason`."""

    def __init__(self, kernel: Kernel, snapshots: SnapshotLog, counters: KernelMetrics) -> None:
        self._kernel = kernel
        self._snapshots = snapshots
        self._counters = counters

    def _counted(self, response: safety_pb2.PolicyCheckResponse) -> safety_pb2.PolicyCheckResponse:
        self._counters.decisions.labels(decision=decision_name(response.decision)).inc()
        if not response.rule_id and response.reason.startswith(NO_MATCH):
            self._counters.defaulted.labels(decision=decision_name(response.decision)).inc()
        return response

    # Decisions are pure and in memory: plain methods, answered without a crossing to Trio.
    def Check(self, request: safety_pb2.PolicyCheckRequest) -> safety_pb2.PolicyCheckResponse:
        return self._counted(self._kernel.check(request))

    Evaluate = Simulate = Check

    def Explain(self, request: safety_pb2.PolicyCheckRequest) -> safety_pb2.PolicyCheckResponse:
        return self._counted(self._kernel.explain(request))

    async def ListSnapshots(self, request: safety_pb2.ListSnapshotsRequest) -> safety_pb2.ListSnapshotsResponse:
        try:
            snapshots = await self._snapshots.newest()
        except (RedisError, OSError, trio.TooSlowError) as exc:
            log.warning("policy.snapshots_unavailable", error=repr(exc), note="answering from local history")
            snapshots = []
        return safety_pb2.ListSnapshotsResponse(snapshots=snapshots or list(self._kernel.history))


BATCH_METHODS = ("Check", "Evaluate", "Simulate")


class PolicyBatchService:
    """cordum.v1.PolicyBatch: the checks a client asked for in one turn, answered in one call.
    Each request is answered exactly as its SafetyKernel method would answer it alone; one that
    fails gets an error of its own without failing the others."""

    def __init__(self, kernel_service: SafetyKernelService) -> None:
        self._kernel_service = kernel_service

    def CheckBatch(self, request: policy_batch_pb2.PolicyCheckBatchRequest) -> policy_batch_pb2.PolicyCheckBatchResponse:
        if request.method not in BATCH_METHODS:
            raise RpcError("INVALID_ARGUMENT", f"method must be one of {', '.join(BATCH_METHODS)}, not {request.method!r}")
        check = getattr(self._kernel_service, request.method)
        reply = policy_batch_pb2.PolicyCheckBatchResponse()
        for item in request.requests:
            answer = reply.items.add()
            try:
                answer.response.CopyFrom(check(item))
            except Exception as exc:
                log.error("policy.batch_item_failed", job_id=item.job_id, error=repr(exc))
                answer.error = "internal error"
        return reply


# ---- the service -------------------------------------------------------------------------------


async def serve(settings: Settings, lifecycle: Lifecycle, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    config = KernelConfig.from_settings(settings)
    metrics = Metrics(settings.instance_id)
    counters = KernelMetrics(metrics)
    kernel = Kernel(cache_ttl=settings.safety_decision_cache_ttl, cache_max_size=settings.safety_decision_cache_max_size)
    watcher = PolicyWatcher(kernel, config, counters)
    await watcher.load_initial()  # before any connection: a bad policy fails fast

    async def health() -> dict[str, Any]:
        current = kernel.current
        body: dict[str, Any] = {
            "policy_version": kernel.version,
            "policy_snapshot": kernel.snapshot,
            "policy_source": str(config.policy_path),
            "policy_loaded_at": current.loaded_at if current else None,
            "policy_rules": len(current.policy.rules) if current else 0,
            "output_rules": len(current.policy.output.rules) if current and current.policy.output.enabled else 0,
            "decision_cache": {
                "enabled": kernel.cache.enabled,
                "size": len(kernel.cache),
                "hits": kernel.cache.hits,
                "misses": kernel.cache.misses,
            },
        }
        if watcher.last_error:
            body["policy_reload_error"] = watcher.last_error
        return body

    async def on_config_changed(packet: BusPacket, msg: Message) -> None:
        watcher.request_reload(CONFIG_CHANGED)

    async with open_redis(settings) as redis, open_bus(settings, name=SERVICE) as bus:
        watch_redis_pool(metrics, redis)
        snapshots = SnapshotLog(redis)
        watcher.snapshots = snapshots
        await watcher.record_pending()
        http = HttpServer(probe_app(SERVICE, metrics, health), *config.admin_addr, graceful_timeout=1.0)
        kernel_service = SafetyKernelService(kernel, snapshots, counters)
        grpc = GrpcServer([(safety_grpc.SafetyKernelBase, kernel_service),
                           (policy_batch_grpc.PolicyBatchBase, PolicyBatchService(kernel_service)),
                           (output_policy_grpc.OutputPolicyServiceBase,
                            OutputPolicyServicer(kernel, redis, OutputKernelMetrics(metrics),
                                                 inline_bytes=config.output_inline_bytes))],
                          ssl=config.tls.server_context())
        watch = trio.CancelScope()

        async def watch_policy(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            with watch:
                async with trio.open_nursery() as inner:
                    await inner.start(
                        lambda task_status: serve_packets(
                            bus, CONFIG_CHANGED, on_config_changed, ConsumerMetrics(metrics), task_status=task_status
                        )
                    )
                    await bus.flush()  # the subscription has reached the server before we are ready
                    await inner.start(watcher.run)
                    task_status.started()

        async def stop_watch() -> None:
            watch.cancel()

        async with trio.open_nursery() as nursery:
            await nursery.start(http.serve)
            await nursery.start(serve_registration, redis, SERVICE, settings.instance_id)
            await nursery.start(grpc.serve, *config.grpc_addr)
            await nursery.start(watch_policy)
            lifecycle.on("grpc drain", grpc.drain)
            lifecycle.on("policy watch", stop_watch)
            lifecycle.on("wait for tasks", http.drain)
            log.info(
                "safety.serving",
                grpc_port=grpc.port,
                admin_port=http.port,
                policy_source=str(config.policy_path),
                reload_interval=config.reload_interval,
                decision_cache_ttl=settings.safety_decision_cache_ttl,
            )
            task_status.started()


def _bytes(raw: str) -> int:
    value = int(raw.strip())
    if value < 0:
        raise ValueError("expected a number of bytes (0 or more)")
    return value


def _check(settings: Settings) -> None:
    """The service's own variables and the policy file, checked before Trio starts (exit 2)."""
    initial_policy(KernelConfig.from_settings(settings))


def main() -> None:
    run_service(SERVICE, STAGES, serve, check=_check)


if __name__ == "__main__":
    main()
