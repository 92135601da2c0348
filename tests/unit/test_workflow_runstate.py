"""The pure run state machine (cordum/workflow/runstate.py, spec §2.5–2.8, §2.11)."""

from __future__ import annotations

import copy
import json
import random
from dataclasses import replace

import pytest

from cordum.store.validate import job_id_problems
from cordum.workflow import runstate as rs
from cordum.workflow.definition import parse_workflow
from cordum.workflow.runstate import (
    ArmTimer,
    CancelJob,
    DispatchStep,
    Run,
    StepRun,
    TimelineEvent,
)


def wf(steps: dict, **extra) -> object:
    return parse_workflow({"id": "wf1", "steps": steps, **extra})


def step(*deps: str, **extra) -> dict:
    out = {"topic": "job.t", **extra}
    if deps:
        out["depends_on"] = list(deps)
    return out


def new_run(**kw) -> Run:
    return Run(id="run1", workflow_id="wf1", input={"x": 1}, **kw)


def dispatch_all(w, run, now):
    """Mark every due step dispatched; returns (run, job ids)."""
    jobs = []
    for path in rs.next_dispatches(w, run, now):
        run, fx = rs.mark_dispatched(w, run, path, now)
        jobs += [e.job_id for e in fx if isinstance(e, DispatchStep)]
    return run, jobs


def kinds(effects, cls):
    return [e for e in effects if isinstance(e, cls)]


# --- job ids -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "run_id,path,attempt",
    [("r1", "fetch", 1), ("0f8f-uuid", "a.b_c-d", 12), ("r", "step[0]", 3), ("r", "s[10][2]", 1)],
)
def test_job_id_round_trip(run_id, path, attempt):
    jid = rs.job_id(run_id, path, attempt)
    assert jid == f"{run_id}:{path}@{attempt}"
    assert job_id_problems(jid) == []
    assert rs.parse_job_id(jid) == (run_id, path, attempt)


@pytest.mark.parametrize(
    "bad", ["", "nocolon", "r:step", "r:step@", "r:step@0", "r:step@x", ":step@1", "r:@1",
            "r:st ep@1", "r:step[x]@1", "r:step@1@", "r:step@١"],
)
def test_parse_job_id_rejects(bad):
    assert rs.parse_job_id(bad) is None


def test_parse_job_id_splits_on_first_colon():
    # a step path can never contain ':' so a second colon makes it invalid, not part of the run id
    assert rs.parse_job_id("r:a:b@1") is None


@pytest.mark.parametrize("args", [("r:x", "s", 1), ("", "s", 1), ("r", "s", 0), ("r", "s@", 1),
                                  ("r" * 130, "s", 1), ("r", "s", True)])
def test_job_id_refuses_bad_parts(args):
    with pytest.raises(ValueError):
        rs.job_id(*args)


# --- linear chain ------------------------------------------------------------------------------
def test_linear_chain_to_success():
    w = wf({"a": step(), "b": step("a", output_path="res.b"), "c": step("b")})
    run0 = new_run()
    run, fx = rs.start(run0, 10.0, w)
    assert run.status == "running" and run.started_at == 10.0
    assert run0.status == "pending"  # input untouched
    assert rs.next_dispatches(w, run, 10) == ["a"]
    run, fx = rs.mark_dispatched(w, run, "a", 10)
    assert DispatchStep("a", "run1:a@1", 1) in fx
    assert run.steps["a"].status == "running" and run.steps["a"].attempts == 1
    assert rs.next_dispatches(w, run, 10) == []
    run, fx = rs.apply_result(w, run, "run1:a@1", "SUCCEEDED", {"v": 1}, None, 11)
    assert run.context["steps"]["a"] == {"output": {"v": 1}}
    assert rs.next_dispatches(w, run, 11) == ["b"]
    run, _ = rs.mark_dispatched(w, run, "b", 11)
    run, _ = rs.apply_result(w, run, "run1:b@1", "SUCCEEDED", {"v": 2}, None, 12,
                             result_ptr="redis://res:run1:b@1")
    assert run.context["steps"]["b"] == {"result_ptr": "redis://res:run1:b@1", "output": {"v": 2}}
    assert run.context["res"]["b"] == {"v": 2}
    run, _ = rs.mark_dispatched(w, run, "c", 12)
    assert run.status == "running" and rs.aggregate(w, run) == "running"
    run, fx = rs.apply_result(w, run, "run1:c@1", "SUCCEEDED", None, None, 13)
    assert run.status == "succeeded" and run.completed_at == 13
    assert TimelineEvent("run_status", status="succeeded", message="run succeeded") in fx
    assert rs.next_dispatches(w, run, 13) == []


