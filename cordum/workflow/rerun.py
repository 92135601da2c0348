"""Rerun a workflow run from one of its steps (spec §2.11 "Rerun"): the pure part.

A rerun is a NEW run of the same workflow, with the old run's input, in which the steps that
``from_step`` depends on (transitively, through ``depends_on``) and that succeeded before are
already done: their StepRuns (for_each children too) and their outputs in the run context are
copied; everything else — ``from_step`` itself, its dependents and unrelated branches — runs again.
No ``from_step`` reruns the whole workflow with the same input.

Pure like ``runstate``: the caller stores the returned run (``WorkflowStore.create_run``) and
advances it (``WorkflowEngine.advance``).

Copied steps lose their ``job_id`` (and the ``audit_hash`` tied to it): a job id names the run it
belongs to (``<run>:<step>@n``) and the store keeps a job → run reverse index, so the new run must
not claim the old run's jobs. Where they came from is kept in ``metadata["rerun"]``.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Any

from cordum.workflow.definition import Workflow, ancestors
from cordum.workflow.runstate import PENDING, SUCCEEDED, Run, base_step

__all__ = ["RerunError", "kept_steps", "rerun_run"]


class RerunError(ValueError):
    """The rerun cannot be built (unknown ``from_step``, a run of another workflow)."""


def kept_steps(workflow: Workflow, old: Run, from_step: str) -> set[str]:
    """Top-level step ids the rerun takes over as done: ancestors of ``from_step`` that succeeded."""
    if not from_step:
        return set()
    if from_step not in workflow.steps:
        known = ", ".join(sorted(workflow.steps))
        raise RerunError(f"from_step {from_step!r} is not a step of workflow {workflow.id} (steps: {known})")
    return {sid for sid in ancestors(workflow, from_step) if old.step(sid).status == SUCCEEDED}


def _context(workflow: Workflow, old: Run, kept: set[str]) -> dict[str, Any]:
    """The old context without the outputs of steps that run again (``ctx.steps[id]`` and the
    value a step wrote at its ``output_path``, unless a kept step writes the same path)."""
    context = copy.deepcopy(dict(old.context))
    steps = context.get("steps")
    if isinstance(steps, dict):
        context["steps"] = {sid: entry for sid, entry in steps.items() if sid in kept}
    kept_paths = {workflow.steps[sid].output_path for sid in kept} - {""}
    for sid, step in workflow.steps.items():
        if sid not in kept and step.output_path and step.output_path not in kept_paths:
            _drop_path(context, step.output_path)
    return context


def _drop_path(target: dict[str, Any], path: str) -> None:
    parts = [p for p in path.split(".") if p]
    for part in parts[:-1]:
        nxt = target.get(part) if isinstance(target, dict) else None
        if not isinstance(nxt, dict):
            return
        target = nxt
    if parts and isinstance(target, dict):
        target.pop(parts[-1], None)


#: run metadata that makes a run a subworkflow child (handlers._spawn writes them)
CHILD_LINKS = frozenset({"parent_run_id", "parent_step_id", "parent_workflow_id", "call_stack"})


def rerun_run(workflow: Workflow, old: Run, *, new_id: str, from_step: str = "", now: float,
              dry_run: bool = False, triggered_by: str = "") -> Run:
    """The pending run that reruns ``old`` from ``from_step`` (RerunError if it is not a step)."""
    if old.workflow_id != workflow.id:
        raise RerunError(f"run {old.id} is a run of workflow {old.workflow_id}, not {workflow.id}")
    kept = kept_steps(workflow, old, from_step)
    steps = {}
    origin: dict[str, str] = {}
    for path, sr in old.steps.items():
        if base_step(path) in kept:
            steps[path] = replace(sr, job_id="", audit_hash="")
            if sr.job_id:
                origin[path] = sr.job_id
    # a rerun stands on its own: it is nobody's subworkflow child, whatever the old run was
    metadata: dict[str, Any] = {k: copy.deepcopy(v) for k, v in old.metadata.items() if k not in CHILD_LINKS}
    metadata["rerun"] = {"run_id": old.id, "from_step": from_step, "kept_jobs": origin}
    return Run(
        id=new_id, workflow_id=old.workflow_id, org_id=old.org_id, team_id=old.team_id,
        input=copy.deepcopy(dict(old.input)), context=_context(workflow, old, kept), status=PENDING,
        steps=steps, triggered_by=triggered_by or old.triggered_by, created_at=now, updated_at=now,
        labels=copy.deepcopy(dict(old.labels)), metadata=metadata, rerun_of=old.id,
        rerun_step=from_step, dry_run=dry_run,
    )
