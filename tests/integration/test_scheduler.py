"""The scheduler as a real process between a real safety kernel and real workers."""

from __future__ import annotations

import json
import urllib.request

import trio

from cordum.agent.v1.job_pb2 import JobResult
from cordum.protocol.packets import decode, encode, new_packet
from cordum.store import keys
from cordum.safety.policy import parse_policy
from cordum.store.jobs import JobStore
from cordum.worker.echo import read_executions
from tests.conftest import unique
from tests.integration.stack import (
    EXECUTIONS_KEY, POLICY, Stack, gateway_stack, http_get, job_path, metric, submit_direct, wait_state,
)
from tests.integration.stack import nats_server, redis_server  # noqa: F401  (servers of its own)


async def test_allowed_job_is_dispatched_once_and_succeeds(spawn, tmp_path, redis, bus):
    await job_path(spawn, tmp_path)
    store = JobStore(redis)
    job_id = await submit_direct(store, bus, context={"prompt": "hello"})
    meta = await wait_state(store, job_id, {"SUCCEEDED"})
    assert meta["worker_id"] == "worker-1" and meta["result_ptr"] == f"redis://res:{job_id}"
    result = json.loads(await redis.get(f"res:{job_id}"))
    assert result["echo"] == {"prompt": "hello"}
    states = [e["state"] for e in await store.events(job_id)]
    assert states == ["PENDING", "DISPATCHED", "RUNNING", "SUCCEEDED"]
    assert meta["safety_decision"] == "ALLOW" and meta["safety_rule_id"] == "allow-default"


async def test_a_dispatching_replica_writes_its_jobs_successes_in_one_step(spawn, tmp_path, redis, bus):
    """Through real processes: the scheduler remembers what it dispatched and writes the worker's
    success without taking the job's lock (a result that beat the dispatch's confirmation takes
    the locked path instead, so a few jobs, of which at least one must take the one step)."""
    stack = await job_path(spawn, tmp_path)
    store = JobStore(redis)
    for _ in range(5):
        job_id = await submit_direct(store, bus, context={"prompt": "one step"})
        meta = await wait_state(store, job_id, {"SUCCEEDED"})
        assert meta["worker_id"] == "worker-1"
        assert [e["state"] for e in await store.events(job_id)] == ["PENDING", "DISPATCHED", "RUNNING", "SUCCEEDED"]
    assert await redis.get(keys.job_lock(job_id)) is None

    async def one_step() -> float:
        text = await trio.to_thread.run_sync(http_get, stack.http_ports["scheduler-1"], "/metrics")
        return metric(text, "cordum_scheduler_results_one_step_total")

    with trio.fail_after(30):  # counted just after the write the test saw
        while await one_step() < 1:
            await trio.sleep(0.05)


async def _policy_recorded(redis) -> str:
    """The test policy's snapshot, once the kernel has recorded it in Redis as the newest loaded."""
    current = parse_policy(POLICY).snapshot
    with trio.fail_after(30):  # the kernel records it just after loading: generous for a loaded CI machine
        while await redis.execute("ZREVRANGE", keys.SAFETY_SNAPSHOTS, 0, 0) != [current]:
            await trio.sleep(0.05)
    return current