def test_start_arms_workflow_timeout_and_is_idempotent():
    w = wf({"a": step()}, timeout_sec=30)
    run, fx = rs.start(new_run(), 100, w)
    assert ArmTimer("", 130) in fx
    again, fx2 = rs.start(run, 101, w)
    assert again is run and fx2 == []


def test_result_data_path_narrows_output():
    w = wf({"a": step(result_data_path="data.items.1", output_path="picked")})
    run, _ = rs.start(new_run(), 0)
    run, _ = rs.mark_dispatched(w, run, "a", 0)
    run, _ = rs.apply_result(w, run, "run1:a@1", "SUCCEEDED", {"data": {"items": [5, 6]}}, None, 1)
    assert run.steps["a"].output == 6
    assert run.context["steps"]["a"] == {"output": 6} and run.context["picked"] == 6


# --- failures ----------------------------------------------------------------------------------
def test_failure_skips_dependents_and_fails_run():
    w = wf({"a": step(), "b": step("a"), "c": step("b"), "d": step()})
    run, _ = rs.start(new_run(), 0)
    run, jobs = dispatch_all(w, run, 0)
    assert jobs == ["run1:a@1", "run1:d@1"]
    run, fx = rs.apply_result(w, run, "run1:a@1", "FAILED", None, "boom", 1)
    assert run.status == "failed"
    assert run.steps["a"].error == {"message": "boom"}
    assert run.steps["b"].status == "skipped"
    assert run.steps["b"].skip_reason == "dependency a failed"
    assert run.steps["c"].skip_reason == "dependency b skipped"
    # the independent branch still running is cancelled, its job too
    assert run.steps["d"].status == "cancelled"
    assert CancelJob("run1:d@1", "workflow run failed") in fx
    assert run.error == {"message": "step a failed: boom", "step_id": "a"}
    # a late result of d is ignored
    late, fx = rs.apply_result(w, run, "run1:d@1", "SUCCEEDED", {}, None, 2)
    assert late is run and fx == []


@pytest.mark.parametrize(
    "result,step_status,run_status",
    [("DENIED", "denied", "denied"), ("TIMEOUT", "timed_out", "timed_out"),
     ("FAILED_FATAL", "failed", "failed"), ("CANCELLED", "cancelled", "cancelled"),
     ("WEIRD", "failed", "failed")],
)
def test_result_status_mapping(result, step_status, run_status):
    w = wf({"a": step(), "b": step("a")})
    run, _ = rs.start(new_run(), 0)
    run, _ = rs.mark_dispatched(w, run, "a", 0)
    run, _ = rs.apply_result(w, run, "run1:a@1", result, None, None, 1)
    assert run.steps["a"].status == step_status
    assert run.status == run_status
    assert run.steps["b"].skip_reason == f"dependency a {step_status}"


def test_on_error_recovery():
    w = wf({"a": step(on_error="fix"), "fix": step(), "b": step("a")})
    run, _ = rs.start(new_run(), 0)
    assert rs.next_dispatches(w, run, 0) == ["a"]  # the handler is not activated yet
    run, _ = rs.mark_dispatched(w, run, "a", 0)
    run, fx = rs.apply_result(w, run, "run1:a@1", "FAILED", None, {"message": "bad", "code": 7}, 1)
    assert run.status == "running"
    assert run.steps["fix"].input == {"error": {"message": "bad", "code": 7, "step_id": "a"}}
    assert any(isinstance(e, TimelineEvent) and e.type == "step_error_redirect" for e in fx)
    assert rs.next_dispatches(w, run, 1) == ["fix"]
    run, _ = rs.mark_dispatched(w, run, "fix", 1)
    run, _ = rs.apply_result(w, run, "run1:fix@1", "SUCCEEDED", {"ok": True}, None, 2)
    assert rs.next_dispatches(w, run, 2) == ["b"]
    run, _ = rs.mark_dispatched(w, run, "b", 2)
    run, _ = rs.apply_result(w, run, "run1:b@1", "SUCCEEDED", {}, None, 3)
    assert run.status == "succeeded"


