"""The pure half of the chaos run (cordum/dev/chaos_core.py): fault plan, job mix, verdict; and the
options of scripts/chaos. No servers."""

from __future__ import annotations

import json
import random

import pytest

from cordum.dev.chaos import build_parser
from cordum.dev.chaos_core import (
    FAULT_KINDS,
    PROCESS_FAULTS,
    TARGETS,
    Facts,
    Fault,
    job_spec,
    judge,
    parse_list,
    percentile,
    plan_faults,
)


def test_the_same_seed_gives_the_same_plan_and_another_seed_another():
    assert plan_faults(7, 20) == plan_faults(7, 20)
    assert plan_faults(7, 20) != plan_faults(8, 20)
    assert plan_faults(7, 0) == []


def test_plan_draws_only_the_allowed_kinds_targets_and_replicas():
    plan = plan_faults(3, 200, ("kill", "pause", "nats"), ("scheduler", "worker"), replicas=2, workers=3)
    assert [f.round for f in plan] == list(range(1, 201))
    assert {f.kind for f in plan} == {"kill", "pause", "nats"}
    for fault in plan:
        if fault.kind in PROCESS_FAULTS:
            assert fault.target in ("scheduler", "worker")
            assert 1 <= fault.index <= (3 if fault.target == "worker" else 2)
        else:
            assert (fault.target, fault.index) == ("nats", 0)
    assert {(f.target, f.index) for f in plan if f.kind == "kill"} == {
        ("scheduler", 1), ("scheduler", 2), ("worker", 1), ("worker", 2), ("worker", 3)}


def test_every_kind_and_target_is_drawn_by_default():
    plan = plan_faults(11, 300)
    assert {f.kind for f in plan} == set(FAULT_KINDS)
    assert {f.target for f in plan if f.kind in PROCESS_FAULTS} == set(TARGETS)


def test_fault_labels_name_the_replica():
    assert Fault(1, "kill", "scheduler", 2).label == "kill scheduler-2"
    assert Fault(2, "pause", "api-gateway", 1).replica == "api-gateway-1"
    assert Fault(3, "redis", "redis").label == "restart redis"


def test_a_plan_that_cannot_be_made_is_refused():
    with pytest.raises(ValueError):
        plan_faults(1, 3, ("kill",), ("worker",), workers=0)
    with pytest.raises(ValueError):
        plan_faults(1, 3, ("explode",))
    with pytest.raises(ValueError):
        plan_faults(1, -1)
    with pytest.raises(ValueError):  # kill asked for, nothing to kill
        plan_faults(1, 3, ("kill", "redis"), ("worker",), workers=0)
    assert [f.kind for f in plan_faults(1, 3, ("redis",), ("worker",), workers=0)] == ["redis"] * 3  # no replica needed


def test_lists_take_aliases_and_name_what_is_wrong():
    assert parse_list("kill, SIGTERM,stop,kill", FAULT_KINDS, "fault kind") == ("kill", "term", "pause")
    assert parse_list("gateway,kernel", TARGETS, "target") == ("api-gateway", "safety-kernel")
    with pytest.raises(ValueError, match="'boom'"):
        parse_list("kill,boom", FAULT_KINDS, "fault kind")
    with pytest.raises(ValueError):
        parse_list(" , ", FAULT_KINDS, "fault kind")


def test_parser_defaults_and_errors(capsys):
    opts = build_parser().parse_args([])
    assert opts.rounds == 5 and opts.pause == 35.0 and opts.faults == FAULT_KINDS and not opts.json
    opts = build_parser().parse_args(["--rounds", "2", "--faults", "kill,nats", "--targets", "worker", "--json"])
    assert (opts.rounds, opts.faults, opts.targets, opts.json) == (2, ("kill", "nats"), ("worker",), True)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--faults", "meteor"])
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--pause", "-1"])


def test_job_mix_is_seeded_and_holds_every_kind():
    first = [job_spec(random.Random("jobs:5")) for _ in range(1)]
    rng_a, rng_b = random.Random("jobs:5"), random.Random("jobs:5")
    a = [job_spec(rng_a) for _ in range(400)]
    b = [job_spec(rng_b) for _ in range(400)]
    assert a == b and a[:1] == first
    kinds = {spec.kind for spec in a}
    assert kinds == {"plain", "slow", "retry", "fail"}
    for spec in a:
        if spec.kind == "slow":
            assert 500 <= spec.context["sleep_ms"] <= 3000 and spec.expected == "SUCCEEDED"
        elif spec.kind == "retry":
            assert spec.context == {"fail_attempts": 1} and spec.expected == "SUCCEEDED"
        elif spec.kind == "fail":
            assert spec.context["fail"] is True and spec.expected == "FAILED"
        else:
            assert spec.context == {} and spec.expected == "SUCCEEDED"
    assert sum(1 for s in a if s.kind == "fail") < sum(1 for s in a if s.kind == "plain")  # a few