async def test_a_submit_time_allow_is_reused_only_while_its_policy_is_the_newest(spawn, tmp_path, redis, bus):
    """The scheduler dispatches under the decision stored at submit when the policy that made it
    is the newest any kernel loaded, without asking the kernel again; made under an older policy,
    it is checked again and the policy in force decides. Both jobs go to `job.danger`, which the
    policy denies: only the check tells them apart."""
    stack = await job_path(spawn, tmp_path)
    store = JobStore(redis)
    current = await _policy_recorded(redis)
    stored = {"safety_decision": "ALLOW", "safety_rule_id": "allow-default", "safety_reason": "checked at submit"}
    stale = await submit_direct(store, bus, topic="job.danger", fields={**stored, "safety_snapshot": "v0:older"})
    meta = await wait_state(store, stale, {"DENIED", "SUCCEEDED"})
    assert meta["state"] == "DENIED" and meta["safety_snapshot"] == current
    assert meta["failure_reason"] == "dangerous work is not allowed"

    fresh = await submit_direct(store, bus, topic="job.danger", fields={**stored, "safety_snapshot": current})
    meta = await wait_state(store, fresh, {"DENIED", "SUCCEEDED"})
    assert meta["state"] == "SUCCEEDED" and meta["safety_reason"] == "checked at submit"
    decisions = [json.loads(d) for d in await redis.execute("LRANGE", keys.job_decisions(fresh), 0, -1)]
    assert [(d["by"], d["decision"], d.get("reused")) for d in decisions] == [("cordum-scheduler", "ALLOW", True)]
    text = await trio.to_thread.run_sync(http_get, stack.http_ports["scheduler-1"], "/metrics")
    assert metric(text, "cordum_scheduler_safety_decisions_reused_total") == 1


