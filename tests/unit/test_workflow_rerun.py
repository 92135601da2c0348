"""Rerun from a step (cordum/workflow/rerun.py): the new run takes over exactly the succeeded
ancestors of the step, and the pure state machine then starts only what must run again."""

from __future__ import annotations

import pytest

from cordum.workflow import runstate as rs
from cordum.workflow.definition import parse_workflow
from cordum.workflow.rerun import RerunError, kept_steps, rerun_run
from cordum.workflow.runstate import Run, StepRun

NOW = 1_900_000_000.0


def workflow():
    # a → b → c ; d alone ; e after c
    return parse_workflow({"id": "wf1", "steps": {
        "a": {"topic": "job.t", "output_path": "fetched", "for_each": "input.items"},
        "b": {"topic": "job.t", "depends_on": ["a"], "output_path": "decided.value"},
        "c": {"topic": "job.t", "depends_on": ["b"], "output_path": "acted"},
        "d": {"topic": "job.t"},
        "e": {"topic": "job.t", "depends_on": ["c"]},
    }})


def done(path: str, job: str = "", **kw) -> StepRun:
    return StepRun(step_id=path, status=rs.SUCCEEDED, attempts=1, job_id=job, audit_hash="h" if job else "",
                   started_at=NOW - 50, completed_at=NOW - 40, **kw)


def old_run(**overrides) -> Run:
    steps = {
        "a": done("a", children=("a[0]", "a[1]"), resolved_items=(1, 2), output=[10, 20]),
        "a[0]": done("a[0]", "old:a[0]@1", item=1, output=10),
        "a[1]": done("a[1]", "old:a[1]@1", item=2, output=20),
        "b": done("b", "old:b@1", output={"ok": True}),
        "c": StepRun(step_id="c", status=rs.FAILED, attempts=1, job_id="old:c@1", error={"message": "boom"}),
        "d": done("d", "old:d@1", output="d-out"),
        "e": StepRun(step_id="e", status=rs.SKIPPED, skip_reason="dependency c failed"),
    }
    context = {
        "steps": {"a": {"output": [10, 20]}, "b": {"output": {"ok": True}, "result_ptr": "redis://res:old:b@1"},
                  "d": {"output": "d-out"}, "c": {"output": None}},
        "fetched": [10, 20], "decided": {"value": {"ok": True}, "note": "kept"}, "acted": "partial",
    }
    fields = dict(id="old", workflow_id="wf1", org_id="acme", team_id="t1", input={"items": [1, 2], "n": {"x": 1}},
                  context=context, status=rs.FAILED, steps=steps, triggered_by="alice", created_at=NOW - 60,
                  started_at=NOW - 59, completed_at=NOW - 30, error={"message": "step c failed"},
                  labels={"env": "prod"}, metadata={"source": "cli"}, idempotency_key="k1")
    fields.update(overrides)
    return Run(**fields)


def test_rerun_from_a_step_keeps_its_succeeded_ancestors_only() -> None:
    wf, old = workflow(), old_run()
    new = rerun_run(wf, old, new_id="new", from_step="c", now=NOW, triggered_by="bob")

    assert (new.id, new.workflow_id, new.org_id, new.team_id) == ("new", "wf1", "acme", "t1")
    assert (new.status, new.rerun_of, new.rerun_step, new.dry_run) == ("pending", "old", "c", False)
    assert (new.created_at, new.updated_at, new.started_at, new.completed_at) == (NOW, NOW, None, None)
    assert new.error is None and new.output is None and new.idempotency_key == ""
    assert new.triggered_by == "bob" and new.labels == {"env": "prod"}
    assert new.input == old.input and new.input is not old.input

    # a (with its for_each children) and b are done; c, d, e run again
    assert set(new.steps) == {"a", "a[0]", "a[1]", "b"}
    assert new.step("b").status == "succeeded" and new.step("b").output == {"ok": True}
    assert new.step("a").children == ("a[0]", "a[1]") and new.step("a[1]").item == 2
    # the old run's jobs stay the old run's: ids and audit hashes are not copied, only recorded
    assert all(sr.job_id == "" and sr.audit_hash == "" for sr in new.steps.values())
    assert new.metadata == {"source": "cli", "rerun": {
        "run_id": "old", "from_step": "c", "kept_jobs": {"a[0]": "old:a[0]@1", "a[1]": "old:a[1]@1", "b": "old:b@1"}}}

    # the context keeps the kept steps' outputs and drops the others' (ctx.steps and output_path)
    assert new.context == {
        "steps": {"a": {"output": [10, 20]}, "b": {"output": {"ok": True}, "result_ptr": "redis://res:old:b@1"}},
        "fetched": [10, 20], "decided": {"value": {"ok": True}, "note": "kept"},
    }
    assert old.context["acted"] == "partial" and "d" in old.context["steps"]  # the old run is untouched


