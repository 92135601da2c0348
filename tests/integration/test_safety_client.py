"""The safety client against real gRPC kernels: replica failover and the shared circuit breaker."""

from __future__ import annotations

import trio

from cordum.agent.v1 import safety_grpc, safety_pb2
from cordum.dev.servers import free_port
from cordum.infra.grpc import GrpcServer
from cordum.v1 import policy_batch_grpc, policy_batch_pb2
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


# ---- coalesced checks (cordum.v1.PolicyBatch) ------------------------------------------------------

BATCH_POLICY = """\
version: "v1"
default_decision: deny
rules:
  - id: allow-default
    match: {topics: ["job.default"]}
    decision: allow
  - id: deploys-need-approval
    match: {topics: ["job.deploy"]}
    decision: require_approval
"""


def _real_kernel_servers(broken_job: str = "") -> tuple[object, object]:
    """The kernel's own gRPC services on a real policy; Check fails for job `broken_job`."""
    from cordum.infra.metrics import Metrics
    from cordum.safety.kernel import Kernel
    from cordum.safety.policy import parse_policy
    from cordum.safety.service import KernelMetrics, PolicyBatchService, SafetyKernelService

    kernel = Kernel()
    kernel.install(parse_policy(BATCH_POLICY))
    service = SafetyKernelService(kernel, None, KernelMetrics(Metrics(unique("t"))))  # type: ignore[arg-type]
    if broken_job:
        check = service.Check

        def flaky(request: safety_pb2.PolicyCheckRequest) -> safety_pb2.PolicyCheckResponse:
            if request.job_id == broken_job:
                raise RuntimeError("evaluation blew up")
            return check(request)

        service.Check = flaky  # type: ignore[method-assign]
    return service, PolicyBatchService(service)


def _requests(count: int) -> list[safety_pb2.PolicyCheckRequest]:
    topics = ("job.default", "job.deploy", "job.other")
    return [safety_pb2.PolicyCheckRequest(job_id=f"j{i}", topic=topics[i % 3], tenant="default") for i in range(count)]


EXPECTED = {"job.default": Verdict.ALLOW, "job.deploy": Verdict.REQUIRE_APPROVAL, "job.other": Verdict.DENY}


async def _check_all(client, requests, method="Check"):
    answers: dict[str, object] = {}

    async def one(request):
        answers[request.job_id] = await client.check(request, method=method)

    async with trio.open_nursery() as nursery:
        for request in requests:
            nursery.start_soon(one, request)
    return answers


async def test_concurrent_checks_go_to_the_kernel_in_batches_each_answered_as_alone(redis):
    """Checks asked for together travel as PolicyBatch calls; each caller gets the decision its
    own request gets from a plain call (verdict, rule, reason), none mixed up with another's."""
    service, batch = _real_kernel_servers()
    server = GrpcServer([(safety_grpc.SafetyKernelBase, service), (policy_batch_grpc.PolicyBatchBase, batch)])
    requests = _requests(90)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(server.serve, "127.0.0.1", 0)
        breaker = CircuitBreaker(redis, unique("cordum:test:cb"))
        async with open_safety_client([("127.0.0.1", port)], breaker, batch=False) as plain:
            alone = {r.job_id: await plain.check(r, method="Evaluate") for r in requests}
        async with open_safety_client([("127.0.0.1", port)], breaker) as client:
            together = await _check_all(client, requests, method="Evaluate")
            assert client.batches_sent >= 1 and client.checks_batched > client.batches_sent  # really batched
        for request in requests:
            got, want = together[request.job_id], alone[request.job_id]
            assert got.verdict is EXPECTED[request.topic] is want.verdict
            assert (got.rule_id, got.reason, got.response.policy_snapshot) == (want.rule_id, want.reason, want.response.policy_snapshot)
        nursery.cancel_scope.cancel()