def test_on_error_handler_failing_fails_run():
    w = wf({"a": step(on_error="fix"), "fix": step(), "b": step("a")})
    run, _ = rs.start(new_run(), 0)
    run, _ = rs.mark_dispatched(w, run, "a", 0)
    run, _ = rs.apply_result(w, run, "run1:a@1", "DENIED", None, None, 1)
    run, _ = rs.mark_dispatched(w, run, "fix", 1)
    run, _ = rs.apply_result(w, run, "run1:fix@1", "FAILED", None, "still bad", 2)
    assert run.status == "failed"
    assert run.steps["b"].status == "skipped"


def test_unactivated_handler_does_not_hold_the_run():
    w = wf({"a": step(on_error="fix"), "fix": step()})
    run, _ = rs.start(new_run(), 0)
    run, _ = rs.mark_dispatched(w, run, "a", 0)
    run, _ = rs.apply_result(w, run, "run1:a@1", "SUCCEEDED", 1, None, 1)
    assert run.status == "succeeded" and "fix" not in run.steps


# --- retries -----------------------------------------------------------------------------------
def test_retry_with_backoff_then_success():
    retry = {"max_retries": 2, "initial_backoff_sec": 5, "multiplier": 3}
    w = wf({"a": step(retry=retry), "b": step("a")})
    run, _ = rs.start(new_run(), 0)
    run, _ = rs.mark_dispatched(w, run, "a", 0)
    run, fx = rs.apply_result(w, run, "run1:a@1", "FAILED_RETRYABLE", None, "flaky", 10)
    sr = run.steps["a"]
    assert (sr.status, sr.next_attempt_at, sr.attempts) == ("pending", 15, 1)
    assert ArmTimer("a", 15) in fx and run.status == "running"
    # the same (stale) result again: pending with a scheduled retry → ignored
    again, fx2 = rs.apply_result(w, run, "run1:a@1", "FAILED_RETRYABLE", None, "flaky", 11)
    assert again is run and fx2 == []
    assert rs.next_dispatches(w, run, 14.9) == []
    assert rs.next_dispatches(w, run, 15) == ["a"]
    run, fx = rs.mark_dispatched(w, run, "a", 15)
    assert DispatchStep("a", "run1:a@2", 2) in fx and run.steps["a"].next_attempt_at is None
    run, fx = rs.apply_result(w, run, "run1:a@2", "TIMEOUT", None, None, 20)
    assert run.steps["a"].next_attempt_at == 20 + 15  # 5 * 3 ** 1
    run, _ = rs.mark_dispatched(w, run, "a", 35)
    # a result for an older attempt is ignored
    stale, fx = rs.apply_result(w, run, "run1:a@2", "SUCCEEDED", {}, None, 36)
    assert stale is run and fx == []
    run, _ = rs.apply_result(w, run, "run1:a@3", "SUCCEEDED", {"n": 3}, None, 36)
    assert run.steps["a"].status == "succeeded" and run.steps["a"].error is None
    assert rs.next_dispatches(w, run, 36) == ["b"]


def test_retries_exhausted_fail():
    w = wf({"a": step(retry={"max_retries": 1})})
    run, _ = rs.start(new_run(), 0)
    run, _ = rs.mark_dispatched(w, run, "a", 0)
    run, _ = rs.apply_result(w, run, "run1:a@1", "FAILED", None, None, 1)
    run, _ = rs.mark_dispatched(w, run, "a", 2)
    run, _ = rs.apply_result(w, run, "run1:a@2", "TIMEOUT", None, None, 3)
    assert run.steps["a"].status == "timed_out" and run.status == "timed_out"


@pytest.mark.parametrize("result", ["DENIED", "FAILED_FATAL", "CANCELLED"])
def test_not_retried(result):
    w = wf({"a": step(retry={"max_retries": 5})})
    run, _ = rs.start(new_run(), 0)
    run, _ = rs.mark_dispatched(w, run, "a", 0)
    run, fx = rs.apply_result(w, run, "run1:a@1", result, None, None, 1)
    assert run.steps["a"].status != "pending" and not kinds(fx, ArmTimer)
    assert run.terminal


