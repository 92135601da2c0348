"""The engine's own step types, pure parts: cordum/workflow/steps.py decisions and the runstate
transitions they feed (delay, switch, storage, parallel, loop, subworkflow)."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from cordum.workflow import runstate as rs
from cordum.workflow.runstate import ArmTimer, TimelineEvent
from cordum.workflow.steps import StepError, delay_due
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
