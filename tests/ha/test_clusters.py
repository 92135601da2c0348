"""The job path on clusters (the guide's production prerequisites):

- a 3-node NATS cluster with JetStream replicas 3: jobs keep flowing, and none is lost or run
  twice, when the node leading the job streams is SIGKILLed mid-stream;
- a Redis Cluster of 3 primaries and 3 replicas (the session's): kernel, scheduler and worker
  run the job path on it without a single CROSSSLOT error.
"""

from __future__ import annotations

import signal
import uuid

import pytest
import trio

from cordum.agent.v1.job_pb2 import JobRequest
from cordum.dev.servers import NatsCluster, start_nats_cluster
from cordum.infra.aio import aio
from cordum.protocol import subjects
from cordum.protocol.packets import decode, encode, new_packet
from cordum.runtime.instances import list_instances
from cordum.store.jobs import JobStore
from cordum.store.jobstate import JobState
from cordum.worker.echo import read_executions
from tests.conftest import crossslot_errors, unique
from tests.integration.stack import EXECUTIONS_KEY, Stack, nats_server, submit_direct, wait_state  # noqa: F401


@pytest.fixture
def nats_cluster(tmp_path) -> NatsCluster:
    """A cluster of its own per test: the test kills one of its nodes."""
    cluster = start_nats_cluster(tmp_path / "nats-cluster", nodes=3)
    yield cluster
    cluster.stop()


@pytest.fixture
def server_env(request, redis_server):
    """The session's redis-server (or, for a test asking for `redis_cluster`, the session's Redis
    Cluster) and a NATS of the test's own: the 3-node cluster for a test asking for
    `nats_cluster` (with NATS_JS_REPLICAS=3), else one node."""
    env = {"REDIS_URL": redis_server.url, "REDIS_MIN_IDLE_CONNS": "1"}
    if "nats_cluster" in request.fixturenames:
        env |= {"NATS_URL": request.getfixturevalue("nats_cluster").url, "NATS_JS_REPLICAS": "3"}
    else:
        env["NATS_URL"] = request.getfixturevalue("nats_server").url  # its own (stack.py)
    if "redis_cluster" in request.fixturenames:
        env["REDIS_CLUSTER_ADDRESSES"] = request.getfixturevalue("redis_cluster").seeds
    return env


async def _job_path(spawn, tmp_path, **env: str) -> Stack:
    stack = Stack.create(spawn, tmp_path, **env)
    stack.kernel()
    stack.scheduler()
    stack.worker(WORKER_MAX_PARALLEL="16")
    await stack.ready(timeout=60)
    return stack


class Results:
    """The jobs whose results reached the bus: a sign that jobs flow end to end."""

    def __init__(self) -> None:
        self.stored: set[str] = set()

    async def watch(self, messages) -> None:
        async for msg in messages:
            self.stored.add(decode(msg.data).job_result.job_id)
            await msg.ack()


async def _submit_until_published(store: JobStore, bus, jobs: list[str]) -> None:
    """What the gateway does (persist PENDING, publish with a msg id), retrying the publish with
    the same msg id while JetStream elects a new leader (the stream deduplicates)."""
    job_id = str(uuid.uuid4())
    request = JobRequest(job_id=job_id, topic="job.default", tenant_id="default",
                         context_ptr=f"redis://ctx:{job_id}")
    await store.create(job_id, JobState.PENDING, request=request,
                       fields={"topic": "job.default", "tenant": "default", "trace_id": job_id},
                       context={"prompt": "cluster"})
    jobs.append(job_id)
    data = encode(new_packet(request, sender_id="test", trace_id=job_id))
    with trio.fail_after(60):
        while True:
            try:
                await bus.publish(subjects.SUBMIT, data, msg_id=f"jobreq:{job_id}")
                return
            except Exception:  # no JetStream leader / reconnecting: same msg id again
                await trio.sleep(0.2)


async def _stream_leader(bus, stream: str) -> str:
    info = await aio(bus._js.stream_info)(stream)
    assert info.config.num_replicas == 3, info.config
    return info.cluster.leader


