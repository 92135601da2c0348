"""A worker's plain success applied in one script, without taking the job's lock
(`JobStore.transition(unlocked=...)`, `Engine._apply_plain_success`), against one real
redis-server: it writes only what a lock holder would have, and nothing at all whenever the
locked path has something to decide."""

from __future__ import annotations

import pytest

from types import SimpleNamespace

from cordum.agent.v1.buspacket_pb2 import BusPacket
from cordum.agent.v1.job_pb2 import JobRequest, JobResult, JobStatus
from cordum.infra.metrics import Metrics
from cordum.runtime.lease import Leases
from cordum.scheduler.dispatches import Dispatched, RecentDispatches
from cordum.protocol import subjects
from cordum.scheduler.engine import Engine, EngineConfig, SchedulerMetrics, _plain_success_of
from cordum.scheduler.registry import WorkerRegistry
from cordum.store import keys
from cordum.store.jobs import JobStore, LockHeld, StaleFence, now_us
from cordum.store.jobstate import JobState
from cordum.store.output import CHECK_FIELD, DUE
from tests.conftest import unique


async def _dispatched(store: JobStore, leases: Leases, worker: str = "w1", **fields) -> tuple[str, int]:
    """A job RUNNING on `worker` as the scheduler leaves it (locked writes), and its attempt."""
    job_id = unique("job")
    await store.create(job_id, JobState.PENDING, request=JobRequest(job_id=job_id, topic="job.default"),
                       fields={"tenant": "t", "topic": "job.default"})
    async with leases.hold(keys.job_lock(job_id), 5) as lease:
        moved = await store.transition(job_id, JobState.DISPATCHED, fence=lease.fence, tenant="t",
                                       fields={"worker_id": worker, **fields},
                                       after=store.inflight_commands(worker, job_id, done=False))
        await store.transition(job_id, JobState.RUNNING, fence=lease.fence, tenant="t")
    return job_id, moved.attempts


def _engine(store: JobStore, leases: Leases, metrics: Metrics | None = None) -> Engine:
    metrics = metrics or Metrics("sched-test")
    return Engine(store=store, bus=None, leases=leases, safety=None, registry=WorkerRegistry(),  # type: ignore[arg-type]
                  pools=lambda: None, metrics=SchedulerMetrics(metrics), config=EngineConfig())  # type: ignore[arg-type]


def _success(job_id: str, worker: str = "w1") -> JobResult:
    return JobResult(job_id=job_id, status=JobStatus.JOB_STATUS_SUCCEEDED, worker_id=worker,
                     result_ptr=f"redis://res:{job_id}", execution_ms=7)


async def test_an_unlocked_move_takes_the_next_fence_and_makes_older_holders_stale(redis):
    store, leases = JobStore(redis), Leases(redis, "holder")
    job_id, _ = await _dispatched(store, leases)
    lock = keys.job_lock(job_id)
    before = int(await redis.get(keys.fence_counter(lock)))
    await store.transition(job_id, JobState.SUCCEEDED, tenant="t", unlocked=lock)
    meta = await store.get(job_id)
    assert meta["state"] == "SUCCEEDED"
    assert int(await redis.get(keys.fence_counter(lock))) == before + 1
    assert await redis.execute("HGET", keys.job_meta(job_id), "_fence") == str(before + 1)
    assert 0 < await redis.execute("PTTL", keys.fence_counter(lock)) <= keys.FENCE_TTL_MS
    # A holder granted the lock before (paused past its lease) writes with an older fence: refused.
    with pytest.raises(StaleFence):
        await store.set_fields(job_id, {"note": "late"}, fence=before)
    # The indexes moved as with any transition.
    assert await redis.execute("ZSCORE", keys.job_index("succeeded"), job_id) is not None
    assert await redis.execute("ZSCORE", keys.job_index("running"), job_id) is None


async def test_an_unlocked_move_is_not_made_while_the_lock_is_held(redis):
    store, leases = JobStore(redis), Leases(redis, "holder")
    job_id, _ = await _dispatched(store, leases)
    lock = keys.job_lock(job_id)
    async with leases.hold(lock, 5) as lease:
        counter = await redis.get(keys.fence_counter(lock))
        after_key = unique("cordum:test:after")
        with pytest.raises(LockHeld):
            await store.transition(job_id, JobState.SUCCEEDED, tenant="t", unlocked=lock,
                                   after=[("SET", after_key, "1")])
        assert (await store.get(job_id))["state"] == "RUNNING"
        assert await redis.get(after_key) is None
        assert await redis.get(keys.fence_counter(lock)) == counter  # no fence taken either
        await store.transition(job_id, JobState.SUCCEEDED, fence=lease.fence, tenant="t")  # the holder may
    assert (await store.get(job_id))["state"] == "SUCCEEDED"


async def test_an_unlocked_move_needs_the_tenant(redis):
    store = JobStore(redis)
    with pytest.raises(ValueError):
        await store.transition(unique("job"), JobState.SUCCEEDED, unlocked=keys.job_lock("x"))