def test_the_rerun_dispatches_only_what_must_run_again() -> None:
    wf = workflow()
    new = rerun_run(wf, old_run(), new_id="new", from_step="c", now=NOW)
    run, _ = rs.start(new, NOW, wf)
    assert sorted(rs.next_dispatches(wf, run, NOW)) == ["c", "d"]
    # the document round-trips through the store's JSON form
    assert Run.from_dict(new.to_dict()) == new
    assert new.to_dict()["rerun_of"] == "old" and new.to_dict()["rerun_step"] == "c"


def test_rerun_without_a_step_runs_everything_again() -> None:
    wf = workflow()
    new = rerun_run(wf, old_run(), new_id="new", now=NOW, dry_run=True)
    assert new.steps == {} and new.rerun_step == "" and new.dry_run
    assert new.context == {"steps": {}, "decided": {"note": "kept"}}
    assert new.triggered_by == "alice"  # nobody named: the old run's
    run, _ = rs.start(new, NOW, wf)
    assert sorted(rs.next_dispatches(wf, run, NOW)) == ["a", "d"]


def test_an_ancestor_that_did_not_succeed_runs_again() -> None:
    wf = workflow()
    old = old_run()
    failed_b = StepRun(step_id="b", status=rs.FAILED, attempts=2, job_id="old:b@2", error={"message": "x"})
    old = Run(**{**{f: getattr(old, f) for f in old.__dataclass_fields__}, "steps": {**old.steps, "b": failed_b}})
    assert kept_steps(wf, old, "c") == {"a"}
    assert kept_steps(wf, old, "e") == {"a"}
    assert kept_steps(wf, old, "a") == set()
    new = rerun_run(wf, old, new_id="new", from_step="e", now=NOW)
    assert set(new.steps) == {"a", "a[0]", "a[1]"}
    assert "b" not in new.context["steps"] and "value" not in new.context["decided"]


def test_a_shared_output_path_of_a_kept_step_survives() -> None:
    wf = parse_workflow({"id": "wf1", "steps": {
        "a": {"topic": "job.t", "output_path": "result"},
        "b": {"topic": "job.t", "depends_on": ["a"], "output_path": "result"},
    }})
    old = Run(id="old", workflow_id="wf1", status=rs.FAILED, context={"result": "from-a", "steps": {}},
              steps={"a": done("a", "old:a@1"), "b": StepRun(step_id="b", status=rs.FAILED)})
    assert rerun_run(wf, old, new_id="n", from_step="b", now=NOW).context["result"] == "from-a"


def test_bad_reruns_are_named() -> None:
    wf = workflow()
    with pytest.raises(RerunError, match=r"from_step 'nope' is not a step of workflow wf1 \(steps: a, b, c, d, e\)"):
        rerun_run(wf, old_run(), new_id="n", from_step="nope", now=NOW)
    with pytest.raises(RerunError, match="from_step 'a\\[0\\]'"):
        rerun_run(wf, old_run(), new_id="n", from_step="a[0]", now=NOW)
    with pytest.raises(RerunError, match="run old is a run of workflow other, not wf1"):
        rerun_run(wf, old_run(workflow_id="other"), new_id="n", from_step="c", now=NOW)
