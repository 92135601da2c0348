"""Run input checks and the dry-run plan (cordum/workflow/preflight.py)."""

from __future__ import annotations

from cordum.workflow.definition import parse_workflow
from cordum.workflow.preflight import input_problems, plan

SCHEMA = {"type": "object", "required": ["amount", "who"], "additionalProperties": False,
          "properties": {"amount": {"type": "number"}, "who": {"type": "string"}, "n": {"type": "integer"},
                         "mode": {"enum": ["fast", "slow"]}, "tags": {"type": ["array", "null"]}}}


def test_input_problems_name_each_field() -> None:
    assert input_problems(SCHEMA, {"amount": 2.5, "who": "ann", "n": 3, "mode": "fast", "tags": None}) == []
    assert input_problems(SCHEMA, {"amount": 1, "who": "x", "n": 2.0, "tags": ["a"]}) == []  # 2.0 is an integer
    assert input_problems(SCHEMA, {"amount": True, "n": 1.5, "mode": "medium", "tags": "a", "extra": 1}) == [
        "input: missing required field 'who'",
        "input.amount must be number (got boolean)",
        "input.n must be integer (got number)",
        "input.mode must be one of 'fast', 'slow'",
        "input.tags must be array or null (got string)",
        "input: unknown field 'extra'",
    ]
    assert input_problems(SCHEMA, [1]) == ["input must be object (got array)"]
    assert input_problems(None, {"anything": 1}) == [] and input_problems({}, "x") == []
    assert input_problems({"properties": {"a": {"type": "string"}}}, {"b": 1}) == []  # others are allowed


def test_plan_orders_steps_in_waves_and_warns() -> None:
    wf = parse_workflow({"id": "wf", "input_schema": {"required": ["n"]}, "steps": {
        "act": {"topic": "job.act", "depends_on": ["ask", "wait"], "for_each": "input.items"},
        "fetch": {"topic": "job.fetch"},
        "ask": {"type": "approval", "depends_on": ["fetch"]},
        "wait": {"type": "delay", "delay_sec": 12, "depends_on": ["fetch"]},
        "more": {"type": "delay", "delay_sec": 5, "depends_on": ["wait"]},
        "tell": {"type": "notify", "depends_on": ["act", "more"], "input": {"message": "done"}},
    }})
    result = plan(wf, {}, unsupported={"delay"})
    assert [(s["step_id"], s["wave"]) for s in result["steps"]] == [
        ("fetch", 0), ("ask", 1), ("wait", 1), ("act", 2), ("more", 2), ("tell", 3)]
    by_id = {s["step_id"]: s for s in result["steps"]}
    assert by_id["fetch"]["topic"] == "job.fetch" and by_id["ask"]["topic"] == "job.cordum.approval-gate"
    assert "topic" not in by_id["tell"] and by_id["act"]["for_each"] == "input.items"
    assert by_id["act"]["depends_on"] == ["ask", "wait"]
    assert result["warnings"] == [
        "input: missing required field 'n'",
        "step 'wait': step type delay is not supported by the engine yet (a run fails at this step)",
        "step 'more': step type delay is not supported by the engine yet (a run fails at this step)",
    ]
    assert result["estimated_duration_sec"] == 17  # fetch → wait (12) → more (5) → tell
    assert result["valid"] is False and result["job_steps"] == 3
    clean = plan(wf, {"n": 1})
    assert clean["warnings"] == [] and clean["valid"] is True


def test_plan_marks_steps_a_parent_orchestrates() -> None:
    wf = parse_workflow({"id": "wf", "steps": {
        "fan": {"type": "parallel", "input": {"steps": ["left", "right"], "strategy": "all"}},
        "left": {"topic": "job.l"}, "right": {"topic": "job.r"},
    }})
    by_id = {s["step_id"]: s for s in plan(wf, None)["steps"]}
    assert by_id["left"]["owned_by"] == "fan" and by_id["right"]["owned_by"] == "fan"
    assert "owned_by" not in by_id["fan"]
