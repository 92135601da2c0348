"""A service built only from the foundation: HTTP, gRPC, a bus tap and a held lease, with the
api-gateway's shutdown stages. Used to test the lifecycle of a real process.

Each stage hook, and each resource on its way out, logs a `demo.*` event when its work is done,
so a test can check what every stage did and in which order, not only the lifecycle's own events.

env: DEMO_HTTP_PORT, DEMO_GRPC_PORT, DEMO_LEASE_KEY;
DEMO_HANG_CLOSE makes the last resource's close hang for a minute: `close_scope` (a close that
bounds itself with `close_scope`, as the infra adapters do) or `stuck` (a shielded close that
ignores the shutdown deadline, like a hung bridge close: only the watchdog can end it).
"""

from __future__ import annotations

import os
from contextlib import asynccontextmanager
from typing import AsyncIterator

import trio
from quart import request

from cordum.agent.v1 import safety_grpc, safety_pb2
from cordum.infra.bus import open_bus
from cordum.infra.config import Settings
from cordum.infra.grpc import GrpcServer
from cordum.infra.http import HttpServer, make_app
from cordum.infra.metrics import Metrics
from cordum.infra.redis import open_redis
from cordum.runtime.consumer import ConsumerMetrics, serve_packets
from cordum.runtime.lease import Leases
from cordum.runtime.lifecycle import Lifecycle, close_scope
from cordum.runtime.log import get_logger
from cordum.runtime.service import run_service

STAGES = ("bus taps", "http drain", "grpc drain", "close stores")
HANG_SECONDS = 60.0

log = get_logger("demo")


class SlowKernel:
    """Answers after sleeping for the number of seconds in label `sleep`."""

    async def Check(self, req: safety_pb2.PolicyCheckRequest) -> safety_pb2.PolicyCheckResponse:
        await trio.sleep(float(req.labels.get("sleep", "0")))
        log.info("demo.grpc_answered", job_id=req.job_id)
        return safety_pb2.PolicyCheckResponse(decision=safety_pb2.DECISION_TYPE_ALLOW, reason=f"checked {req.job_id}")

    Evaluate = Explain = Simulate = Check

    async def ListSnapshots(self, req: safety_pb2.ListSnapshotsRequest) -> safety_pb2.ListSnapshotsResponse:
        return safety_pb2.ListSnapshotsResponse(snapshots=["demo"])


@asynccontextmanager
async def last_resource(hang: str) -> AsyncIterator[None]:
    """Closed last, after the lease, the bus and Redis; with `hang`, its close hangs far longer
    than any shutdown timeout."""
    try:
        yield
    finally:
        log.info("demo.last_close", hang=hang)
        if hang == "close_scope":
            with close_scope(HANG_SECONDS):
                await trio.sleep(HANG_SECONDS)
        elif hang == "stuck":
            with trio.CancelScope(shield=True):
                await trio.sleep(HANG_SECONDS)


async def serve(settings: Settings, lifecycle: Lifecycle, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    metrics = Metrics(settings.instance_id)
    app = make_app("demo", metrics)

    @app.get("/slow")
    async def slow() -> dict:
        await trio.sleep(float(request.args.get("seconds", "1")))
        log.info("demo.http_answered")
        return {"slept": True}

    http = HttpServer(app, "127.0.0.1", int(os.environ["DEMO_HTTP_PORT"]))
    grpc = GrpcServer([(safety_grpc.SafetyKernelBase, SlowKernel())])

    async def handle(packet, msg) -> None:
        pass

    hang = os.environ.get("DEMO_HANG_CLOSE", "")
    async with last_resource(hang), open_redis(settings) as redis, open_bus(settings, name="demo") as bus:
        leases = Leases(redis, settings.instance_id)
        async with trio.open_nursery() as nursery:
            await nursery.start(http.serve)
            await nursery.start(grpc.serve, "127.0.0.1", int(os.environ["DEMO_GRPC_PORT"]))
            taps = trio.CancelScope()
            taps_done = trio.Event()

            async def tap(*, task_status=trio.TASK_STATUS_IGNORED) -> None:
                try:
                    with taps:
                        await serve_packets(bus, "sys.alert", handle, ConsumerMetrics(metrics), task_status=task_status)
                finally:
                    taps_done.set()

            await nursery.start(tap)

            async def hold_lease(*, task_status=trio.TASK_STATUS_IGNORED) -> None:
                try:
                    async with leases.hold(os.environ["DEMO_LEASE_KEY"], 5.0):
                        task_status.started()
                        await trio.sleep_forever()
                finally:
                    log.info("demo.lease_released")

            await nursery.start(hold_lease)

            async def stop_taps() -> None:
                taps.cancel()
                await taps_done.wait()
                log.info("demo.taps_stopped")

            async def drain_http() -> None:
                await http.drain()
                log.info("demo.http_drained")

            async def drain_grpc() -> None:
                await grpc.drain()
                log.info("demo.grpc_drained")

            async def flush_bus() -> None:
                await bus.flush()
                log.info("demo.bus_flushed")

            lifecycle.on("bus taps", stop_taps)
            lifecycle.on("http drain", drain_http)
            lifecycle.on("grpc drain", drain_grpc)
            lifecycle.on("close stores", flush_bus)
            task_status.started()


if __name__ == "__main__":
    run_service("demo-service", STAGES, serve)
