"""cordum-scheduler: the nursery tree of one scheduler replica.

    root
    ├── metrics/health HTTP                      stage "metrics drain"
    ├── output checks     content checks of outputs (scheduler.output), started before the consumers
    ├── consumers sys.job.submit|result|cancel   queue group cordum-scheduler ("engine stop")
    ├── broadcast taps: heartbeats, config       (every replica hears every worker)
    └── background ("cancel context"; started after the consumers)
        ├── reconciler        leader cordum:reconciler:default (+ the sweep of unfinished output checks)
        ├── pending replayer  leader cordum:replayer:pending
        ├── worker reaper     leader cordum:scheduler:worker:reaper (+ the index sweep)
        ├── snapshot writer   leader cordum:scheduler:snapshot:writer
        ├── config overlay    sys.config.changed + poll
        └── gauges            consumer backlog, safety breaker (every 15 s)

The background starts once the consumers run, and the reconciler's first pass comes one interval
after it leads: results that waited in the stream while no scheduler ran are applied before any
job can be judged stuck.
"""

from __future__ import annotations

from pathlib import Path

import trio

from cordum.agent.v1.handshake_pb2 import COMPONENT_ROLE_SCHEDULER, Handshake
from cordum.infra.bus import open_bus
from cordum.infra.config import Settings, env_value, parse_bool, parse_duration, parse_listen_addr, parse_positive_duration
from cordum.infra.http import HttpServer, probe_app
from cordum.infra.metrics import Metrics
from cordum.infra.redis import open_redis
from cordum.protocol import subjects
from cordum.protocol.packets import encode, new_packet
from cordum.runtime.instances import serve_registration
from cordum.runtime.audit import AuditLog
from cordum.runtime.consumer import ConsumerMetrics, PacketConsumer, serve_packets
from cordum.runtime.gauges import ConsumerBacklog, refresh_forever, watch_breaker, watch_redis_pool
from cordum.runtime.leader import LeaderElection, LeaderMetrics, every
from cordum.runtime.lease import Leases
from cordum.runtime.lifecycle import Lifecycle
from cordum.runtime.log import get_logger
from cordum.runtime.service import run_service
from cordum.safety.client import CircuitBreaker, kernel_client_tls, open_safety_client, parse_kernel_addrs
from cordum.scheduler.config import PoolsSource
from cordum.scheduler.engine import SENDER, Engine, EngineConfig, SchedulerMetrics
from cordum.scheduler.output import OutputMetrics, OutputReview, OutputSettings
from cordum.scheduler.routing import topic_label
from cordum.scheduler.loops import IndexSweep, PendingReplayer, Reconciler, SnapshotWriter, Timeouts, WorkerReaper
from cordum.scheduler.registry import WorkerRegistry
from cordum.store import keys
from cordum.store.audit import AuditChain
from cordum.store.config import ConfigStore
from cordum.store.jobs import JobStore

NAME = "cordum-scheduler"
STAGES = ("metrics drain", "engine stop", "cancel context")
DEFAULT_POOLS = Path(__file__).with_name("default_pools.yaml")
log = get_logger("scheduler.service")


