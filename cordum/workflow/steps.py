"""What the engine's own step types decide (spec §2.3): the pure part of their handlers.

Pure like ``runstate``: no I/O; time arrives as unix seconds, expressions are evaluated with
``expr`` against the scope the engine builds. Each function returns a decision the engine hands to
a ``runstate`` transition; a problem is a :class:`StepError` whose message becomes the step's error.

- ``delay``: :func:`delay_due` — when the step is due (``delay_sec`` > 0, else ``delay_until`` −
  now, else ``timeout_sec``); a due time at or before now means "succeed at once".
- ``switch``: :func:`choose_branch` — the first case whose value equals the switch's value (list
  cases ``{when|match|value, next|step|target}`` in order, or a map value → step), else
  ``default``/``default_step``, else no branch at all (the switch still succeeds; every target is
  not taken). Equality: numbers by value (``1 == 1.0``), booleans only with booleans, and a string
  equals a number or boolean written the same way (``"1"`` matches 1, ``"true"`` matches true), so
  map keys — always strings — match numeric and boolean values.
- ``storage``: :func:`storage_op` — ``read``/``write``/``delete`` at the dot path ``key`` of the
  run context. The output is the value at the key (read; written; deleted — null when there was
  none). Reading a missing key fails naming it; ``steps…`` is read-only (the step outputs).
- ``loop``: :func:`loop_next` — before iteration ``i`` (0-based) the scope's ``loop`` is
  ``{index: i, iteration: i + 1, previous_output: <output of iteration i-1, null at first>}``,
  the same the body of iteration ``i`` sees (:func:`loop_scope`). Then ``until`` (from the second
  iteration on) stops the loop when truthy, and ``while`` (``input.while``, else the step's
  ``condition``) stops it when falsy — so ``until`` loops run at least once, ``while`` loops maybe
  never. With neither, the loop runs ``max_iterations`` times. A loop with a condition that would
  still go on after ``max_iterations`` iterations fails. Output ``{iterations, last_output}``.
- ``subworkflow``: :func:`subworkflow_call` — the child run to start: ``input.workflow_id``
  (templated), input = rendered ``input.input_mapping`` (``{}`` without one), metadata
  ``parent_run_id, parent_step_id, parent_workflow_id, call_stack`` (the workflow ids above it;
  calling one of them again fails: ``circular workflow reference detected``), and an id derived
  from the parent run and step path, so creating it twice creates it once.
  :func:`subworkflow_outcome` — the step's outcome once the child ended: its status (failed,
  denied, timed_out, cancelled carry the child's error) and, on success, rendered
  ``input.output_mapping`` with scope ``child = {run_id, status, input, ctx, steps, output}``,
  or the child's whole context without a mapping.
"""

from __future__ import annotations

import copy
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Mapping

from cordum.workflow import expr
from cordum.workflow import runstate as rs
from cordum.workflow.definition import (
    ID_PATTERN,
    LOOP_DEFAULT_MAX_ITERATIONS,
    Step,
    Workflow,
    subworkflow_cycle,
    switch_targets,
)

__all__ = [
    "SUBWORKFLOW_MAX_DEPTH",
    "Branch",
    "StepError",
    "choose_branch",
    "delay_due",
    "loop_next",
    "loop_scope",
    "storage_op",
    "subworkflow_call",
    "subworkflow_outcome",
]

#: how many workflows may be on a call stack (a chain of distinct workflows calling each other)
SUBWORKFLOW_MAX_DEPTH = 16
_CHILD_RUN_NAMESPACE = uuid.UUID("7d0b8f4e-5a61-4c55-9a3b-2f1c0de0c0de")


class StepError(ValueError):
    """The step cannot do its work; the message is the step's error."""


def delay_due(step: Step, scope: Mapping[str, Any], now: float) -> float:
    """The unix time a delay step is due. ``delay_until`` may be a ``${…}`` template; it must
    render to an RFC3339 timestamp with a zone (a past one is due now)."""
    if step.delay_sec > 0:
        return now + step.delay_sec
    if step.delay_until:
        text = expr.render(step.delay_until, scope)
        if not isinstance(text, str):
            raise StepError(f"delay_until rendered to {type(text).__name__}, not an RFC3339 timestamp")
        try:
            when = datetime.fromisoformat(text.strip().replace("z", "Z"))
        except ValueError:
            raise StepError(f"delay_until {text!r} is not an RFC3339 timestamp") from None
        if when.tzinfo is None:
            raise StepError(f"delay_until {text!r} has no time zone")
        return when.timestamp()
    return now + max(step.timeout_sec, 0.0)


