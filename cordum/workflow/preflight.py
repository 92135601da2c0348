"""What can be known about a run before it starts (pure): run input against the workflow's
``input_schema``, and the dry-run plan of ``POST /api/v1/workflows/{id}/dry-run``.

Input checks cover the part of JSON Schema a run input needs, one level deep: ``type`` of the
input and of each property (string, number, integer, boolean, object, array, null, or a list of
them), ``required``, ``enum`` and ``additionalProperties: false``. Other keywords are ignored
(no validator library is a dependency of ours); every problem is named by its field.

The plan lists the steps in dependency order with the wave each can start in (0 = at once), what
it would dispatch, and warnings: input problems and step types the engine cannot run yet. ``estimated_duration_sec`` is a lower bound: the longest chain of ``delay`` steps
(job durations are unknown before they run).
"""

from __future__ import annotations

from typing import Any, Collection, Mapping

from cordum.protocol.subjects import APPROVAL_GATE_TOPIC
from cordum.workflow.definition import DISPATCH_TYPES, Workflow, owned_steps, topological_order

__all__ = ["input_problems", "plan"]

_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,), "number": (int, float), "integer": (int,), "boolean": (bool,),
    "object": (dict,), "array": (list,), "null": (type(None),),
}


def _type_name(value: Any) -> str:
    for name in ("null", "boolean", "integer", "number", "string", "array", "object"):
        if _matches(value, name):
            return name
    return type(value).__name__


def _matches(value: Any, name: str) -> bool:
    if name in ("number", "integer") and isinstance(value, bool):
        return False
    if name == "integer" and isinstance(value, float):
        return value.is_integer()
    return isinstance(value, _TYPES.get(name, ()))


def _type_problem(where: str, value: Any, wanted: Any) -> str | None:
    names = [wanted] if isinstance(wanted, str) else [w for w in wanted or () if isinstance(w, str)]
    if not names or any(_matches(value, name) for name in names):
        return None
    return f"{where} must be {' or '.join(names)} (got {_type_name(value)})"


def input_problems(schema: Mapping[str, Any] | None, value: Any) -> list[str]:
    """Problems of a run input against a workflow's ``input_schema`` (empty: acceptable)."""
    if not isinstance(schema, Mapping) or not schema:
        return []
    problem = _type_problem("input", value, schema.get("type"))
    if problem:
        return [problem]
    if not isinstance(value, Mapping):
        return []
    problems = [f"input: missing required field {name!r}" for name in schema.get("required") or ()
                if isinstance(name, str) and name not in value]
    properties = schema.get("properties") if isinstance(schema.get("properties"), Mapping) else {}
    for name, sub in properties.items():
        if name not in value or not isinstance(sub, Mapping):
            continue
        where = f"input.{name}"
        problem = _type_problem(where, value[name], sub.get("type"))
        if problem:
            problems.append(problem)
        elif isinstance(sub.get("enum"), list) and value[name] not in sub["enum"]:
            problems.append(f"{where} must be one of {', '.join(repr(v) for v in sub['enum'])}")
    if schema.get("additionalProperties") is False:
        problems += [f"input: unknown field {name!r}" for name in value if name not in properties]
    return problems


def plan(workflow: Workflow, input: Any, *, unsupported: Collection[str] = ()) -> dict[str, Any]:
    """The dry-run answer: ``{steps, warnings, estimated_duration_sec}`` (the SDK's DryRunResult)."""
    problems = input_problems(workflow.input_schema, input)
    warnings = list(problems)
    owned = {child: parent for parent, s in workflow.steps.items() for child in s.owned()}
    owned_set = owned_steps(workflow)
    wave: dict[str, int] = {}
    finish: dict[str, float] = {}
    steps = []
    for sid in topological_order(workflow):
        step = workflow.steps[sid]
        wave[sid] = max((wave[d] + 1 for d in step.depends_on), default=0)
        own = float(step.delay_sec) if step.type == "delay" else 0.0
        finish[sid] = max((finish[d] for d in step.depends_on), default=0.0) + own
        entry: dict[str, Any] = {"step_id": sid, "status": "pending", "type": step.type, "wave": wave[sid],
                                 "depends_on": list(step.depends_on)}
        if step.dispatches:
            entry["topic"] = step.topic
        elif step.type == "approval":
            entry["topic"] = APPROVAL_GATE_TOPIC
        for name in ("for_each", "condition", "on_error"):
            if getattr(step, name):
                entry[name] = getattr(step, name)
        if sid in owned_set:
            entry["owned_by"] = owned[sid]
        if step.type in unsupported:
            warnings.append(f"step {sid!r}: step type {step.type} is not supported by the engine yet "
                            "(a run fails at this step)")
        steps.append(entry)
    jobs = sum(1 for s in workflow.steps.values() if s.type in DISPATCH_TYPES or s.type == "approval")
    return {"steps": steps, "warnings": warnings, "estimated_duration_sec": max(finish.values(), default=0.0),
            "valid": not problems, "job_steps": jobs}
