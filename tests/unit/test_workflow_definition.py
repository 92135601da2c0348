"""Workflow definitions: parsing, validation errors, DAG helpers (pure, no servers)."""

from __future__ import annotations

import json
import random

import pytest

from cordum.workflow.definition import (
    MAX_STEPS,
    DefinitionError,
    RetryPolicy,
    Workflow,
    ancestors,
    descendants,
    parse_workflow,
    ready_steps,
    subworkflow_cycle,
    topological_order,
)

EXAMPLE_YAML = """\
id: triage
name: Triage incidents
version: 1
timeout_sec: 3600
steps:
  fetch:
    type: worker
    topic: job.echo
    input:
      tickets: ${input.tickets}
  decide:
    type: condition
    depends_on: [fetch]
    condition: length(steps.fetch.output.items) > 0
  approve:
    type: approval
    depends_on: [decide]
    input:
      summary: "act on ${length(steps.fetch.output.items)} tickets"
  act:
    type: worker
    topic: job.echo
    depends_on: [approve]
    for_each: steps.fetch.output.items
    max_parallel: 4
    input:
      ticket: ${item}
    retry:
      max_retries: 2
      initial_backoff_sec: 0.5
    on_error: cleanup
  cleanup:
    type: transform
    input:
      note: cleaned
  notify:
    type: notify
    depends_on: [act]
    input:
      level: info
      message: done
"""


def example_dict() -> dict:
    return {
        "id": "triage",
        "name": "Triage incidents",
        "steps": {
            "fetch": {
                "type": "worker",
                "topic": "job.echo",
                "input": {"tickets": "${input.tickets}"},
            },
            "decide": {
                "type": "condition",
                "depends_on": ["fetch"],
                "condition": "length(steps.fetch.output.items) > 0",
            },
            "approve": {"type": "approval", "depends_on": ["decide"]},
            "act": {
                "type": "worker",
                "topic": "job.echo",
                "depends_on": ["approve"],
                "for_each": "steps.fetch.output.items",
                "max_parallel": 4,
                "on_error": "cleanup",
            },
            "cleanup": {"type": "transform"},
            "notify": {"type": "notify", "depends_on": ["act"]},
        },
    }


def err(source, **kw) -> DefinitionError:
    with pytest.raises(DefinitionError) as info:
        parse_workflow(source, **kw)
    return info.value


# --- valid inputs ------------------------------------------------------------------------------
def test_yaml_example_parses() -> None:
    wf = parse_workflow(EXAMPLE_YAML, origin="triage.yaml")
    assert wf.id == "triage" and wf.version == "1" and wf.timeout_sec == 3600
    assert list(wf.steps) == ["fetch", "decide", "approve", "act", "cleanup", "notify"]
    act = wf.steps["act"]
    assert act.for_each == "steps.fetch.output.items" and act.max_parallel == 4
    assert act.retry == RetryPolicy(max_retries=2, initial_backoff_sec=0.5)
    assert act.depends_on == ("approve",) and act.dispatches
    assert wf.steps["approve"].input == {
        "summary": "act on ${length(steps.fetch.output.items)} tickets"
    }


def test_json_text_bytes_and_mapping_agree() -> None:
    data = example_dict()
    a = parse_workflow(data)
    b = parse_workflow(json.dumps(data))
    c = parse_workflow(json.dumps(data).encode())
    d = Workflow.from_mapping(data)
    assert a == b == c == d
    assert a.steps["fetch"].type == "worker"


def test_list_steps_normalise_to_map() -> None:
    data = example_dict()
    listed = dict(data, steps=[dict(step, id=sid) for sid, step in data["steps"].items()])
    assert parse_workflow(listed) == parse_workflow(data)
    yaml_list = (
        "id: w\nsteps:\n  - id: a\n    topic: t\n  - id: b\n    topic: t\n    depends_on: a\n"
    )
    wf = parse_workflow(yaml_list)
    assert list(wf.steps) == ["a", "b"] and wf.steps["b"].depends_on == ("a",)


