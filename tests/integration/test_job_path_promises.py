"""The job path keeps its promises under ordinary faults (issue 8), against a real scheduler and
safety kernel process, real Redis and NATS. Executions are counted where work happens: in the
handlers of the workers (a list per test), never by results on the bus.

Every test here failed on the job path before issue 8: a retry never ran, a departed worker's jobs
waited for the 900 s running timeout, a finished job ran again after a crash, a stored result timed
out, a job whose index entry was lost stayed PENDING for good, a write that lost still left a DLQ
entry, and the policy's max_retries was not enforced.
"""

from __future__ import annotations

import json
from collections import Counter
from contextlib import asynccontextmanager
from typing import AsyncIterator, Awaitable, Callable

import trio

from cordum.agent.v1 import job_pb2
from cordum.agent.v1.job_pb2 import JobRequest, JobResult
from cordum.protocol import subjects
from cordum.protocol.packets import decode, encode, new_packet
from cordum.store import keys
from cordum.store.jobs import JobStore, result_to_json
from cordum.store.jobstate import JobState
from cordum.worker import JobContext, Worker
from cordum.worker.core import JobFailed
from tests.conftest import unique
from tests.integration.stack import Stack, http_get, submit_direct, wait_state
from tests.integration.stack import nats_server, redis_server  # noqa: F401  (servers of its own)
from tests.integration.test_worker_sdk import running

S = JobState
# Long enough that the reconciler and the replayer never rescue a job in these tests: what moves
# a job here is the mechanism under test.
SLOW_RESCUE = {"SCHEDULER_RUNNING_TIMEOUT": "300s", "SCHEDULER_DISPATCH_TIMEOUT": "300s",
               "SCHEDULER_PENDING_AGE": "300s", "SCHEDULER_DISPATCH_CONFIRM": "300s"}


async def control_plane(spawn, tmp_path, **env: str) -> Stack:
    stack = Stack.create(spawn, tmp_path, **env)
    stack.kernel()
    stack.scheduler()
    await stack.ready()
    return stack


async def known_to_scheduler(redis, worker_id: str, timeout: float = 20) -> None:
    """Wait until the scheduler's worker snapshot lists the worker (it routes only to those)."""
    with trio.fail_after(timeout):
        while True:
            raw = await redis.get(keys.WORKERS_SNAPSHOT)
            if raw and worker_id in {w["worker_id"] for w in json.loads(raw)["workers"]}:
                return
            await trio.sleep(0.1)


Handler = Callable[[JobContext], Awaitable[object]]


@asynccontextmanager
async def serving(settings, worker_id: str, handler: Handler, *, max_parallel: int = 4) -> AsyncIterator[Worker]:
    worker = Worker(worker_id, "default", ["job.default"], max_parallel_jobs=max_parallel, settings=settings,
                    heartbeat_interval=0.5)
    worker.handler()(handler)
    async with running(worker, drain=5) as serving_worker:
        yield serving_worker


def counting(runs: list, behave: Callable[[JobContext], Awaitable[object]] | None = None) -> Handler:
    async def handler(job: JobContext) -> object:
        runs.append((job.job_id, job.attempt, job.worker_id))
        return await behave(job) if behave else {"ok": True}

    return handler


async def dispatched(store: JobStore, job_id: str, worker_id: str, *, attempts: int = 1, state: JobState = S.RUNNING,
                     **fields: object) -> None:
    """A job as the scheduler leaves it after `attempts` dispatches to `worker_id`."""
    request = JobRequest(job_id=job_id, topic="job.default", tenant_id="default", context_ptr=f"redis://ctx:{job_id}")
    await store.create(job_id, S.PENDING, request=request, context={"prompt": "x"},
                       fields={"topic": "job.default", "tenant": "default", "trace_id": job_id})
    for n in range(attempts):
        if n:
            await store.transition(job_id, S.RETRYING)
        await store.transition(job_id, S.DISPATCHED, fields={"worker_id": worker_id},
                               after=store.inflight_commands(worker_id, job_id, done=False))
    if state is not S.DISPATCHED:
        await store.transition(job_id, state)
    if fields:
        await store.set_fields(job_id, fields)


async def send_to(bus, worker_id: str, job_id: str, attempt: int) -> None:
    request = JobRequest(job_id=job_id, topic="job.default", tenant_id="default", context_ptr=f"redis://ctx:{job_id}")
    await bus.publish(subjects.worker_subject(worker_id), encode(new_packet(request, sender_id="cordum-scheduler")),
                      headers={subjects.ATTEMPT_HEADER: str(attempt)})