def test_percentile_is_nearest_rank():
    assert percentile([], 99) is None
    assert percentile([4.0], 99) == 4.0
    assert percentile(range(1, 101), 99) == 99
    assert percentile([3.0, 1.0, 2.0], 99) == 3.0
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0


def _facts(**overrides) -> Facts:
    facts = Facts(
        jobs={"a": "plain", "b": "slow", "c": "retry", "d": "fail", "p": "probe", "x": "denied"},
        states={"a": "SUCCEEDED", "b": "SUCCEEDED", "c": "SUCCEEDED", "d": "FAILED", "p": "SUCCEEDED", "x": "DENIED"},
        executions={"a": 1, "b": 1, "c": 1, "p": 1},
        dlq={"d", "x"},
        faults=[Fault(1, "kill", "scheduler", 1), Fault(2, "redis", "redis"), Fault(3, "kill", "worker", 2)],
        recoveries=[1.5, 4.0, 2.0],
        seed=9,
    )
    for name, value in overrides.items():
        setattr(facts, name, value)
    return facts


def test_a_clean_run_passes():
    summary = judge(_facts())
    assert summary.ok and summary.exit_code == 0
    assert (summary.lost, summary.duplicated, summary.wrong_state, summary.dlq_mismatch) == (0, 0, 0, 0)
    assert summary.rounds == 3 and summary.faults == {"kill": 2, "redis": 1} and summary.jobs == 6
    assert summary.p99_recovery_s == 4.0 and summary.unrecovered == 0
    line = summary.line()
    assert line.startswith("chaos: PASS rounds=3 faults=kill:2,redis:1 jobs=6 lost=0 duplicated=0 wrong_state=0 "
                           "dlq_mismatch=0 p99_recovery_s=4.0")
    assert "\n" not in line
    assert json.loads(json.dumps(summary.as_dict()))["faults"] == {"kill": 2, "redis": 1}


def test_a_job_not_terminal_or_unknown_is_lost():
    summary = judge(_facts(states={**_facts().states, "a": "RUNNING", "b": None}))
    assert summary.lost == 2 and not summary.ok and summary.exit_code == 1
    assert any("unknown to the store" in e for e in summary.examples["lost"])
    assert summary.wrong_state == 0 and summary.dlq_mismatch == 0  # a lost job is counted once


def test_a_second_execution_is_a_duplicate_whatever_the_state():
    summary = judge(_facts(executions={"a": 2, "b": 1, "c": 3, "p": 1}))
    assert summary.duplicated == 2 and summary.lost == 0 and summary.wrong_state == 0
    assert "executed 3 times" in " ".join(summary.examples["duplicated"])


def test_wrong_final_states_and_a_success_without_execution():
    states = {**_facts().states, "a": "TIMEOUT", "d": "SUCCEEDED"}
    summary = judge(_facts(states=states, executions={"b": 1, "c": 1, "p": 0}, dlq={"a", "x"}))
    # a: TIMEOUT instead of SUCCEEDED; d: SUCCEEDED instead of FAILED; p: SUCCEEDED, never executed
    assert summary.wrong_state == 3
    assert summary.dlq_mismatch == 0  # the DLQ matches the states the jobs are in


def test_the_dlq_must_hold_exactly_the_failed_jobs():
    summary = judge(_facts(dlq={"x", "a", "someone-else"}))
    # d (FAILED) is missing, a (SUCCEEDED) should not be there, someone-else is not ours
    assert summary.dlq_mismatch == 3
    assert any("not a job of this run" in e for e in summary.examples["dlq_mismatch"])


def test_unrecovered_rounds_and_errors_are_reported():
    summary = judge(_facts(recoveries=[None, 2.0, None], errors=["round 2: Redis lost its data"]))
    assert summary.unrecovered == 2 and summary.p99_recovery_s == 2.0
    assert summary.ok and summary.exit_code == 2 and summary.line().startswith("chaos: INCOMPLETE")
    assert judge(_facts(recoveries=[None])).p99_recovery_s is None
    assert "p99_recovery_s=n/a" in judge(_facts(recoveries=[None])).line()