# --- idempotency and staleness -----------------------------------------------------------------
def test_duplicate_result_is_a_no_op():
    w = wf({"a": step(), "b": step("a")})
    run, _ = rs.start(new_run(), 0)
    run, _ = rs.mark_dispatched(w, run, "a", 0)
    once, fx1 = rs.apply_result(w, run, "run1:a@1", "SUCCEEDED", {"v": 1}, None, 1)
    twice, fx2 = rs.apply_result(w, once, "run1:a@1", "SUCCEEDED", {"v": 1}, None, 2)
    assert twice is once and fx2 == [] and fx1
    # replaying on the original state gives the same run and effects
    again, fx3 = rs.apply_result(w, run, "run1:a@1", "SUCCEEDED", {"v": 1}, None, 1)
    assert again == once and fx3 == fx1


@pytest.mark.parametrize("jid", ["other:a@1", "run1:a@2", "run1:zz@1", "garbage", "run1:b@1"])
def test_mismatched_results_ignored(jid):
    w = wf({"a": step(), "b": step("a")})
    run, _ = rs.start(new_run(), 0)
    run, _ = rs.mark_dispatched(w, run, "a", 0)
    same, fx = rs.apply_result(w, run, jid, "SUCCEEDED", {}, None, 1)
    assert same is run and fx == []


def test_transitions_do_not_mutate_input():
    w = wf({"a": step(output_path="x.y"), "b": step("a")})
    run, _ = rs.start(new_run(context={"x": {"z": 1}}), 0)
    run, _ = rs.mark_dispatched(w, run, "a", 0)
    before = copy.deepcopy(run.to_dict())
    rs.apply_result(w, run, "run1:a@1", "SUCCEEDED", {"v": 1}, None, 1)
    rs.cancel(run, now=1)
    assert run.to_dict() == before


# --- cancel and timeouts -----------------------------------------------------------------------
def test_cancel_effects():
    w = wf({"a": step(), "b": step(), "c": step("a"), "g": {"type": "approval"}})
    run, _ = rs.start(new_run(), 0)
    run, _ = rs.mark_dispatched(w, run, "a", 0)
    run, _ = rs.mark_dispatched(w, run, "b", 0)
    run, fx = rs.mark_dispatched(w, run, "g", 0, status="waiting")
    assert run.status == "waiting" and run.steps["g"].job_id == "run1:g@1"
    run, _ = rs.apply_result(w, run, "run1:b@1", "SUCCEEDED", {}, None, 1)
    assert run.status == "waiting"
    run, fx = rs.cancel(run, now=2)
    assert run.status == "cancelled" and run.completed_at == 2
    assert run.steps["a"].status == "cancelled" and run.steps["g"].status == "cancelled"
    assert run.steps["b"].status == "succeeded"
    assert sorted(e.job_id for e in kinds(fx, CancelJob)) == ["run1:a@1", "run1:g@1"]
    assert {e.reason for e in kinds(fx, CancelJob)} == {"workflow run cancelled"}
    same, fx2 = rs.cancel(run, now=3)
    assert same is run and fx2 == []
    assert rs.apply_result(w, run, "run1:a@1", "SUCCEEDED", {}, None, 4) == (run, [])


def test_workflow_timeout():
    w = wf({"a": step(), "b": step("a")}, timeout_sec=60)
    run, _ = rs.start(new_run(), 100)
    run, _ = rs.mark_dispatched(w, run, "a", 100)
    assert rs.time_out(w, run, 159.9) == (run, [])
    assert rs.next_dispatches(w, replace(run, steps={}), 160) == []  # due: time_out first
    out, fx = rs.time_out(w, run, 160)
    assert out.status == "timed_out" and out.error == {"message": "workflow run timed out"}
    assert out.steps["a"].status == "timed_out"
    assert CancelJob("run1:a@1", "workflow run timed out") in fx
    # a result arriving after the deadline times the run out instead of being applied
    late, fx = rs.apply_result(w, run, "run1:a@1", "SUCCEEDED", {}, None, 200)
    assert late.status == "timed_out" and late.steps["a"].status == "timed_out"