def test_to_json_round_trip() -> None:
    wf = parse_workflow(EXAMPLE_YAML)
    text = wf.to_json()
    again = parse_workflow(text)
    assert again == wf and again.to_json() == text
    doc = json.loads(text)
    assert isinstance(doc["steps"], dict) and doc["steps"]["act"]["retry"]["max_retries"] == 2
    assert "worker_id" not in doc["steps"]["act"]  # empty fields omitted, as Go's omitempty
    full = dict(
        example_dict(),
        org_id="o",
        team_id="t",
        created_by="me",
        created_at="2026-01-01T00:00:00Z",
        updated_at="2026-01-02T00:00:00Z",
        config={"k": 1},
        input_schema={"type": "object"},
        parameters=[{"name": "p"}],
        description="d",
    )
    wf2 = parse_workflow(full)
    assert parse_workflow(wf2.to_json()) == wf2 and wf2.created_at == "2026-01-01T00:00:00Z"


def test_yaml_timestamps_stay_text() -> None:
    wf = parse_workflow(
        "id: w\ncreated_at: 2026-01-01T00:00:00Z\nsteps:\n  d:\n    type: delay\n"
        "    delay_until: 2026-05-01T10:00:00Z\n"
    )
    assert wf.created_at == "2026-01-01T00:00:00Z"
    assert wf.steps["d"].delay_until == "2026-05-01T10:00:00Z"


def test_retry_backoff() -> None:
    r = RetryPolicy(max_retries=3, initial_backoff_sec=1, max_backoff_sec=3, multiplier=2)
    assert [r.backoff(n) for n in (1, 2, 3, 4)] == [1, 2, 3, 3]
    assert RetryPolicy(multiplier=1).backoff(3) == 4  # multiplier ≤ 1 → 2 (§2.8)


# --- errors ------------------------------------------------------------------------------------
def test_unknown_step_field_names_line_step_and_field() -> None:
    text = "id: w\nsteps:\n  fetch:\n    type: worker\n    topc: job.echo\n"
    e = err(text, origin="flow.yaml")
    assert e.line == 5 and e.step == "fetch" and e.field == "topc"
    assert str(e).startswith("flow.yaml:5: step 'fetch': field 'topc': unknown step field")
    assert "did you mean 'topic'" in str(e)


def test_unknown_fields_elsewhere() -> None:
    assert "unknown workflow field" in str(
        err({"id": "w", "stepz": {}, "steps": {"a": {"topic": "t"}}})
    )
    e = err({"id": "w", "steps": {"a": {"topic": "t", "retry": {"max_retry": 1}}}})
    assert e.field == "max_retry" and "did you mean 'max_retries'" in str(e)
    e = err({"id": "w", "steps": {"a": {"topic": "t", "meta": {"pak_id": "x"}}}})
    assert e.field == "pak_id"


def test_unknown_depends_on() -> None:
    text = "id: w\nsteps:\n  a:\n    topic: t\n  b:\n    topic: t\n    depends_on: [a, fetsh]\n"
    e = err(text, origin="w.yaml")
    assert e.step == "b" and e.field == "depends_on" and e.line == 7
    assert "dependency 'fetsh' is not a step of this workflow" in str(e)


def test_self_dependency_and_on_error_targets() -> None:
    e = err({"id": "w", "steps": {"a": {"topic": "t", "depends_on": ["a"]}}})
    assert "refers to the step itself" in str(e)
    e = err({"id": "w", "steps": {"a": {"topic": "t", "on_error": "nope"}}})
    assert e.field == "on_error" and "'nope' is not a step" in str(e)


def test_cycle_path_is_reported() -> None:
    data = {
        "id": "w",
        "steps": {
            "a": {"topic": "t", "depends_on": ["c"]},
            "b": {"topic": "t", "depends_on": ["a"]},
            "c": {"topic": "t", "depends_on": ["b"]},
            "d": {"topic": "t"},
        },
    }
    e = err(data)
    assert "dependency cycle: a → c → b → a" in str(e) and e.step == "a"