async def serve(settings: Settings, lifecycle: Lifecycle, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    http_addr = env_value(settings, "SCHEDULER_METRICS_ADDR", ":9090", parse_listen_addr)
    safety_addrs = env_value(settings, "SAFETY_KERNEL_ADDR", "localhost:50051", parse_kernel_addrs)
    safety_tls = kernel_client_tls(settings)
    fail_mode = env_value(settings, "POLICY_CHECK_FAIL_MODE", "closed", _fail_mode)
    reuse_decision = env_value(settings, "SCHEDULER_REUSE_SUBMIT_DECISION", "true", parse_bool)
    output_settings = OutputSettings(
        enabled=env_value(settings, "OUTPUT_POLICY_ENABLED", "true", parse_bool),
        fail_closed=env_value(settings, "OUTPUT_POLICY_FAIL_MODE", "open", _fail_mode) == "closed",
        meta_timeout=env_value(settings, "CORDUM_OUTPUT_META_TIMEOUT_MS", "500", _milliseconds),
        content_timeout=env_value(settings, "CORDUM_OUTPUT_CONTENT_TIMEOUT", "30s", parse_positive_duration),
    )
    scan = env_value(settings, "SCHEDULER_SCAN_INTERVAL", "30s", parse_duration)
    timeouts = Timeouts(
        dispatch=env_value(settings, "SCHEDULER_DISPATCH_TIMEOUT", "120s", parse_duration),
        running=env_value(settings, "SCHEDULER_RUNNING_TIMEOUT", "900s", parse_duration),
        pending_age=env_value(settings, "SCHEDULER_PENDING_AGE", "30s", parse_duration),
        dispatch_confirm=env_value(settings, "SCHEDULER_DISPATCH_CONFIRM", "10s", parse_duration),
        output_content=output_settings.content_timeout,
    )
    snapshot_every = env_value(settings, "WORKER_SNAPSHOT_INTERVAL", "5s", parse_duration)
    config_every = env_value(settings, "SCHEDULER_CONFIG_RELOAD_INTERVAL", "30s", parse_duration)
    worker_ttl = env_value(settings, "WORKER_TTL", "30s", parse_duration)
    reap_every = min(scan, 2.0)  # how often the leader looks for jobs of workers that left
    pools_path = env_value(settings, "SCHEDULER_POOLS_PATH", str(DEFAULT_POOLS), str)

    metrics = Metrics(settings.instance_id)
    counters = ConsumerMetrics(metrics)
    leaders = LeaderMetrics(metrics)
    async with open_redis(settings) as redis, open_bus(settings, name=f"{NAME}/{settings.instance_id}") as bus, \
            open_safety_client(safety_addrs, breaker := CircuitBreaker(redis), tls=safety_tls) as safety:
        watch_redis_pool(metrics, redis)
        pools = PoolsSource(Path(pools_path), ConfigStore(redis), timeouts)
        await pools.load()  # a bad pools file stops the start with its message
        leases = Leases(redis, settings.instance_id)
        registry = WorkerRegistry(ttl=worker_ttl, started=trio.current_time())
        engine = Engine(
            store=JobStore(redis), bus=bus, leases=leases, safety=safety,
            registry=registry, pools=pools.current, metrics=SchedulerMetrics(metrics, pools.current),
            config=EngineConfig(fail_open=fail_mode == "open", reuse_submit_decision=reuse_decision,
                                route_wait_refresh=min(10.0, timeouts.pending_age / 3)),
        )
        engine.audit = AuditLog(AuditChain(redis, hmac_key=(settings.extra.get("CORDUM_AUDIT_HMAC_KEY") or "").strip().encode()),
                                bus, transport=settings.audit_transport, sender=settings.instance_id)
        engine.audit.instrument(metrics)
        if output_settings.enabled:
            output_breaker = CircuitBreaker(redis, keys.SAFETY_CB_OUTPUT_FAILURES)
            engine.output = OutputReview(engine, safety.output_client(output_breaker), output_settings,
                                         OutputMetrics(metrics, lambda topic: topic_label(pools.current(), topic)))

        async def health() -> dict:
            await redis.ping()
            return {"workers": len(registry.alive(trio.current_time()))}

        http = HttpServer(probe_app(NAME, metrics, health), *http_addr)
        consumers = [
            PacketConsumer(bus, subjects.SUBMIT, engine.on_submit, counters, queue=subjects.QUEUE_SCHEDULER),
            PacketConsumer(bus, subjects.RESULT, engine.on_result, counters, queue=subjects.QUEUE_SCHEDULER),
            PacketConsumer(bus, subjects.CANCEL, engine.on_cancel, counters, queue=subjects.QUEUE_SCHEDULER),
        ]
        backlog = ConsumerBacklog(metrics, bus, [(c.subject, subjects.QUEUE_SCHEDULER) for c in consumers])

        async def on_heartbeat(packet, msg) -> None:
            if packet.WhichOneof("payload") == "heartbeat" and packet.heartbeat.worker_id:
                registry.observe(packet.heartbeat, trio.current_time())

        async def on_config_changed(packet, msg) -> None:
            await pools.load()

        async with trio.open_nursery() as nursery:
            await nursery.start(leases.keep_all)  # renews held job locks until the process ends
            await nursery.start(http.serve)
            await nursery.start(serve_registration, redis, NAME, settings.instance_id)
            await nursery.start(engine.audit.run)
            await nursery.start(serve_packets, bus, subjects.HEARTBEAT, on_heartbeat, counters)
            if engine.output is not None:  # before the consumers: their results may start content checks
                await nursery.start(engine.output.run)
            for consumer in consumers:
                await nursery.start(consumer.run)
            background = trio.CancelScope()
            reaper, sweep = WorkerReaper(engine), IndexSweep(engine)

            async def reap(lease) -> None:
                await reaper.tick(lease)
                await sweep.tick(lease)

            async def run_background(*, task_status=trio.TASK_STATUS_IGNORED) -> None:
                with background:
                    async with trio.open_nursery() as loops:
                        await loops.start(serve_packets, bus, subjects.CONFIG_CHANGED, on_config_changed, counters)
                        loops.start_soon(LeaderElection(leases, keys.RECONCILER_LEADER, 2 * scan, metrics=leaders).run,
                                         every(scan, Reconciler(engine, timeouts).tick, first_after=scan))
                        loops.start_soon(LeaderElection(leases, keys.WORKER_REAPER_LEADER, 2 * reap_every,
                                                        metrics=leaders).run,
                                         every(reap_every, reap))
                        loops.start_soon(LeaderElection(leases, keys.REPLAYER_LEADER, 2 * scan, metrics=leaders).run,
                                         every(scan, PendingReplayer(engine, timeouts).tick))
                        loops.start_soon(LeaderElection(leases, keys.SNAPSHOT_WRITER_LEADER, 30.0, metrics=leaders).run,
                                         every(snapshot_every, SnapshotWriter(engine, redis, settings.instance_id).tick))
                        loops.start_soon(pools.poll, config_every)
                        loops.start_soon(refresh_forever, [backlog.refresh, watch_breaker(metrics, breaker)])
                        task_status.started()

            await nursery.start(run_background)
            hello = Handshake(component_id=settings.instance_id, role=COMPONENT_ROLE_SCHEDULER, supported_versions=[1],
                              capabilities={"safety_check": True, "routing": True})
            bus.publish_nowait(subjects.HANDSHAKE, encode(new_packet(hello, sender_id=settings.instance_id)))

            async def stop_engine() -> None:
                async with trio.open_nursery() as stopping:
                    for consumer in consumers:
                        stopping.start_soon(consumer.stop)

            async def cancel_background() -> None:
                background.cancel()

            lifecycle.on("metrics drain", http.drain)
            lifecycle.on("engine stop", stop_engine)
            lifecycle.on("cancel context", cancel_background)
            log.info("scheduler.started", sender=SENDER, pools=sorted(pools.current().topics))
            task_status.started()


def _fail_mode(raw: str) -> str:
    value = raw.strip().lower()
    if value not in ("closed", "open"):
        raise ValueError("expected 'closed' or 'open'")
    return value


def _milliseconds(raw: str) -> float:
    value = int(raw.strip())
    if value <= 0:
        raise ValueError("expected a positive number of milliseconds")
    return value / 1000


def main() -> None:
    run_service(NAME, STAGES, serve)


if __name__ == "__main__":
    main()