async def test_job_path_survives_killing_a_nats_node(spawn, tmp_path, nats_cluster, redis, bus):
    # A job in flight may wait out the election and a client reconnect (a few seconds): the
    # stack's 3 s dispatch/running timeouts would turn that delay into a TIMEOUT.
    stack = await _job_path(spawn, tmp_path, SCHEDULER_DISPATCH_TIMEOUT="60s", SCHEDULER_RUNNING_TIMEOUT="60s")
    store = JobStore(redis)
    results, jobs = Results(), []
    jobs_stream = subjects.stream_for(subjects.SUBMIT)
    async with bus.consume(subjects.RESULT, unique("results")) as messages, trio.open_nursery() as nursery:
        nursery.start_soon(results.watch, messages)

        async def produce(stop: trio.Event) -> None:
            while not stop.is_set():
                await _submit_until_published(store, bus, jobs)
                await trio.sleep(0.05)

        stop = trio.Event()
        nursery.start_soon(produce, stop)
        with trio.fail_after(60):
            while len(results.stored) < 10:  # jobs are flowing end to end
                await trio.sleep(0.1)
        # SIGKILL the node leading the stream of submissions: the stream must elect a new leader.
        leader = await _stream_leader(bus, jobs_stream)
        victim = next(n for i, n in enumerate(nats_cluster.nodes) if f"{nats_cluster.name}-{i}" == leader)
        victim.proc.send_signal(signal.SIGKILL)
        victim.proc.wait()
        sent_before, killed_at = len(jobs), trio.current_time()
        # keep submitting through the election and the clients' reconnects, and after them
        with trio.fail_after(90):
            while len(jobs) < sent_before + 20:
                await trio.sleep(0.1)
        stop.set()
        stopped_at = trio.current_time()
        for job_id in list(jobs):
            await wait_state(store, job_id, {"SUCCEEDED"}, timeout=90)
        print(f"{len(jobs)} jobs ({sent_before} before the kill of {leader}, the next 20 in "
              f"{stopped_at - killed_at:.1f}s); all SUCCEEDED {trio.current_time() - stopped_at:.1f}s later")
        # Each job ran exactly once, counted by the worker (a result repeated on the bus after a
        # failover would not show a second run, and a second run need not show on the bus).
        executions = await read_executions(redis, EXECUTIONS_KEY, jobs)
        assert all(n == 1 for n in executions.values()), {j: n for j, n in executions.items() if n != 1}
        new_leader = await _stream_leader(bus, jobs_stream)
        nursery.cancel_scope.cancel()
    assert new_leader != leader
    assert len(jobs) >= sent_before + 20 and sent_before >= 10, (sent_before, len(jobs))
    for name, proc in stack.procs.items():
        assert proc.popen.poll() is None, (name, proc.lines("err")[-10:])  # the services rode it out


def _submit_http(port: int, api_key: str, n: int) -> str:
    import json
    import urllib.request

    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/api/v1/jobs", method="POST",
        data=json.dumps({"prompt": f"cluster {n}", "context": {"n": n}, "idempotency_key": f"cluster-{n}"}).encode(),
        headers={"X-API-Key": api_key, "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())["job_id"]


async def test_job_path_on_a_redis_cluster(spawn, tmp_path, redis_cluster, redis, bus):
    """Every process on REDIS_CLUSTER_ADDRESSES: jobs submitted through the gateway (rate limiter,
    idempotency, job store) and directly succeed; replicas are listed by a SCAN over all primaries."""
    assert redis.cluster
    api_key = "cluster-test-admin-key-0123456789abcdef"
    before = crossslot_errors(redis_cluster)
    stack = await _job_path(spawn, tmp_path, CORDUM_API_KEY=api_key, CORDUM_ENV="dev")
    stack.start("gateway-1", "cordum.gateway.service")
    await stack.ready("gateway-1", timeout=60)
    store = JobStore(redis)
    jobs = [await submit_direct(store, bus) for _ in range(8)]
    port = stack.http_ports["gateway-1"]
    jobs += [await trio.to_thread.run_sync(_submit_http, port, api_key, n) for n in range(8)]
    assert await trio.to_thread.run_sync(_submit_http, port, api_key, 0) == jobs[8]  # idempotent replay
    for job_id in jobs:
        meta = await wait_state(store, job_id, {"SUCCEEDED"}, timeout=60)
        assert meta["state"] == "SUCCEEDED"
    registered = await list_instances(redis)  # SCAN over every primary finds each replica
    assert {"safety-1", "scheduler-1", "gateway-1"} <= {e["id"] for group in registered.values() for e in group}
    assert crossslot_errors(redis_cluster) == before
    for name, proc in stack.procs.items():
        errors = [e for e in proc.events() if "CROSSSLOT" in str(e) or "same slot" in str(e)]
        assert not errors, (name, errors[:3])