@pytest.mark.parametrize("bad", ["", "-lead", "has space", "a:b", "x@1", "a[0]", "é", "x" * 65])
def test_bad_ids(bad: str) -> None:
    e = err({"id": bad, "steps": {"a": {"topic": "t"}}})
    assert e.field == "id"
    e = err({"id": "w", "steps": {bad: {"topic": "t"}}})
    assert e.field == "id" and "step id" in str(e)


def test_good_ids() -> None:
    assert parse_workflow({"id": "A.b_c-9", "steps": {"x" * 64: {"topic": "t"}}}).id == "A.b_c-9"


def test_limits() -> None:
    too_many = {"id": "w", "steps": {f"s{i}": {"topic": "t"} for i in range(MAX_STEPS + 1)}}
    assert f"the limit is {MAX_STEPS}" in str(err(too_many))
    for fld, value in (("max_parallel", -1), ("timeout_sec", -5), ("delay_sec", -1)):
        e = err({"id": "w", "steps": {"a": {"topic": "t", fld: value}}})
        assert e.field == fld and "must not be negative" in str(e)
    e = err({"id": "w", "steps": {"a": {"topic": "t", "retry": {"max_retries": -1}}}})
    assert e.field == "max_retries"
    e = err({"id": "w", "steps": {"a": {"topic": "t", "max_parallel": 1.5}}})
    assert "must be an integer" in str(e)
    e = err({"id": "w", "timeout_sec": -1, "steps": {"a": {"topic": "t"}}})
    assert e.field == "timeout_sec" and e.step is None
    assert "at least one step" in str(err({"id": "w", "steps": {}}))


def test_type_requirements() -> None:
    def problem(step: dict) -> str:
        return str(err({"id": "w", "steps": {"a": step, "b": {"topic": "t"}, "c": {"topic": "t"}}}))

    assert "unknown step type 'wroker'" in problem({"type": "wroker"})
    assert "needs a topic" in problem({"type": "llm"})
    assert "needs a condition" in problem({"type": "condition"})
    assert "needs delay_sec" in problem({"type": "delay"})
    assert "RFC3339" in problem({"type": "delay", "delay_until": "tomorrow"})
    assert "RFC3339" in problem({"type": "delay", "delay_until": "2026-05-01T10:00:00"})
    assert "input.cases" in problem({"type": "switch", "condition": "input.x"})
    assert "needs a condition" in problem({"type": "switch", "input": {"cases": {"1": "b"}}})
    assert "switch target 'zz'" in problem(
        {"type": "switch", "condition": "input.x", "input": {"cases": [{"when": 1, "next": "zz"}]}}
    )
    assert "input.steps" in problem({"type": "parallel"})
    assert "parallel child 'q'" in problem({"type": "parallel", "input": {"steps": ["b", "q"]}})
    assert "input.strategy" in problem(
        {"type": "parallel", "input": {"steps": ["b"], "strategy": "most"}}
    )
    assert "between 1 and 2" in problem(
        {"type": "parallel", "input": {"steps": ["b", "c"], "strategy": "n_of_m", "required": 3}}
    )
    assert "body_step" in problem({"type": "loop"})
    assert "loop body 'q'" in problem({"type": "loop", "input": {"body_step": "q"}})
    assert "max_iterations" in problem(
        {"type": "loop", "input": {"body_step": "b", "max_iterations": 0}}
    )
    assert "from 1 to 10000" in problem(
        {"type": "loop", "input": {"body_step": "b", "max_iterations": 10_001}}
    )
    assert "input.workflow_id" in problem({"type": "subworkflow"})
    assert "input.input_mapping must be a mapping, got a list" in problem(
        {"type": "subworkflow", "input": {"workflow_id": "other", "input_mapping": [1]}}
    )
    assert "circular workflow reference" in problem(
        {"type": "subworkflow", "input": {"workflow_id": "w"}}
    )
    assert "input.operation" in problem(
        {"type": "storage", "input": {"operation": "move", "key": "k"}}
    )
    assert "policy_gate" in problem({"topic": "t", "policy_gate": "maybe"})


