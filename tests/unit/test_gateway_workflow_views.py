"""Shapes of the workflow routes (cordum/gateway/workflow_views.py): the public cordum-sdk's
definition shape mapped onto ours, and runs/steps/timeline events as its models read them."""

from __future__ import annotations

import pytest

from cordum.gateway.workflow_views import (
    ShapeError,
    definition_view,
    iso,
    normalise_definition,
    run_detail,
    run_summary,
    step_view,
    timeline_view,
    timer_view,
)


def test_iso_times() -> None:
    assert iso(0) == "1970-01-01T00:00:00.000000Z"
    assert iso(1_700_000_000.25) == "2023-11-14T22:13:20.250000Z"
    assert iso(None) is None and iso("soon") is None and iso(True) is None


def test_sdk_step_shape_is_mapped_and_ours_is_left_alone() -> None:
    ours = {"id": "w", "steps": {"a": {"type": "worker", "topic": "job.a", "retry": {"max_retries": 2}}}}
    assert normalise_definition(ours) == (ours, False)
    doc, changed = normalise_definition({"id": "w", "steps": {
        "a": {"id": "a", "type": "job", "config": {"topic": "job.a", "input": {"x": 1}},
              "retry": {"max_attempts": 4, "backoff_sec": 3, "multiplier": 3}},
        "b": {"type": "approval", "config": {}},
    }})
    assert changed
    assert doc["steps"]["a"] == {"id": "a", "type": "worker", "topic": "job.a", "input": {"x": 1},
                                 "retry": {"multiplier": 3, "max_retries": 3, "initial_backoff_sec": 3}}
    assert doc["steps"]["b"] == {"type": "approval"}
    # our own retry fields win over the SDK's when both are given
    both, _ = normalise_definition({"steps": {"a": {"retry": {"max_retries": 1, "max_attempts": 9}}}})
    assert both["steps"]["a"]["retry"] == {"max_retries": 1}
    same, _ = normalise_definition({"steps": {"a": {"topic": "job.a", "config": {"topic": "job.a"}}}})
    assert same["steps"]["a"] == {"topic": "job.a"}
    for step, problem in (({"config": [1]}, "field 'config' must be an object"),
                          ({"topic": "x", "config": {"topic": "y"}}, "field 'topic' is given twice"),
                          ({"retry": {"max_attempts": True}}, "retry.max_attempts must be a whole number >= 1")):
        with pytest.raises(ShapeError, match=problem):
            normalise_definition({"steps": {"s": step}})
    assert normalise_definition({"steps": "nope"}) == ({"steps": "nope"}, False)  # the parser names it


def test_definition_view_has_what_the_sdk_model_requires() -> None:
    view = definition_view({"id": "w", "steps": {"a": {"id": "a", "type": "notify"}, "b": {"topic": "job.b"}}})
    assert view["name"] == "" and view["steps"]["a"]["type"] == "notify"
    assert view["steps"]["b"] == {"id": "b", "type": "worker", "topic": "job.b"}


RUN = {
    "id": "r1", "workflow_id": "w", "org_id": "acme", "status": "running", "input": {"n": 1},
    "context": {"steps": {}}, "created_at": 100.0, "updated_at": 101.5, "started_at": 100.5,
    "triggered_by": "ann", "idempotency_key": "k",
    "steps": {
        "a": {"step_id": "a", "status": "failed", "started_at": 100.5, "completed_at": 101.0, "attempts": 1,
              "job_id": "r1:a@1", "error": {"message": "boom", "code": "x"}},
        "b": {"step_id": "b", "status": "pending", "next_attempt_at": 130.0},
    },
}


def test_run_views() -> None:
    summary = run_summary(RUN)
    assert summary == {"id": "r1", "workflow_id": "w", "org_id": "acme", "status": "running", "error": None,
                       "created_by": "ann", "created_at": iso(100.0), "updated_at": iso(101.5), "dry_run": False,
                       "idempotency_key": "k", "started_at": iso(100.5), "completed_at": None}
    assert "started_at" not in run_summary({**RUN, "started_at": None})  # the SDK refuses a null there

    detail = run_detail(RUN, [timer_view("w", "r1", 130.0, 100.0)])
    assert detail["input"] == {"n": 1} and detail["output"] is None and detail["triggered_by"] == "ann"
    assert detail["timers"] == [{"workflow_id": "w", "run_id": "r1", "fires_at": iso(130.0), "remaining_ms": 30000}]
    a, b = detail["steps"]["a"], detail["steps"]["b"]
    assert a["error"] == "boom" and a["error_detail"] == {"message": "boom", "code": "x"}
    assert a["started_at"] == iso(100.5) and a["completed_at"] == iso(101.0) and a["job_id"] == "r1:a@1"
    assert b["job_id"] is None and b["started_at"] is None and b["next_attempt_at"] == iso(130.0)
    assert RUN["steps"]["a"]["error"] == {"message": "boom", "code": "x"}  # the document is not changed
    assert step_view("c", {"error": "plain"})["error"] == "plain"
    assert timer_view("w", "r", 10.0, 20.0)["remaining_ms"] == 0


def test_timeline_view() -> None:
    event = timeline_view({"type": "step_dispatched", "at": 100.0, "step_id": "a", "data": {"attempt": 1}}, "r1", "w")
    assert event == {"type": "step_dispatched", "step_id": "a", "data": {"attempt": 1}, "timestamp": iso(100.0),
                     "time": iso(100.0), "run_id": "r1", "workflow_id": "w", "message": ""}
    assert "timestamp" not in timeline_view({"type": "x"}, "r1", "w")


def test_a_run_view_never_shows_its_starters_key_name() -> None:
    doc = {"id": "r1", "workflow_id": "wf", "status": "running", "created_at": 1.0, "updated_at": 1.0,
           "metadata": {"started_by": {"principal": "alice", "key": "0123abcd4567ef89"}, "note": "x"}}
    view = run_detail(doc)
    assert view["metadata"] == {"started_by": {"principal": "alice"}, "note": "x"}
    assert doc["metadata"]["started_by"]["key"] == "0123abcd4567ef89"  # the stored run is untouched