# --- for_each children -------------------------------------------------------------------------
def test_for_each_children_and_roll_up():
    w = wf({"fan": step(for_each="input.items", max_parallel=2), "after": step("fan")})
    run, _ = rs.start(new_run(), 0)
    assert rs.next_dispatches(w, run, 0) == ["fan"]
    run, _ = rs.expand_for_each(w, run, "fan", ["x", "y", "z"], 0)
    assert run.steps["fan"].children == ("fan[0]", "fan[1]", "fan[2]")
    assert run.steps["fan[1]"].item == "y"
    run, jobs = dispatch_all(w, run, 0)
    assert jobs == ["run1:fan[0]@1", "run1:fan[1]@1"]  # max_parallel
    assert rs.parse_job_id(jobs[1]) == ("run1", "fan[1]", 1)
    run, _ = rs.apply_result(w, run, jobs[0], "SUCCEEDED", "X", None, 1)
    run, jobs2 = dispatch_all(w, run, 1)
    assert jobs2 == ["run1:fan[2]@1"]
    run, _ = rs.apply_result(w, run, jobs[1], "SUCCEEDED", "Y", None, 2)
    run, _ = rs.apply_result(w, run, jobs2[0], "SUCCEEDED", "Z", None, 3)
    assert run.steps["fan"].status == "succeeded"
    assert run.context["steps"]["fan"] == {"output": ["X", "Y", "Z"]}
    assert rs.next_dispatches(w, run, 3) == ["after"]


def test_for_each_child_failure_fails_parent_and_cancels_siblings():
    w = wf({"fan": step(for_each="input.items"), "after": step("fan")})
    run, _ = rs.start(new_run(), 0)
    run, _ = rs.expand_for_each(w, run, "fan", [1, 2], 0)
    run, jobs = dispatch_all(w, run, 0)
    run, fx = rs.apply_result(w, run, jobs[0], "FAILED", None, "nope", 1)
    assert run.steps["fan"].status == "failed" and run.steps["fan[1]"].status == "cancelled"
    assert CancelJob(jobs[1], "for_each sibling fan[0] failed") in fx
    assert run.status == "failed" and run.steps["after"].status == "skipped"


def test_for_each_empty_succeeds():
    w = wf({"fan": step(for_each="input.items")})
    run, _ = rs.start(new_run(), 0)
    run, _ = rs.expand_for_each(w, run, "fan", [], 0)
    assert run.steps["fan"].status == "succeeded" and run.status == "succeeded"


def test_complete_step_inline_and_skip_propagation():
    w = wf({"c": {"type": "transform"}, "d": step("c"), "e": step("d")})
    run, _ = rs.start(new_run(), 0)
    run, _ = rs.complete_step(w, run, "c", "skipped", error="condition false", now=1)
    assert run.steps["c"].skip_reason == "condition false"
    assert run.steps["d"].skip_reason == "dependency c skipped"
    assert run.steps["e"].status == "skipped" and run.status == "succeeded"


# --- documents ---------------------------------------------------------------------------------
def test_to_dict_from_dict_round_trip():
    w = wf({"a": step(retry={"max_retries": 1}), "fan": step(for_each="input.items"),
            "b": step("a")})
    run, _ = rs.start(new_run(org_id="org", team_id="t", labels={"k": "v"},
                             metadata={"m": [1]}, idempotency_key="idem", dry_run=True,
                             triggered_by="user", created_at=1.5, output=0), 0)
    run, _ = rs.mark_dispatched(w, run, "a", 0)
    run, _ = rs.apply_result(w, run, "run1:a@1", "FAILED", None, {"message": "x", "n": 1}, 1)
    run, _ = rs.expand_for_each(w, run, "fan", [{"i": 1}, "two"], 2)
    doc = run.to_dict()
    text = json.dumps(doc)
    back = Run.from_dict(json.loads(text))
    assert back == run and back.to_dict() == doc
    assert doc["steps"]["a"]["next_attempt_at"] == 2 and doc["steps"]["fan"]["children"] == [
        "fan[0]", "fan[1]"]
    assert doc["org_id"] == "org" and run.tenant == "org" and doc["dry_run"] is True
    assert StepRun.from_dict(StepRun(step_id="s", output="").to_dict()).output == ""


def test_documents_copy_their_values_unless_told_to_share_them():
    w = wf({"a": step(), "b": step("a")})
    run, _ = rs.start(new_run(metadata={"m": [1]}), 0)
    run, _ = rs.mark_dispatched(w, run, "a", 0)
    run, _ = rs.apply_result(w, run, "run1:a@1", "SUCCEEDED", {"out": [1, 2]}, None, 1)
    copied, shared = run.to_dict(), run.to_dict(copy_values=False)
    assert copied == shared
    assert copied["steps"]["a"]["output"] is not run.steps["a"].output
    assert shared["steps"]["a"]["output"] is run.steps["a"].output and shared["metadata"] is run.metadata
    copied["steps"]["a"]["output"]["out"].append(3)  # a caller's change never reaches the run
    assert run.steps["a"].output == {"out": [1, 2]}
    doc = json.loads(json.dumps(shared))
    taken, fresh = Run.from_dict(doc, copy_values=False), Run.from_dict(doc)
    assert taken == fresh == run
    assert taken.steps["a"].output is doc["steps"]["a"]["output"]
    assert fresh.steps["a"].output is not doc["steps"]["a"]["output"]