def test_valid_special_steps() -> None:
    wf = parse_workflow(
        {
            "id": "w",
            "steps": {
                "b": {"topic": "t"},
                "c": {"topic": "t"},
                "par": {
                    "type": "parallel",
                    "input": {"steps": ["b", "c"], "strategy": "n_of_m", "required": 1},
                },
                "e": {"type": "transform", "input": {"n": "${loop.index}"}},
                "loop": {"type": "loop", "input": {"body": "e", "until": "loop.index >= 3"}},
                "sw": {
                    "type": "switch",
                    "condition": "input.x",
                    "input": {"cases": {"1": "yes"}, "default": "no"},
                },
                "yes": {"topic": "t", "depends_on": ["sw"]},
                "no": {"topic": "t", "depends_on": ["yes2"]},
                "yes2": {"type": "notify", "depends_on": ["sw"]},
                "d": {"type": "delay", "delay_sec": 5},
                "sub": {"type": "subworkflow", "input": {"workflow_id": "other"}},
                "st": {
                    "type": "storage",
                    "input": {"operation": "write", "key": "a.b", "value": 1},
                },
            },
        }
    )
    assert wf.steps["loop"].owned() == ("e",) and wf.steps["par"].owned() == ("b", "c")


def test_switch_rules() -> None:
    def problem(extra: dict) -> DefinitionError:
        sw = {"type": "switch", "condition": "input.x", "input": {"cases": [{"when": 1, "next": "b"}],
                                                                    "default": "c"}}
        return err({"id": "w", "steps": {"sw": sw, "b": {"topic": "t", "depends_on": ["sw"]},
                                         "c": {"topic": "t"}, **extra}})

    e = problem({})
    assert e.step == "sw" and "switch target 'c' must depend on this switch" in str(e)
    e = problem({"c": {"topic": "t", "depends_on": ["b"]}, "sw2": {
        "type": "switch", "condition": "input.x", "for_each": "input.items",
        "input": {"cases": {"1": "b"}}}})
    assert e.step == "sw2" and e.field == "for_each"
    for kind, inp in (("parallel", {"steps": ["b"]}), ("loop", {"body_step": "b"})):
        e = err({"id": "w", "steps": {"p": {"type": kind, "for_each": "input.items", "input": inp},
                                      "b": {"topic": "t"}}})
        assert e.field == "for_each" and f"a {kind} step cannot have for_each" in str(e)


def test_text_errors() -> None:
    e = err("id: w\nsteps: [\n", origin="x.yaml")
    assert "invalid YAML" in str(e) and e.line is not None
    assert "invalid JSON" in str(err('{"id": "w",', origin="x.json"))
    assert "duplicate key 'id'" in str(err("id: a\nid: b\nsteps: {}\n"))
    assert "must be a mapping" in str(err("- 1\n- 2\n"))
    e = err("id: w\nsteps:\n  a:\n    topic: t\n    max_parallel: lots\n")
    assert e.line == 5 and "must be an integer, got string" in str(e)


def test_expression_and_template_errors() -> None:
    text = "id: w\nsteps:\n  a:\n    type: condition\n    condition: 'input.x =='\n"
    e = err(text, origin="w.yaml")
    assert e.step == "a" and e.field == "condition" and e.line == 5 and "bad expression" in str(e)
    e = err({"id": "w", "steps": {"a": {"topic": "t", "for_each": "items["}}})
    assert e.field == "for_each"
    e = err({"id": "w", "steps": {"a": {"topic": "t", "input": {"x": "${oops"}}}})
    assert e.field == "input" and "bad template" in str(e)
    e = err({"id": "w", "steps": {"a": {"topic": "t", "route_labels": {"x": "${"}}}})
    assert e.field == "route_labels"
    e = err(
        {
            "id": "w",
            "steps": {
                "b": {"topic": "t"},
                "l": {"type": "loop", "input": {"body_step": "b", "while": "&&"}},
            },
        }
    )
    assert "input.while" in str(e)


