"""A service built only from the foundation: HTTP, gRPC, a bus tap and a held lease, with the
api-gateway's shutdown stages. Used to test the lifecycle of a real process.

env: DEMO_HTTP_PORT, DEMO_GRPC_PORT, DEMO_LEASE_KEY
"""

from __future__ import annotations

import os

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
from cordum.runtime.lifecycle import Lifecycle
from cordum.runtime.service import run_service

STAGES = ("bus taps", "http drain", "grpc drain", "close stores")


class SlowKernel:
    """Answers after sleeping for the number of seconds in label `sleep`."""

    async def Check(self, req: safety_pb2.PolicyCheckRequest) -> safety_pb2.PolicyCheckResponse:
        await trio.sleep(float(req.labels.get("sleep", "0")))
        return safety_pb2.PolicyCheckResponse(decision=safety_pb2.DECISION_TYPE_ALLOW, reason=f"checked {req.job_id}")

    Evaluate = Explain = Simulate = Check

    async def ListSnapshots(self, req: safety_pb2.ListSnapshotsRequest) -> safety_pb2.ListSnapshotsResponse:
        return safety_pb2.ListSnapshotsResponse(snapshots=["demo"])


async def serve(settings: Settings, lifecycle: Lifecycle, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    metrics = Metrics(settings.instance_id)
    app = make_app("demo", metrics)

    @app.get("/slow")
    async def slow() -> dict:
        await trio.sleep(float(request.args.get("seconds", "1")))
        return {"slept": True}

    http = HttpServer(app, "127.0.0.1", int(os.environ["DEMO_HTTP_PORT"]))
    grpc = GrpcServer([(safety_grpc.SafetyKernelBase, SlowKernel())])

    async def handle(packet, msg) -> None:
        pass

    async with open_redis(settings) as redis, open_bus(settings, name="demo") as bus:
        leases = Leases(redis, settings.instance_id)
        async with trio.open_nursery() as nursery:
            await nursery.start(http.serve)
            await nursery.start(grpc.serve, "127.0.0.1", int(os.environ["DEMO_GRPC_PORT"]))
            taps = trio.CancelScope()

            async def tap(*, task_status=trio.TASK_STATUS_IGNORED) -> None:
                with taps:
                    await serve_packets(bus, "sys.alert", handle, ConsumerMetrics(metrics), task_status=task_status)

            await nursery.start(tap)

            async def hold_lease(*, task_status=trio.TASK_STATUS_IGNORED) -> None:
                async with leases.hold(os.environ["DEMO_LEASE_KEY"], 5.0):
                    task_status.started()
                    await trio.sleep_forever()

            await nursery.start(hold_lease)

            async def stop_taps() -> None:
                taps.cancel()

            lifecycle.on("bus taps", stop_taps)
            lifecycle.on("http drain", http.drain)
            lifecycle.on("grpc drain", grpc.drain)
            lifecycle.on("close stores", bus.flush)
            task_status.started()


if __name__ == "__main__":
    run_service("demo-service", STAGES, serve)
