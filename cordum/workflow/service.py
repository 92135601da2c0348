"""cordum-workflow-engine: the nursery tree of one workflow-engine replica.

    root
    ├── HTTP /health, /metrics                   stage "http drain"
    ├── consumers sys.job.result, sys.job.dlq    queue group cordum-workflow-engine ("cancel context")
    └── background ("cancel context"; started after the consumers)
        ├── run reconciler    leader cordum:workflow-engine:reconciler:default (TTL 2× scan)
        ├── delay poller      leader cordum:wf:delay:poller (TTL 2× poll)
        └── gauges            consumer backlog (every 15 s)

Results drive runs: each result is processed by exactly one replica (the queue group), under the
run's fenced lock; results of jobs that are no run's steps are acked as they arrive, unhandled.
The scheduler keeps its own durable on `sys.job.result`, so both see every result. Shutdown
follows the guide: cancel context (intake stops, handlers finish, loops end) → HTTP drain. Timers
stay in `cordum:wf:delay:timers` for the other replicas' poller, run locks expire by TTL.
"""

from __future__ import annotations

import trio

from cordum.agent.v1.handshake_pb2 import COMPONENT_ROLE_ORCHESTRATOR, Handshake
from cordum.infra.bus import open_bus
from cordum.infra.config import Settings, env_value, parse_duration, parse_listen_addr
from cordum.infra.http import HttpServer, probe_app
from cordum.infra.metrics import Metrics
from cordum.infra.redis import open_redis
from cordum.protocol import subjects
from cordum.protocol.packets import encode, new_packet
from cordum.runtime.consumer import ConsumerMetrics, PacketConsumer
from cordum.runtime.instances import serve_registration
from cordum.runtime.gauges import ConsumerBacklog, refresh_forever, watch_redis_pool
from cordum.runtime.leader import LeaderElection, LeaderMetrics, every
from cordum.runtime.lease import Leases
from cordum.runtime.lifecycle import Lifecycle
from cordum.runtime.log import get_logger
from cordum.runtime.service import run_service
from cordum.store import keys
from cordum.store.jobs import JobStore
from cordum.store.workflows import WorkflowStore
from cordum.workflow.engine import SENDER, WorkflowEngine, WorkflowMetrics, skips_result
from cordum.workflow.loops import DelayPoller, RunReconciler

NAME = "cordum-workflow-engine"
STAGES = ("cancel context", "http drain")
log = get_logger("workflow.service")


def _positive_int(raw: str) -> int:
    value = int(raw)
    if value < 1:
        raise ValueError("expected a whole number >= 1")
    return value


async def serve(settings: Settings, lifecycle: Lifecycle, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    http_addr = env_value(settings, "WORKFLOW_ENGINE_HTTP_ADDR", ":9093", parse_listen_addr)
    scan = env_value(settings, "WORKFLOW_ENGINE_SCAN_INTERVAL", "5s", parse_duration)
    scan_limit = env_value(settings, "WORKFLOW_ENGINE_RUN_SCAN_LIMIT", "200", _positive_int)
    poll = env_value(settings, "WORKFLOW_ENGINE_DELAY_POLL_INTERVAL", "1s", parse_duration)

    metrics = Metrics(settings.instance_id)
    counters = ConsumerMetrics(metrics)
    leaders = LeaderMetrics(metrics)
    async with open_redis(settings) as redis, open_bus(settings, name=f"{NAME}/{settings.instance_id}") as bus:
        watch_redis_pool(metrics, redis)
        leases = Leases(redis, settings.instance_id)
        engine = WorkflowEngine(store=WorkflowStore(redis), jobs=JobStore(redis), bus=bus, leases=leases,
                                redis=redis, metrics=WorkflowMetrics(metrics))

        async def health() -> dict:
            await redis.ping()
            return {}

        http = HttpServer(probe_app(NAME, metrics, health), *http_addr)
        consumers = [
            PacketConsumer(bus, subjects.RESULT, engine.on_result, counters, queue=subjects.QUEUE_WORKFLOW_ENGINE,
                           skip=skips_result),
            PacketConsumer(bus, subjects.DLQ, engine.on_dlq, counters, queue=subjects.QUEUE_WORKFLOW_ENGINE),
        ]
        backlog = ConsumerBacklog(metrics, bus, [(c.subject, subjects.QUEUE_WORKFLOW_ENGINE) for c in consumers])

        async with trio.open_nursery() as nursery:
            await nursery.start(leases.keep_all)  # renews held run locks until the process ends
            await nursery.start(http.serve)
            await nursery.start(serve_registration, redis, NAME, settings.instance_id)
            for consumer in consumers:
                await nursery.start(consumer.run)
            background = trio.CancelScope()

            async def run_background(*, task_status=trio.TASK_STATUS_IGNORED) -> None:
                with background:
                    async with trio.open_nursery() as loops:
                        loops.start_soon(LeaderElection(leases, keys.WORKFLOW_RECONCILER_LEADER, 2 * scan,
                                                        metrics=leaders).run,
                                         every(scan, RunReconciler(engine, scan, scan_limit).tick, first_after=scan))
                        loops.start_soon(LeaderElection(leases, keys.WORKFLOW_DELAY_POLLER_LEADER, max(2 * poll, 2.0),
                                                        metrics=leaders).run,
                                         every(poll, DelayPoller(engine).tick))
                        loops.start_soon(refresh_forever, [backlog.refresh])
                        task_status.started()

            await nursery.start(run_background)
            hello = Handshake(component_id=settings.instance_id, role=COMPONENT_ROLE_ORCHESTRATOR,
                              supported_versions=[1], capabilities={"workflows": True})
            bus.publish_nowait(subjects.HANDSHAKE, encode(new_packet(hello, sender_id=settings.instance_id)))

            async def cancel_context() -> None:
                async with trio.open_nursery() as stopping:
                    for consumer in consumers:
                        stopping.start_soon(consumer.stop)
                background.cancel()

            lifecycle.on("cancel context", cancel_context)
            lifecycle.on("http drain", http.drain)
            log.info("workflow_engine.started", sender=SENDER, scan=scan, poll=poll)
            task_status.started()


def main() -> None:
    run_service(NAME, STAGES, serve)


if __name__ == "__main__":
    main()