# --- DAG helpers -------------------------------------------------------------------------------
def test_topological_order() -> None:
    wf = parse_workflow(EXAMPLE_YAML)
    order = topological_order(wf)
    assert order == ["fetch", "decide", "approve", "act", "cleanup", "notify"]
    for sid, step in wf.steps.items():
        assert all(order.index(d) < order.index(sid) for d in step.depends_on)
    diamond = parse_workflow(
        {
            "id": "w",
            "steps": {
                "d": {"topic": "t", "depends_on": ["b", "c"]},
                "c": {"topic": "t", "depends_on": ["a"]},
                "b": {"topic": "t", "depends_on": ["a"]},
                "a": {"topic": "t"},
            },
        }
    )
    assert topological_order(diamond) == ["a", "c", "b", "d"]


def test_ready_steps_basic() -> None:
    wf = parse_workflow(EXAMPLE_YAML)
    assert ready_steps(wf, {}) == ["fetch"]
    assert ready_steps(wf, {"fetch": "running"}) == []
    assert ready_steps(wf, {"fetch": "succeeded"}) == ["decide"]
    assert ready_steps(wf, {"fetch": "succeeded", "decide": "pending"}) == ["decide"]
    assert ready_steps(wf, {"fetch": "failed"}) == []
    done = {"fetch": "succeeded", "decide": "succeeded", "approve": "succeeded", "act": "succeeded"}
    assert ready_steps(wf, done) == ["notify"]  # cleanup is an unactivated on_error target
    assert ready_steps(wf, {**done, "act[0]": "failed"}) == ["notify"]  # children ignored


def test_ready_steps_on_error() -> None:
    wf = parse_workflow(EXAMPLE_YAML)
    base = {"fetch": "succeeded", "decide": "succeeded", "approve": "succeeded"}
    for status in ("failed", "denied", "timed_out"):
        assert ready_steps(wf, {**base, "act": status}) == ["cleanup"]  # activated, deps bypassed
        assert ready_steps(wf, {**base, "act": status, "cleanup": "running"}) == []
        assert ready_steps(wf, {**base, "act": status, "cleanup": "succeeded"}) == ["notify"]
        assert ready_steps(wf, {**base, "act": status, "cleanup": "failed"}) == []
    assert ready_steps(wf, {**base, "act": "cancelled", "cleanup": "succeeded"}) == []


def test_ready_steps_leaves_owned_children_to_parent() -> None:
    wf = parse_workflow(
        {
            "id": "w",
            "steps": {
                "b": {"topic": "t"},
                "c": {"topic": "t"},
                "par": {"type": "parallel", "input": {"steps": ["b", "c"]}},
            },
        }
    )
    assert ready_steps(wf, {}) == ["par"]


def test_descendants_and_ancestors() -> None:
    wf = parse_workflow(EXAMPLE_YAML)
    assert descendants(wf, "decide") == {"approve", "act", "notify"}
    assert descendants(wf, "notify") == set()
    assert ancestors(wf, "act") == {"approve", "decide", "fetch"}
    with pytest.raises(KeyError):
        descendants(wf, "nope")


def test_subworkflow_cycle() -> None:
    assert subworkflow_cycle(["root", "child"], "root")
    assert not subworkflow_cycle(["root", "child"], "grandchild")
    assert not subworkflow_cycle([], "root")


def test_lines_for_list_steps_and_json_text() -> None:
    text = "id: w\nsteps:\n  - id: a\n    topic: t\n  - id: b\n    topic: t\n    on_eror: a\n"
    e = err(text, origin="l.yaml")
    assert (e.line, e.step, e.field) == (7, "b", "on_eror")
    as_json = json.dumps(
        {"id": "w", "steps": {"a": {"topic": "t"}, "b": {"topic": "t", "depends_on": ["zz"]}}},
        indent=2,
    )
    e = err(as_json, origin="w.json")
    assert e.step == "b" and e.line is not None and str(e).startswith(f"w.json:{e.line}: step 'b'")
    assert '"zz"' in as_json.splitlines()[e.line - 1]  # the offending item's own line