async def test_one_failing_check_in_a_batch_fails_alone(redis):
    service, batch = _real_kernel_servers(broken_job="j4")
    server = GrpcServer([(safety_grpc.SafetyKernelBase, service), (policy_batch_grpc.PolicyBatchBase, batch)])
    async with trio.open_nursery() as nursery:
        port = await nursery.start(server.serve, "127.0.0.1", 0)
        key = unique("cordum:test:cb")
        async with open_safety_client([("127.0.0.1", port)], CircuitBreaker(redis, key, threshold=3)) as client:
            answers = await _check_all(client, _requests(12))
            assert client.checks_batched >= 2
        assert answers["j4"].verdict is Verdict.UNAVAILABLE  # the caller's fail mode decides
        assert all(a.verdict is EXPECTED[r.topic] for r in _requests(12) if r.job_id != "j4" for a in [answers[r.job_id]])
        assert int(await redis.get(key)) == 1  # one failure counted, not one per batch member
        nursery.cancel_scope.cancel()


async def test_a_kernel_without_batches_gets_one_call_per_check(redis):
    """Cordum's own kernel (or an older one) has no PolicyBatch: UNIMPLEMENTED, then plain calls."""
    service, _ = _real_kernel_servers()
    server = GrpcServer([(safety_grpc.SafetyKernelBase, service)])
    requests = _requests(30)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(server.serve, "127.0.0.1", 0)
        key = unique("cordum:test:cb")
        async with open_safety_client([("127.0.0.1", port)], CircuitBreaker(redis, key)) as client:
            answers = await _check_all(client, requests)
            answers.update(await _check_all(client, _requests(30)))  # stays unbatched, no second probe
            assert client.batches_sent == 0
        assert all(answers[r.job_id].verdict is EXPECTED[r.topic] for r in requests)
        assert await redis.get(key) is None  # UNIMPLEMENTED is not a kernel failure
        nursery.cancel_scope.cancel()


async def test_checks_waiting_for_a_batch_are_answered_when_the_client_closes(redis):
    """Closing the client (shutdown) while checks are queued or in flight leaves no caller
    waiting for a batch that will never be answered: each gets a decision of its own."""
    server = GrpcServer([(safety_grpc.SafetyKernelBase, SlowKernel()),
                         (policy_batch_grpc.PolicyBatchBase, _SlowBatches())])
    slow = [safety_pb2.PolicyCheckRequest(job_id=f"s{i}", topic="job.default", labels={"sleep": "0.3"}) for i in range(6)]
    answers: list[Verdict] = []
    async with trio.open_nursery() as nursery:
        port = await nursery.start(server.serve, "127.0.0.1", 0)
        with trio.fail_after(10):
            async with trio.open_nursery() as callers:
                async with open_safety_client([("127.0.0.1", port)], CircuitBreaker(redis, unique("cordum:test:cb"))) as client:
                    async def one(request):
                        answers.append((await client.check(request)).verdict)

                    for request in slow[:2]:  # two batches in flight: every slot taken
                        callers.start_soon(one, request)
                        await trio.sleep(0.05)
                    for request in slow[2:]:
                        callers.start_soon(one, request)
                    await trio.sleep(0.05)
                    assert len(client._queue) == 4  # noqa: SLF001 - waiting for a slot
        nursery.cancel_scope.cancel()
    assert len(answers) == len(slow)
    assert set(answers) <= {Verdict.ALLOW, Verdict.UNAVAILABLE}  # sent again over a closed channel


class _SlowBatches:
    async def CheckBatch(self, request):
        await trio.sleep(float(request.requests[0].labels.get("sleep", "0")))
        return policy_batch_pb2.PolicyCheckBatchResponse(items=[
            policy_batch_pb2.PolicyCheckBatchItem(response=safety_pb2.PolicyCheckResponse(
                decision=safety_pb2.DECISION_TYPE_ALLOW, reason=f"checked {r.job_id}")) for r in request.requests])