def test_from_dict_minimal():
    run = Run.from_dict({"id": "r", "workflow_id": "w"})
    assert run.status == "pending" and run.steps == {} and run.to_dict()["steps"] == {}


# --- property: random result orders -----------------------------------------------------------
def _random_workflow(rnd: random.Random):
    n = rnd.randint(1, 7)
    ids = [f"s{i}" for i in range(n)]
    steps: dict = {}
    for i, sid in enumerate(ids):
        deps = rnd.sample(ids[:i], rnd.randint(0, min(i, 2)))
        s = step(*deps)
        if rnd.random() < 0.3:
            s["retry"] = {"max_retries": rnd.randint(1, 2), "initial_backoff_sec": 1}
        if rnd.random() < 0.2:
            s["for_each"] = "input.items"
            s["max_parallel"] = rnd.randint(0, 2)
        steps[sid] = s
    # an on_error handler for some steps: a fresh step that depends on nothing
    for sid in list(ids):
        if rnd.random() < 0.2:
            steps[sid]["on_error"] = f"h_{sid}"
            steps[f"h_{sid}"] = step()
    return parse_workflow({"id": "wf1", "steps": steps,
                           **({"timeout_sec": 1000} if rnd.random() < 0.3 else {})})


@pytest.mark.parametrize("seed", range(300))
def test_random_result_orders_terminate(seed):
    rnd = random.Random(seed)
    w = _random_workflow(rnd)
    run, _ = rs.start(new_run(), 0, w)
    now = 0.0
    outstanding: list[str] = []
    answered: set[str] = set()
    for _ in range(500):
        if run.terminal:
            break
        now += rnd.choice([0, 0.5, 2])
        for path in rs.next_dispatches(w, run, now):
            sid = rs.base_step(path)
            if w.steps[sid].for_each and path == sid:
                run, _ = rs.expand_for_each(w, run, path, range(rnd.randint(0, 3)), now)
            else:
                run, fx = rs.mark_dispatched(w, run, path, now)
                outstanding += [e.job_id for e in fx if isinstance(e, DispatchStep)]
        if not outstanding:
            now += 10  # let retries come due
            continue
        jid = outstanding.pop(rnd.randrange(len(outstanding)))
        if rnd.random() < 0.2:
            outstanding.append(jid)  # answered twice later (duplicate delivery)
        status = rnd.choice(["SUCCEEDED"] * 4 + ["FAILED", "FAILED_RETRYABLE", "TIMEOUT",
                                                "DENIED", "FAILED_FATAL", "CANCELLED"])
        before = run
        terminal_before = {p: s for p, s in run.steps.items()
                           if s.status in rs.TERMINAL_STEP_STATUSES}
        run, fx = rs.apply_result(w, run, jid, status, {"j": jid}, "err", now)
        for p, s in terminal_before.items():  # terminal steps never move
            assert run.steps[p] == s
        timeout_due = w.timeout_sec > 0 and now >= run.started_at + w.timeout_sec
        if jid in answered and not timeout_due:
            assert run is before and fx == []
        answered.add(jid)
        if rnd.random() < 0.05:
            run, _ = rs.cancel(run, now=now)
    else:
        pytest.fail("run did not terminate")
    assert run.terminal
    assert all(s.status in rs.TERMINAL_STEP_STATUSES or s.status == "pending"
               for s in run.steps.values())
    assert not any(s.status in ("running", "waiting") for s in run.steps.values())
    assert Run.from_dict(json.loads(json.dumps(run.to_dict()))) == run


def test_approval_waiting_then_approved():
    w = wf({"g": {"type": "approval"}, "b": step("g")})
    run, _ = rs.start(new_run(), 0)
    run, fx = rs.mark_dispatched(w, run, "g", 0, status="waiting")
    assert run.status == "waiting" and DispatchStep("g", "run1:g@1", 1) in fx
    assert rs.aggregate(w, run) == "waiting"
    run, fx = rs.apply_result(w, run, "run1:g@1", "SUCCEEDED", None, None, 5)
    assert run.status == "running" and rs.next_dispatches(w, run, 5) == ["b"]


