"""A real service process under SIGTERM: stages in order, in-flight calls finish, lease released."""

from __future__ import annotations

import json
import signal
import time
import urllib.request

import pytest
import trio

from cordum.agent.v1 import safety_grpc, safety_pb2
from cordum.dev.servers import free_port
from cordum.infra.grpc import open_grpc_client
from cordum.runtime.lease import Leases
from tests.conftest import unique
from tests.integration.test_multiprocess import _wait_for
from tests.procs.demo_service import STAGES


def _http_get(url: str) -> tuple[int, dict]:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.status, json.loads(response.read())


async def test_sigterm_drains_in_declared_order_and_releases_the_lease(spawn, redis):
    http_port, grpc_port, lease_key = free_port(), free_port(), unique("cordum:test:demo")
    proc = spawn("demo-1", ["-m", "tests.procs.demo_service"],
                 env={"DEMO_HTTP_PORT": str(http_port), "DEMO_GRPC_PORT": str(grpc_port), "DEMO_LEASE_KEY": lease_key})
    await _wait_for(lambda: any(e["event"] == "service.ready" for e in proc.events()), 15, "service ready")
    rival = Leases(redis, "rival")
    assert await rival.try_acquire(lease_key, 5) is None  # held by the service

    status, health = await trio.to_thread.run_sync(_http_get, f"http://127.0.0.1:{http_port}/health")
    assert status == 200 and health["instance"] == "demo-1"

    results: dict[str, object] = {}

    async def slow_http() -> None:
        results["http"] = await trio.to_thread.run_sync(_http_get, f"http://127.0.0.1:{http_port}/slow?seconds=2")

    async def slow_grpc() -> None:
        async with open_grpc_client(safety_grpc.SafetyKernelStub, "127.0.0.1", grpc_port) as client:
            request = safety_pb2.PolicyCheckRequest(job_id="in-flight", labels={"sleep": "2"})
            results["grpc"] = await client.call("Check", request, timeout=10)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(slow_http)
        nursery.start_soon(slow_grpc)
        await trio.sleep(0.5)  # both calls are in flight
        proc.signal(signal.SIGTERM)
        sent = time.monotonic()
        await trio.sleep(0.3)
        proc.signal(signal.SIGTERM)  # a second signal must not cut the drain short

    code = await trio.to_thread.run_sync(proc.wait, 15)
    elapsed = time.monotonic() - sent
    assert code == 0, proc.lines("err")[-20:]
    assert elapsed < 15
    assert results["http"] == (200, {"slept": True})
    assert results["grpc"].reason == "checked in-flight"

    events = proc.events()
    observed = [(e["event"], e["stage"]) for e in events if e["event"] in ("stage.begin", "stage.end")]
    assert observed == [(kind, stage) for stage in STAGES for kind in ("stage.begin", "stage.end")]
    assert any(e["event"] == "signal.ignored" for e in events)
    # Released on the way out: another process gets it at once, no TTL wait.
    assert await rival.try_acquire(lease_key, 5) is not None


def test_bad_environment_variable_stops_the_service_with_a_clear_error(spawn):
    proc = spawn("demo-bad", ["-m", "tests.procs.demo_service"], env={"REDIS_POOL_SIZE": "lots"})
    assert proc.wait(15) == 2
    err = "\n".join(proc.lines("err"))
    assert "REDIS_POOL_SIZE='lots' is invalid: expected an integer" in err
    assert "Traceback" not in err


async def test_grpc_drain_refuses_new_calls_and_finishes_in_flight_ones():
    from cordum.infra.grpc import GrpcServer, RpcError
    from tests.procs.demo_service import SlowKernel

    server = GrpcServer([(safety_grpc.SafetyKernelBase, SlowKernel())])
    async with trio.open_nursery() as nursery:
        port = await nursery.start(server.serve, "127.0.0.1", 0)
        async with open_grpc_client(safety_grpc.SafetyKernelStub, "127.0.0.1", port) as client:
            replies = []

            async def in_flight() -> None:
                replies.append(await client.call("Check", safety_pb2.PolicyCheckRequest(job_id="a", labels={"sleep": "1"})))

            nursery.start_soon(in_flight)
            await trio.sleep(0.2)
            drained = trio.Event()

            async def drain() -> None:
                await server.drain()
                drained.set()

            nursery.start_soon(drain)
            await trio.sleep(0.1)
            with pytest.raises(RpcError) as refused:
                await client.call("Check", safety_pb2.PolicyCheckRequest(job_id="b"), timeout=2)
            assert refused.value.code == "UNAVAILABLE"
            assert not drained.is_set()
            with trio.fail_after(3):
                await drained.wait()
            assert [r.reason for r in replies] == ["checked a"]


async def test_grpc_client_calls_are_bounded_by_deadlines():
    from cordum.infra.grpc import GrpcServer, RpcError
    from tests.procs.demo_service import SlowKernel

    server = GrpcServer([(safety_grpc.SafetyKernelBase, SlowKernel())])
    slow = safety_pb2.PolicyCheckRequest(labels={"sleep": "2"})
    async with trio.open_nursery() as nursery:
        port = await nursery.start(server.serve, "127.0.0.1", 0)
        async with open_grpc_client(safety_grpc.SafetyKernelStub, "127.0.0.1", port) as client:
            started = trio.current_time()
            with pytest.raises(RpcError) as late:
                await client.call("Check", slow, timeout=0.3)
            assert late.value.code == "DEADLINE_EXCEEDED"
            # Without timeout=, the caller's Trio deadline bounds the call (sent as grpc-timeout).
            with trio.move_on_after(0.3) as scope:
                try:
                    await client.call("Check", slow)
                except RpcError as exc:
                    assert exc.code == "DEADLINE_EXCEEDED"
            assert trio.current_time() - started < 1.5
            assert (await client.call("Check", safety_pb2.PolicyCheckRequest(job_id="ok"))).reason == "checked ok"
        nursery.cancel_scope.cancel()
