"""The workflow engine's I/O core against real Redis and NATS. No scheduler runs: the test plays
its part, consuming `sys.job.submit` (its own durable) and answering step jobs with JobResults
(published on `sys.job.result` and fed to `handle_result`), so every run is deterministic."""

from __future__ import annotations

import json
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

import trio

from cordum.agent.v1.buspacket_pb2 import BusPacket
from cordum.agent.v1.job_pb2 import JobRequest, JobResult, JobStatus
from cordum.protocol import subjects
from cordum.protocol.packets import decode, encode, new_packet
from cordum.runtime.lease import Leases
from cordum.store import keys
from cordum.store.jobs import JobStore
from cordum.store.workflows import WorkflowStore
from cordum.workflow.engine import WorkflowEngine, status_name
from cordum.workflow.runstate import Run
from tests.conftest import unique

TIMEOUT = 10
TENANT = "acme"


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


class Tap:
    """Packets seen on a subject (a JetStream consumer of our own, or a core subscription)."""

    def __init__(self, keep: Callable[[BusPacket], bool]) -> None:
        self.packets: list[BusPacket] = []
        self.keep = keep
        self._changed = trio.Event()

    def _add(self, data: bytes) -> None:
        packet = decode(data)
        if self.keep(packet):
            self.packets.append(packet)
            self._changed.set()
            self._changed = trio.Event()

    async def consume(self, bus, subject: str, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with bus.consume(subject, unique("wf-test")) as messages:
            task_status.started()
            async for msg in messages:
                self._add(msg.data)
                await msg.ack()

    async def subscribe(self, bus, subject: str, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with bus.subscribe(subject) as messages:
            task_status.started()
            async for msg in messages:
                self._add(msg.data)

    async def wait(self, predicate: Callable[[BusPacket], bool], what: str) -> BusPacket:
        with trio.move_on_after(TIMEOUT):
            while True:
                for packet in self.packets:
                    if predicate(packet):
                        return packet
                await self._changed.wait()
        raise AssertionError(f"timed out waiting for {what}")


@dataclass
class Env:
    engine: WorkflowEngine
    store: WorkflowStore
    jobs: JobStore
    redis: Any
    bus: Any
    clock: Clock
    submits: Tap
    cancels: Tap
    events: Tap
    runs: set[str] = field(default_factory=set)
    workflows: set[str] = field(default_factory=set)

    async def define(self, steps: dict[str, Any], **extra: Any) -> str:
        workflow_id = unique("wf")
        self.workflows.add(workflow_id)
        await self.store.put_definition({"id": workflow_id, "steps": steps, **extra}, TENANT)
        return workflow_id

    async def start(self, workflow_id: str, input: dict[str, Any] | None = None) -> str:
        run_id = await self.engine.start_run(workflow_id, TENANT, input or {})
        self.runs.add(run_id)
        return run_id

    async def run(self, run_id: str) -> Run:
        doc = await self.store.get_run(run_id)
        assert doc is not None
        return Run.from_dict(doc)

    async def request(self, job_id: str) -> JobRequest:
        packet = await self.submits.wait(lambda p: p.job_request.job_id == job_id, f"submit of {job_id}")
        return packet.job_request

    def requests(self, job_id: str) -> list[JobRequest]:
        return [p.job_request for p in self.submits.packets if p.job_request.job_id == job_id]

    async def answer(self, job_id: str, status: str = "SUCCEEDED", output: Any = None, error: str = "") -> None:
        """What the scheduler would relay from a worker: output at `res:<id>`, then the result."""
        result = JobResult(job_id=job_id, status=JobStatus.Value("JOB_STATUS_" + status), worker_id="test-worker",
                           error_message=error)
        if output is not None:
            await self.redis.execute("SET", keys.result(job_id), json.dumps(output))
            result.result_ptr = f"redis://{keys.result(job_id)}"
        packet = new_packet(result, sender_id="test-worker", trace_id=job_id.split(":")[0])
        await self.bus.publish(subjects.RESULT, encode(packet), msg_id=f"{subjects.RESULT}:{job_id}:{status}")
        await self.engine.handle_result(packet)


@asynccontextmanager
async def engine_env(redis, bus, settings) -> AsyncIterator[Env]:
    store, jobs, clock = WorkflowStore(redis), JobStore(redis), Clock()
    engine = WorkflowEngine(store=store, jobs=jobs, bus=bus, leases=Leases(redis, settings.instance_id),
                            redis=redis, clock=clock)
    env_runs: set[str] = set()
    env_workflows: set[str] = set()

    def ours(packet: BusPacket) -> bool:
        kind = packet.WhichOneof("payload")
        if kind == "job_request":
            return packet.job_request.labels.get("workflow_id") in env_workflows
        if kind == "job_cancel":
            return packet.job_cancel.job_id.split(":")[0] in env_runs
        return kind == "alert" and packet.alert.details.get("workflow_id") in env_workflows

    env = Env(engine, store, jobs, redis, bus, clock, Tap(ours), Tap(ours), Tap(ours), env_runs, env_workflows)
    async with trio.open_nursery() as nursery:
        await nursery.start(env.submits.consume, bus, subjects.SUBMIT)
        await nursery.start(env.cancels.subscribe, bus, subjects.CANCEL)
        await nursery.start(env.events.subscribe, bus, subjects.WORKFLOW_EVENT)
        yield env
        nursery.cancel_scope.cancel()


def worker(topic: str = "job.test.echo", **extra: Any) -> dict[str, Any]:
    return {"type": "worker", "topic": topic, **extra}


async def test_chain_succeeds_with_outputs_flowing(redis, bus, settings) -> None:
    async with engine_env(redis, bus, settings) as env:
        workflow_id = await env.define({
            "a": worker(input={"url": "${input.url}"}),
            "b": worker(depends_on=["a"], input={"n": "${steps.a.output.count}", "msg": "got ${steps.a.output.count}"}),
            "c": worker(depends_on=["b"], output_path="final"),
        })
        run_id = await env.start(workflow_id, {"url": "https://example.org"})

        req_a = await env.request(f"{run_id}:a@1")
        assert req_a.topic == "job.test.echo"
        assert dict(req_a.labels) == {"workflow_id": workflow_id, "run_id": run_id, "step_id": "a",
                                      "_source": "workflow"}
        assert req_a.env["tenant_id"] == TENANT and req_a.env["run_id"] == run_id
        assert req_a.context_ptr == f"redis://ctx:{run_id}:a@1"
        assert await env.jobs.get_context(f"{run_id}:a@1") == {"url": "https://example.org"}
        meta = await env.jobs.get(f"{run_id}:a@1")
        assert meta is not None and meta["state"] == "PENDING" and meta["tenant"] == TENANT
        assert (await env.run(run_id)).step("a").status == "running"
        assert env.requests(f"{run_id}:b@1") == []

        await env.answer(f"{run_id}:a@1", output={"count": 3})
        await env.request(f"{run_id}:b@1")
        assert await env.jobs.get_context(f"{run_id}:b@1") == {"n": 3, "msg": "got 3"}

        await env.answer(f"{run_id}:b@1", output={"ok": True})
        await env.request(f"{run_id}:c@1")
        await env.answer(f"{run_id}:c@1", output={"done": 1})

        run = await env.run(run_id)
        assert run.status == "succeeded"
        assert [run.step(s).status for s in "abc"] == ["succeeded"] * 3
        assert run.context["steps"]["a"]["output"] == {"count": 3}
        assert run.context["final"] == {"done": 1}
        timeline = await env.store.timeline(run_id)
        assert timeline is not None and timeline[-1]["type"] == "run_status" and timeline[-1]["status"] == "succeeded"
        assert [len(env.requests(f"{run_id}:{s}@1")) for s in "abc"] == [1, 1, 1]


async def test_condition_transform_and_notify_run_inline(redis, bus, settings) -> None:
    async with engine_env(redis, bus, settings) as env:
        workflow_id = await env.define({
            "fetch": worker(),
            "big": {"type": "condition", "depends_on": ["fetch"], "condition": "steps.fetch.output.size > 10"},
            "shape": {"type": "transform", "depends_on": ["big"], "input": {"size": "${steps.fetch.output.size}",
                                                                             "big": "${steps.big.output}"}},
            "tell": {"type": "notify", "depends_on": ["shape"], "input": {"level": "info",
                                                                         "message": "size ${steps.shape.output.size}"}},
            "act": worker(depends_on=["tell"], condition="steps.big.output"),
        })
        run_id = await env.start(workflow_id)
        await env.answer(f"{run_id}:fetch@1", output={"size": 42})
        await env.request(f"{run_id}:act@1")
        run = await env.run(run_id)
        assert run.step("big").output is True
        assert run.step("shape").output == {"size": 42, "big": True}
        alert = await env.events.wait(lambda p: p.alert.details.get("step_id") == "tell", "notify alert")
        assert alert.alert.message == "size 42" and alert.sender_id == "workflow-engine"
        await env.answer(f"{run_id}:act@1", output={})
        assert (await env.run(run_id)).status == "succeeded"

        # condition false: the gated step is skipped, no job
        run_id = await env.start(workflow_id)
        await env.answer(f"{run_id}:fetch@1", output={"size": 1})
        run = await env.run(run_id)
        assert run.step("big").output is False
        assert run.step("act").status == "skipped"
        assert env.requests(f"{run_id}:act@1") == []
        assert run.terminal


async def test_failed_step_skips_its_dependent(redis, bus, settings) -> None:
    async with engine_env(redis, bus, settings) as env:
        workflow_id = await env.define({"a": worker(), "b": worker(depends_on=["a"])})
        run_id = await env.start(workflow_id)
        await env.answer(f"{run_id}:a@1", "FAILED_FATAL", error="boom")
        run = await env.run(run_id)
        assert run.status == "failed"
        assert run.step("a").status == "failed" and run.step("a").error["message"] == "boom"
        assert run.step("b").status == "skipped"
        assert env.requests(f"{run_id}:b@1") == []


async def test_retried_step_then_success(redis, bus, settings) -> None:
    async with engine_env(redis, bus, settings) as env:
        workflow_id = await env.define({"a": worker(retry={"max_retries": 2, "initial_backoff_sec": 2}),
                                        "b": worker(depends_on=["a"])})
        run_id = await env.start(workflow_id)
        await env.answer(f"{run_id}:a@1", "FAILED", error="flaky")
        run = await env.run(run_id)
        assert run.step("a").status == "pending" and run.step("a").next_attempt_at == env.clock.now + 2
        assert await env.store.timer_due(f"{workflow_id}:{run_id}") == env.clock.now + 2

        await env.engine.advance(run_id)  # not due yet: nothing happens
        assert env.requests(f"{run_id}:a@2") == []

        env.clock.now += 2.5  # what the delay poller does when the timer fires
        await env.engine.advance(run_id)
        await env.request(f"{run_id}:a@2")
        await env.answer(f"{run_id}:a@2", output={"v": 2})
        await env.request(f"{run_id}:b@1")
        await env.answer(f"{run_id}:b@1", output={})
        run = await env.run(run_id)
        assert run.status == "succeeded" and run.step("a").attempts == 2


async def test_duplicate_result_changes_nothing(redis, bus, settings) -> None:
    async with engine_env(redis, bus, settings) as env:
        workflow_id = await env.define({"a": worker(), "b": worker(depends_on=["a"])})
        run_id = await env.start(workflow_id)
        await env.answer(f"{run_id}:a@1", output={"x": 1})
        await env.request(f"{run_id}:b@1")
        doc = await env.store.get_run(run_id)
        timeline = await env.store.timeline(run_id)
        env.clock.now += 1
        await env.answer(f"{run_id}:a@1", output={"x": 1})
        await env.answer(f"{run_id}:a@1", "FAILED", error="late")
        assert await env.store.get_run(run_id) == doc
        assert await env.store.timeline(run_id) == timeline
        await trio.sleep(0.2)
        assert len(env.requests(f"{run_id}:b@1")) == 1


async def test_cancel_publishes_job_cancel_for_running_step(redis, bus, settings) -> None:
    async with engine_env(redis, bus, settings) as env:
        workflow_id = await env.define({"a": worker(), "b": worker(depends_on=["a"])})
        run_id = await env.start(workflow_id)
        await env.request(f"{run_id}:a@1")
        assert not await env.engine.cancel_run(run_id, "other-tenant")
        assert await env.engine.cancel_run(run_id, TENANT)
        packet = await env.cancels.wait(lambda p: p.job_cancel.job_id == f"{run_id}:a@1", "JobCancel")
        assert packet.job_cancel.reason
        run = await env.run(run_id)
        assert run.status == "cancelled"
        assert run.step("a").status == "cancelled"
        assert run.step("b").job_id == ""  # never started (a step not begun has no entry to close)
        # the job's late result changes nothing, and b never starts
        await env.answer(f"{run_id}:a@1", output={})
        assert (await env.run(run_id)).status == "cancelled"
        assert env.requests(f"{run_id}:b@1") == []


async def test_stale_fence_drops_the_operation(redis, bus, settings) -> None:
    async with engine_env(redis, bus, settings) as env:
        workflow_id = await env.define({"a": worker(), "b": worker(depends_on=["a"])})
        run_id = await env.start(workflow_id)
        await env.request(f"{run_id}:a@1")
        # Another holder (this one's lease expired while it was paused) wrote with a newer fence.
        doc = await env.store.get_run(run_id)
        await env.store.update_run(doc, fence=10**9)

        await env.answer(f"{run_id}:a@1", output={"x": 1})
        assert await env.store.get_run(run_id) == doc  # nothing written
        await trio.sleep(0.2)
        assert env.requests(f"{run_id}:b@1") == []  # nothing published
        assert not await env.engine.cancel_run(run_id, TENANT)
        assert (await env.run(run_id)).status == "running"

        async with env.engine.run_locked(run_id) as (run, fence):
            assert run is not None and fence < 10**9
            assert not await env.engine.save(run, fence)


async def test_run_lock_is_reentrant_and_exclusive(redis, bus, settings) -> None:
    async with engine_env(redis, bus, settings) as env:
        workflow_id = await env.define({"a": worker()})
        run_id = await env.start(workflow_id)
        other = WorkflowEngine(store=env.store, jobs=env.jobs, bus=bus, leases=Leases(redis, "other"),
                               redis=redis, clock=env.clock, lock_wait=0.05)
        async with env.engine.run_locked(run_id) as (run, fence):
            async with env.engine.run_locked(run_id) as (again, fence2):
                assert fence2 == fence and again == run
            try:
                async with other.run_locked(run_id):
                    raise AssertionError("a second holder got the run lock")
            except Exception as exc:
                assert type(exc).__name__ == "RunBusy"


def test_status_names() -> None:
    assert status_name(JobStatus.JOB_STATUS_SUCCEEDED) == "SUCCEEDED"
    assert status_name(JobStatus.JOB_STATUS_FAILED_RETRYABLE) == "FAILED_RETRYABLE"
    assert status_name(999) == "FAILED"


async def test_for_each_fans_out_and_collects(redis, bus, settings) -> None:
    async with engine_env(redis, bus, settings) as env:
        workflow_id = await env.define({
            "each": worker(for_each="input.items", max_parallel=2, input={"tag": "x"}),
            "after": worker(depends_on=["each"], input={"all": "${steps.each.output}"}),
        })
        run_id = await env.start(workflow_id, {"items": [10, 20, 30]})
        await env.request(f"{run_id}:each[0]@1")
        await env.request(f"{run_id}:each[1]@1")
        assert env.requests(f"{run_id}:each[2]@1") == []  # max_parallel 2
        assert await env.jobs.get_context(f"{run_id}:each[1]@1") == {"tag": "x", "item": 20}
        await env.answer(f"{run_id}:each[0]@1", output=100)
        await env.request(f"{run_id}:each[2]@1")
        await env.answer(f"{run_id}:each[2]@1", output=300)
        await env.answer(f"{run_id}:each[1]@1", output=200)
        await env.request(f"{run_id}:after@1")
        assert await env.jobs.get_context(f"{run_id}:after@1") == {"all": [100, 200, 300]}


async def test_approval_gate_job_waits_then_continues(redis, bus, settings) -> None:
    async with engine_env(redis, bus, settings) as env:
        workflow_id = await env.define({"ask": {"type": "approval", "input": {"amount": "${input.amount}"}},
                                        "act": worker(depends_on=["ask"])})
        run_id = await env.start(workflow_id, {"amount": 5})
        gate = await env.request(f"{run_id}:ask@1")
        assert gate.topic == subjects.APPROVAL_GATE_TOPIC and gate.labels["gate_type"] == "workflow_approval"
        context = await env.jobs.get_context(f"{run_id}:ask@1")
        assert context["kind"] == "workflow_approval_context" and context["decision"] == {"amount": 5}
        run = await env.run(run_id)
        assert run.status == "waiting" and run.step("ask").status == "waiting"
        await env.answer(f"{run_id}:ask@1")  # approved
        await env.request(f"{run_id}:act@1")

        run_id = await env.start(workflow_id, {"amount": 9})
        await env.request(f"{run_id}:ask@1")
        await env.answer(f"{run_id}:ask@1", "DENIED", error="rejected by a human")
        run = await env.run(run_id)
        assert run.status == "denied" and run.step("act").status == "skipped"


async def test_workflow_timeout_cancels_running_jobs(redis, bus, settings) -> None:
    async with engine_env(redis, bus, settings) as env:
        workflow_id = await env.define({"a": worker()}, timeout_sec=5)
        run_id = await env.start(workflow_id)
        await env.request(f"{run_id}:a@1")
        assert await env.store.timer_due(f"{workflow_id}:{run_id}") == env.clock.now + 5
        env.clock.now += 6
        await env.engine.advance(run_id)
        run = await env.run(run_id)
        assert run.status == "timed_out" and run.step("a").status == "timed_out"
        await env.cancels.wait(lambda p: p.job_cancel.job_id == f"{run_id}:a@1", "JobCancel after timeout")


async def test_concurrent_results_of_parallel_steps(redis, bus, settings) -> None:
    async with engine_env(redis, bus, settings) as env:
        workflow_id = await env.define({"a": worker(), "b": worker(), "join": worker(depends_on=["a", "b"])})
        run_id = await env.start(workflow_id)
        await env.request(f"{run_id}:a@1")
        await env.request(f"{run_id}:b@1")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(env.answer, f"{run_id}:a@1", "SUCCEEDED", {"a": 1})
            nursery.start_soon(env.answer, f"{run_id}:b@1", "SUCCEEDED", {"b": 2})
        await env.request(f"{run_id}:join@1")
        await env.answer(f"{run_id}:join@1", output={})
        assert (await env.run(run_id)).status == "succeeded"
        assert len(env.requests(f"{run_id}:join@1")) == 1


async def test_a_step_whose_job_could_not_be_published_stays_running_and_cancellable(redis, bus, settings) -> None:
    from cordum.infra.bus import open_bus

    async with engine_env(redis, bus, settings) as env:
        workflow_id = await env.define({"a": worker()})
        async with open_bus(settings, name="closed-soon") as closed:
            pass
        broken = WorkflowEngine(store=env.store, jobs=env.jobs, bus=closed, leases=Leases(redis, "broken"),
                                redis=redis, clock=env.clock)
        with trio.fail_after(TIMEOUT):
            run_id = await broken.start_run(workflow_id, TENANT, {})
        env.runs.add(run_id)
        run = await env.run(run_id)
        job_id = f"{run_id}:a@1"
        assert run.step("a").status == "running" and run.step("a").job_id == job_id
        assert (await env.jobs.get(job_id))["state"] == "PENDING"  # the scheduler's replayer re-sends it
        events = [e["type"] for e in await env.store.timeline(run_id)]
        assert "step_dispatch_failed" in events
        assert env.requests(job_id) == []
        assert await env.engine.cancel_run(run_id, TENANT)  # the job is not orphaned
        await env.cancels.wait(lambda p: p.job_cancel.job_id == job_id, "cancel of the unpublished job")


async def test_reconciler_republishes_a_step_job_whose_record_was_never_written(redis, bus, settings) -> None:
    async with engine_env(redis, bus, settings) as env:
        from cordum.workflow import runstate as rs
        from cordum.workflow.definition import parse_workflow

        workflow_id = await env.define({"a": worker()})
        definition = await env.store.get_definition(workflow_id)
        workflow = parse_workflow(definition)
        # What an engine that died right after persisting the dispatch left: step a running
        # under its job id, no job record, nothing published.
        run = Run(id=unique("run"), workflow_id=workflow_id, org_id=TENANT, created_at=env.clock.now)
        run, _ = rs.start(run, env.clock.now, workflow)
        run, _ = rs.mark_dispatched(workflow, run, "a", env.clock.now)
        run_id, _ = await env.store.create_run(run.to_dict(), tenant=TENANT, definition=definition)
        env.runs.add(run_id)
        job_id = f"{run_id}:a@1"
        await env.engine.reconcile(run_id)  # too recent to call lost: left alone
        assert env.requests(job_id) == [] and await env.jobs.get(job_id) is None
        env.clock.now += 60
        await env.engine.reconcile(run_id)
        await env.request(job_id)
        assert (await env.jobs.get(job_id))["state"] == "PENDING"
        await env.answer(job_id)
        assert (await env.run(run_id)).status == "succeeded"


async def test_a_result_of_a_superseded_attempt_is_not_the_steps_outcome(redis, bus, settings) -> None:
    """The scheduler moved the step's job to a second worker (attempt 2): the first worker's late
    result — by its attempt header, or (a CAP SDK worker, no header) by its worker id — is ignored,
    as the scheduler ignores it; the current attempt's result counts."""
    from types import SimpleNamespace

    async with engine_env(redis, bus, settings) as env:
        workflow_id = await env.define({"a": worker()})
        run_id = await env.start(workflow_id)
        job_id = f"{run_id}:a@1"
        await env.request(job_id)
        await redis.execute("HSET", keys.job_meta(job_id), "attempts", "2", "worker_id", "w2")

        def result(worker_id: str) -> BusPacket:
            return new_packet(JobResult(job_id=job_id, status=JobStatus.JOB_STATUS_FAILED, worker_id=worker_id,
                                        error_message="late"), sender_id=worker_id)

        await env.engine.on_result(result("w1"), SimpleNamespace(headers={subjects.ATTEMPT_HEADER: "1"}))
        await env.engine.on_result(result("w1"), SimpleNamespace(headers={}))
        assert (await env.run(run_id)).step("a").status == "running"
        await env.engine.on_result(result("w2"), SimpleNamespace(headers={subjects.ATTEMPT_HEADER: "2"}))
        assert (await env.run(run_id)).step("a").status == "failed"


async def test_a_run_follows_the_definition_it_started_with(redis, bus, settings) -> None:
    """Editing or deleting a workflow while it runs neither wedges nor redirects its runs."""
    async with engine_env(redis, bus, settings) as env:
        workflow_id = await env.define({"a": worker(), "b": worker(depends_on=["a"])})
        run_id = await env.start(workflow_id)
        await env.request(f"{run_id}:a@1")
        await env.store.put_definition({"id": workflow_id, "steps": {"x": worker()}}, TENANT)
        fresh = WorkflowEngine(store=env.store, jobs=env.jobs, bus=bus, leases=Leases(redis, "fresh"),
                               redis=redis, clock=env.clock)  # no cache: reads what the run keeps
        env.engine = fresh
        await env.answer(f"{run_id}:a@1")
        await env.request(f"{run_id}:b@1")
        assert await env.store.delete_definition(workflow_id, TENANT)
        await env.answer(f"{run_id}:b@1")
        run = await env.run(run_id)
        assert run.status == "succeeded" and set(run.steps) == {"a", "b"}


async def test_reconciler_walks_every_quiet_run_a_page_at_a_time(redis, bus, settings) -> None:
    """Runs that stay quiet (waiting for a person) do not keep the rest from their turn."""
    from cordum.workflow.loops import RunReconciler

    async with engine_env(redis, bus, settings) as env:
        workflow_id = await env.define({"a": worker()})
        waiting = []
        for _ in range(5):
            run_id, _ = await env.store.create_run({"workflow_id": workflow_id, "status": "waiting"}, tenant=TENANT)
            waiting.append(run_id)
        seen: list[str] = []

        async def record(run_id: str, **_: object) -> None:
            seen.append(run_id)

        env.engine.reconcile = record
        reconciler = RunReconciler(env.engine, scan=0.0, limit=2)
        lease = SimpleLease()
        for _ in range(3):
            await reconciler.tick(lease)
        assert set(seen) == set(waiting) and len(seen) == 5  # 2 + 2 + 1, each once
        await reconciler.tick(lease)  # wrapped around
        assert set(seen[5:]) == set(seen[:2])  # a page's runs are reconciled concurrently


class SimpleLease:
    lost = False


async def test_a_memory_id_the_context_engine_would_refuse_fails_the_step_naming_it(redis, bus, settings) -> None:
    async with engine_env(redis, bus, settings) as env:
        workflow_id = await env.define({"a": worker()})
        run_id = await env.start(workflow_id, {"memory_id": "conv 1"})
        run = await env.run(run_id)
        assert run.status == "failed" and "memory_id" in run.steps["a"].error["message"]
        assert env.requests(f"{run_id}:a@1") == []
