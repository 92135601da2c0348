"""The engine's own step types, pure parts: cordum/workflow/steps.py decisions and the runstate
transitions they feed (delay, switch, storage, parallel, loop, subworkflow)."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from cordum.workflow import runstate as rs
from cordum.workflow.runstate import ArmTimer, TimelineEvent
from cordum.workflow.definition import ready_steps
from cordum.workflow.steps import StepError, choose_branch, delay_due, same_value, storage_op
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