def test_aggregate_on_documents():
    w = wf({"a": step(), "b": step("a"), "c": step()})
    doc = {"id": "r", "workflow_id": "wf1", "status": "running", "steps": {
        "a": {"step_id": "a", "status": "succeeded"}, "c": {"step_id": "c", "status": "running"}}}
    assert rs.aggregate(w, Run.from_dict(doc)) == "running"
    doc["steps"]["a"]["status"] = "timed_out"
    assert rs.aggregate(w, Run.from_dict(doc)) == "timed_out"
    doc["steps"]["c"]["status"] = "denied"
    assert rs.aggregate(w, Run.from_dict(doc)) == "denied"  # denied outranks timed_out
    doc["steps"]["a"]["status"] = "succeeded"
    doc["steps"]["b"] = {"step_id": "b", "status": "succeeded"}
    doc["steps"]["c"]["status"] = "succeeded"
    assert rs.aggregate(w, Run.from_dict(doc)) == "succeeded"
    doc["status"] = "cancelled"  # a terminal run keeps its status
    assert rs.aggregate(w, Run.from_dict(doc)) == "cancelled"
    assert rs.aggregate(w, Run(id="r", workflow_id="wf1")) == "pending"


def test_mark_dispatched_refuses():
    w = wf({"a": step()})
    run, _ = rs.start(new_run(), 0)
    run, _ = rs.mark_dispatched(w, run, "a", 0)
    with pytest.raises(ValueError):
        rs.mark_dispatched(w, run, "a", 0)  # already running
    with pytest.raises(ValueError):
        rs.mark_dispatched(w, run, "nope", 0)
    done, _ = rs.cancel(run, now=1)
    with pytest.raises(ValueError):
        rs.mark_dispatched(w, done, "a", 1)


# ---- which results the engine's consumer acks unread ----------------------------------------


@pytest.mark.parametrize("job_id, status, skipped", [
    ("8f3c2a", "SUCCEEDED", True),  # a plain job: no run's step
    ("run-1:fetch@1", "SUCCEEDED", False),  # a step's success
    ("run-1:fetch[2]@3", "FAILED", False),  # a fan-out step's failure
    ("run-1:fetch@1", "CANCELLED", False),
    ("run-1:fetch@1", "FAILED_RETRYABLE", True),  # the scheduler retries it itself
    ("run-1:fetch@0", "SUCCEEDED", True),  # attempt 0 names no step job
])
def test_the_result_consumer_skips_only_results_that_decide_no_step(job_id, status, skipped):
    from cordum.agent.v1.job_pb2 import JobResult, JobStatus
    from cordum.protocol.packets import encode, new_packet
    from cordum.workflow.engine import skips_result

    packet = new_packet(JobResult(job_id=job_id, status=JobStatus.Value("JOB_STATUS_" + status)), sender_id="w")
    assert skips_result(encode(packet)) is skipped


def test_the_result_consumer_skips_other_payloads_but_never_malformed_bytes():
    from cordum.agent.v1.heartbeat_pb2 import Heartbeat
    from cordum.protocol.packets import encode, new_packet
    from cordum.workflow.engine import skips_result

    assert skips_result(encode(new_packet(Heartbeat(worker_id="w"), sender_id="w"))) is True
    assert skips_result(b"\xff not a packet") is False  # left to the consumer: counted, terminated
    assert skips_result(b"") is False


# ---- stored definitions, parsed once per text ------------------------------------------------
def test_the_engine_parses_a_stored_definition_once_per_text():
    from cordum.workflow.definition import DefinitionError
    from cordum.workflow.engine import WorkflowEngine

    engine = WorkflowEngine(store=None, jobs=None, bus=None, leases=None, redis=None)  # parsing does no I/O
    doc = {"id": "w", "steps": {"a": {"type": "worker", "topic": "job.default"}}}
    first = engine.parsed(doc, "workflow w")
    assert engine.parsed(json.loads(json.dumps(doc)), "workflow w") is first  # the same text: kept
    changed = {**doc, "steps": {"b": {"type": "worker", "topic": "job.default"}}}
    assert list(engine.parsed(changed, "workflow w").steps) == ["b"]
    with pytest.raises(DefinitionError):
        engine.parsed({"id": "w", "steps": {"a": {"type": "no-such-type"}}}, "workflow w")
