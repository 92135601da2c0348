"""The safety client against real gRPC kernels: replica failover and the shared circuit breaker."""

from __future__ import annotations

import trio

from cordum.agent.v1 import safety_grpc, safety_pb2
from cordum.dev.servers import free_port
from cordum.infra.grpc import GrpcServer
from cordum.safety.client import HEALTHY_LOOK_S, CircuitBreaker, Verdict, open_safety_client, parse_kernel_addrs
from tests.conftest import unique
from tests.procs.demo_service import SlowKernel


def test_kernel_addresses():
    assert parse_kernel_addrs(":50051") == [("127.0.0.1", 50051)]
    assert parse_kernel_addrs("k1:1, k2:2") == [("k1", 1), ("k2", 2)]


async def test_a_draining_replica_is_skipped_and_an_outage_opens_the_shared_breaker(redis):
    servers = [GrpcServer([(safety_grpc.SafetyKernelBase, SlowKernel())]) for _ in range(2)]
    request = safety_pb2.PolicyCheckRequest(job_id="j", topic="job.default")
    async with trio.open_nursery() as nursery:
        ports = [await nursery.start(s.serve, "127.0.0.1", 0) for s in servers]
        key = unique("cordum:test:cb")
        breaker = CircuitBreaker(redis, key, threshold=3, open_for=30)
        async with open_safety_client([("127.0.0.1", p) for p in ports], breaker, timeout=2) as client:
            assert (await client.check(request)).verdict is Verdict.ALLOW
            await servers[0].drain()  # replica 1 goes away: every check still gets an answer
            for _ in range(4):
                assert (await client.check(request)).verdict is Verdict.ALLOW
            assert await redis.get(key) is None

        dead = [("127.0.0.1", free_port())]
        async with open_safety_client(dead, breaker, timeout=1) as client:
            for _ in range(3):
                assert (await client.check(request)).verdict is Verdict.UNAVAILABLE
            assert int(await redis.get(key)) == 3
        # Another replica's client sharing the breaker does not even try while it is open.
        other = CircuitBreaker(redis, key, threshold=3, open_for=30)
        async with open_safety_client([("127.0.0.1", ports[1])], other) as client:
            decision = await client.check(request)
            assert decision.verdict is Verdict.UNAVAILABLE and decision.reason == "safety kernel circuit open"
            await redis.delete(key)  # the window passes (or an operator resets it)
            assert (await client.check(request)).verdict is Verdict.ALLOW
        nursery.cancel_scope.cancel()


async def test_a_healthy_look_at_the_shared_breaker_stands_briefly(redis):
    key = unique("cordum:test:cb")
    breaker = CircuitBreaker(redis, key, threshold=3, open_for=30)
    assert not await breaker.is_open()
    await redis.set(key, 3)  # other replicas counted failures meanwhile
    assert not await breaker.is_open()  # within HEALTHY_LOOK_S: no round trip, still closed
    await trio.sleep(HEALTHY_LOOK_S + 0.05)
    assert await breaker.is_open()  # the next look sees them
    await redis.delete(key)
    assert not await breaker.is_open()  # once failures were seen, every check looks
    await redis.set(key, 3)
    await breaker.record_failure()  # a failure of our own: the next check looks again
    assert await breaker.is_open()


class FrozenKernel(SlowKernel):
    """A kernel replica that takes the call and never answers in time (SIGSTOP, overload)."""

    async def Check(self, req: safety_pb2.PolicyCheckRequest) -> safety_pb2.PolicyCheckResponse:
        await trio.sleep(30)
        return await super().Check(req)


async def test_a_frozen_replica_is_passed_over_and_opens_no_breaker(redis):
    """A kernel that stops answering costs one timeout, not the shared breaker: the call goes on
    to the next replica, and the frozen one is tried last for a while."""
    servers = [GrpcServer([(safety_grpc.SafetyKernelBase, FrozenKernel())]),
               GrpcServer([(safety_grpc.SafetyKernelBase, SlowKernel())])]
    request = safety_pb2.PolicyCheckRequest(job_id="j", topic="job.default")
    async with trio.open_nursery() as nursery:
        ports = [await nursery.start(s.serve, "127.0.0.1", 0) for s in servers]
        key = unique("cordum:test:cb")
        breaker = CircuitBreaker(redis, key, threshold=3, open_for=30)
        async with open_safety_client([("127.0.0.1", p) for p in ports], breaker, timeout=0.5) as client:
            for _ in range(6):
                assert (await client.check(request)).verdict is Verdict.ALLOW
            assert await redis.get(key) is None
        async with open_safety_client([("127.0.0.1", ports[0])], breaker, timeout=0.5) as client:
            assert (await client.check(request)).verdict is Verdict.UNAVAILABLE  # no replica answered
            assert int(await redis.get(key)) == 1
        nursery.cancel_scope.cancel()
