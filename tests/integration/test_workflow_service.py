"""cordum-workflow-engine as real processes, with a safety kernel, a scheduler and echo workers:
runs go through the governed job path and every step job is counted where it executes."""

from __future__ import annotations

import signal
from typing import Any

import trio

from cordum.store.jobs import JobStore
from cordum.store.workflows import WorkflowStore
from cordum.workflow.runstate import Run
from tests.conftest import unique
from tests.integration.stack import EXECUTIONS_KEY, Stack, http_get, metric, nats_server, redis_server  # noqa: F401
from tests.integration.test_workflow_engine import engine_env

TENANT = "acme"
WAIT = 60  # generous: a loaded 2-core CI machine restarts processes slowly
FAST_ENGINE = {"WORKFLOW_ENGINE_SCAN_INTERVAL": "1s", "WORKFLOW_ENGINE_DELAY_POLL_INTERVAL": "0.5s"}


def step(**extra: Any) -> dict[str, Any]:
    return {"type": "worker", "topic": "job.default", **extra}


async def executions(redis, job_id: str) -> int:
    return int(await redis.execute("HGET", EXECUTIONS_KEY, job_id) or 0)


async def wait_run(store: WorkflowStore, run_id: str, statuses: set[str], timeout: float = WAIT) -> Run:
    doc: dict | None = None
    with trio.move_on_after(timeout):
        while True:
            doc = await store.get_run(run_id)
            if doc is not None and doc.get("status") in statuses:
                return Run.from_dict(doc)
            await trio.sleep(0.1)
    raise AssertionError(f"run {run_id} did not reach {statuses}: {doc}")


async def start_stack(spawn, tmp_path, engines: int = 1, workers: int = 1) -> Stack:
    stack = Stack.create(spawn, tmp_path, **FAST_ENGINE)
    stack.kernel()
    stack.scheduler()
    for i in range(1, engines + 1):
        stack.workflow_engine(f"workflow-engine-{i}")
    for i in range(1, workers + 1):
        stack.worker(f"worker-{i}")
    await stack.ready()
    await trio.sleep(1.0)  # worker heartbeats reach the scheduler
    return stack


async def test_run_goes_through_the_job_path_and_each_step_runs_once(spawn, tmp_path, redis, bus, settings) -> None:
    stack = await start_stack(spawn, tmp_path)
    store = WorkflowStore(redis)
    workflow_id = unique("wf")
    await store.put_definition({"id": workflow_id, "steps": {
        "fetch": step(input={"url": "${input.url}"}),
        "decide": {"type": "condition", "depends_on": ["fetch"], "condition": "input.size > 2"},
        "act": step(depends_on=["decide"], input={"n": "${input.size}"}, for_each="input.items"),
        "notify": {"type": "notify", "depends_on": ["act"], "input": {"message": "done"}},
    }}, TENANT)
    async with engine_env(redis, bus, settings) as env:  # start_run only; the service drives the run
        run_id = await env.engine.start_run(workflow_id, TENANT, {"url": "u", "size": 3, "items": [1, 2, 3]})
    run = await wait_run(store, run_id, {"succeeded", "failed", "cancelled", "timed_out", "denied"})
    assert run.status == "succeeded", run
    jobs = [sr.job_id for sr in run.steps.values() if sr.job_id]
    assert len(jobs) == 4  # fetch + three for_each children
    for job_id in jobs:
        assert await executions(redis, job_id) == 1, job_id
        assert (await JobStore(redis).get(job_id))["state"] == "SUCCEEDED"
    assert run.steps["decide"].output is True
    text = http_get(stack.http_ports["workflow-engine-1"], "/metrics")
    assert metric(text, "cordum_workflows_completed_total") >= 1
    assert '"status"' in http_get(stack.http_ports["workflow-engine-1"], "/health")


async def test_a_retryable_failure_is_retried_by_the_scheduler_not_failed(spawn, tmp_path, redis, bus, settings) -> None:
    await start_stack(spawn, tmp_path)
    store = WorkflowStore(redis)
    workflow_id = unique("wf")
    await store.put_definition({"id": workflow_id, "steps": {"flaky": step(input={"fail_attempts": 1})}}, TENANT)
    async with engine_env(redis, bus, settings) as env:
        run_id = await env.engine.start_run(workflow_id, TENANT, {})
    run = await wait_run(store, run_id, {"succeeded", "failed"})
    assert run.status == "succeeded", run
    job_id = run.steps["flaky"].job_id
    assert run.steps["flaky"].attempts == 1  # one step job; the scheduler retried it
    assert await executions(redis, job_id) == 1  # counted once: the run that succeeded
    assert int(await redis.execute("HGET", f"{EXECUTIONS_KEY}:starts", job_id)) == 2


async def test_denied_step_job_fails_the_run_through_the_dlq(spawn, tmp_path, redis, bus, settings) -> None:
    await start_stack(spawn, tmp_path)
    store = WorkflowStore(redis)
    workflow_id = unique("wf")
    await store.put_definition({"id": workflow_id, "steps": {"bad": {"type": "worker", "topic": "job.danger"}}}, TENANT)
    async with engine_env(redis, bus, settings) as env:
        run_id = await env.engine.start_run(workflow_id, TENANT, {})
    run = await wait_run(store, run_id, {"succeeded", "failed", "denied"})
    assert run.status == "denied", run
    assert "dangerous work" in run.steps["bad"].error["message"]


async def test_killed_engine_its_peer_finishes_the_run(spawn, tmp_path, redis, bus, settings) -> None:
    """Two engines; one is killed -9 (and restarted) and the other paused for a few seconds while
    steps run; after resuming, every run ends and every step job executed exactly once. (The
    pause past the 30 s run-lock TTL is tests/ha/test_workflow_ha.py's.)"""
    stack = await start_stack(spawn, tmp_path, engines=2, workers=2)
    store = WorkflowStore(redis)
    workflow_id = unique("wf")
    await store.put_definition({"id": workflow_id, "steps": {
        "a": step(input={"sleep_ms": 100}),
        "b": step(depends_on=["a"], for_each="input.items", input={"sleep_ms": 50}),
        "c": step(depends_on=["b"]),
    }}, TENANT)
    run_ids = []
    async with engine_env(redis, bus, settings) as env:
        for _ in range(20):
            run_ids.append(await env.engine.start_run(workflow_id, TENANT, {"items": list(range(5))}))
    await trio.sleep(0.5)
    stack.procs["workflow-engine-1"].stop()  # SIGKILL
    stack.procs["workflow-engine-2"].signal(signal.SIGSTOP)
    await trio.sleep(3.0)
    stack.restart("workflow-engine-1")
    await stack.ready("workflow-engine-1")
    stack.procs["workflow-engine-2"].signal(signal.SIGCONT)
    for run_id in run_ids:
        run = await wait_run(store, run_id, {"succeeded", "failed", "cancelled", "timed_out", "denied"}, timeout=120)
        assert run.status == "succeeded", run
        jobs = [sr.job_id for sr in run.steps.values() if sr.job_id]
        assert len(jobs) == 7
        for job_id in jobs:
            assert await executions(redis, job_id) == 1, job_id
