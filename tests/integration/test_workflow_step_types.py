"""The engine's own step types (delay, switch, storage, parallel, loop, subworkflow) against real
Redis and NATS, with the deterministic harness of test_workflow_engine.py: the test plays the
scheduler (answers step jobs) and moves the engine's clock."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any
from cordum.runtime.lease import Leases
from cordum.workflow.engine import WorkflowEngine
from tests.conftest import unique
from tests.integration.test_workflow_engine import TENANT, Env, engine_env, worker


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat().replace("+00:00", "Z")


async def timeline_types(env: Env, run_id: str) -> list[str]:
    return [e["type"] for e in await env.store.timeline(run_id) or []]


def other_engine(env: Env, name: str) -> WorkflowEngine:
    """A second engine on the same stores (another replica, or this one after a restart)."""
    return WorkflowEngine(store=env.store, jobs=env.jobs, bus=env.bus, leases=Leases(env.redis, name),
                          redis=env.redis, clock=env.clock)


# --- delay -------------------------------------------------------------------------------------
async def test_delay_waits_durably_then_its_dependent_runs(redis, bus, settings) -> None:
    async with engine_env(redis, bus, settings) as env:
        workflow_id = await env.define({"a": worker(), "wait": {"type": "delay", "delay_sec": 30,
                                                                "depends_on": ["a"]},
                                        "b": worker(depends_on=["wait"])})
        run_id = await env.start(workflow_id)
        await env.answer(f"{run_id}:a@1", output={})
        t0 = env.clock.now
        run = await env.run(run_id)
        wait = run.step("wait")
        assert (wait.status, wait.next_attempt_at, wait.job_id) == ("running", t0 + 30, "")
        assert await env.store.timer_due(f"{workflow_id}:{run_id}") == t0 + 30
        assert "step_delay_started" in await timeline_types(env, run_id)
        assert env.requests(f"{run_id}:wait@1") == []  # a delay dispatches no job

        env.clock.now = t0 + 29
        await env.engine.advance(run_id)  # early: still waiting
        assert (await env.run(run_id)).step("wait").status == "running"

        # the replica that started the wait is gone; another one's poller fires the timer
        env.clock.now = t0 + 30
        assert await other_engine(env, "replica-2").fire_timers() >= 1
        await env.request(f"{run_id}:b@1")
        run = await env.run(run_id)
        assert run.step("wait").status == "succeeded" and run.step("wait").output == {"due_at": t0 + 30}
        assert "step_delay_completed" in await timeline_types(env, run_id)
        await env.answer(f"{run_id}:b@1", output={})
        assert (await env.run(run_id)).status == "succeeded"


async def test_delay_reconciler_completes_a_due_wait(redis, bus, settings) -> None:
    async with engine_env(redis, bus, settings) as env:
        workflow_id = await env.define({"wait": {"type": "delay", "timeout_sec": 10}, "b": worker(depends_on=["wait"])})
        run_id = await env.start(workflow_id)
        assert (await env.run(run_id)).step("wait").next_attempt_at == env.clock.now + 10
        env.clock.now += 10
        await env.engine.reconcile(run_id)  # the timer was lost: the reconciler's pass still moves it
        await env.request(f"{run_id}:b@1")


async def test_delay_until_past_or_bad(redis, bus, settings) -> None:
    async with engine_env(redis, bus, settings) as env:
        workflow_id = await env.define({"wait": {"type": "delay", "delay_until": "${input.at}"},
                                        "b": worker(depends_on=["wait"])})
        run_id = await env.start(workflow_id, {"at": iso(env.clock.now - 60)})
        await env.request(f"{run_id}:b@1")  # a past time: no wait at all
        run = await env.run(run_id)
        assert run.step("wait").status == "succeeded" and run.step("wait").next_attempt_at is None

        run_id = await env.start(workflow_id, {"at": iso(env.clock.now + 3600)})
        assert (await env.run(run_id)).step("wait").next_attempt_at == env.clock.now + 3600

        run_id = await env.start(workflow_id, {"at": "next tuesday"})
        run = await env.run(run_id)
        assert run.status == "failed" and "not an RFC3339" in run.step("wait").error["message"]


async def test_delay_is_cancelled_with_its_run(redis, bus, settings) -> None:
    async with engine_env(redis, bus, settings) as env:
        workflow_id = await env.define({"wait": {"type": "delay", "delay_sec": 5}, "b": worker(depends_on=["wait"])})
        run_id = await env.start(workflow_id)
        assert await env.engine.cancel_run(run_id, TENANT)
        env.clock.now += 10
        await env.engine.advance(run_id)
        run = await env.run(run_id)
        assert run.status == "cancelled" and run.step("wait").status == "cancelled"
        assert env.requests(f"{run_id}:b@1") == []


# --- switch ------------------------------------------------------------------------------------
async def test_switch_runs_one_branch_and_the_join(redis, bus, settings) -> None:
    async with engine_env(redis, bus, settings) as env:
        workflow_id = await env.define({
            "route": {"type": "switch", "condition": "input.size > 10 ? 'big' : input.size",
                      "input": {"cases": [{"when": "big", "next": "big"}, {"when": 0, "next": "empty"}],
                                "default": "small"}},
            "big": worker(depends_on=["route"]),
            "empty": {"type": "transform", "depends_on": ["route"], "input": {"none": True}},
            "small": worker(depends_on=["route"]),
            "small2": worker(depends_on=["small"]),
            "join": worker(depends_on=["big", "empty", "small2"], input={"via": "${steps.route.output.target_step}"}),
        })
        run_id = await env.start(workflow_id, {"size": 50})
        await env.answer(f"{run_id}:big@1", output={"b": 1})
        join = await env.request(f"{run_id}:join@1")
        assert await env.jobs.get_context(join.job_id) == {"via": "big"}
        await env.answer(f"{run_id}:join@1", output={})
        run = await env.run(run_id)
        assert run.status == "succeeded"
        assert run.step("route").output == {"matched_case": 0, "matched_value": "big", "target_step": "big"}
        for sid in ("empty", "small", "small2"):
            assert (run.step(sid).status, run.step(sid).skip_reason) == ("skipped", "switch_branch_not_taken")
        assert env.requests(f"{run_id}:small@1") == [] and env.requests(f"{run_id}:small2@1") == []
        skipped = [e for e in await env.store.timeline(run_id) if e["type"] == "step_skipped"]
        assert {e["step_id"] for e in skipped} == {"empty", "small", "small2"}

        run_id = await env.start(workflow_id, {"size": 0})  # an inline branch: the join follows at once
        await env.request(f"{run_id}:join@1")
        assert (await env.run(run_id)).step("empty").output == {"none": True}

        run_id = await env.start(workflow_id, {"size": 3})  # the default, a two-step branch
        await env.answer(f"{run_id}:small@1", output={})
        await env.answer(f"{run_id}:small2@1", output={})
        await env.request(f"{run_id}:join@1")
        run = await env.run(run_id)
        assert run.step("route").output["matched_case"] == "default" and run.step("big").status == "skipped"


async def test_switch_with_a_bad_condition_fails(redis, bus, settings) -> None:
    async with engine_env(redis, bus, settings) as env:
        workflow_id = await env.define({
            "route": {"type": "switch", "condition": "input.n > 1", "input": {"cases": {"1": "a"}}},
            "a": worker(depends_on=["route"]),
        })
        run_id = await env.start(workflow_id, {})  # n missing: null > 1 is an error
        run = await env.run(run_id)
        assert run.status == "failed" and run.step("route").status == "failed"
        assert "route" in run.error["message"] and run.step("a").status == "skipped"


# --- storage -----------------------------------------------------------------------------------
async def test_storage_writes_reads_and_deletes_run_context(redis, bus, settings) -> None:
    async with engine_env(redis, bus, settings) as env:
        workflow_id = await env.define({
            "put": {"type": "storage", "input": {"operation": "write", "key": "cart.${input.who}",
                                                 "value": {"n": "${input.n}"}}},
            "use": worker(depends_on=["put"], input={"n": "${ctx.cart.bob.n}"}),
            "get": {"type": "storage", "depends_on": ["use"], "input": {"operation": "read", "key": "cart.bob"}},
            "drop": {"type": "storage", "depends_on": ["get"], "input": {"operation": "delete", "key": "cart.bob"}},
            "again": {"type": "storage", "depends_on": ["drop"], "input": {"operation": "read", "key": "cart.bob"}},
        })
        run_id = await env.start(workflow_id, {"who": "bob", "n": 2})
        use = await env.request(f"{run_id}:use@1")
        assert await env.jobs.get_context(use.job_id) == {"n": 2}
        assert (await env.run(run_id)).context["cart"] == {"bob": {"n": 2}}
        await env.answer(use.job_id, output={})
        run = await env.run(run_id)
        assert run.step("get").output == {"n": 2} and run.step("drop").output == {"n": 2}
        assert run.context["cart"] == {}
        assert run.status == "failed" and run.step("again").status == "failed"
        assert run.step("again").error["message"] == "storage read: key 'cart.bob' is not in the run context"


# --- parallel ----------------------------------------------------------------------------------
async def test_parallel_all_with_max_parallel(redis, bus, settings) -> None:
    async with engine_env(redis, bus, settings) as env:
        workflow_id = await env.define({
            "fan": {"type": "parallel", "input": {"steps": ["b", "c", "t"], "max_parallel": 1}},
            "b": worker(input={"who": "b"}),
            "c": worker(input={"who": "c"}),
            "t": {"type": "transform", "input": {"x": "${input.x}"}},
            "after": worker(depends_on=["fan"], input={"all": "${steps.fan.output}"}),
        })
        run_id = await env.start(workflow_id, {"x": 7})
        await env.request(f"{run_id}:b@1")
        assert env.requests(f"{run_id}:c@1") == []  # one child at a time
        await env.answer(f"{run_id}:b@1", output={"b": 1})
        await env.request(f"{run_id}:c@1")
        await env.answer(f"{run_id}:c@1", output={"c": 2})
        after = await env.request(f"{run_id}:after@1")
        assert await env.jobs.get_context(after.job_id) == {"all": {"b": {"b": 1}, "c": {"c": 2}, "t": {"x": 7}}}
        await env.answer(after.job_id, output={})
        run = await env.run(run_id)
        assert run.status == "succeeded" and run.step("fan").children == ("b", "c", "t")


async def test_parallel_any_cancels_the_others(redis, bus, settings) -> None:
    async with engine_env(redis, bus, settings) as env:
        workflow_id = await env.define({
            "race": {"type": "parallel", "input": {"steps": ["fast", "slow", "wait"], "strategy": "any"}},
            "fast": worker(),
            "slow": worker(),
            "wait": {"type": "delay", "delay_sec": 60},
            "after": worker(depends_on=["race"]),
        })
        run_id = await env.start(workflow_id)
        await env.request(f"{run_id}:slow@1")
        await env.answer(f"{run_id}:fast@1", output={"won": True})
        await env.cancels.wait(lambda p: p.job_cancel.job_id == f"{run_id}:slow@1", "cancel of the slower child")
        await env.request(f"{run_id}:after@1")
        run = await env.run(run_id)
        assert run.step("race").output == {"fast": {"won": True}}
        assert run.step("slow").status == "cancelled" and run.step("wait").status == "cancelled"
        await env.answer(f"{run_id}:slow@1", output={"late": True})  # its late result changes nothing
        assert (await env.run(run_id)).step("slow").status == "cancelled"
        await env.answer(f"{run_id}:after@1", output={})
        assert (await env.run(run_id)).status == "succeeded"


async def test_parallel_n_of_m_fails_when_it_can_no_longer_succeed(redis, bus, settings) -> None:
    async with engine_env(redis, bus, settings) as env:
        workflow_id = await env.define({
            "vote": {"type": "parallel", "input": {"steps": ["v1", "v2", "v3"], "strategy": "n_of_m", "required": 2}},
            "v1": worker(), "v2": worker(), "v3": worker(),
        })
        run_id = await env.start(workflow_id)
        await env.answer(f"{run_id}:v1@1", "FAILED_FATAL", error="no")
        assert (await env.run(run_id)).step("vote").status == "running"
        await env.answer(f"{run_id}:v2@1", "FAILED_FATAL", error="nope")
        await env.cancels.wait(lambda p: p.job_cancel.job_id == f"{run_id}:v3@1", "cancel of the last voter")
        run = await env.run(run_id)
        assert run.status == "failed" and run.step("vote").status == "failed"
        assert run.step("vote").error["message"].startswith("0 of the 2 children parallel vote needs succeeded")


# --- loop --------------------------------------------------------------------------------------
async def test_loop_runs_its_body_until_done(redis, bus, settings) -> None:
    async with engine_env(redis, bus, settings) as env:
        workflow_id = await env.define({
            "poll": {"type": "loop", "input": {"body_step": "check", "until": "loop.previous_output.done",
                                               "max_iterations": 5}},
            "check": worker(input={"i": "${loop.index}", "n": "${loop.iteration}", "prev": "${loop.previous_output}"}),
            "after": worker(depends_on=["poll"], input={"got": "${steps.poll.output}"}),
        })
        run_id = await env.start(workflow_id)
        first = await env.request(f"{run_id}:poll[0]@1")
        assert first.labels["step_id"] == "poll[0]"
        assert await env.jobs.get_context(first.job_id) == {"i": 0, "n": 1}  # a nil template drops its key
        await env.answer(first.job_id, output={"done": False, "k": 1})
        second = await env.request(f"{run_id}:poll[1]@1")
        assert await env.jobs.get_context(second.job_id) == {"i": 1, "n": 2, "prev": {"done": False, "k": 1}}
        await env.answer(second.job_id, output={"done": True, "k": 2})
        after = await env.request(f"{run_id}:after@1")
        assert await env.jobs.get_context(after.job_id) == {"got": {"iterations": 2,
                                                                    "last_output": {"done": True, "k": 2}}}
        run = await env.run(run_id)
        assert run.step("poll").children == ("poll[0]", "poll[1]")
        assert [e["data"]["index"] for e in await env.store.timeline(run_id) if e["type"] == "loop_iteration"] == [0, 1]
        assert env.requests(f"{run_id}:poll[2]@1") == []


async def test_inline_loop_and_the_cap(redis, bus, settings) -> None:
    async with engine_env(redis, bus, settings) as env:
        workflow_id = await env.define({
            "count": {"type": "loop", "input": {"body": "inc", "while": "loop.index < input.n", "max_iterations": 4}},
            "inc": {"type": "transform", "input": {"v": "${(loop.previous_output.v ?? 0) + 10}"}},
        })
        run_id = await env.start(workflow_id, {"n": 3})  # inline body: the whole loop in one advance
        run = await env.run(run_id)
        assert run.status == "succeeded"
        assert run.step("count").output == {"iterations": 3, "last_output": {"v": 30}}

        run_id = await env.start(workflow_id, {"n": 0})
        assert (await env.run(run_id)).step("count").output == {"iterations": 0, "last_output": None}

        run_id = await env.start(workflow_id, {"n": 10})
        run = await env.run(run_id)
        assert run.status == "failed" and len(run.step("count").children) == 4
        assert "reached max_iterations 4" in run.step("count").error["message"]


async def test_loop_iteration_failure_fails_the_loop(redis, bus, settings) -> None:
    async with engine_env(redis, bus, settings) as env:
        workflow_id = await env.define({
            "l": {"type": "loop", "input": {"body_step": "b", "max_iterations": 3}},
            "b": worker(retry={"max_retries": 1, "initial_backoff_sec": 1}),
        })
        run_id = await env.start(workflow_id)
        await env.answer(f"{run_id}:l[0]@1", output=1)
        await env.answer(f"{run_id}:l[1]@1", "FAILED", error="flaky")  # the body's retry policy applies
        env.clock.now += 1
        await env.engine.advance(run_id)
        await env.answer(f"{run_id}:l[1]@2", "FAILED", error="still")
        run = await env.run(run_id)
        assert run.status == "failed" and run.step("l").error["message"] == "loop iteration l[1] failed: still"
        assert env.requests(f"{run_id}:l[2]@1") == []


# --- subworkflow -------------------------------------------------------------------------------
async def test_subworkflow_runs_a_child_run_and_maps_its_output(redis, bus, settings) -> None:
    async with engine_env(redis, bus, settings) as env:
        child_wf = await env.define({"work": worker(input={"n": "${input.n}"})})
        parent_wf = await env.define({
            "call": {"type": "subworkflow", "input": {"workflow_id": child_wf, "input_mapping": {"n": "${input.n}"},
                                                      "output_mapping": {"doubled": "${child.steps.work.output.v * 2}"}}},
            "after": worker(depends_on=["call"], input={"got": "${steps.call.output.doubled}"}),
        })
        run_id = await env.start(parent_wf, {"n": 21})
        call = (await env.run(run_id)).step("call")
        assert call.status == "running" and call.child_run_id
        child_id = call.child_run_id
        env.runs.add(child_id)
        child = await env.run(child_id)
        assert child.org_id == TENANT and child.workflow_id == child_wf and child.input == {"n": 21}
        assert child.metadata == {"parent_run_id": run_id, "parent_step_id": "call", "parent_workflow_id": parent_wf,
                                  "call_stack": [parent_wf]}
        work = await env.request(f"{child_id}:work@1")
        assert await env.jobs.get_context(work.job_id) == {"n": 21}

        await env.answer(work.job_id, output={"v": 21})  # the child ends: it wakes its parent
        after = await env.request(f"{run_id}:after@1")
        assert await env.jobs.get_context(after.job_id) == {"got": 42}
        assert (await env.run(child_id)).status == "succeeded"
        assert (await env.run(run_id)).step("call").output == {"doubled": 42}
        assert "subworkflow_started" in await timeline_types(env, run_id)


async def test_inline_subworkflow_finishes_within_the_parents_advance(redis, bus, settings) -> None:
    async with engine_env(redis, bus, settings) as env:
        child_wf = await env.define({"t": {"type": "transform", "input": {"x": "${input.x}"}}})
        parent_wf = await env.define({
            "each": {"type": "subworkflow", "for_each": "input.xs", "input": {"workflow_id": child_wf,
                                                                             "input_mapping": {"x": "${item}"}}},
            "after": worker(depends_on=["each"], input={"all": "${steps.each.output}"}),
        })
        run_id = await env.start(parent_wf, {"xs": [1, 2]})
        after = await env.request(f"{run_id}:after@1")
        outputs = (await env.jobs.get_context(after.job_id))["all"]
        assert [o["steps"]["t"]["output"] for o in outputs] == [{"x": 1}, {"x": 2}]
        run = await env.run(run_id)
        assert run.step("each[0]").child_run_id != run.step("each[1]").child_run_id


async def test_subworkflow_cycle_and_missing_workflow_fail_the_step(redis, bus, settings) -> None:
    async with engine_env(redis, bus, settings) as env:
        a, b = unique("wf-a"), unique("wf-b")
        env.workflows.update({a, b})
        await env.store.put_definition({"id": a, "steps": {"call": {"type": "subworkflow", "input": {"workflow_id": b}}}},
                                       TENANT)
        await env.store.put_definition({"id": b, "steps": {"back": {"type": "subworkflow", "input": {"workflow_id": a}}}},
                                       TENANT)
        run_id = await env.start(a)
        run = await env.run(run_id)
        assert run.status == "failed"
        message = run.step("call").error["message"]
        assert message.startswith(f"subworkflow run {run.step('call').child_run_id} failed")
        assert f"circular workflow reference detected: {a} → {b} → {a}" in message

        missing = await env.define({"call": {"type": "subworkflow", "input": {"workflow_id": "${input.target}"}}})
        run_id = await env.start(missing, {"target": "no-such-workflow"})
        run = await env.run(run_id)
        assert run.status == "failed" and run.step("call").error["message"] == \
            "subworkflow workflow no-such-workflow not found"
        assert run.step("call").child_run_id == ""


async def start_with_child(env: Env, **after: Any) -> tuple[str, str, str]:
    """A run whose subworkflow step `call` runs a one-worker-step child: (parent workflow, run, child run)."""
    child_wf = await env.define({"work": worker()})
    parent_wf = await env.define({"call": {"type": "subworkflow", "input": {"workflow_id": child_wf}}, **after})
    run_id = await env.start(parent_wf)
    child_id = (await env.run(run_id)).step("call").child_run_id
    env.runs.add(child_id)
    return parent_wf, run_id, child_id


async def test_cancelling_the_parent_cancels_the_child(redis, bus, settings) -> None:
    async with engine_env(redis, bus, settings) as env:
        _, run_id, child_id = await start_with_child(env)
        await env.request(f"{child_id}:work@1")
        assert await env.engine.cancel_run(run_id, TENANT)
        await env.cancels.wait(lambda p: p.job_cancel.job_id == f"{child_id}:work@1", "cancel of the child's job")
        assert (await env.run(child_id)).status == "cancelled"
        run = await env.run(run_id)
        assert run.status == "cancelled" and run.step("call").status == "cancelled"


async def test_child_failure_and_a_lost_child_run(redis, bus, settings) -> None:
    async with engine_env(redis, bus, settings) as env:
        _, run_id, child_id = await start_with_child(env)
        # the engine died between storing the parent's step and creating the child: it is created again
        assert await env.store.delete_run(child_id, TENANT)
        await env.engine.reconcile(run_id)
        assert (await env.run(child_id)).metadata["parent_run_id"] == run_id
        await env.answer(f"{child_id}:work@1", "FAILED_FATAL", error="worker broke")
        run = await env.run(run_id)
        assert run.status == "failed"
        assert run.step("call").error == {"message": f"subworkflow run {child_id} failed: step work failed: worker broke",
                                          "child_run_id": child_id}


async def test_a_busy_parent_is_woken_by_its_timer(redis, bus, settings) -> None:
    async with engine_env(redis, bus, settings) as env:
        parent_wf, run_id, child_id = await start_with_child(env, after=worker(depends_on=["call"]))
        quick = WorkflowEngine(store=env.store, jobs=env.jobs, bus=env.bus, leases=Leases(env.redis, "quick"),
                               redis=env.redis, clock=env.clock, lock_wait=0.05)
        async with other_engine(env, "holder").run_locked(run_id):  # another replica works on the parent
            await quick.apply_outcome(f"{child_id}:work@1", "SUCCEEDED")
        assert (await env.run(child_id)).status == "succeeded"
        assert (await env.run(run_id)).step("call").status == "running"
        assert await env.store.timer_due(f"{parent_wf}:{run_id}") is not None
        await env.engine.fire_timers()
        await env.request(f"{run_id}:after@1")


async def test_loop_of_delays_moves_on_with_each_timer(redis, bus, settings) -> None:
    async with engine_env(redis, bus, settings) as env:
        workflow_id = await env.define({
            "tick": {"type": "loop", "input": {"body_step": "wait", "max_iterations": 2}},
            "wait": {"type": "delay", "delay_sec": 10},
            "after": worker(depends_on=["tick"]),
        })
        run_id = await env.start(workflow_id)
        t0 = env.clock.now
        assert (await env.run(run_id)).step("tick[0]").next_attempt_at == t0 + 10
        env.clock.now = t0 + 10
        await env.engine.fire_timers()  # iteration 0 ends and iteration 1 starts waiting in one advance
        run = await env.run(run_id)
        assert run.step("tick[0]").status == "succeeded" and run.step("tick[1]").next_attempt_at == t0 + 20
        env.clock.now = t0 + 20
        await env.engine.fire_timers()
        await env.request(f"{run_id}:after@1")
        assert (await env.run(run_id)).step("tick").output == {"iterations": 2, "last_output": {"due_at": t0 + 20}}


async def test_compositions(redis, bus, settings) -> None:
    async with engine_env(redis, bus, settings) as env:
        child_wf = await env.define({"sq": {"type": "transform", "input": {"v": "${input.i * input.i}"}}})
        workflow_id = await env.define({
            "squares": {"type": "loop", "input": {"body_step": "square", "while": "loop.index < 3"}},
            "square": {"type": "subworkflow", "input": {"workflow_id": child_wf, "input_mapping": {"i": "${loop.index}"},
                                                        "output_mapping": "${child.steps.sq.output.v}"}},
            "both": {"type": "parallel", "depends_on": ["squares"], "input": {"steps": ["pick", "work"]}},
            "pick": {"type": "switch", "condition": "steps.squares.output.last_output",
                     "input": {"cases": {"4": "four"}, "default": "other"}},
            "work": worker(),
            "four": {"type": "transform", "depends_on": ["pick"], "input": {"ok": True}},
            "other": worker(depends_on=["pick"]),
        })
        run_id = await env.start(workflow_id)
        run = await env.run(run_id)
        assert run.step("squares").output == {"iterations": 3, "last_output": 4}  # 0, 1, 4: all inline
        assert [run.step(f"squares[{i}]").output for i in range(3)] == [0, 1, 4]
        assert len({run.step(f"squares[{i}]").child_run_id for i in range(3)}) == 3
        assert run.step("four").output == {"ok": True} and run.step("other").skip_reason == "switch_branch_not_taken"
        await env.answer(f"{run_id}:work@1", output={"w": 1})
        run = await env.run(run_id)
        assert run.status == "succeeded"
        assert run.step("both").output == {"pick": {"matched_case": "4", "matched_value": 4, "target_step": "four"},
                                           "work": {"w": 1}}


async def test_a_for_each_over_too_many_items_fails_its_step_naming_the_cap(redis, bus, settings) -> None:
    from cordum.workflow.definition import FOREACH_MAX_ITEMS

    async with engine_env(redis, bus, settings) as env:
        workflow_id = await env.define({"fan": worker(for_each="input.items")})
        run_id = await env.start(workflow_id, {"items": list(range(FOREACH_MAX_ITEMS + 1))})
        run = await env.run(run_id)
        assert run.status == "failed" and len(run.steps) == 1
        assert f"at most {FOREACH_MAX_ITEMS}" in run.steps["fan"].error["message"]