async def test_a_plain_success_is_applied_in_one_step_as_the_locked_path_would(redis):
    store, leases = JobStore(redis), Leases(redis, "holder")
    metrics = Metrics("sched-test")
    engine = _engine(store, leases, metrics)
    job_id, attempt = await _dispatched(store, leases)
    sent = Dispatched("t", "job.default", "w1", attempt, "trace-1", now_us())
    assert await engine._apply_plain_success(_success(job_id), sent)
    meta = await store.get(job_id)
    assert (meta["state"], meta["worker_id"], meta["result_ptr"], meta["execution_ms"]) == (
        "SUCCEEDED", "w1", f"redis://res:{job_id}", "7")
    assert await redis.execute("ZSCORE", keys.worker_inflight("w1"), job_id) is None
    assert await redis.execute("ZSCORE", keys.worker_jobs("w1"), job_id) is not None
    assert job_id not in await redis.execute("SMEMBERS", keys.tenant_active("t"))
    text = metrics.exposition().decode()
    assert 'cordum_scheduler_jobs_finished_total{pod="sched-test",state="SUCCEEDED",topic="other"} 1.0' in text


def test_only_a_success_from_the_worker_and_attempt_sent_is_tried_in_one_step():
    sent = Dispatched("t", "job.default", "w1", 3, "trace-1", now_us())
    assert _plain_success_of(_success("j", "w1"), sent, 3)
    assert _plain_success_of(_success("j", "w1"), sent, None)  # the CAP SDK names no attempt
    assert not _plain_success_of(_success("j", "w1"), sent, 2)  # a late result of an earlier attempt
    assert not _plain_success_of(_success("j", "w2"), sent, 3)
    failed = _success("j", "w1")
    failed.status = JobStatus.JOB_STATUS_FAILED
    assert not _plain_success_of(failed, sent, 3)


@pytest.mark.parametrize("case", ["lock_held", "attempt_moved_on", "other_worker", "output_due", "finished"])
async def test_anything_but_a_plain_success_is_left_to_the_locked_path(redis, case):
    """What the replica remembers may be out of date: the script checks the job itself."""
    store, leases = JobStore(redis), Leases(redis, "holder")
    engine = _engine(store, leases)
    job_id, attempt = await _dispatched(store, leases, **({CHECK_FIELD: DUE} if case == "output_due" else {}))
    sent = Dispatched("t", "job.default", "w1", attempt, "trace-1", now_us())
    if case == "attempt_moved_on":  # dispatched again since (by another replica), to the same worker
        await store.set_fields(job_id, {"attempts": attempt + 1})
    elif case == "other_worker":  # re-routed meanwhile (by another replica): the hash names another worker
        await store.set_fields(job_id, {"worker_id": "w2"})
    elif case == "finished":
        await store.cancel(job_id, "cancelled meanwhile")
    before = await store.get(job_id)
    if case == "lock_held":
        async with leases.hold(keys.job_lock(job_id), 5):
            assert not await engine._apply_plain_success(_success(job_id), sent)
    else:
        assert not await engine._apply_plain_success(_success(job_id), sent)
    assert await store.get(job_id) == before


async def test_a_result_message_takes_the_one_step_path_only_for_a_plain_success(redis):
    """Through the result consumer's handler: a failure from another worker leaves what was
    sent remembered (and goes the locked way, which ignores it); the real success then finishes
    the job in one step and is forgotten."""
    store, leases = JobStore(redis), Leases(redis, "holder")
    engine = _engine(store, leases)
    job_id, attempt = await _dispatched(store, leases)
    engine.dispatches.remember(job_id, Dispatched("t", "job.default", "w1", attempt, "trace-1", now_us()))
    msg = SimpleNamespace(headers={subjects.ATTEMPT_HEADER: str(attempt)})
    stray = _success(job_id, "w9")
    stray.status = JobStatus.JOB_STATUS_FAILED
    await engine.on_result(BusPacket(sender_id="w9", job_result=stray), SimpleNamespace(headers={}))
    assert (await store.get(job_id))["state"] == "RUNNING"
    assert engine.dispatches.peek(job_id) is not None
    one_step = engine._apply_plain_success
    calls = []

    async def counted(*args):
        calls.append(args)
        return await one_step(*args)

    engine._apply_plain_success = counted
    await engine.on_result(BusPacket(sender_id="w1", job_result=_success(job_id)), msg)
    assert len(calls) == 1 and (await store.get(job_id))["state"] == "SUCCEEDED"
    assert engine.dispatches.peek(job_id) is None


def test_recent_dispatches_forget_the_oldest_first():
    recent = RecentDispatches(capacity=2)
    for n in range(3):
        recent.remember(f"j{n}", Dispatched("t", "job.default", "w", n, "", 0))
    assert len(recent) == 2 and recent.peek("j0") is None
    recent.remember("j1", Dispatched("t", "job.default", "w", 5, "", 0))  # a new attempt: newest again
    recent.remember("j3", Dispatched("t", "job.default", "w", 0, "", 0))
    assert recent.peek("j2") is None and recent.peek("j1").attempt == 5
    recent.forget("j3")
    recent.forget("j1")
    assert len(recent) == 0