def test_empty_optionals_round_trip() -> None:
    data = {
        "id": "w",
        "config": {},
        "parameters": [],
        "input_schema": None,
        "steps": {"a": {"topic": "t", "input": {}, "meta": {}, "output_schema": {}, "retry": {}}},
    }
    wf = parse_workflow(data)
    assert wf.config is None and wf.parameters is None and wf.steps["a"].output_schema is None
    assert wf.steps["a"].retry is None  # an empty retry{} is no retry policy
    assert parse_workflow(wf.to_json()) == wf


def test_id_with_trailing_newline_is_refused() -> None:
    assert err({"id": "w\n", "steps": {"a": {"topic": "t"}}}).field == "id"


def test_ownership_rules() -> None:
    e = err(
        {
            "id": "w",
            "steps": {
                "b": {"topic": "t", "depends_on": ["par"]},
                "par": {"type": "parallel", "input": {"steps": ["b"]}},
            },
        }
    )
    assert e.step == "b" and e.field == "depends_on" and "run by parallel step 'par'" in str(e)
    e = err(
        {
            "id": "w",
            "steps": {
                "a": {"topic": "t", "depends_on": ["b"]},
                "b": {"topic": "t"},
                "par": {"type": "parallel", "depends_on": ["a"], "input": {"steps": ["b"]}},
            },
        }
    )
    assert e.step == "par" and "deadlock" in str(e)
    e = err(
        {
            "id": "w",
            "steps": {
                "h": {"topic": "t"},
                "b": {"topic": "t", "on_error": "h"},
                "loop": {"type": "loop", "input": {"body_step": "b"}},
            },
        }
    )
    assert e.step == "b" and e.field == "on_error" and "cannot have on_error" in str(e)
    e = err({"id": "w", "steps": {"b": {"topic": "t"}, "par": {
        "type": "parallel", "input": {"steps": ["b"], "max_parallel": -1}}}})
    assert "input.max_parallel" in str(e)
    e = err({"id": "w", "steps": {"b": {"topic": "t"}, "par": {"type": "parallel", "input": {"steps": ["b"]}},
                                  "loop": {"type": "loop", "input": {"body_step": "par"}}}})
    assert e.step == "loop" and "a loop body cannot be a parallel step" in str(e)
    e = err(
        {
            "id": "w",
            "steps": {
                "b": {"topic": "t"},
                "p1": {"type": "parallel", "input": {"steps": ["b"]}},
                "p2": {"type": "loop", "input": {"body_step": "b"}},
            },
        }
    )
    assert e.step == "p2" and "already run by 'p1'" in str(e)


def test_random_dags_property() -> None:
    """Seeded random DAGs: order respects deps, round trip is exact, ready/descendants agree."""
    rng = random.Random(9)
    for _ in range(200):
        n = rng.randint(1, 25)
        ids = [f"s{i}" for i in range(n)]
        rng.shuffle(ids)  # definition order ≠ dependency order
        rank = {sid: i for i, sid in enumerate(sorted(ids, key=lambda s: int(s[1:])))}
        steps = {}
        for sid in ids:
            earlier = [d for d in ids if rank[d] < rank[sid]]
            deps = rng.sample(earlier, k=min(len(earlier), rng.randint(0, 3)))
            steps[sid] = {"topic": "t", "depends_on": deps}
        wf = parse_workflow({"id": "w", "steps": steps})
        assert parse_workflow(wf.to_json()) == wf
        order = topological_order(wf)
        assert sorted(order) == sorted(ids)
        pos = {sid: i for i, sid in enumerate(order)}
        for sid, step in wf.steps.items():
            assert all(pos[d] < pos[sid] for d in step.depends_on)
        # running the order one step at a time, each step is ready exactly when its turn comes
        statuses: dict[str, str] = {}
        for sid in order:
            assert sid in ready_steps(wf, statuses)
            statuses[sid] = "succeeded"
        assert ready_steps(wf, statuses) == []
        a, b = rng.choice(ids), rng.choice(ids)
        assert (b in descendants(wf, a)) == (a in ancestors(wf, b))