@dataclass(frozen=True)
class Branch:
    """A switch's decision: ``output`` is the step's output, ``not_taken`` the targets to skip."""

    matched_case: Any
    matched_value: Any
    target_step: str | None
    not_taken: tuple[str, ...]

    @property
    def output(self) -> dict[str, Any]:
        return {"matched_case": self.matched_case, "matched_value": self.matched_value,
                "target_step": self.target_step}


def _text(value: Any) -> str | None:
    """How a scalar is written, for comparing a string with a number or a boolean."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, (int, float, str)):
        return str(value)
    return None


def same_value(a: Any, b: Any) -> bool:
    """Switch equality (see the module docstring)."""
    if isinstance(a, bool) or isinstance(b, bool):
        if isinstance(a, bool) and isinstance(b, bool):
            return a == b
    elif isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    if isinstance(a, str) != isinstance(b, str):
        return _text(a) is not None and _text(a) == _text(b)
    return type(a) is type(b) and a == b


def choose_branch(step: Step, inp: Mapping[str, Any], value: Any) -> Branch:
    """Which target a switch takes for ``value``; ``inp`` is its rendered ``input``."""
    cases = inp.get("cases")
    matched: tuple[Any, str] | None = None
    if isinstance(cases, list):
        for i, case in enumerate(cases):
            if not isinstance(case, Mapping):
                continue
            when = case.get("when", case.get("match", case.get("value")))
            if same_value(value, when):
                matched = (i, case.get("next", case.get("step", case.get("target"))))
                break
    elif isinstance(cases, Mapping):
        matched = next(((k, t) for k, t in cases.items() if same_value(value, k)), None)
    if matched is None:
        default = inp.get("default") or inp.get("default_step")
        matched = ("default", default) if isinstance(default, str) and default else None
    target = matched[1] if matched is not None else None
    return Branch(
        matched_case=matched[0] if matched is not None else None,
        matched_value=value,
        target_step=target,
        not_taken=tuple(t for t in switch_targets(step) if t != target),
    )


_MISSING = object()


def _lookup(value: Any, parts: list[str]) -> Any:
    for part in parts:
        if isinstance(value, Mapping) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            return _MISSING
    return value


def storage_op(context: Mapping[str, Any], inp: Mapping[str, Any]) -> tuple[dict[str, Any] | None, Any]:
    """``(new context or None when unchanged, output)`` of a storage step with rendered ``inp``."""
    op, key = inp.get("operation"), inp.get("key")
    if not isinstance(key, str) or not key.strip("."):
        raise StepError(f"storage key must be a non-empty dot path, got {key!r}")
    parts = key.split(".")
    if "" in parts:
        raise StepError(f"storage key {key!r} has an empty part")
    current = _lookup(context, parts)
    if op == "read":
        if current is _MISSING:
            raise StepError(f"storage read: key {key!r} is not in the run context")
        return None, copy.deepcopy(current)
    if op not in ("write", "delete"):
        raise StepError(f"storage operation must be read, write or delete, got {op!r}")
    if parts[0] == "steps":
        raise StepError(f"storage {op}: key {key!r} is read-only (step outputs live under steps)")
    if op == "delete" and current is _MISSING:
        return None, None
    new = copy.deepcopy(dict(context))
    target: Any = new
    for i, part in enumerate(parts[:-1]):
        nxt = target.get(part)
        if nxt is None and op == "write":
            nxt = target[part] = {}
        if not isinstance(nxt, dict):
            where = ".".join(parts[: i + 1])
            raise StepError(f"storage {op}: {where!r} is {type(nxt).__name__}, not a mapping")
        target = nxt
    if op == "delete":
        return new, target.pop(parts[-1])
    value = copy.deepcopy(inp.get("value"))
    target[parts[-1]] = value
    return new, copy.deepcopy(value)


def _loop_vars(index: int, previous_output: Any) -> dict[str, Any]:
    return {"index": index, "iteration": index + 1, "previous_output": copy.deepcopy(previous_output)}


def loop_scope(workflow: Workflow, run: rs.Run, path: str) -> dict[str, Any] | None:
    """The ``loop`` scope entry of the nearest loop iteration ``path`` is in (None outside)."""
    while (m := rs.CHILD_PATH.match(path)) is not None:
        parent, index = m.group(1), int(m.group(2))
        if rs.is_step_path(workflow, parent) and rs.step_for_path(workflow, parent)[0].type == "loop":
            previous = run.step(f"{parent}[{index - 1}]").output if index > 0 else None
            return _loop_vars(index, previous)
        path = parent
    return None


def loop_next(step: Step, scope: Mapping[str, Any], done: int, last_output: Any) -> dict[str, Any] | None:
    """After ``done`` iterations (the last one's output ``last_output``): None to run the next
    one, else the loop's output. StepError when the cap is reached and the loop would go on."""
    inp = step.input
    limit = inp.get("max_iterations", LOOP_DEFAULT_MAX_ITERATIONS)
    until = inp.get("until") or ""
    while_ = inp.get("while") or step.condition
    here = {**scope, "loop": _loop_vars(done, last_output)}
    stop = bool(until) and done > 0 and expr.truthy(expr.evaluate(until, here))
    if not stop and while_:
        stop = not expr.truthy(expr.evaluate(while_, here))
    if not stop and done >= limit:
        if until or while_:
            raise StepError(f"loop {step.id} reached max_iterations {limit} and its condition still "
                            "says go on")
        stop = True
    return {"iterations": done, "last_output": copy.deepcopy(last_output)} if stop else None


def subworkflow_call(run: rs.Run, path: str, workflow_id: Any, child_input: Any) -> rs.StartRun:
    """The child run a subworkflow step at ``path`` of ``run`` starts (rendered target and input)."""
    if not isinstance(workflow_id, str) or not ID_PATTERN.match(workflow_id):
        raise StepError(f"input.workflow_id rendered to {workflow_id!r}, not a workflow id")
    if child_input is None:
        child_input = {}
    if not isinstance(child_input, Mapping):
        raise StepError(f"input.input_mapping rendered to {type(child_input).__name__}, not a mapping")
    above = run.metadata.get("call_stack")
    stack = [str(w) for w in above if isinstance(w, str)] if isinstance(above, list) else []
    stack.append(run.workflow_id)
    if subworkflow_cycle(stack, workflow_id):
        raise StepError("circular workflow reference detected: " + " → ".join(stack + [workflow_id]))
    if len(stack) >= SUBWORKFLOW_MAX_DEPTH:
        raise StepError(f"subworkflow calls nest deeper than {SUBWORKFLOW_MAX_DEPTH} workflows")
    return rs.StartRun(
        run_id=str(uuid.uuid5(_CHILD_RUN_NAMESPACE, f"{run.id}/{path}")),
        workflow_id=workflow_id,
        input=copy.deepcopy(dict(child_input)),
        metadata={"parent_run_id": run.id, "parent_step_id": path,
                  "parent_workflow_id": run.workflow_id, "call_stack": stack},
    )


def subworkflow_outcome(step: Step, child: rs.Run, scope: Mapping[str, Any]) -> tuple[str, Any, Any]:
    """``(status, output, error)`` of a subworkflow step whose child run ended."""
    if child.status != rs.SUCCEEDED:
        cause = (child.error or {}).get("message")
        return child.status, None, {
            "message": f"subworkflow run {child.id} {child.status}" + (f": {cause}" if cause else ""),
            "child_run_id": child.id,
        }
    mapping = step.input.get("output_mapping")
    if not mapping:
        return rs.SUCCEEDED, copy.deepcopy(dict(child.context)), None
    steps = child.context.get("steps") if isinstance(child.context, Mapping) else None
    view = {"run_id": child.id, "status": child.status, "input": child.input, "ctx": child.context,
            "steps": steps or {}, "output": child.output}
    return rs.SUCCEEDED, expr.render(mapping, {**scope, "child": view}), None
