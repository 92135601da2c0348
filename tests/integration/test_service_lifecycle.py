"""A real service process under SIGTERM: stages in order, each doing its work inside its stage,
in-flight calls finish, lease released after the last stage; a close that hangs cannot carry the
shutdown past CORDUM_SHUTDOWN_TIMEOUT (exit code 1)."""

from __future__ import annotations

import json
import signal
import subprocess
import time
import urllib.request

import pytest
import trio

from cordum.agent.v1 import safety_grpc, safety_pb2
from cordum.dev.servers import free_port
from cordum.infra.grpc import open_grpc_client
from cordum.runtime.lease import Leases
from cordum.runtime.service import WATCHDOG_MARGIN
from tests.conftest import unique
from tests.integration.test_multiprocess import _wait_for
from tests.procs.demo_service import HANG_SECONDS, STAGES

# What each demo stage logs once its work is done (tests/procs/demo_service.py).
STAGE_DONE = {"bus taps": "demo.taps_stopped", "http drain": "demo.http_drained",
              "grpc drain": "demo.grpc_drained", "close stores": "demo.bus_flushed"}


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
    _assert_stages_did_their_work(events)
    # Released on the way out: another process gets it at once, no TTL wait.
    assert await rival.try_acquire(lease_key, 5) is not None


def _at(events: list[dict], event: str, stage: str | None = None) -> int:
    """The position of the one log line `event` (of `stage`)."""
    found = [i for i, e in enumerate(events) if e["event"] == event and (stage is None or e.get("stage") == stage)]
    assert len(found) == 1, (event, stage, found)
    return found[0]


def _assert_stages_did_their_work(events: list[dict]) -> None:
    # Each stage's work is done inside that stage, not before it and not left for later.
    for stage, done in STAGE_DONE.items():
        assert _at(events, "stage.begin", stage) < _at(events, done) < _at(events, "stage.end", stage), stage
    # The drains waited for the calls in flight.
    assert _at(events, "demo.http_answered") < _at(events, "demo.http_drained")
    assert _at(events, "demo.grpc_answered") < _at(events, "demo.grpc_drained")
    # Leases and clients are released after the last stage, then the process stops.
    last = _at(events, "stage.end", STAGES[-1])
    assert last < _at(events, "demo.lease_released") < _at(events, "demo.last_close") < _at(events, "service.stopped")
    assert not any(e["event"] == "shutdown.deadline_exceeded" for e in events)


@pytest.mark.parametrize("hang", ["close_scope", "stuck"])
async def test_a_hanging_close_cannot_carry_the_shutdown_past_its_deadline(spawn, redis, hang):
    """`close_scope`: the close ends at the deadline and the process exits normally with code 1.
    `stuck` (a shielded close ignoring the deadline): the watchdog ends the process with code 1."""
    timeout = 3.0
    http_port, grpc_port, lease_key = free_port(), free_port(), unique("cordum:test:demo")
    proc = spawn(f"demo-hang-{hang}", ["-m", "tests.procs.demo_service"],
                 env={"DEMO_HTTP_PORT": str(http_port), "DEMO_GRPC_PORT": str(grpc_port), "DEMO_LEASE_KEY": lease_key,
                      "DEMO_HANG_CLOSE": hang, "CORDUM_SHUTDOWN_TIMEOUT": f"{timeout:g}s"})
    await _wait_for(lambda: any(e["event"] == "service.ready" for e in proc.events()), 15, "service ready")
    proc.signal(signal.SIGTERM)
    # A generous bound for a loaded machine, far below the minute the close would hang.
    limit = timeout + WATCHDOG_MARGIN + 3
    try:
        code = await trio.to_thread.run_sync(proc.wait, limit)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running {limit:g} s after SIGTERM (its close hangs for {HANG_SECONDS:g} s)")
    assert code == 1, proc.lines("err")[-20:]

    events = proc.events()
    assert _at(events, "stage.end", STAGES[-1]) < _at(events, "demo.lease_released") < _at(events, "demo.last_close")
    overruns = [e for e in events if e["event"] == "shutdown.deadline_exceeded"]
    if hang == "close_scope":
        # Cut at the deadline by close_scope: the service itself notices the overrun.
        assert [e["phase"] for e in overruns] == ["closes"]
        assert events[-1]["event"] == "service.stopped" and events[-1]["exit_code"] == 1
    else:
        # Nothing inside Trio can end a shielded close that ignores the deadline: the watchdog does.
        assert [e["phase"] for e in overruns] == ["watchdog"]
        assert overruns[0]["exit_code"] == 1
        assert not any(e["event"] == "service.stopped" for e in events)


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