async def test_the_gateways_submit_time_allow_is_the_one_the_scheduler_reuses(spawn, tmp_path, redis):
    """End to end: what the gateway stores at submit is what the scheduler finds reusable (the
    snapshot the kernel answers with is the one it records in Redis), so the job's decision log
    holds the gateway's decision and the scheduler's reuse of it, and the job succeeds."""
    key = "reuse-admin-key-0123456789abcdef"
    stack = Stack.create(spawn, tmp_path, CORDUM_API_KEY=key, CORDUM_ENV="dev")
    base = await gateway_stack(stack)
    current = await _policy_recorded(redis)

    def submit() -> dict:
        request = urllib.request.Request(f"{base}/api/v1/jobs", data=json.dumps({"prompt": "reuse"}).encode(),
                                         method="POST", headers={"X-API-Key": key, "X-Tenant-ID": "default",
                                                                 "Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    job_id = (await trio.to_thread.run_sync(submit))["job_id"]
    meta = await wait_state(JobStore(redis), job_id, {"SUCCEEDED", "FAILED", "DENIED"})
    assert meta["state"] == "SUCCEEDED" and meta["safety_snapshot"] == current
    decisions = [json.loads(d) for d in await redis.execute("LRANGE", keys.job_decisions(job_id), 0, -1)]
    assert [(d["by"], d["decision"], d.get("reused")) for d in decisions] == [
        ("api-gateway", "ALLOW", None), ("cordum-scheduler", "ALLOW", True)]


async def test_decisions_are_not_reused_when_turned_off(spawn, tmp_path, redis, bus):
    await job_path(spawn, tmp_path, SCHEDULER_REUSE_SUBMIT_DECISION="false")
    store = JobStore(redis)
    current = await _policy_recorded(redis)
    job_id = await submit_direct(store, bus, topic="job.danger",
                                 fields={"safety_decision": "ALLOW", "safety_snapshot": current})
    assert (await wait_state(store, job_id, {"DENIED", "SUCCEEDED"}))["state"] == "DENIED"


async def _next_dlq_event(events, job_id: str):
    with trio.fail_after(10):
        while True:
            msg = await events.receive()
            await msg.ack()
            packet = decode(msg.data)
            if packet.job_result.job_id == job_id:
                return packet.job_result


async def test_denied_job_goes_to_the_dlq(spawn, tmp_path, redis, bus):
    await job_path(spawn, tmp_path, worker=False)
    store = JobStore(redis)
    async with bus.consume("sys.job.dlq", unique("dlq-watch")) as dlq_events:
        job_id = await submit_direct(store, bus, topic="job.danger")
        meta = await wait_state(store, job_id, {"DENIED"})
        assert meta["failure_reason"] == "dangerous work is not allowed"
        event = await _next_dlq_event(dlq_events, job_id)
        assert event.error_code == "safety_denied" and event.error_message == "dangerous work is not allowed"


async def test_worker_killed_mid_job_times_out_into_the_dlq(spawn, tmp_path, redis, bus):
    stack = await job_path(spawn, tmp_path)
    worker = stack.procs["worker-1"]
    store = JobStore(redis)
    async with bus.consume("sys.job.dlq", unique("dlq-watch")) as dlq_events:
        job_id = await submit_direct(store, bus, context={"sleep_ms": 20000})
        await wait_state(store, job_id, {"RUNNING"})
        worker.stop()  # SIGKILL mid-job
        meta = await wait_state(store, job_id, {"TIMEOUT"}, timeout=15)
        assert meta["failure_reason"].startswith("timeout: RUNNING")
        event = await _next_dlq_event(dlq_events, job_id)
        assert event.error_code == "timeout"


async def test_duplicate_and_late_results_make_one_terminal_transition(spawn, tmp_path, redis, bus):
    await job_path(spawn, tmp_path)
    store = JobStore(redis)
    job_id = await submit_direct(store, bus)
    await wait_state(store, job_id, {"SUCCEEDED"})
    late = JobResult(job_id=job_id, status=6, worker_id="worker-1", error_message="late failure")
    for n in range(3):
        await bus.publish("sys.job.result", encode(new_packet(late, sender_id="worker-1")), msg_id=f"late-{job_id}-{n}")
    await bus.publish("sys.job.submit", b"\x00\xffnot a packet")  # and a malformed submit
    await trio.sleep(1.0)
    meta = await store.get(job_id)
    assert meta["state"] == "SUCCEEDED"
    assert [e["state"] for e in await store.events(job_id)].count("SUCCEEDED") == 1
    # the scheduler is still consuming
    second = await submit_direct(store, bus)
    await wait_state(store, second, {"SUCCEEDED"})


async def test_job_needing_approval_is_held(spawn, tmp_path, redis, bus):
    await job_path(spawn, tmp_path, worker=False)
    store = JobStore(redis)
    job_id = await submit_direct(store, bus, topic="job.approve")
    meta = await wait_state(store, job_id, {"APPROVAL_REQUIRED"})
    assert meta["approval_status"] == "pending" and meta["safety_rule_id"] == "needs-human"


async def test_a_job_waits_for_a_worker_and_runs_when_one_arrives(spawn, tmp_path, redis, bus):
    stack = await job_path(spawn, tmp_path, worker=False)
    store = JobStore(redis)
    job_id = await submit_direct(store, bus)
    await trio.sleep(1.5)
    assert (await store.get(job_id))["state"] == "PENDING"  # no worker: nothing lost, nothing failed
    stack.worker()
    await wait_state(store, job_id, {"SUCCEEDED"}, timeout=20)


async def test_a_job_waiting_for_a_worker_is_answered_from_memory_between_refreshes(spawn, tmp_path, redis, bus):
    # SCHEDULER_PENDING_AGE 60 s: a waiting job takes the whole path every 10 s, and is redelivered
    # every 2 s (RETRY_NO_WORKERS_S) in between.
    stack = await job_path(spawn, tmp_path, worker=False, SCHEDULER_PENDING_AGE="60s")
    store = JobStore(redis)
    job_id = await submit_direct(store, bus)

    async def marked() -> str:
        while not (mark := (await store.get(job_id) or {}).get("route_wait_at")):
            await trio.sleep(0.05)
        return mark

    with trio.fail_after(20):
        first = await marked()
    await trio.sleep(5)  # two redeliveries at least, well inside the 10 s
    meta = await store.get(job_id)
    # Not written again (the previous code wrote it at each redelivery, 2 s apart); a test stalled
    # past the refresh may see the refresh's mark, never an earlier one.
    later = meta["route_wait_at"]
    assert meta["state"] == "PENDING" and (later == first or int(later) - int(first) >= 9_000_000)
    log = stack.procs["scheduler-1"].out.read_text() + stack.procs["scheduler-1"].err.read_text()
    assert log.count('"scheduler.no_route"') == 1
    stack.worker()
    await wait_state(store, job_id, {"SUCCEEDED"}, timeout=30)
    assert await read_executions(redis, EXECUTIONS_KEY, [job_id]) == {job_id: 1}


async def test_a_waiting_job_is_logged_once_however_often_it_is_refreshed(spawn, tmp_path, redis, bus):
    stack = await job_path(spawn, tmp_path, worker=False)  # SCHEDULER_PENDING_AGE 3 s: refreshed every 1 s
    store = JobStore(redis)
    job_id = await submit_direct(store, bus)
    marks: set[str] = set()
    with trio.fail_after(30):
        while len(marks) < 3:  # the first pass and two refreshes, each renewing the replayer's mark
            if mark := (await store.get(job_id) or {}).get("route_wait_at"):
                marks.add(mark)
            await trio.sleep(0.05)
    log = stack.procs["scheduler-1"].out.read_text() + stack.procs["scheduler-1"].err.read_text()
    assert log.count('"scheduler.no_route"') == 1 and (await store.get(job_id))["state"] == "PENDING"


async def test_two_schedulers_dispatch_each_of_200_jobs_exactly_once(spawn, tmp_path, redis, bus):
    stack = Stack.create(spawn, tmp_path)
    stack.kernel()
    for n in (1, 2):
        stack.scheduler(f"scheduler-{n}")
        stack.worker(f"worker-{n}", WORKER_MAX_PARALLEL="16")
    await stack.ready()
    store = JobStore(redis)
    await trio.sleep(1.0)
    jobs: list[str] = []
    async with trio.open_nursery() as submitters:
        async def submit_some() -> None:
            for _ in range(20):
                jobs.append(await submit_direct(store, bus))
        for _ in range(10):
            submitters.start_soon(submit_some)
    metas = [await wait_state(store, job_id, {"SUCCEEDED"}, timeout=60) for job_id in jobs]
    # Executions are counted by the workers themselves (JetStream would drop a repeated result on
    # the bus, so results can never show a second run).
    executions = await read_executions(redis, EXECUTIONS_KEY, jobs)
    assert len(jobs) == 200
    assert all(executions[job_id] == 1 for job_id in jobs), {j: n for j, n in executions.items() if n != 1}
    for job_id in jobs[:20]:
        assert [e["state"] for e in await store.events(job_id)].count("DISPATCHED") == 1
    dispatched = [metric(http_get(stack.http_ports[f"scheduler-{n}"], "/metrics"), "cordum_jobs_dispatched_total")
                  for n in (1, 2)]
    assert sum(dispatched) == 200 and all(d > 0 for d in dispatched), dispatched
    assert {meta["worker_id"] for meta in metas} == {"worker-1", "worker-2"}


async def test_sigterm_stops_the_scheduler_in_its_declared_order(spawn, tmp_path, redis, bus):
    import signal as signals

    from cordum.scheduler.service import STAGES

    stack = await job_path(spawn, tmp_path)
    scheduler = stack.procs["scheduler-1"]
    store = JobStore(redis)
    jobs = [await submit_direct(store, bus, context={"sleep_ms": 300}) for _ in range(5)]
    scheduler.signal(signals.SIGTERM)
    code = await trio.to_thread.run_sync(scheduler.wait, 15)
    assert code == 0, scheduler.lines("err")[-10:]
    observed = [(e["event"], e["stage"]) for e in scheduler.events() if e["event"] in ("stage.begin", "stage.end")]
    assert observed == [(kind, stage) for stage in STAGES for kind in ("stage.begin", "stage.end")]
    # What the stages did: the consumers stopped in "engine stop", before the leader loops were
    # cancelled; and no leader lease is left behind for the next replica to wait out.
    events = scheduler.events()
    engine_stopped = next(i for i, e in enumerate(events) if e["event"] == "stage.end" and e["stage"] == "engine stop")
    assert not any(e["event"] in ("leader.elected", "scheduler.started") for e in events[engine_stopped:])
    for key in (keys.RECONCILER_LEADER, keys.REPLAYER_LEADER, keys.WORKER_REAPER_LEADER):
        holder = await redis.get(key)
        assert holder is None or not holder.startswith("scheduler-1"), (key, holder)
    # Nothing was lost: whatever it had not finished is picked up by a new replica.
    stack.scheduler("scheduler-2")
    for job_id in jobs:
        await wait_state(store, job_id, {"SUCCEEDED"}, timeout=30)


async def test_a_dispatch_never_confirmed_is_resent_to_its_worker_once(spawn, tmp_path, redis, bus):
    from cordum.agent.v1.job_pb2 import JobRequest
    from cordum.store.jobstate import JobState

    stack = Stack.create(spawn, tmp_path, SCHEDULER_DISPATCH_CONFIRM="1s")
    stack.kernel()
    stack.worker()
    await stack.ready()
    store = JobStore(redis)
    # As if a scheduler died right after recording the dispatch, before sending it.
    job_id = unique("job")
    request = JobRequest(job_id=job_id, topic="job.default", tenant_id="default", context_ptr=f"redis://ctx:{job_id}")
    await store.create(job_id, JobState.PENDING, request=request, context={"prompt": "late"},
                       fields={"topic": "job.default", "tenant": "default", "trace_id": job_id})
    await store.transition(job_id, JobState.SCHEDULED)
    await store.transition(job_id, JobState.DISPATCHED, fields={"worker_id": "worker-1", "dispatch_attempt": 1})
    stack.scheduler()
    meta = await wait_state(store, job_id, {"SUCCEEDED"}, timeout=60)  # a fresh scheduler's start, then the resend
    assert meta["worker_id"] == "worker-1"
    assert (await read_executions(redis, EXECUTIONS_KEY, [job_id]))[job_id] == 1  # counted by the worker


async def test_retrying_and_invalid_jobs_do_not_wait_forever(spawn, tmp_path, redis, bus):
    from cordum.agent.v1.job_pb2 import JobRequest
    from cordum.store.jobstate import JobState

    await job_path(spawn, tmp_path)
    store = JobStore(redis)
    # A worker said FAILED_RETRYABLE: the replayer runs it again once it is old enough.
    job_id = unique("job")
    request = JobRequest(job_id=job_id, topic="job.default", tenant_id="default", context_ptr=f"redis://ctx:{job_id}")
    await store.create(job_id, JobState.PENDING, request=request, context={"prompt": "again"},
                       fields={"topic": "job.default", "tenant": "default", "trace_id": job_id})
    await store.transition(job_id, JobState.RETRYING)
    await wait_state(store, job_id, {"SUCCEEDED"}, timeout=20)
    # A request the scheduler's ingress validation refuses fails visibly instead of staying PENDING.
    await wait_state(store, await submit_direct(store, bus), {"SUCCEEDED"})  # the path still runs
    broken = JobRequest(job_id=unique("job"), topic="job.default", priority=9)
    await store.create(broken.job_id, JobState.PENDING, request=broken, fields={"topic": "job.default", "tenant": "default"})
    await bus.publish("sys.job.submit", encode(new_packet(broken, sender_id="test")), msg_id=f"jobreq:{broken.job_id}")
    failed = await wait_state(store, broken.job_id, {"FAILED"})
    assert "priority" in failed["failure_reason"]


async def test_deadlines_from_submit_are_enforced(redis):
    from cordum.agent.v1.job_pb2 import JobRequest
    from cordum.store import keys
    from cordum.store.jobs import now_us
    from cordum.store.jobstate import JobState

    store = JobStore(redis)
    job_id = unique("job")
    await store.create(job_id, JobState.PENDING, request=JobRequest(job_id=job_id),
                       fields={"tenant": "t", "deadline_unix": now_us() + 5_000_000})
    assert await redis.zscore(keys.JOB_DEADLINE, job_id) is not None
    await store.forget_stale(job_id, JobState.PENDING)
    assert await redis.zscore(keys.JOB_DEADLINE, job_id) is None
