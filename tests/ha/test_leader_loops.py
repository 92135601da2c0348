"""The scheduler's leader-elected loops with three replicas: one at a time, fast failover, and a
paused leader that wakes up after its lease expired does nothing its successor already did."""

from __future__ import annotations

import signal
import time

import trio

from cordum.agent.v1.job_pb2 import JobRequest
from cordum.protocol.packets import decode
from cordum.store import keys
from cordum.store.jobs import JobStore
from cordum.store.jobstate import JobState
from tests.conftest import unique
from tests.integration.stack import Stack, nats_server, redis_server, wait_state  # noqa: F401
from tests.integration.test_multiprocess import _wait_for

SCAN = 0.5  # reconciler and replayer leases live 2 × SCAN = 1 s
LOOPS = (keys.RECONCILER_LEADER, keys.REPLAYER_LEADER, keys.SNAPSHOT_WRITER_LEADER)


def _elections(proc, key: str) -> list[dict]:
    return [e for e in proc.events() if e.get("event") == "leader.elected" and e.get("key") == key]


async def _holder(redis, key: str) -> str | None:
    value = await redis.get(key)
    return value.split("/")[0] if value else None


async def _three_schedulers(spawn, tmp_path, **env):
    stack = Stack.create(spawn, tmp_path, SCHEDULER_SCAN_INTERVAL=f"{SCAN}s", **env)
    stack.kernel()
    names = [f"scheduler-{n}" for n in (1, 2, 3)]
    for name in names:
        stack.scheduler(name)
    await stack.ready()
    return stack, names


async def test_one_leader_per_loop_and_failover_within_a_ttl(spawn, tmp_path, redis):
    stack, names = await _three_schedulers(spawn, tmp_path)
    await trio.sleep(2.0)
    for key in LOOPS:
        holder = await _holder(redis, key)
        assert holder in names, (key, holder)
        elected = {name: len(_elections(stack.procs[name], key)) for name in names}
        assert elected == {name: int(name == holder) for name in names}, (key, elected)  # no flapping

    leader = await _holder(redis, keys.RECONCILER_LEADER)
    first_fence = _elections(stack.procs[leader], keys.RECONCILER_LEADER)[0]["fence"]
    stack.procs[leader].signal(signal.SIGKILL)
    killed_at = time.time()
    successors = [n for n in names if n != leader]
    elected = await _wait_for(
        lambda: [e for n in successors for e in _elections(stack.procs[n], keys.RECONCILER_LEADER)],
        2 * SCAN + 3, "a new reconciler leader")
    assert len(elected) == 1 and elected[0]["fence"] > first_fence
    # within one TTL (2 × SCAN) plus the candidates' poll, with room for a loaded machine
    assert elected[0]["ts"] - killed_at <= 2 * SCAN + 1.5


async def test_a_paused_leader_does_nothing_its_successor_already_did(spawn, tmp_path, redis, bus):
    stack, names = await _three_schedulers(spawn, tmp_path, SCHEDULER_RUNNING_TIMEOUT="2s")
    store = JobStore(redis)
    await trio.sleep(1.5)
    async with bus.consume("sys.job.dlq", unique("dlq-watch")) as dlq_events:
        # A job that is RUNNING on a worker that will never answer.
        job_id = unique("job")
        await store.create(job_id, JobState.PENDING, request=JobRequest(job_id=job_id, topic="job.default"),
                           fields={"topic": "job.default", "tenant": "default", "trace_id": job_id})
        for state in (JobState.SCHEDULED, JobState.DISPATCHED, JobState.RUNNING):
            await store.transition(job_id, state)
        leader = await _holder(redis, keys.RECONCILER_LEADER)
        paused = stack.procs[leader]
        paused.signal(signal.SIGSTOP)  # before the job is due: only a successor can time it out
        try:
            await wait_state(store, job_id, {"TIMEOUT"}, timeout=45)
            successor = await _holder(redis, keys.RECONCILER_LEADER)
            assert successor not in (None, leader)
        finally:
            paused.signal(signal.SIGCONT)
        await trio.sleep(2 * SCAN + 1.0)  # the woken leader has had every chance to act

        timed_out_by = [n for n in names
                        if any(e.get("event") == "reconciler.timed_out" and e.get("job_id") == job_id
                               for e in stack.procs[n].events())]
        assert timed_out_by == [successor]
        assert [e["state"] for e in await store.events(job_id)].count("TIMEOUT") == 1
        dlq = []
        with trio.move_on_after(1.0):
            async for msg in dlq_events:
                await msg.ack()
                if decode(msg.data).job_result.job_id == job_id:
                    dlq.append(msg)
        assert len(dlq) == 1
        woke = [e["event"] for e in paused.events() if e.get("key") == keys.RECONCILER_LEADER]
        assert {"leader.stepped_down", "leader.lease_expired_while_idle"} & set(woke), woke
        assert await _holder(redis, keys.RECONCILER_LEADER) == successor  # it did not take the lease back
