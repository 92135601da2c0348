"""The engine's own step types, I/O half: a mixin of ``WorkflowEngine`` (engine.py keeps the run
lock, persistence, dispatch and results; ``steps.py`` is the pure half that decides).

Inline types finish in the engine's pass (condition, transform, notify, storage, switch); delay,
parallel and loop start here and are moved on later by the engine (``runstate.due_steps``, child
roll-ups). A subworkflow step starts a child run of the same tenant:

1. the step goes ``running`` with ``child_run_id`` and the effect ``StartRun``; the parent is
   persisted first (like a job: persist before publish);
2. carrying the effect out creates the child run (its id derives from the parent run and step
   path, so a second try finds it) and advances it under the child's own lock;
3. whenever the parent advances, each running subworkflow step looks at its child: ended → the step
   completes with ``steps.subworkflow_outcome``; missing (the engine died between 1 and 2) → step
   2 again. The child's final commit wakes the parent (``WorkflowEngine._commit``), the
   reconciler is the safety net;
4. cancelling the step (run cancelled or timed out, a parallel sibling won, …) cancels the child.

Locks are only ever taken parent → child (spawning, cancelling); a child wakes its parent after
releasing its own lock, so two operations never wait for each other.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from cordum.agent.v1.alert_pb2 import SystemAlert
from cordum.infra.bus import Bus
from cordum.protocol import subjects
from cordum.protocol.packets import encode, new_packet
from cordum.runtime.log import get_logger
from cordum.store.workflows import RunExists, WorkflowStore
from cordum.workflow import expr
from cordum.workflow import runstate as rs
from cordum.workflow.definition import FOREACH_MAX_ITEMS, Step, Workflow
from cordum.workflow.runstate import Run
from cordum.workflow.steps import (
    StepError,
    choose_branch,
    delay_due,
    loop_next,
    loop_scope,
    storage_op,
    subworkflow_call,
    subworkflow_outcome,
)

log = get_logger("workflow.handlers")

SENDER = "workflow-engine"


class StepHandlers:
    """The step-type handlers of :class:`cordum.workflow.engine.WorkflowEngine`."""

    store: WorkflowStore
    bus: Bus
    clock: Callable[[], float]

    async def advance(self, run_id: str) -> None:  # WorkflowEngine's
        raise NotImplementedError

    async def cancel_run(self, run_id: str, tenant: str, reason: str = "") -> bool:  # WorkflowEngine's
        raise NotImplementedError

    async def load_run(self, run_id: str) -> Run | None:  # WorkflowEngine's
        raise NotImplementedError

    def _scope(self, workflow: Workflow, run: Run, path: str) -> dict[str, Any]:
        steps = run.context.get("steps") if isinstance(run.context, Mapping) else None
        scope = {"input": run.input, "ctx": run.context, "steps": steps or {}, "item": run.step(path).item}
        loop = loop_scope(workflow, run, path) if "[" in path else None
        if loop is not None:
            scope["loop"] = loop
        return scope

    def _gate_passes(self, workflow: Workflow, run: Run, step: Step, path: str) -> bool:
        try:
            return expr.truthy(expr.evaluate(step.condition, self._scope(workflow, run, path)))
        except Exception as exc:  # a bad pre-gate skips the step rather than hanging the run
            log.warning("workflow.condition_error", run_id=run.id, step=path, error=str(exc))
            return False

    def _expand(self, workflow: Workflow, run: Run, step: Step, path: str,
                now: float) -> tuple[Run, list[rs.Effect]]:
        try:
            items = expr.evaluate(step.for_each, self._scope(workflow, run, path))
        except Exception as exc:
            return rs.complete_step(workflow, run, path, rs.FAILED, None,
                                    {"message": f"for_each: {exc}"}, now)
        if items is None:
            items = []
        if isinstance(items, Mapping):
            items = list(items.values())
        if not isinstance(items, (list, tuple)):
            return rs.complete_step(workflow, run, path, rs.FAILED, None,
                                    {"message": f"for_each: {step.for_each!r} is not a list"}, now)
        if len(items) > FOREACH_MAX_ITEMS:  # every item becomes a step of the run document
            return rs.complete_step(workflow, run, path, rs.FAILED, None, {
                "message": f"for_each: {step.for_each!r} has {len(items)} items; at most {FOREACH_MAX_ITEMS}"}, now)
        return rs.expand_for_each(workflow, run, path, items, now)

    async def _inline(self, workflow: Workflow, run: Run, step: Step, path: str,
                      now: float) -> tuple[Run, list[rs.Effect]]:
        scope = self._scope(workflow, run, path)
        try:
            if step.type == "condition":
                if not step.condition:
                    raise ValueError("condition step without a condition")
                output: Any = expr.truthy(expr.evaluate(step.condition, scope))
            elif step.type == "transform":
                output = expr.render(dict(step.input), scope)
            elif step.type == "notify":
                output = expr.render(dict(step.input), scope)
                await self._notify(run, path, output if isinstance(output, Mapping) else {})
            elif step.type == "switch":
                branch = choose_branch(step, expr.render(dict(step.input), scope),
                                       expr.evaluate(step.condition, scope))
                return rs.take_branch(workflow, run, path, branch.output, branch.not_taken, now)
            elif step.type == "storage":
                context, output = storage_op(run.context, expr.render(dict(step.input), scope))
                return rs.complete_step(workflow, run, path, rs.SUCCEEDED, output, None, now, context=context)
            elif step.type == "parallel":
                return rs.start_parallel(workflow, run, path, now)
            elif step.type == "loop":
                kids = run.step(path).children
                output = loop_next(step, scope, len(kids), run.step(kids[-1]).output if kids else None)
                if output is None:
                    return rs.loop_iterate(workflow, run, path, now)
            elif step.type == "delay":
                due = delay_due(step, scope, now)
                if due > now:
                    return rs.start_delay(workflow, run, path, due, now)
                output = {"due_at": due}
            elif step.type == "subworkflow":
                return await self._start_subworkflow(workflow, run, step, path, scope, now)
            else:
                raise StepError(f"step type {step.type} has no handler")
        except Exception as exc:
            return rs.complete_step(workflow, run, path, rs.FAILED, None, {"message": str(exc)}, now)
        return rs.complete_step(workflow, run, path, rs.SUCCEEDED, output, None, now)

    async def _notify(self, run: Run, path: str, data: Mapping[str, Any]) -> None:
        alert = SystemAlert(
            level=str(data.get("level") or "info"), message=str(data.get("message") or ""),
            code=str(data.get("code") or ""), component=str(data.get("component") or SENDER),
            source_component=SENDER, trace_id=run.id,
            details={"workflow_id": run.workflow_id, "run_id": run.id, "step_id": path, "tenant_id": run.org_id},
        )
        await self.bus.publish(subjects.WORKFLOW_EVENT, encode(new_packet(alert, sender_id=SENDER, trace_id=run.id)))

    # ---- subworkflow ----------------------------------------------------------------------------

    async def _start_subworkflow(self, workflow: Workflow, run: Run, step: Step, path: str,
                                 scope: Mapping[str, Any], now: float) -> tuple[Run, list[rs.Effect]]:
        call = subworkflow_call(run, path, expr.render(step.input.get("workflow_id"), scope),
                                expr.render(step.input.get("input_mapping") or {}, scope))
        if await self.store.get_definition(call.workflow_id, tenant=run.org_id) is None:
            raise StepError(f"subworkflow workflow {call.workflow_id} not found")
        return rs.start_subworkflow(workflow, run, path, call, now)

    async def _look_at_children(self, workflow: Workflow, run: Run, now: float) -> tuple[Run, list[rs.Effect]]:
        """Running subworkflow steps: a child run that ended completes its step; a missing one is
        created again (same id)."""
        effects: list[rs.Effect] = []
        for path, sr in list(run.steps.items()):
            if sr.status != rs.RUNNING or not sr.child_run_id or run.terminal:
                continue
            child = await self.load_run(sr.child_run_id)
            if child is None:
                inp = sr.input if isinstance(sr.input, Mapping) else {}
                effects.append(subworkflow_call(run, path, inp.get("workflow_id"), inp.get("input")))
                continue
            if not child.terminal:
                continue
            try:
                status, output, error = subworkflow_outcome(rs.step_for_path(workflow, path)[0], child,
                                                            self._scope(workflow, run, path))
            except Exception as exc:  # e.g. an output_mapping that does not render
                status, output, error = rs.FAILED, None, {"message": f"output_mapping: {exc}",
                                                          "child_run_id": child.id}
            run, fx = rs.complete_step(workflow, run, path, status, output, error, now)
            effects += fx
        return run, effects

    async def _spawn(self, parent: Run, call: rs.StartRun) -> None:
        """Create a subworkflow's child run (once) and advance it. A definition deleted meanwhile
        gives a child that failed at once, so the parent's step fails instead of waiting."""
        doc = await self.store.get_definition(call.workflow_id, tenant=parent.org_id)
        now = self.clock()
        gone: dict[str, Any] = {} if doc is not None else {
            "status": rs.FAILED, "completed_at": now, "error": {"message": f"workflow {call.workflow_id} not found"}}
        child = Run(id=call.run_id, workflow_id=call.workflow_id, org_id=parent.org_id,
                    team_id=str((doc or {}).get("team_id") or ""), input=dict(call.input),
                    metadata={**call.metadata, **_starter(parent)}, dry_run=parent.dry_run, triggered_by=f"workflow:{parent.id}",
                    created_at=now, updated_at=now, **gone)
        try:
            await self.store.create_run(child.to_dict(), tenant=parent.org_id, definition=doc)
            await self.store.append_timeline(child.id, {"type": "run_created", "at": now, "status": child.status,
                                                        "data": {"parent_run_id": parent.id}})
        except RunExists:
            pass  # created by an earlier try; advancing it again is harmless
        try:
            await self.advance(child.id)
        except Exception as exc:  # the reconciler advances pending runs
            log.warning("workflow.child_advance_failed", run_id=child.id, parent_run_id=parent.id, error=repr(exc))

    async def _cancel_child(self, parent: Run, effect: rs.CancelRun) -> None:
        try:
            await self.cancel_run(effect.run_id, parent.org_id, effect.reason)
        except Exception as exc:  # cancel_strays repeats it for the ended parent
            log.warning("workflow.child_cancel_failed", run_id=effect.run_id, parent_run_id=parent.id,
                        error=repr(exc))


def _starter(parent: Run) -> dict[str, Any]:
    """A child run's gates are guarded against the parent run's starter too."""
    starter = parent.metadata.get("started_by")
    return {"started_by": dict(starter)} if isinstance(starter, Mapping) else {}
