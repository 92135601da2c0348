"""The engine's own step types, pure parts: cordum/workflow/steps.py decisions and the runstate
transitions they feed (delay, switch, storage, parallel, loop, subworkflow)."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from cordum.workflow import runstate as rs
from cordum.workflow.runstate import ArmTimer, Run, TimelineEvent
from cordum.workflow.definition import ready_steps
from cordum.workflow.steps import (
    StepError,
    choose_branch,
    delay_due,
    loop_next,
    loop_scope,
    same_value,
    storage_op,
    subworkflow_call,
    subworkflow_outcome,
)
from tests.unit.test_workflow_runstate import new_run, wf
from tests.unit.test_workflow_runstate import step as worker

NOW = 1_800_000_000.0


def events(effects, kind=TimelineEvent):
    return [e for e in effects if isinstance(e, kind)]


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat().replace("+00:00", "Z")


# --- delay -------------------------------------------------------------------------------------
def test_delay_due_prefers_delay_sec_then_until_then_timeout() -> None:
    w = wf({
        "a": {"type": "delay", "delay_sec": 5, "delay_until": iso(NOW + 100), "timeout_sec": 7},
        "b": {"type": "delay", "delay_until": iso(NOW + 100), "timeout_sec": 7},
        "c": {"type": "delay", "timeout_sec": 7},
        "d": {"type": "delay", "delay_until": "${input.at}"},
    })
    assert delay_due(w.steps["a"], {}, NOW) == NOW + 5
    assert delay_due(w.steps["b"], {}, NOW) == NOW + 100
    assert delay_due(w.steps["c"], {}, NOW) == NOW + 7
    assert delay_due(w.steps["d"], {"input": {"at": "2027-01-15T08:00:00+01:00"}}, NOW) == datetime(
        2027, 1, 15, 7, tzinfo=timezone.utc).timestamp()
    with pytest.raises(StepError, match="not an RFC3339"):
        delay_due(w.steps["d"], {"input": {"at": "soon"}}, NOW)
    with pytest.raises(StepError, match="no time zone"):
        delay_due(w.steps["d"], {"input": {"at": "2027-01-15T08:00:00"}}, NOW)
    with pytest.raises(StepError, match="rendered to int"):
        delay_due(w.steps["d"], {"input": {"at": 5}}, NOW)


def test_delay_waits_running_then_completes_when_due() -> None:
    w = wf({"d": {"type": "delay", "delay_sec": 30}, "b": worker("d")})
    run, _ = rs.start(new_run(), NOW, w)
    assert rs.next_dispatches(w, run, NOW) == ["d"]
    run, fx = rs.start_delay(w, run, "d", NOW + 30, NOW)
    sr = run.step("d")
    assert (sr.status, sr.next_attempt_at, sr.job_id, sr.attempts) == ("running", NOW + 30, "", 0)
    assert ArmTimer("d", NOW + 30) in fx
    assert [e.type for e in events(fx)] == ["step_delay_started"]
    assert rs.next_wake(w, run) == NOW + 30
    assert rs.next_dispatches(w, run, NOW + 10) == []
    assert rs.due_steps(w, run, NOW + 29.9) == []
    assert rs.finish_delay(w, run, "d", NOW + 29.9) == (run, [])  # not due: no-op

    assert rs.due_steps(w, run, NOW + 30) == ["d"]
    run, fx = rs.finish_delay(w, run, "d", NOW + 31)
    assert run.step("d").status == "succeeded" and run.step("d").next_attempt_at is None
    assert run.context["steps"]["d"]["output"] == {"due_at": NOW + 30}
    assert [e.type for e in events(fx)] == ["step_delay_completed", "step_completed"]
    assert rs.next_dispatches(w, run, NOW + 31) == ["b"]
    assert rs.finish_delay(w, run, "d", NOW + 40) == (run, [])  # done: idempotent
    assert rs.due_steps(w, run, NOW + 40) == []
    # a cancelled run stops the wait
    run2, _ = rs.start_delay(w, rs.start(new_run(), NOW, w)[0], "d", NOW + 30, NOW)
    run2, _ = rs.cancel(run2, now=NOW + 1)
    assert run2.step("d").status == "cancelled" and rs.next_wake(w, run2) is None


def test_start_delay_refuses_a_started_step() -> None:
    w = wf({"d": {"type": "delay", "delay_sec": 30}})
    run, _ = rs.start_delay(w, rs.start(new_run(), NOW, w)[0], "d", NOW + 30, NOW)
    with pytest.raises(ValueError, match="not pending"):
        rs.start_delay(w, run, "d", NOW + 30, NOW)


# --- switch ------------------------------------------------------------------------------------
def switch_wf(cases, **inp) -> object:
    return wf({
        "sw": {"type": "switch", "condition": "input.kind", "input": {"cases": cases, **inp}},
        "small": worker("sw"),
        "big": worker("sw"),
        "big2": worker("big"),
        "other": worker("sw"),
        "join": worker("small", "big2"),
    })


def test_same_value() -> None:
    assert same_value(1, 1.0) and same_value("1", 1) and same_value(1.0, "1") and same_value("a", "a")
    assert same_value(True, "true") and same_value(None, None) and same_value([1], [1])
    assert not same_value(True, 1) and not same_value(1, True) and not same_value(0, False)
    assert not same_value("1.0", 1) and not same_value(None, "null") and not same_value("a", "b")


def test_choose_branch_list_map_default_and_none() -> None:
    cases = [{"when": "s", "next": "small"}, {"match": 2, "step": "big"}, {"value": "x", "target": "big"}]
    w = switch_wf(cases, default="other")
    sw = w.steps["sw"]
    b = choose_branch(sw, sw.input, "s")
    assert b.output == {"matched_case": 0, "matched_value": "s", "target_step": "small"}
    assert b.not_taken == ("big", "other")
    assert choose_branch(sw, sw.input, 2.0).target_step == "big"
    assert choose_branch(sw, sw.input, "x").matched_case == 2
    b = choose_branch(sw, sw.input, "zzz")
    assert (b.matched_case, b.target_step, b.not_taken) == ("default", "other", ("small", "big"))

    w = switch_wf({"1": "small", "true": "big"})
    sw = w.steps["sw"]
    assert choose_branch(sw, sw.input, 1).output == {"matched_case": "1", "matched_value": 1,
                                                      "target_step": "small"}
    assert choose_branch(sw, sw.input, True).target_step == "big"
    b = choose_branch(sw, sw.input, None)  # no match, no default: no branch at all
    assert b.target_step is None and b.matched_case is None and b.not_taken == ("small", "big")


def test_take_branch_skips_the_others_and_the_join_still_runs() -> None:
    w = switch_wf({"s": "small", "b": "big"}, default="other")
    run, _ = rs.start(new_run(), NOW, w)
    b = choose_branch(w.steps["sw"], w.steps["sw"].input, "s")
    run, fx = rs.take_branch(w, run, "sw", b.output, b.not_taken, NOW)
    assert run.step("sw").status == "succeeded" and run.step("sw").output["target_step"] == "small"
    for sid in ("big", "other", "big2"):  # big2 only follows the branch not taken
        assert run.step(sid).status == "skipped" and run.step(sid).skip_reason == rs.NOT_TAKEN
    assert [e.step_id for e in events(fx) if e.type == "step_skipped"] == ["big", "other", "big2"]
    assert rs.next_dispatches(w, run, NOW) == ["small"]
    run, fx = rs.mark_dispatched(w, run, "small", NOW)
    run, _ = rs.apply_result(w, run, "run1:small@1", "SUCCEEDED", {"v": 1}, now=NOW)
    assert rs.next_dispatches(w, run, NOW) == ["join"]  # small succeeded, big2 not taken
    run, _ = rs.mark_dispatched(w, run, "join", NOW)
    run, _ = rs.apply_result(w, run, "run1:join@1", "SUCCEEDED", {}, now=NOW)
    assert run.status == "succeeded"
    assert rs.take_branch(w, run, "sw", b.output, b.not_taken, NOW) == (run, [])  # terminal: no-op


def test_no_branch_taken_skips_the_join_and_the_run_succeeds() -> None:
    w = switch_wf({"s": "small", "b": "big"}, default="other")
    w2 = switch_wf({"s": "small", "b": "big"})
    run, _ = rs.start(new_run(), NOW, w2)
    b = choose_branch(w2.steps["sw"], w2.steps["sw"].input, "nothing")
    run, _ = rs.take_branch(w2, run, "sw", b.output, b.not_taken, NOW)
    assert run.step("join").status == "skipped" and run.step("join").skip_reason == rs.NOT_TAKEN
    assert rs.next_dispatches(w2, run, NOW) == ["other"]  # a plain dependent of the switch
    run, _ = rs.mark_dispatched(w2, run, "other", NOW)
    run, _ = rs.apply_result(w2, run, "run1:other@1", "SUCCEEDED", {}, now=NOW)
    assert run.status == "succeeded"
    # a join waits while a taken branch is still running
    run, _ = rs.start(new_run(), NOW, w)
    b = choose_branch(w.steps["sw"], w.steps["sw"].input, "b")
    run, _ = rs.take_branch(w, run, "sw", b.output, b.not_taken, NOW)
    assert run.step("small").skip_reason == rs.NOT_TAKEN and rs.next_dispatches(w, run, NOW) == ["big"]
    run, _ = rs.mark_dispatched(w, run, "big", NOW)
    assert run.step("join").status == "pending"
    run, _ = rs.apply_result(w, run, "run1:big@1", "FAILED_FATAL", error="boom", now=NOW)
    assert run.status == "failed"  # a real failure on the taken branch still ends the run
    assert run.step("big2").skip_reason == "dependency big failed"


def test_ready_steps_with_not_taken() -> None:
    w = switch_wf({"s": "small"}, default="big")
    done = {"sw": "succeeded", "other": "running", "big": "skipped"}
    assert ready_steps(w, {**done, "small": "succeeded", "big2": "skipped"}) == []
    assert ready_steps(w, {**done, "small": "succeeded", "big2": "skipped"}, {"big", "big2"}) == ["join"]
    assert ready_steps(w, {**done, "small": "skipped", "big2": "skipped"}, {"small", "big", "big2"}) == []
    assert ready_steps(w, {**done, "small": "running", "big2": "skipped"}, {"big", "big2"}) == []


# --- storage -----------------------------------------------------------------------------------
def test_storage_read_write_delete() -> None:
    ctx = {"cfg": {"limit": 5, "tags": ["a", "b"]}, "steps": {"s": {"output": 1}}}
    assert storage_op(ctx, {"operation": "read", "key": "cfg.limit"}) == (None, 5)
    assert storage_op(ctx, {"operation": "read", "key": "cfg.tags.1"}) == (None, "b")
    assert storage_op(ctx, {"operation": "read", "key": "steps.s.output"}) == (None, 1)
    with pytest.raises(StepError, match="key 'cfg.nope' is not in the run context"):
        storage_op(ctx, {"operation": "read", "key": "cfg.nope"})

    new, out = storage_op(ctx, {"operation": "write", "key": "a.b.c", "value": {"x": [1]}})
    assert out == {"x": [1]} and new["a"] == {"b": {"c": {"x": [1]}}} and new["cfg"] == ctx["cfg"]
    assert "a" not in ctx  # the input context is never changed
    new, out = storage_op(ctx, {"operation": "write", "key": "cfg.limit", "value": None})
    assert out is None and new["cfg"]["limit"] is None
    with pytest.raises(StepError, match="'cfg.limit' is int, not a mapping"):
        storage_op(ctx, {"operation": "write", "key": "cfg.limit.x", "value": 1})

    new, out = storage_op(ctx, {"operation": "delete", "key": "cfg.limit"})
    assert out == 5 and new["cfg"] == {"tags": ["a", "b"]} and ctx["cfg"]["limit"] == 5
    assert storage_op(ctx, {"operation": "delete", "key": "cfg.gone.deeper"}) == (None, None)
    for op in ("write", "delete"):
        with pytest.raises(StepError, match="read-only"):
            storage_op(ctx, {"operation": op, "key": "steps.s", "value": 1})
    for bad in ("", ".", "a..b", 5, None):
        with pytest.raises(StepError, match="storage key"):
            storage_op(ctx, {"operation": "read", "key": bad})


def test_complete_step_keeps_the_context_a_step_leaves() -> None:
    w = wf({"st": {"type": "storage", "input": {"operation": "write", "key": "k", "value": 1}},
            "b": worker("st")})
    run, _ = rs.start(new_run(), NOW, w)
    new_ctx, out = storage_op(run.context, w.steps["st"].input)
    run, _ = rs.complete_step(w, run, "st", "succeeded", out, None, NOW, context=new_ctx)
    assert run.context["k"] == 1 and run.context["steps"]["st"] == {"output": 1}


# --- parallel ----------------------------------------------------------------------------------
def par_wf(strategy: str = "all", **inp) -> object:
    return wf({
        "p": {"type": "parallel", "input": {"steps": ["b", "c", "e"], "strategy": strategy, **inp}},
        "b": worker(),
        "c": worker(),
        "e": worker(for_each="input.items"),
        "after": worker("p"),
    })


def started(w):
    run, _ = rs.start(new_run(), NOW, w)
    assert rs.next_dispatches(w, run, NOW) == ["p"]  # children are the parent's
    return rs.start_parallel(w, run, "p", NOW)[0]


def answer(w, run, path, status="SUCCEEDED", output=None):
    if run.step(path).status == "pending":
        run, _ = rs.mark_dispatched(w, run, path, NOW)
    return rs.apply_result(w, run, f"run1:{path}@1", status, output, "boom" if status != "SUCCEEDED" else None,
                           now=NOW)


def test_parallel_all_collects_child_outputs() -> None:
    w = par_wf(max_parallel=2)
    run = started(w)
    assert run.step("p").children == ("b", "c", "e") and run.step("p").status == "running"
    assert rs.next_dispatches(w, run, NOW) == ["b", "c"]  # input.max_parallel 2
    run, _ = answer(w, run, "b", output={"v": "b"})
    run, _ = rs.mark_dispatched(w, run, "c", NOW)
    assert rs.next_dispatches(w, run, NOW) == ["e"]  # b done, c running: one more fits
    run, fx = rs.expand_for_each(w, run, "e", [1, 2], NOW)
    run, _ = answer(w, run, "e[0]", output=10)
    run, _ = answer(w, run, "e[1]", output=20)
    assert run.step("e").output == [10, 20] and run.step("p").status == "running"
    run, _ = answer(w, run, "c", output={"v": "c"})
    p = run.step("p")
    assert p.status == "succeeded" and p.output == {"b": {"v": "b"}, "c": {"v": "c"}, "e": [10, 20]}
    assert run.context["steps"]["p"]["output"] == p.output
    assert run.context["steps"]["b"]["output"] == {"v": "b"}  # a child is a step of its own too
    assert rs.next_dispatches(w, run, NOW) == ["after"]


def test_parallel_all_fails_on_the_first_failure_and_cancels_the_rest() -> None:
    w = par_wf()
    run = started(w)
    for path in ("b", "c", "e"):
        run, _ = rs.mark_dispatched(w, run, path, NOW) if path != "e" else rs.expand_for_each(
            w, run, "e", [1], NOW)
    run, _ = rs.mark_dispatched(w, run, "e[0]", NOW)
    run, fx = answer(w, run, "c", "FAILED_FATAL")
    p = run.step("p")
    assert p.status == "failed"
    assert p.error["message"] == "0 of the 3 children parallel p needs succeeded; child c failed: boom"
    cancels = {e.job_id for e in events(fx, rs.CancelJob)}
    assert cancels == {"run1:b@1", "run1:e[0]@1"}  # a for_each child's items too
    assert run.step("e").status == "cancelled" and run.step("e[0]").status == "cancelled"
    assert run.status == "failed" and run.step("after").status == "skipped"
    assert rs.apply_result(w, run, "run1:b@1", "SUCCEEDED", {}, now=NOW)[0] is run  # late: ignored


def test_parallel_any_and_n_of_m() -> None:
    w = par_wf("any")
    run = started(w)
    run, _ = rs.mark_dispatched(w, run, "b", NOW)
    run, _ = rs.mark_dispatched(w, run, "c", NOW)
    run, _ = answer(w, run, "b", "FAILED_FATAL")
    assert run.step("p").status == "running"  # c or e may still succeed
    run, fx = answer(w, run, "c", output=3)
    assert run.step("p").status == "succeeded" and run.step("p").output == {"c": 3}
    assert run.step("e").status == "cancelled" and run.step("e").skip_reason == "parallel p already satisfied"
    assert run.status == "running" and rs.next_dispatches(w, run, NOW) == ["after"]

    w = par_wf("n_of_m", required=2)
    run = started(w)
    run, _ = answer(w, run, "b", output=1)
    run, _ = answer(w, run, "c", "DENIED")
    assert run.step("p").status == "running"
    run, _ = rs.expand_for_each(w, run, "e", [], NOW)  # no items: e succeeds with []
    assert run.step("p").status == "succeeded" and run.step("p").output == {"b": 1, "e": []}

    run = started(w)
    run, _ = answer(w, run, "b", "DENIED")
    run, fx = answer(w, run, "c", "DENIED")
    assert run.step("p").status == "denied" and run.status == "denied"  # only denials: denied


def test_parallel_child_skipped_by_its_condition() -> None:
    w = par_wf()
    run = started(w)
    for path in ("b", "e"):
        run, _ = rs.complete_step(w, run, path, "skipped", None, {"message": "condition_false"}, NOW)
    assert run.step("p").status == "running"
    run, _ = answer(w, run, "c", output=1)
    assert run.step("p").status == "succeeded" and run.step("p").output == {"c": 1}

    w = par_wf("any")
    run = started(w)
    for path in ("b", "c", "e"):
        run, _ = rs.complete_step(w, run, path, "skipped", None, {"message": "condition_false"}, NOW)
    assert run.step("p").status == "failed" and "child b skipped" in run.step("p").error["message"]


def test_start_parallel_refuses_other_steps() -> None:
    w = par_wf()
    run, _ = rs.start(new_run(), NOW, w)
    with pytest.raises(ValueError, match="not a parallel step"):
        rs.start_parallel(w, run, "b", NOW)
    with pytest.raises(ValueError, match="is running, not pending"):
        rs.start_parallel(w, started(w), "p", NOW)


def test_step_for_path() -> None:
    w = wf({"e": worker(for_each="input.items"), "b": worker(),
            "l": {"type": "loop", "input": {"body_step": "b"}},
            "l2": {"type": "loop", "input": {"body_step": "e"}}})
    assert rs.step_for_path(w, "e") == (w.steps["e"], False)
    assert rs.step_for_path(w, "e[3]") == (w.steps["e"], True)
    assert rs.step_for_path(w, "l[0]") == (w.steps["b"], False)
    assert rs.step_for_path(w, "l2[4]") == (w.steps["e"], False)
    assert rs.step_for_path(w, "l2[4][1]") == (w.steps["e"], True)
    for bad in ("zz", "b[0]", "e[1][2]", "l[0][0]", "e[x]", ""):
        assert not rs.is_step_path(w, bad)
        with pytest.raises(KeyError):
            rs.step_for_path(w, bad)


# --- loop --------------------------------------------------------------------------------------
def loop_wf(**inp) -> object:
    return wf({"l": {"type": "loop", "input": {"body_step": "b", **inp}}, "b": worker(), "after": worker("l")})


def test_loop_next_until_while_and_the_cap() -> None:
    until = loop_wf(until="loop.previous_output.done", max_iterations=3).steps["l"]
    assert loop_next(until, {}, 0, None) is None  # until: always a first iteration
    assert loop_next(until, {}, 1, {"done": False}) is None
    assert loop_next(until, {}, 2, {"done": True}) == {"iterations": 2, "last_output": {"done": True}}
    with pytest.raises(StepError, match="reached max_iterations 3"):
        loop_next(until, {}, 3, {"done": False})

    while_ = loop_wf(**{"while": "loop.index < input.n"}).steps["l"]
    assert loop_next(while_, {"input": {"n": 0}}, 0, None) == {"iterations": 0, "last_output": None}
    assert loop_next(while_, {"input": {"n": 2}}, 1, "x") is None
    assert loop_next(while_, {"input": {"n": 2}}, 2, "y") == {"iterations": 2, "last_output": "y"}
    cond = wf({"l": {"type": "loop", "condition": "loop.iteration <= 2", "input": {"body": "b"}},
               "b": worker()}).steps["l"]
    assert loop_next(cond, {}, 1, None) is None and loop_next(cond, {}, 2, 5)["iterations"] == 2

    counted = loop_wf(max_iterations=2).steps["l"]
    assert loop_next(counted, {}, 1, 1) is None
    assert loop_next(counted, {}, 2, 2) == {"iterations": 2, "last_output": 2}  # no condition: no failure
    with pytest.raises(Exception, match="cannot compare int < null"):
        loop_next(while_, {}, 0, None)  # null < null: the expression's own error


def test_loop_iterations_are_children_of_the_loop() -> None:
    w = loop_wf(until="loop.previous_output.done")
    run, _ = rs.start(new_run(), NOW, w)
    assert rs.next_dispatches(w, run, NOW) == ["l"]  # the body is the loop's
    run, fx = rs.loop_iterate(w, run, "l", NOW)
    assert run.step("l").children == ("l[0]",) and run.step("l").status == "running"
    assert [e.data["index"] for e in events(fx) if e.type == "loop_iteration"] == [0]
    assert rs.next_dispatches(w, run, NOW) == ["l[0]"] and rs.due_steps(w, run, NOW) == []
    with pytest.raises(ValueError, match="not a loop ready"):
        rs.loop_iterate(w, run, "l", NOW)  # iteration 0 still going
    run, fx = rs.mark_dispatched(w, run, "l[0]", NOW)
    assert fx[0].job_id == "run1:l[0]@1"
    run, _ = rs.apply_result(w, run, "run1:l[0]@1", "SUCCEEDED", {"done": False}, now=NOW)
    assert run.step("l").status == "running" and rs.due_steps(w, run, NOW) == ["l"]
    assert "b" not in run.context.get("steps", {}) and "l[0]" not in run.context.get("steps", {})
    assert loop_scope(w, run, "l[1]") == {"index": 1, "iteration": 2, "previous_output": {"done": False}}
    assert loop_scope(w, run, "l[0]") == {"index": 0, "iteration": 1, "previous_output": None}
    assert loop_scope(w, run, "l") is None

    run, _ = rs.loop_iterate(w, run, "l", NOW)
    run, _ = rs.mark_dispatched(w, run, "l[1]", NOW)
    run, _ = rs.apply_result(w, run, "run1:l[1]@1", "FAILED_FATAL", error="bad input", now=NOW)
    assert run.step("l").status == "failed" and run.status == "failed"
    assert run.step("l").error["message"] == "loop iteration l[1] failed: bad input"


def test_loop_done_and_nested_paths() -> None:
    w = wf({"l": {"type": "loop", "input": {"body_step": "e"}}, "e": worker(for_each="input.items"),
            "outer": {"type": "loop", "input": {"body_step": "l2"}},
            "l2": {"type": "loop", "input": {"body_step": "t"}}, "t": {"type": "transform"}})
    run, _ = rs.start(new_run(), NOW, w)
    run, _ = rs.loop_iterate(w, run, "l", NOW)
    assert rs.next_dispatches(w, run, NOW) == ["outer", "l[0]"]  # top-level steps first
    run, _ = rs.expand_for_each(w, run, "l[0]", ["x"], NOW)  # the body's for_each: items of the iteration
    assert rs.next_dispatches(w, run, NOW) == ["outer", "l[0][0]"]
    run, _ = rs.mark_dispatched(w, run, "l[0][0]", NOW)
    run, _ = rs.apply_result(w, run, "run1:l[0][0]@1", "SUCCEEDED", 7, now=NOW)
    assert run.step("l[0]").output == [7] and rs.due_steps(w, run, NOW) == ["l"]
    assert loop_scope(w, run, "l[1][0]")["previous_output"] == [7]
    run, _ = rs.complete_step(w, run, "l", "succeeded", {"iterations": 1, "last_output": [7]}, None, NOW)
    assert run.context["steps"]["l"]["output"] == {"iterations": 1, "last_output": [7]}

    run, _ = rs.loop_iterate(w, run, "outer", NOW)
    run, _ = rs.loop_iterate(w, run, "outer[0]", NOW)  # an iteration that is a loop itself
    assert rs.step_for_path(w, "outer[0][0]")[0].id == "t"
    assert loop_scope(w, run, "outer[0][0]")["index"] == 0
    run, _ = rs.complete_step(w, run, "outer[0][0]", "succeeded", {"n": 1}, None, NOW)
    assert rs.due_steps(w, run, NOW) == ["outer[0]"]


# --- subworkflow -------------------------------------------------------------------------------
def test_subworkflow_call_ids_metadata_and_cycles() -> None:
    run = new_run(metadata={"call_stack": ["root"]})
    call = subworkflow_call(run, "sub", "child", {"a": 1})
    assert call.workflow_id == "child" and call.input == {"a": 1}
    assert call.metadata == {"parent_run_id": "run1", "parent_step_id": "sub", "parent_workflow_id": "wf1",
                             "call_stack": ["root", "wf1"]}
    assert call.run_id == subworkflow_call(run, "sub", "child", {"a": 2}).run_id  # derived: once per step
    assert call.run_id != subworkflow_call(run, "sub2", "child", {}).run_id
    assert ":" not in call.run_id and len(call.run_id) == 36
    assert subworkflow_call(run, "sub", "child", None).input == {}
    with pytest.raises(StepError, match="circular workflow reference detected: root → wf1 → root"):
        subworkflow_call(run, "sub", "root", {})
    with pytest.raises(StepError, match="circular workflow reference detected: root → wf1 → wf1"):
        subworkflow_call(run, "sub", "wf1", {})
    with pytest.raises(StepError, match="not a workflow id"):
        subworkflow_call(run, "sub", "bad id", {})
    with pytest.raises(StepError, match="not a mapping"):
        subworkflow_call(run, "sub", "child", [1])
    deep = new_run(metadata={"call_stack": [f"w{i}" for i in range(15)]})
    with pytest.raises(StepError, match="deeper than 16"):
        subworkflow_call(deep, "sub", "child", {})


def test_subworkflow_outcome() -> None:
    w = wf({"sub": {"type": "subworkflow", "input": {"workflow_id": "child", "output_mapping": {
        "total": "${child.steps.sum.output.n + input.x}", "run": "${child.run_id}"}}},
        "plain": {"type": "subworkflow", "input": {"workflow_id": "child"}}})
    child = Run(id="c1", workflow_id="child", status="succeeded", context={"steps": {"sum": {"output": {"n": 5}}}})
    assert subworkflow_outcome(w.steps["sub"], child, {"input": {"x": 1}}) == (
        "succeeded", {"total": 6, "run": "c1"}, None)
    assert subworkflow_outcome(w.steps["plain"], child, {}) == ("succeeded", dict(child.context), None)
    failed = Run(id="c1", workflow_id="child", status="denied", error={"message": "step a denied"})
    assert subworkflow_outcome(w.steps["sub"], failed, {}) == (
        "denied", None, {"message": "subworkflow run c1 denied: step a denied", "child_run_id": "c1"})


def test_start_subworkflow_and_cancel_reaches_the_child() -> None:
    w = wf({"sub": {"type": "subworkflow", "input": {"workflow_id": "child"}}, "b": worker("sub")})
    run, _ = rs.start(new_run(), NOW, w)
    call = subworkflow_call(run, "sub", "child", {"k": 1})
    run, fx = rs.start_subworkflow(w, run, "sub", call, NOW)
    sr = run.step("sub")
    assert (sr.status, sr.child_run_id, sr.attempts) == ("running", call.run_id, 1)
    assert sr.input == {"workflow_id": "child", "input": {"k": 1}}  # enough to create it again
    assert fx[0] == call and [e.type for e in events(fx)] == ["subworkflow_started"]
    assert rs.StepRun.from_dict(sr.to_dict()) == sr
    with pytest.raises(ValueError, match="not pending"):
        rs.start_subworkflow(w, run, "sub", call, NOW)
    cancelled, fx = rs.cancel(run, now=NOW)
    assert rs.CancelRun(call.run_id, "workflow run cancelled") in fx
    done, fx = rs.complete_step(w, run, "sub", "succeeded", {"o": 1}, None, NOW)
    assert not events(fx, rs.CancelRun) and rs.next_dispatches(w, done, NOW) == ["b"]