async def until(predicate: Callable[[], bool], what: str, timeout: float = 20) -> None:
    with trio.move_on_after(timeout):
        while not predicate():
            await trio.sleep(0.05)
        return
    raise AssertionError(f"timed out waiting for {what}")


def scheduler_metric(stack: Stack, name: str, **labels: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = http_get(stack.http_ports["scheduler-1"], "/metrics")
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


# ---- 1. retries --------------------------------------------------------------------------------


async def test_a_retryable_failure_runs_again_and_the_job_succeeds(spawn, tmp_path, redis, bus, settings):
    await control_plane(spawn, tmp_path, **SLOW_RESCUE)
    store = JobStore(redis)
    runs: list = []

    async def first_attempt_fails(job: JobContext) -> object:
        if job.attempt == 1:
            raise JobFailed("busy, try again", code="busy", status=job_pb2.JOB_STATUS_FAILED_RETRYABLE)
        return {"attempt": job.attempt}

    async with serving(settings, unique("flaky"), counting(runs, first_attempt_fails)) as worker:
        await known_to_scheduler(redis, worker.worker_id)
        jobs = [await submit_direct(store, bus) for _ in range(5)]
        for job_id in jobs:
            meta = await wait_state(store, job_id, {"SUCCEEDED"}, timeout=60)
            assert meta["attempts"] == 2
            assert json.loads(await redis.get(f"res:{job_id}")) == {"attempt": 2}
            assert [e["state"] for e in await store.events(job_id)].count("RETRYING") == 1
    # Each job ran exactly twice: once failing, once succeeding.
    assert sorted((job_id, attempt) for job_id, attempt, _ in runs) == sorted(
        [(j, 1) for j in jobs] + [(j, 2) for j in jobs])


async def test_a_late_result_of_an_earlier_attempt_never_moves_the_current_one(spawn, tmp_path, redis, bus):
    stack = await control_plane(spawn, tmp_path, **SLOW_RESCUE)
    store = JobStore(redis)
    job_id = unique("job")
    await dispatched(store, job_id, "w-late", attempts=2)

    async def result(status: int, attempt: int) -> None:
        packet = new_packet(JobResult(job_id=job_id, status=status, worker_id="w-late", error_message="old"),
                            sender_id="w-late")
        await bus.publish(subjects.RESULT, encode(packet), msg_id=f"{subjects.RESULT}:{job_id}:{attempt}",
                          headers={subjects.ATTEMPT_HEADER: str(attempt)})

    await result(job_pb2.JOB_STATUS_FAILED, 1)  # the first attempt's result, arriving late
    with trio.fail_after(20):
        while scheduler_metric(stack, "cordum_scheduler_results_ignored_total", reason="stale_attempt") < 1:
            await trio.sleep(0.1)
    assert (await store.get(job_id))["state"] == "RUNNING"
    await result(job_pb2.JOB_STATUS_SUCCEEDED, 2)
    await wait_state(store, job_id, {"SUCCEEDED"})


async def test_the_policy_max_retries_is_enforced(spawn, tmp_path, redis, bus, settings):
    stack = Stack.create(spawn, tmp_path, **SLOW_RESCUE)
    (tmp_path / "safety.yaml").write_text("""
version: test
rules:
  - id: limited
    match: {topics: ["job.default"]}
    decision: allow_with_constraints
    constraints:
      budgets: {max_retries: 1}
""")
    stack.kernel()
    stack.scheduler()
    await stack.ready()
    store = JobStore(redis)
    runs: list = []

    async def always_busy(job: JobContext) -> object:
        raise JobFailed("still busy", code="busy", status=job_pb2.JOB_STATUS_FAILED_RETRYABLE)

    async with bus.consume(subjects.DLQ, unique("dlq-watch")) as dlq, \
            serving(settings, unique("busy"), counting(runs, always_busy)) as worker:
        await known_to_scheduler(redis, worker.worker_id)
        job_id = await submit_direct(store, bus)
        meta = await wait_state(store, job_id, {"FAILED"}, timeout=60)
        assert "the policy allows 1" in meta["failure_reason"]
        with trio.fail_after(10):
            async for msg in dlq:
                await msg.ack()
                entry = decode(msg.data).job_result
                if entry.job_id == job_id:
                    assert entry.error_code == "max_retries_exceeded"
                    break
    assert [attempt for j, attempt, _ in runs if j == job_id] == [1, 2]  # the first run and one retry


# ---- 2. departed workers -----------------------------------------------------------------------


async def test_a_draining_worker_finishes_what_it_started_and_the_rest_moves_on_at_once(
        spawn, tmp_path, redis, bus, settings):
    await control_plane(spawn, tmp_path, **SLOW_RESCUE)
    store = JobStore(redis)
    runs: list = []

    async def slow(job: JobContext) -> object:
        await trio.sleep(1.5)
        return {"by": job.worker_id}

    async with serving(settings, unique("leaving"), counting(runs, slow), max_parallel=1) as leaving:
        # Three jobs sent to a worker that runs one at a time: two wait in its own subject.
        jobs = [unique("job") for _ in range(3)]
        for job_id in jobs:
            await dispatched(store, job_id, leaving.worker_id)
            await send_to(bus, leaving.worker_id, job_id, attempt=1)
        await until(lambda: len(runs) == 1, "the first job to start")
        async with serving(settings, unique("staying"), counting(runs, slow)) as staying:
            await known_to_scheduler(redis, staying.worker_id)
            await leaving.drain(timeout=10)  # says "draining", finishes its one job, says "stopped"
            for job_id in jobs:
                await wait_state(store, job_id, {"SUCCEEDED"}, timeout=30)
    executions = Counter(job_id for job_id, _, _ in runs)
    assert executions == Counter(jobs)  # every job ran exactly once
    by_worker = Counter(worker_id for _, _, worker_id in runs)
    assert by_worker == {leaving.worker_id: 1, staying.worker_id: 2}


async def test_a_killed_worker_is_replaced_by_one_with_a_new_id_and_its_job_runs_there(spawn, tmp_path, redis, bus):
    stack = await control_plane(spawn, tmp_path, WORKER_TTL="3s", **SLOW_RESCUE)
    store = JobStore(redis)
    stack.worker("worker-1")
    await stack.ready("worker-1")
    await known_to_scheduler(redis, "worker-1")
    job_id = await submit_direct(store, bus, context={"sleep_ms": 3000})
    await wait_state(store, job_id, {"RUNNING"})
    stack.procs["worker-1"].stop()  # SIGKILL mid-job: its durable keeps the message nobody will read
    stack.worker("worker-2")  # a new process, a new id (as hostname-pid ids do)
    meta = await wait_state(store, job_id, {"SUCCEEDED"}, timeout=60)
    assert meta["worker_id"] == "worker-2" and meta["attempts"] == 2
    moved = [e for e in await store.events(job_id) if e["state"] == "RETRYING"]
    assert [e["ctx"] for e in moved] == [{"reason": "worker_left", "worker_id": "worker-1"}]


# ---- 3. nothing runs twice ---------------------------------------------------------------------


async def test_a_redelivery_after_a_crash_publishes_the_stored_result_instead_of_running_again(
        spawn, tmp_path, redis, bus, settings):
    await control_plane(spawn, tmp_path, **SLOW_RESCUE)
    store = JobStore(redis)
    worker_id, job_id = unique("crashed"), unique("job")
    # The worker ran the job, committed its result, and died before publishing it. A new process
    # with the same id gets the message again.
    done = JobResult(job_id=job_id, status=job_pb2.JOB_STATUS_SUCCEEDED, worker_id=worker_id,
                     result_ptr=f"redis://res:{job_id}")
    await dispatched(store, job_id, worker_id, run_claim=f"{worker_id}:1", run_result=result_to_json(done),
                     run_result_attempt=1)
    await redis.set(f"res:{job_id}", json.dumps({"done": True}))
    runs: list = []
    async with serving(settings, worker_id, counting(runs)) as worker:
        await send_to(bus, worker_id, job_id, attempt=1)
        meta = await wait_state(store, job_id, {"SUCCEEDED"})
        assert meta["result_ptr"] == f"redis://res:{job_id}"
        assert worker.stats.republished == 1
    assert runs == []


async def test_a_finished_or_superseded_job_delivered_again_is_not_run(redis, bus, settings):
    store = JobStore(redis)
    worker_id = unique("w")
    cancelled, superseded = unique("job"), unique("job")
    await dispatched(store, cancelled, worker_id)
    await store.cancel(cancelled, "user asked")
    await dispatched(store, superseded, worker_id, attempts=2)  # re-routed: attempt 1 is history
    runs: list = []
    async with serving(settings, worker_id, counting(runs)) as worker:
        await send_to(bus, worker_id, cancelled, attempt=1)
        await send_to(bus, worker_id, superseded, attempt=1)
        await until(lambda: worker.stats.superseded == 2, "both messages dropped")
    assert runs == []


# ---- 4. stored results are not timed out -------------------------------------------------------


async def test_the_reconciler_finishes_a_job_from_its_stored_result_instead_of_timing_it_out(spawn, tmp_path, redis, bus):
    store = JobStore(redis)
    ours, theirs = unique("job"), unique("job")
    # Our worker committed its result; a CAP SDK worker wrote only res:<id>. Neither message came.
    done = JobResult(job_id=ours, status=job_pb2.JOB_STATUS_SUCCEEDED, worker_id="w-1", result_ptr=f"redis://res:{ours}")
    await dispatched(store, ours, "w-1", run_claim="w-1:1", run_result=result_to_json(done), run_result_attempt=1)
    await redis.set(f"res:{ours}", "{}")
    await dispatched(store, theirs, "cap-worker")
    await redis.set(f"res:{theirs}", json.dumps({"answer": 42}))
    await trio.sleep(1.2)  # both are older than the running timeout below
    await control_plane(spawn, tmp_path, SCHEDULER_RUNNING_TIMEOUT="1s", SCHEDULER_SCAN_INTERVAL="0.3s")
    for job_id in (ours, theirs):
        meta = await wait_state(store, job_id, {"SUCCEEDED", "TIMEOUT"})
        assert meta["state"] == "SUCCEEDED" and meta["result_ptr"] == f"redis://res:{job_id}"


# ---- 5. a lost index entry does not lose the job ------------------------------------------------


async def test_a_job_whose_index_entry_was_lost_is_found_and_run(spawn, tmp_path, redis, bus):
    stack = await control_plane(spawn, tmp_path, SCHEDULER_PENDING_AGE="1s")
    stack.worker("worker-1")
    await stack.ready("worker-1")
    store = JobStore(redis)
    job_id = unique("job")
    request = JobRequest(job_id=job_id, topic="job.default", tenant_id="default", context_ptr=f"redis://ctx:{job_id}")
    # Accepted and stored, but its submit never reached the bus and its index write was lost.
    await store.create(job_id, S.PENDING, request=request, context={"prompt": "lost"},
                       fields={"topic": "job.default", "tenant": "default", "trace_id": job_id})
    await redis.execute("ZREM", keys.job_index("PENDING"), job_id)
    await wait_state(store, job_id, {"SUCCEEDED"}, timeout=60)


# ---- 6. ids that would split a lock from its fence ------------------------------------------------


async def test_the_scheduler_drops_a_job_id_with_hash_tag_braces_without_locking_it(spawn, tmp_path, redis, bus):
    stack = await control_plane(spawn, tmp_path)
    bad = "a{b}"
    request = JobRequest(job_id=bad, topic="job.default", tenant_id="default", context_ptr="redis://ctx:x")
    await bus.publish(subjects.SUBMIT, encode(new_packet(request, sender_id="test")), msg_id="jobreq:bad-braces")
    with trio.fail_after(20):
        while scheduler_metric(stack, "cordum_scheduler_validation_rejections_total", kind="job_request") < 1:
            await trio.sleep(0.1)
    assert await JobStore(redis).get(bad) is None
    assert await redis.execute("EXISTS", keys.job_lock(bad), keys.fence_counter(keys.job_lock(bad))) == 0


# ---- 7. the DLQ only after the terminal write ----------------------------------------------------


async def test_a_final_write_that_loses_leaves_no_dlq_entry(spawn, tmp_path, redis, bus):
    stack = await control_plane(spawn, tmp_path, **SLOW_RESCUE)
    store = JobStore(redis)
    job_id = unique("job")
    # A newer lock holder wrote this job (its fence is far ahead): this scheduler's write must lose.
    await dispatched(store, job_id, "w-1", _fence=10**12)
    async with bus.consume(subjects.DLQ, unique("dlq-watch")) as dlq:
        failed = JobResult(job_id=job_id, status=job_pb2.JOB_STATUS_FAILED, worker_id="w-1", error_message="boom")
        await bus.publish(subjects.RESULT, encode(new_packet(failed, sender_id="w-1")),
                          headers={subjects.ATTEMPT_HEADER: "1"})
        with trio.fail_after(20):  # the write was tried (and lost) at least once
            while scheduler_metric(stack, "cordum_bus_handler_errors_total", subject=subjects.RESULT) < 1:
                await trio.sleep(0.1)
        entries = []
        with trio.move_on_after(1.0):
            async for msg in dlq:
                await msg.ack()
                entries.append(decode(msg.data).job_result.job_id)
    assert job_id not in entries
    assert (await store.get(job_id))["state"] == "RUNNING"
